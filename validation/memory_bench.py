"""`python -m validation memory`: anonymous memory of a package runtime at the LLaVA bench shape.

Exports (or reuses, `--package`) the bench preset's package (hidden 1024 x 12 layers, fp32) and, in
a fresh process per configuration, reads the process's anonymous memory (/proc/self/smaps_rollup)
before loading, after loading, after one generation of a batch of 1 and of a batch of 8 (the same
~632-token prompt, policy `none`: the full cache), each as a ratio to the package's bytes. The
bound of issue 10 is printed term by term: 1.15x the package + 2x the batch's KV cache + the
largest single graph's activations (estimate, `engines.memory.activation_bytes`).

Configurations: `shared` (the runtime's defaults: ONNX Runtime's memory map of the weights in every
session, only the fused decode graph prepacked, one shared arena), `no-prepack` (no session
prepacks: the weights live in the mapped file only; the default before issue 13), `prepack-prefill` (the same, the prefill
graphs prepacked), `separate` (every session prepacks its own copy and keeps its arena: the
behaviour before issue 10). Prefill and
decode times of the batch of 1 are printed side by side for the speed comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "shared": {},
    "prepack-prefill": {"prepack": "prefill"},
    "no-prepack": {"prepack": "none"},  # the default before issue 13: the decode graph reads the mapped weights too
    "separate": {"prepack": "all", "shrink_arena": False, "shared_arena": False},
    "env-arena": {"shrink_arena": False, "shared_arena": True},  # = "shared" on CPU since the default
    "shrink": {"shrink_arena": True, "shared_arena": False},  # per-session arenas shrunk after every run
    "keep-arenas": {"shrink_arena": False, "shared_arena": False},
}


def add_arguments(parser) -> None:
    parser.add_argument("--package", help="an exported bench-shape package (default: export one to a temporary folder)")
    parser.add_argument("--preset", default="bench", help="LLaVA preset to export (default: bench)")
    parser.add_argument("--configs", default="shared,no-prepack,separate", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of the batch of 1 (median)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--speed", action="store_true",
                        help="instead: prefill/decode of a batch of 1 per configuration, in rotation in one process")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def export_bench_package(folder: Path, preset: str = "bench") -> Path:
    import torch

    from exporter.models.llava import Llava
    from exporter.package import export_onnx

    torch.manual_seed(0)
    return export_onnx(Llava().preset(seed=0, name=preset), folder / "pkg", "fp32", progress=True)


def measure(package: str, config: str, batches: list[int], decode_tokens: int, repeats: int) -> dict:
    """In this process: anonymous memory at each moment, and the batch of 1's timings."""
    import statistics

    import onnx  # noqa: F401  (imports are not the package's memory)
    import onnxruntime  # noqa: F401

    from engines.core.manifest import Manifest
    from engines.load import open_package
    from engines.memory import RuntimeLimits, activation_bytes, anonymous_bytes
    from engines.policy import GenerationConfig
    from validation.bench import TEXT_TOKENS, _prompt

    manifest = Manifest.load(package, verify=False)
    size = manifest.package_bytes
    base = anonymous_bytes()
    runtime = open_package(package, verify=False, limits=RuntimeLimits(max_batch=max(batches), max_tokens=10**6),
                           **CONFIGS[config])
    moments = [("package loaded", anonymous_bytes(), None)]
    prompt = _prompt(runtime, TEXT_TOKENS)
    config_ = GenerationConfig(max_new_tokens=decode_tokens)
    shape, elem = manifest.shape, manifest.precision.element_bytes
    timings = {}
    for batch in batches:
        runs = [runtime.generate([prompt] * batch, "none", config_)[0].timings_ms
                for _ in range(repeats if batch == 1 else 1)]
        if batch == 1:
            timings = {"prefill_ms": statistics.median(r["prefill"] for r in runs),
                       "decode_ms_per_token": statistics.median(r["decode"] / max(decode_tokens - 1, 1) for r in runs)}
        seq = len(prompt.input_ids)
        kv = shape.kv_bytes_per_token(elem) * shape.num_layers * batch * (seq + decode_tokens)
        terms = {"package_x1.15": int(1.15 * size), "kv_cache_x2": 2 * kv,
                 "activations": activation_bytes(shape, batch, seq, elem)}
        moments.append((f"after a batch of {batch} ({seq} + {decode_tokens} tokens)", anonymous_bytes(), terms))
    return {"config": config, "package_bytes": size, "baseline_bytes": base, "prompt_tokens": len(prompt.input_ids),
            "moments": [{"moment": m, "anonymous_bytes": a, "loaded_bytes": a - base, "bound_terms": t}
                        for m, a, t in moments], **timings}


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        size = r["package_bytes"]
        lines.append(f"{r['config']}: package {size / 2**20:.0f} MiB; anonymous memory before loading "
                     f"{r['baseline_bytes'] / 2**20:.0f} MiB (python, torch, onnxruntime), not counted below")
        lines.append(f"  {'moment':<40} {'anon MiB':>9} {'x package':>9}  bound (MiB)")
        for m in r["moments"]:
            extra = ""
            if m["bound_terms"]:
                t = {k: v / 2**20 for k, v in m["bound_terms"].items()}
                total = sum(t.values())
                ok = "within" if m["loaded_bytes"] / 2**20 <= total else "OVER"
                extra = (f"{total:.0f} = 1.15x package {t['package_x1.15']:.0f} + 2x KV {t['kv_cache_x2']:.0f} "
                         f"+ activations {t['activations']:.0f}: {ok}")
            else:
                extra = f"{1.15 * size / 2**20:.0f} = 1.15x package: " + (
                    "within" if m["loaded_bytes"] <= 1.15 * size else "OVER")
            lines.append(f"  {m['moment']:<40} {m['loaded_bytes'] / 2**20:>9.0f} {m['loaded_bytes'] / size:>9.2f}  {extra}")
        if "prefill_ms" in r:
            lines.append(f"  batch of 1: prefill {r['prefill_ms']:.0f} ms, decode {r['decode_ms_per_token']:.1f} ms/token")
    by = {r["config"]: r for r in results}
    if "shared" in by and "separate" in by and "prefill_ms" in by["shared"]:
        a, b = by["shared"], by["separate"]
        lines.append(f"shared / separate: prefill {a['prefill_ms'] / b['prefill_ms']:.3f}, "
                     f"decode {a['decode_ms_per_token'] / b['decode_ms_per_token']:.3f} (time ratios; one run each "
                     "in its own process, on this machine's noise)")
    return "\n".join(lines)


