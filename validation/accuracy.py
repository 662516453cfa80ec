"""Accuracy under each exit policy: does the dynamic exit keep the answers, and at what compute?

For every policy (`none`, `dynamic` when the model has routers, and `layer:K` for K = 0..L-2) the
evaluation samples are answered greedily by the reference runtime, in batches; a sample is right
when its normalised answer equals the reference. Reported with each: the mean number of layers the
visual tokens pass through (exit layer + 1, L without an exit), the mean exit layer (L-1 without an
exit) and the analytic prefill FLOPs relative to no exit (`exporter.dyvte.flops`; the dynamic
policy's count includes the routers it asked).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from exporter.data import VQASample
from exporter.data.answers import normalise, prepare_prompts, run_policy
from exporter.dyvte.flops import prefill_flops
from engines.core.errors import DyVTEError

FULL_ACCURACY_MIN = 0.90
DYNAMIC_TOLERANCE = 0.02


def policy_stats(model, samples, prompts, results, router_inner: int = 0) -> dict:
    L = model.shape.num_layers
    shape = model.shape
    right, flops, full, exits = [], 0, 0, []
    by_kind: dict[str, list[bool]] = {}
    for s, p, r in zip(samples, prompts, results):
        ok = s.answer is not None and normalise(r.text) == normalise(s.answer)
        right.append(ok)
        by_kind.setdefault(s.kind or "all", []).append(ok)
        text = len(p.input_ids) - p.num_visual
        flops += prefill_flops(shape, text, p.num_visual, r.exit_layer, router_inner)
        full += prefill_flops(shape, text, p.num_visual, None)
        exits.append(L - 1 if r.exit_layer is None else r.exit_layer)
    n = len(right)
    return {
        "accuracy": round(sum(right) / n, 4),
        "mean_exit_layer": round(sum(exits) / n, 3),
        "mean_visual_layers": round(sum(exits) / n + 1, 3),
        "flops_ratio": round(flops / full, 4),
        "exit_share": round(sum(e < L - 1 for e in exits) / n, 4),
        "by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
    }


def evaluate_accuracy(model, samples: list[VQASample], batch_size: int = 64, max_new_tokens: int = 4,
                      progress=None) -> dict:
    """All policies on `samples`; the JSON object `python -m validation accuracy` writes."""
    if not samples:
        raise DyVTEError("no evaluation samples")
    if all(s.answer is None for s in samples):
        raise DyVTEError("the evaluation samples carry no reference answers")
    model.eval()
    L = model.shape.num_layers
    prompts = prepare_prompts(model, samples)
    policies = ["none"] + (["dynamic"] if model.routers is not None else []) + [f"layer:{k}" for k in range(L - 1)]
    stats, seconds = {}, {}
    for policy in policies:
        t0 = time.perf_counter()
        results = run_policy(model, prompts, policy, batch_size, max_new_tokens)
        inner = model.routers.inner if policy == "dynamic" else 0
        stats[policy] = policy_stats(model, samples, prompts, results, inner)
        seconds[policy] = round(time.perf_counter() - t0, 2)
        if progress:
            progress(policy, stats[policy])
    full = stats["none"]
    report = {
        "num_samples": len(samples),
        "num_layers": L,
        "visual_tokens": prompts[0].num_visual,
        "mean_prompt_tokens": round(sum(len(p.input_ids) for p in prompts) / len(prompts), 2),
        "full_accuracy": full["accuracy"],
        "full_by_kind": full["by_kind"],
        "static": {str(k): {key: stats[f"layer:{k}"][key] for key in
                            ("accuracy", "flops_ratio", "mean_exit_layer", "mean_visual_layers", "by_kind")}
                   for k in range(L - 1)},
        "seconds": seconds,
    }
    if "dynamic" in stats:
        d = stats["dynamic"]
        report.update({
            "dynamic_accuracy": d["accuracy"],
            "dynamic_mean_exit_layer": d["mean_exit_layer"],
            "dynamic_mean_visual_layers": d["mean_visual_layers"],
            "dynamic_flops_ratio": d["flops_ratio"],
            "dynamic_exit_share": d["exit_share"],
            "dynamic_by_kind": d["by_kind"],
        })
        report["checks"] = checks(report)
    return report


# Answer accuracy a quantized package may lose against the fp32 PyTorch reference (points of 1.0).
PACKAGE_TOLERANCE = {"fp32": 0.0, "fp16": 0.005, "int8": 0.005, "int4": 0.02}


def evaluate_package(model, package, samples: list[VQASample], batch_size: int = 64, max_new_tokens: int = 4,
                     progress=None) -> dict:
    """An exported package (ONNX Runtime) against the fp32 PyTorch reference `model` on `samples`:
    accuracy under `none` and `dynamic` of both, the package's loss against the precision's
    tolerance, exit-layer agreement and greedy-answer agreement per sample, and prefill FLOPs."""
    from engines.core.manifest import Manifest
    from engines.load import open_package

    if not samples:
        raise DyVTEError("no evaluation samples")
    manifest = Manifest.load(package)
    runtime = open_package(package, verify=False)
    model.eval()
    prompts = prepare_prompts(model, samples)
    policies = ["none"] + (["dynamic"] if model.routers is not None and manifest.split.router_layers else [])
    out = {"package": str(package), "precision": manifest.precision.name, "num_samples": len(samples),
           "tolerance": PACKAGE_TOLERANCE[manifest.precision.name],
           "quantization": manifest.quantization.to_dict() if manifest.quantization else None, "policies": {}}
    for policy in policies:
        inner = model.routers.inner if policy == "dynamic" else 0
        ref = run_policy(model, prompts, policy, batch_size, max_new_tokens)
        pkg = run_policy(runtime, prompts, policy, min(batch_size, runtime.limits.max_batch), max_new_tokens)
        a, b = policy_stats(model, samples, prompts, ref, inner), policy_stats(model, samples, prompts, pkg, inner)
        n = len(prompts)
        row = {"reference_accuracy": a["accuracy"], "package_accuracy": b["accuracy"],
               "accuracy_loss": round(a["accuracy"] - b["accuracy"], 4),
               "exit_layer_agreement": round(sum(x.exit_layer == y.exit_layer for x, y in zip(ref, pkg)) / n, 4),
               "answer_agreement": round(sum(x.generated_ids == y.generated_ids for x, y in zip(ref, pkg)) / n, 4),
               "reference_flops_ratio": a["flops_ratio"], "package_flops_ratio": b["flops_ratio"],
               "package_mean_exit_layer": b["mean_exit_layer"]}
        row["passed"] = row["accuracy_loss"] <= out["tolerance"] + 1e-9 and (
            policy != "dynamic" or row["package_flops_ratio"] <= row["reference_flops_ratio"] + 0.01)
        out["policies"][policy] = row
        if progress:
            progress(policy, row)
    out["passed"] = all(r["passed"] for r in out["policies"].values())
    return out


def format_package_report(r: dict) -> str:
    lines = [f"package {r['package']} ({r['precision']}) vs the fp32 PyTorch reference, {r['num_samples']} samples; "
             f"tolerance {r['tolerance']:.3f} accuracy"]
    if r.get("quantization"):
        q = r["quantization"]
        lines.append(f"  quantized: int{q['bits']} block {q['block_size']} "
                     f"{'symmetric' if q['symmetric'] else 'asymmetric'} {q['format']}")
    for policy, row in r["policies"].items():
        lines.append(f"  {policy:<8} reference {row['reference_accuracy']:.3f}  package {row['package_accuracy']:.3f}  "
                     f"loss {row['accuracy_loss']:+.3f}  exit agreement {row['exit_layer_agreement']:.0%}  "
                     f"answers equal {row['answer_agreement']:.0%}  FLOPs {row['reference_flops_ratio']:.3f} / "
                     f"{row['package_flops_ratio']:.3f}  {'pass' if row['passed'] else 'FAIL'}")
    return "\n".join(lines)


def checks(report: dict) -> dict:
    """The claims DyVTE makes, on this model: accuracy kept, a real exit, and no static exit of equal
    or higher compute (VTW's fixed layer) answers better."""
    L = report["num_layers"]
    dominating = {k: s for k, s in report["static"].items() if s["flops_ratio"] >= report["dynamic_flops_ratio"]}
    return {
        "full_accuracy_at_least_0.90": report["full_accuracy"] >= FULL_ACCURACY_MIN,
        "dynamic_within_2_points_of_full": report["dynamic_accuracy"] >= report["full_accuracy"] - DYNAMIC_TOLERANCE,
        "routers_exit": report["dynamic_mean_exit_layer"] < L - 1,
        "dynamic_not_worse_than_static_of_equal_or_higher_flops": all(
            report["dynamic_accuracy"] >= s["accuracy"] for s in dominating.values()),
        "static_layers_compared": sorted(int(k) for k in dominating),
    }


def format_report(report: dict) -> str:
    L = report["num_layers"]
    lines = [f"{report['num_samples']} samples, {L} decoder layers, {report['visual_tokens']} visual tokens of "
             f"{report['mean_prompt_tokens']:.0f} prompt tokens on average",
             f"{'policy':<10} {'accuracy':>8} {'exit layer':>10} {'visual layers':>13} {'FLOPs':>7}"]
    lines.append(f"{'none':<10} {report['full_accuracy']:>8.3f} {L - 1:>10.2f} {L:>13.2f} {1.0:>7.3f}")
    if "dynamic_accuracy" in report:
        lines.append(f"{'dynamic':<10} {report['dynamic_accuracy']:>8.3f} {report['dynamic_mean_exit_layer']:>10.2f} "
                     f"{report['dynamic_mean_visual_layers']:>13.2f} {report['dynamic_flops_ratio']:>7.3f}")
    for k, s in report["static"].items():
        lines.append(f"{'layer:' + k:<10} {s['accuracy']:>8.3f} {s['mean_exit_layer']:>10.2f} "
                     f"{s['mean_visual_layers']:>13.2f} {s['flops_ratio']:>7.3f}")
    kinds = report["full_by_kind"]
    if len(kinds) > 1:
        dyn = report.get("dynamic_by_kind", {})
        lines.append("by question kind (none / dynamic): " + ", ".join(
            f"{k} {v:.2f}" + (f"/{dyn[k]:.2f}" if k in dyn else "") for k, v in kinds.items()))
    for name, value in report.get("checks", {}).items():
        if isinstance(value, bool):
            lines.append(f"{'PASS' if value else 'FAIL'}  {name.replace('_', ' ')}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model family (vila, ...)")
    parser.add_argument("--checkpoint", help="a checkpoint folder in the family's native layout (default: built-in)")
    parser.add_argument("--routers", help="DyVTE router weights (.safetensors file or folder)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (the built-in task's eval split) or a LLaVA-style JSONL with answers")
    parser.add_argument("--images", help="image folder for --data FILE")
    parser.add_argument("--samples", type=int, help="number of evaluation samples (synthetic default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a DyVTE check fails")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"),
                        help="evaluate an exported package of this precision against the fp32 reference "
                             "(exported to a temporary folder unless --package is given)")
    parser.add_argument("--package", help="the exported package to evaluate (with --precision: must match it)")
    parser.add_argument("--quant-block", type=int, help="int8/int4 export: weights per scale (default int8 32, int4 16)")


