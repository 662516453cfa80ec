"""`python -m engines run ...`: generate with DyVTE on any backend, from a model or a package.

An entry point (the top layer): it may import the exporter, for the PyTorch reference of a model."""

from __future__ import annotations

import argparse
import json
import math
import sys

from engines.memory import DEFAULT_MAX_BATCH, DEFAULT_MAX_TOKENS, RuntimeLimits
from engines.policy import ExitPolicy, GenerationConfig
from engines.core.errors import DyVTEError, run_cli, warn

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a prompt about an image")
    run.add_argument("package", nargs="?", help="an exported package directory")
    run.add_argument("--model", help="model family (vila, llava, internvl, eagle) when no package is given")
    run.add_argument("--checkpoint", help="a local checkpoint folder in the family's native layout")
    run.add_argument("--routers", help="DyVTE router weights (.safetensors file or folder)")
    run.add_argument("--vision-tower", help="local vision tower folder (original LLaVA layout)")
    run.add_argument("--template", help="conversation template of original layouts (vicuna_v1, llama_3, hermes_2)")
    run.add_argument("--image", action="append", default=[], help="image file; repeat for a batch")
    run.add_argument("--prompt", action="append", default=[], help="question; repeat for a batch")
    run.add_argument("--backend", choices=BACKENDS,
                     help="default: onnxruntime for a package, torch (the reference) for --model")
    run.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                     help="onnxruntime execution provider: cpu, cuda, or tensorrt (the TensorRT EP)")
    run.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    run.add_argument("--exit-policy", help="dynamic | none | layer:K (default: dynamic if routers exist)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                     help=f"packages: most prompts in one batch (default {DEFAULT_MAX_BATCH})")
    run.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                     help=f"packages: most cache positions of a batch, prompts + new tokens (default {DEFAULT_MAX_TOKENS})")
    build = sub.add_parser("build", help="build TensorRT engines for a package (needs an NVIDIA GPU)")
    build.add_argument("package")
    build.add_argument("--max-batch", type=int, default=8, help="largest batch the profiles accept")
    build.add_argument("--max-text", type=int, default=512, help="most text tokens of a prompt")
    build.add_argument("--precision", choices=("fp32", "fp16"), help="engine precision (default: the package's)")
    build.add_argument("--workspace-gb", type=float, default=8)
    from engines.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def _pairs(images: list[str], prompts: list[str]) -> list[tuple[str | None, str]]:
    if not prompts:
        raise DyVTEError("--prompt is required")
    if len(images) > 1 and len(images) != len(prompts):
        if len(prompts) == 1:
            prompts = prompts * len(images)
        else:
            raise DyVTEError(f"got {len(images)} --image and {len(prompts)} --prompt; give one of each per sample")
    if len(images) <= 1:
        images = (images or [None]) * len(prompts)
    return list(zip(images, prompts))


def load_runtime(args):
    from engines.load import open_package
    from exporter.reference import open_model, package_reference

    if args.package:
        if args.model or args.checkpoint:
            raise DyVTEError("give either a package directory or --model/--checkpoint, not both")
        backend = args.backend or "onnxruntime"
        if backend == "torch":  # the PyTorch reference of the model the package was exported from
            return package_reference(args.package)
        runtime = open_package(args.package, backend=backend, device=args.device,
                               limits=RuntimeLimits(args.max_batch, args.max_tokens))
        m = runtime.backend.manifest
        print(runtime.limits.describe(m.shape, m.precision.element_bytes, m.weights.parameter_bytes), file=sys.stderr)
        return runtime
    if not args.model:
        raise DyVTEError("give a package directory or --model FAMILY (with --checkpoint DIR for real weights)")
    if args.backend not in (None, "torch"):
        raise DyVTEError(f"--backend {args.backend} runs exported packages: export first (python export.py), "
                         "then pass the package directory")
    options = {k: v for k, v in (("vision_tower", args.vision_tower), ("template", args.template)) if v}
    if options and not args.checkpoint:
        raise DyVTEError("--vision-tower and --template apply to --checkpoint folders only")
    return open_model(args.model, args.checkpoint, args.routers, **options)


def run(args) -> int:
    from engines.core.prompt import load_image

    runtime = load_runtime(args)
    policy = ExitPolicy.parse(args.exit_policy) if args.exit_policy else (
        ExitPolicy("dynamic") if runtime.backend.router_layers else ExitPolicy("none")
    )
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    pairs = _pairs(args.image, args.prompt)
    prompts = [runtime.prepare(text, load_image(img) if img else None) for img, text in pairs]
    stream = None
    if args.stream and not args.json:
        if len(prompts) > 1:
            raise DyVTEError("--stream prints one sample's tokens; give one --prompt")
        processor = runtime.processor
        stream = lambda _sample, token: print(processor.decode([token]), end=" ", flush=True)  # noqa: E731

    results = runtime.generate(prompts, policy, config, on_token=stream)
    if stream:
        print()
    objects = [
        {
            "text": r.text,
            "input_ids": r.input_ids,
            "visual_span": list(r.visual_span) if r.visual_span else None,
            "generated_ids": r.generated_ids,
            "exit_layer": r.exit_layer,
            "num_layers": runtime.backend.shape.num_layers,
            "exit_policy": str(policy),
            "backend": args.backend or ("onnxruntime" if args.package else "torch"),
            "router_logits": {str(k): v for k, v in r.router_logits.items()},
            "timings_ms": {k: round(v, 3) for k, v in r.timings_ms.items()},
        }
        for r in results
    ]
    for i, r in enumerate(results):
        bad = sorted(k for k, v in r.router_logits.items() if not all(math.isfinite(x) for x in v))
        if bad:
            warn(f"sample {i}: router logits after layer {bad[0]} are NaN or Inf (damaged routers?): "
                 "the sample cannot exit there")
    if args.json:  # strict JSON: NaN/Inf become null
        print(json.dumps(_finite(objects[0] if len(objects) == 1 else {"results": objects}), allow_nan=False))
    else:
        for obj in objects:
            exit_text = "never" if obj["exit_layer"] is None else f"after layer {obj['exit_layer']}"
            if not stream:
                print(obj["text"])
            print(
                f"  [visual tokens exit: {exit_text} of {obj['num_layers']}; policy {obj['exit_policy']}; "
                f"{len(obj['generated_ids'])} tokens in {obj['timings_ms']['total']:.0f} ms]",
                file=sys.stderr,
            )
    return 0


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def build(args) -> int:
    from engines.backends.tensorrt_build import build_engines

    build_engines(args.package, max_batch=args.max_batch, max_text=args.max_text, precision=args.precision,
                  workspace_gb=args.workspace_gb)
    return 0


def serve(args) -> int:
    from engines.serve.cli import serve_package

    return serve_package(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli({"run": run, "build": build, "serve": serve}[args.command], args)