def run(args) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        print(json.dumps(measure(args.package, args.child, batches, args.decode_tokens, args.repeats)))
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="dyvte-memory-") if not args.package else None
    package = args.package or str(export_bench_package(Path(tmp.name), args.preset))
    if args.speed:
        configs = args.configs.split(",")
        r = speed_compare(package, configs, args.repeats, args.decode_tokens)
        first = configs[0]
        for c in configs:
            print(f"{c:<10} prefill {r['prefill_s'][c]:.3f} s ({r['prefill_s'][c] / r['prefill_s'][first]:.3f}x {first}), "
                  f"decode {r['decode_ms_per_token'][c]:.1f} ms/token "
                  f"({r['decode_ms_per_token'][c] / r['decode_ms_per_token'][first]:.3f}x {first})")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
        return 0
    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            from engines.core.errors import DyVTEError

            raise DyVTEError(f"unknown memory configuration {config!r}; choose from {', '.join(CONFIGS)}")
        out = subprocess.run([sys.executable, "-m", "validation", "memory", "--child", config, "--package", package,
                              "--batches", args.batches, "--decode-tokens", str(args.decode_tokens),
                              "--repeats", str(args.repeats)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(table(results[-1:]), file=sys.stderr)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


def speed_compare(package: str, configs=("shared", "prepack-prefill", "separate"), repeats: int = 3,
                  decode_tokens: int = 8) -> dict:
    """Prefill and decode of a batch of 1 under each configuration, in one process, in rotation
    (`validation.bench._interleaved`), so the machine's drift hits each alike."""
    from engines.load import open_package
    from engines.memory import RuntimeLimits
    from engines.policy import GenerationConfig
    from validation.bench import TEXT_TOKENS, _interleaved, _prompt

    runtimes = {c: open_package(package, verify=False, limits=RuntimeLimits(8, 10**6), **CONFIGS[c]) for c in configs}
    prompt = _prompt(next(iter(runtimes.values())), TEXT_TOKENS)
    config = GenerationConfig(max_new_tokens=decode_tokens + 1)

    def timed(runtime, key):
        return lambda: runtime.generate([prompt], "none", config)[0].timings_ms[key] / 1e3

    prefill = _interleaved({c: timed(r, "prefill") for c, r in runtimes.items()}, repeats)
    decode = _interleaved({c: timed(r, "decode") for c, r in runtimes.items()}, repeats)
    return {"prefill_s": prefill, "decode_ms_per_token": {c: 1e3 * v / decode_tokens for c, v in decode.items()}}