def run(args) -> int:
    import torch

    from exporter.data import load_samples
    from exporter.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    samples = load_samples(args.data, args.images, split="eval", size=args.samples, seed=args.seed)
    model = load_model(args.model, args.checkpoint, args.routers)

    if args.precision or args.package:
        return _run_package(args, model, samples)

    def progress(policy, s):
        print(f"  {policy:<10} accuracy {s['accuracy']:.3f}  flops {s['flops_ratio']:.3f}", file=sys.stderr)

    report = evaluate_accuracy(model, samples, args.batch_size, args.max_new_tokens, progress)
    report.update(model=args.model, checkpoint=args.checkpoint, data=args.data)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    failed = [k for k, v in report.get("checks", {}).items() if v is False]
    return 1 if args.check and failed else 0


def _run_package(args, model, samples) -> int:
    import tempfile

    from engines.core.manifest import Manifest

    with tempfile.TemporaryDirectory(prefix="dyvte-accuracy-") as tmp:
        package = args.package
        if package is None:
            from exporter.package import export_onnx

            package = export_onnx(model, Path(tmp) / "package", args.precision, progress=False,
                                  quant_block=args.quant_block)
        elif args.precision and Manifest.load(package, verify=False).precision.name != args.precision:
            raise DyVTEError(f"--package {package} is not a {args.precision} package")
        report = evaluate_package(model, package, samples, args.batch_size, args.max_new_tokens)
    report.update(model=args.model, checkpoint=args.checkpoint, data=args.data)
    print(format_package_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if args.check and not report["passed"] else 0
