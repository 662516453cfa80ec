"""Parity of an exported package against the PyTorch reference, runner by runner.

Every runner (the reference, ONNX Runtime, TensorRT when a GPU is there) is a `Runtime` over the
same inputs. With the exit disabled and the routers probed at every candidate layer, every stage is
comparable: visual embeddings, each segment's hidden states, router logits, the final logits.
Then the dynamic policy is run: exit layers and greedy tokens must agree; a router margin so small
that precision could flip it is a *near tie*, listed apart from real disagreements.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engines.policy import GenerationConfig
from engines.core.errors import DyVTEError

# Per precision; override with a JSON file (`--thresholds`). Errors are measured on float32 copies.
DEFAULT_THRESHOLDS = {
    "fp32": {"logits_max_abs": 1e-3, "stage_max_rel": 1e-4, "min_cosine": 0.99999, "near_tie": 1e-4,
             "token_agreement": 1.0, "exit_layer_agreement": 1.0},
    "fp16": {"logits_max_abs": 0.25, "stage_max_rel": 2e-2, "min_cosine": 0.999, "near_tie": 5e-2,
             "token_agreement": 0.9, "exit_layer_agreement": 1.0},
    # weight-only quantized packages are judged by what quantization may change: greedy tokens and
    # exit layers against the fp32 reference (answer accuracy: `python -m validation accuracy
    # --precision`); logits and stages only catch gross breakage (measured on the built-in VILA:
    # see README "Quantized packages")
    "int8": {"logits_max_abs": 0.5, "stage_max_rel": 0.1, "min_cosine": 0.995, "near_tie": 0.1,
             "token_agreement": 0.9, "exit_layer_agreement": 1.0},
    "int4": {"logits_max_abs": 3.0, "stage_max_rel": 0.3, "min_cosine": 0.7, "near_tie": 0.5,
             "token_agreement": 0.75, "exit_layer_agreement": 1.0},
}


@dataclass
class RunnerOutput:
    """What one runner produced for every sample."""

    stages: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per sample: stage -> tensor
    probe_logits: list[dict[int, list[float]]] = field(default_factory=list)
    exit_layers: list[int | None] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0


def run_runner(runtime, prompts, max_new_tokens: int, dynamic: bool, chunk: int = 4) -> RunnerOutput:
    """Every sample's stages, router logits, exits and tokens, `chunk` samples at a time (memory:
    one chunk's activations and caches at once; each stage is kept once, as float32 on the CPU,
    because it is what `compare` compares)."""
    out = RunnerOutput(stages=[{} for _ in prompts])
    start = time.perf_counter()
    policy = "dynamic" if dynamic else "none"
    for first in range(0, len(prompts), chunk):
        part = prompts[first:first + chunk]

        def observe(stage, sample, tensor, first=first):
            out.stages[first + sample][stage] = tensor.detach().float().cpu()

        probe = runtime.generate(part, "none", GenerationConfig(max_new_tokens=1), observe=observe,
                                 probe_routers=dynamic)
        for i, r in enumerate(probe, start=first):
            out.stages[i]["logits"] = r.first_logits.float()
            for layer, logits in r.router_logits.items():
                out.stages[i][f"router {layer}"] = torch.tensor(logits)
            out.probe_logits.append(r.router_logits)
        del probe
        for r in runtime.generate(part, policy, GenerationConfig(max_new_tokens=max_new_tokens)):
            out.exit_layers.append(r.exit_layer)
            out.tokens.append(r.generated_ids)
    out.seconds = time.perf_counter() - start
    return out


def _stage_order(stage: str) -> tuple:
    """Stages in the order the prefill computes them: vision, each segment with its router, logits."""
    if stage == "vision":
        return (-1, 0)
    if stage.startswith("layers "):
        return (int(stage.split()[1].split("-")[1]), 0)
    if stage.startswith("router "):
        return (int(stage.split()[1]), 1)
    return (float("inf"), 0)


def _worse(old: float, new: float, larger: bool = True) -> float:
    """Fold one more measurement into a running max (min): a NaN, once seen, stays (Python's
    `max(0.0, nan)` is 0.0, which would hide it)."""
    if old != old or new != new:
        return float("nan")
    return max(old, new) if larger else min(old, new)


def _stage_errors(ref: RunnerOutput, other: RunnerOutput) -> dict[str, dict]:
    errors: dict[str, dict] = {}
    for a_stages, b_stages in zip(ref.stages, other.stages):
        for stage, a in a_stages.items():
            b = b_stages.get(stage)
            if b is None or b.shape != a.shape:
                errors.setdefault(stage, {})["missing"] = True
                continue
            e = errors.setdefault(stage, {"max_abs": 0.0, "max_rel": 0.0, "min_cosine": 1.0})
            bad = {who: int((~torch.isfinite(t)).sum()) for who, t in (("reference", a), ("backend", b))}
            if any(bad.values()):  # NaN or Inf: a parity failure by itself, whatever the other side holds
                found = e.setdefault("non_finite", {"reference": 0, "backend": 0})
                for who, n in bad.items():
                    found[who] += n
                e["max_abs"] = e["max_rel"] = e["min_cosine"] = float("nan")
                continue
            diff = float((a - b).abs().max())
            scale = float(a.abs().max()) or 1.0
            if stage.startswith("router"):  # two logits compared by their margin: judged in logit units
                scale = max(scale, 1.0)
            cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
            e["max_abs"] = _worse(e["max_abs"], diff)
            e["max_rel"] = _worse(e["max_rel"], diff / scale)
            e["min_cosine"] = _worse(e["min_cosine"], cos, larger=False)
    return dict(sorted(errors.items(), key=lambda kv: _stage_order(kv[0])))


def _near_tie(probe: dict[int, list[float]], upto: int | None, margin: float) -> list[int]:
    """Layers (up to the decisive one) whose reference router margin is below `margin`."""
    return [layer for layer, (keep, leave) in sorted(probe.items())
            if (upto is None or layer <= upto) and abs(leave - keep) < margin]


def _token_agreement(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same / n


def compare(ref: RunnerOutput, other: RunnerOutput, thresholds: dict) -> dict:
    stages = _stage_errors(ref, other)
    logits = stages.get("logits", {})
    near_ties, disagreements = [], []
    for i, (a, b) in enumerate(zip(ref.exit_layers, other.exit_layers)):
        if a == b:
            continue
        decisive = min(x for x in (a, b) if x is not None) if (a, b) != (None, None) else None
        ties = _near_tie(ref.probe_logits[i], decisive, thresholds["near_tie"])
        record = {"sample": i, "reference": a, "backend": b, "near_tie_layers": ties}
        (near_ties if ties else disagreements).append(record)
    n = max(len(ref.exit_layers), 1)
    exit_agreement = 1.0 - len(disagreements) / n
    tokens = [_token_agreement(a, b) for a, b, ea, eb in
              zip(ref.tokens, other.tokens, ref.exit_layers, other.exit_layers) if ea == eb]
    token_agreement = sum(tokens) / len(tokens) if tokens else 1.0
    # comparisons written so that NaN fails them (NaN <= x is False)
    stage_fail = [s for s, e in stages.items() if s != "logits" and (
        e.get("missing") or not e["max_rel"] <= thresholds["stage_max_rel"]
        or not e["min_cosine"] >= thresholds["min_cosine"])]
    non_finite = [s for s, e in stages.items() if e.get("non_finite")]
    checks = {
        "finite": not non_finite,
        "logits": bool(logits) and not logits.get("missing") and logits["max_abs"] <= thresholds["logits_max_abs"]
        and logits["min_cosine"] >= thresholds["min_cosine"],
        "stages": not stage_fail,
        "exit_layers": exit_agreement >= thresholds["exit_layer_agreement"],
        "tokens": token_agreement >= thresholds["token_agreement"],
    }
    return {
        "passed": all(checks.values()),
        "skipped": None,
        "checks": checks,
        "failed_stages": stage_fail,
        "first_failed_stage": stage_fail[0] if stage_fail else None,
        "non_finite_stages": non_finite,
        "first_non_finite_stage": non_finite[0] if non_finite else None,
        "exit_layer_agreement": exit_agreement,
        "logits_max_abs_diff": logits.get("max_abs"),
        "logits_min_cosine": logits.get("min_cosine"),
        "token_agreement": token_agreement,
        "near_ties": near_ties,
        "exit_disagreements": disagreements,
        "stages": stages,
        "exit_layers": other.exit_layers,
        "seconds": round(other.seconds, 3),
    }


@dataclass
class ParityReport:
    data: dict

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

    def summary(self) -> str:
        lines = [f"parity: {'PASSED' if self.passed else 'FAILED'} ({self.data['samples']} samples, "
                 f"{self.data['precision']})"]
        for name, b in self.data["backends"].items():
            if b.get("skipped"):
                lines.append(f"  {name:12s} skipped: {b['skipped']}")
                continue
            lines.append(
                f"  {name:12s} {'pass' if b['passed'] else 'FAIL'}  logits max|diff| {_num(b['logits_max_abs_diff'], '.2e')}"
                f"  min cos {_num(b['logits_min_cosine'], '.6f')}  exit agreement {b['exit_layer_agreement']:.0%}"
                f"  tokens {b['token_agreement']:.0%}  near ties {len(b['near_ties'])}"
            )
            if b.get("first_non_finite_stage"):
                stage = b["first_non_finite_stage"]
                where = b["stages"][stage]["non_finite"]
                side = " and ".join(k for k in ("reference", "backend") if where.get(k)) or "backend"
                lines.append(f"  {'':12s} first non-finite stage: {stage} (NaN/Inf in the {side}; "
                             f"all: {', '.join(b['non_finite_stages'])})")
            if b["failed_stages"]:
                lines.append(f"  {'':12s} first diverging stage: {b['first_failed_stage']} "
                             f"(over threshold: {', '.join(b['failed_stages'])})")
        low = self.data.get("low_memory") or {}
        if low.get("on"):
            lines.append(f"  onnxruntime ran graph by graph ({low.get('why')}): no latency figures")
        if self.data.get("json"):
            lines.append(f"  report: {self.data['json']}")
        if self.data.get("html"):
            lines.append(f"  html:   {self.data['html']}")
        return "\n".join(lines)


def _num(value, spec: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}" if math.isfinite(value) else ("non-finite" if value != value else f"{value}")


def _jsonable(obj):
    """Strict JSON: NaN and Inf become null (the stage records why, in `non_finite`)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def measure_speed(runtime, prompt, exit_layer: int | None, repeats: int = 3, decode_tokens: int = 8) -> dict:
    """Prefill and per-token decode latency (medians over `repeats`, after one warm-up) with the
    exit disabled and with the exit after `exit_layer`, on one prompt."""
    out = {}
    policies = {"none": "none"} if exit_layer is None else {"none": "none", "exit": f"layer:{exit_layer}"}
    config = GenerationConfig(max_new_tokens=decode_tokens + 1)
    for key, policy in policies.items():
        runs = [runtime.generate([prompt], policy, config)[0] for _ in range(repeats + 1)][1:]

        def median(values):
            return sorted(values)[len(values) // 2]

        out[f"prefill_ms_{key}"] = median([r.timings_ms["prefill"] for r in runs])
        out[f"vision_ms_{key}"] = median([r.timings_ms["vision"] for r in runs])
        out[f"decode_ms_per_token_{key}"] = median(
            [r.timings_ms["decode"] / max(len(r.generated_ids) - 1, 1) for r in runs])
    if exit_layer is not None:
        out["prefill_speedup"] = out["prefill_ms_none"] / out["prefill_ms_exit"]
    return out


def speed_section(manifest, prompt, runners: dict, exit_layer: int | None, repeats: int) -> dict:
    from exporter.dyvte.flops import flops_ratio

    shape = manifest.shape
    num_visual, num_text = prompt.num_visual, len(prompt.input_ids) - prompt.num_visual
    per_token = shape.kv_bytes_per_token(manifest.precision.element_bytes)
    L = shape.num_layers
    section = {"exit_layer": exit_layer, "visual_tokens": num_visual, "text_tokens": num_text,
               "kv_bytes_full": L * (num_visual + num_text) * per_token}
    if exit_layer is not None:
        section["kv_bytes_saved"] = (L - 1 - exit_layer) * num_visual * per_token
        if shape.intermediate_size:
            section["analytic_speedup"] = 1 / flops_ratio(shape, num_text, num_visual, exit_layer)
    for name, runtime in runners.items():
        section[name] = measure_speed(runtime, prompt, exit_layer, repeats)
        if "analytic_speedup" in section and "prefill_speedup" in section[name]:
            section[name]["efficiency"] = section[name]["prefill_speedup"] / section["analytic_speedup"]
    return section


def validate_package(package, model=None, images=None, prompts=None, thresholds: dict | None = None,
                     backends=("onnxruntime", "tensorrt"), max_new_tokens: int = 8, progress: bool = True,
                     count: int = 8, speed_repeats: int = 3, report_dir=None, low_memory: bool | None = None,
                     on_stage=None) -> ParityReport:
    """Parity of `package`; the report goes to `report_dir` (default: the package's `report/`),
    which is checked to be writable before any work.

    `low_memory` (None: chosen by `choose_low_memory`) runs ONNX Runtime graph by graph (one
    weighty session open at a time, no fused decode graph; `OnnxRuntimeBackend(sessions=...)`), so
    a model whose package does not fit in memory (or, fp16 on CPU, whose float32 copies do not) is
    validated within the streaming budget; it gives the same numbers as the normal path (tested)
    and skips the latency measurements of that runner. `on_stage(name)` is called after the
    reference's run ("pytorch") and each backend's ("onnxruntime", ...), e.g. to read peak memory."""
    from engines.core.manifest import Manifest
    from engines.load import open_package
    from exporter.output import check_writable_folder
    from exporter.reference import package_reference
    from validation.samples import sample_prompts

    package = Path(package)
    manifest = Manifest.load(package)
    report_dir = check_writable_folder(Path(report_dir) if report_dir else package / "report",
                                       "pass --report-dir DIR to write the report elsewhere")
    precision = manifest.precision.name
    limits = {**DEFAULT_THRESHOLDS[precision], **(thresholds or {})}
    reference = package_reference(package, manifest, model)
    low_memory, low_memory_why = choose_low_memory(manifest, reference, low_memory)
    samples = sample_prompts(reference, images, prompts, count=count)
    dynamic = bool(manifest.split.router_layers)
    ref = run_runner(reference, samples, max_new_tokens, dynamic)
    if on_stage is not None:
        on_stage("pytorch")
    results, runners = {}, {"pytorch": reference}
    for name in backends:
        if name == "tensorrt":
            reason = tensorrt_unavailable()
            if reason:
                results[name] = {"passed": None, "skipped": reason}
                continue
        options = {"sessions": "graph-by-graph"} if low_memory and name == "onnxruntime" else {}
        try:
            runtime = open_package(package, backend=name, verify=False, **options)
        except DyVTEError as exc:
            results[name] = {"passed": None, "skipped": str(exc)}
            continue
        results[name] = compare(ref, run_runner(runtime, samples, max_new_tokens, dynamic), limits)
        if on_stage is not None:
            on_stage(name)
        if options:  # graph by graph: its latency would be the sessions' opening; close what is open
            runtime.backend.release()
            del runtime
        else:
            runners[name] = runtime
    ran = [r for r in results.values() if r.get("passed") is not None]
    exits = sorted(e for e in ref.exit_layers if e is not None)
    boundaries = manifest.split.exit_boundaries
    speed_exit = exits[len(exits) // 2] if exits else (boundaries[len(boundaries) // 2] if boundaries else None)
    speed = speed_section(manifest, samples[0], runners, speed_exit, speed_repeats) if speed_repeats else {}
    data = {
        "passed": bool(ran) and all(r["passed"] for r in ran),
        "samples": len(samples),
        "precision": precision,
        "thresholds": limits,
        "policy": "dynamic" if dynamic else "none",
        "low_memory": {"on": low_memory, "why": low_memory_why},
        "reference": {"exit_layers": ref.exit_layers, "seconds": round(ref.seconds, 3)},
        "backends": results,
        "speed": speed,
    }
    from validation.report_html import write_html

    path = report_dir / "parity.json"
    try:
        path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False))
        data["json"] = str(path)
        data["html"] = str(write_html(data, report_dir / "parity.html"))
    except OSError as exc:
        raise DyVTEError(f"cannot write the report into {report_dir}: {exc.strerror or exc}; "
                         "pass --report-dir DIR to write it elsewhere") from None
    return ParityReport(data)


def choose_low_memory(manifest, reference, forced: bool | None) -> tuple[bool, str]:
    """Whether the report runs ONNX Runtime graph by graph, and why: forced, or when the reference
    runs on streamed weights, or by the streaming rule (`exporter.streaming.exceeds_memory`) on what
    the ONNX Runtime sessions would hold (the package's weights; twice that for fp16 on CPU, whose
    MatMul weights ONNX Runtime keeps as float32 copies)."""
    from exporter.streaming import exceeds_memory, is_streamed

    flags = ("--low-memory-report", "--no-low-memory-report")
    size = manifest.weights.parameter_bytes * (2 if manifest.precision.name == "fp16" else 1)
    if forced is None and is_streamed(reference.backend.model):
        return True, "the reference streams its weights"
    on, why = exceeds_memory(size, forced, "ONNX Runtime weights", flags)
    return on, why


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (no CUDA GPU, tensorrt missing or too old), or None when it can."""
    from engines.backends.tensorrt_build import environment_problem

    return environment_problem()
