"""`python -m engines run ...`: generate with DyVTE on any backend, from a model or a package."""

from __future__ import annotations

import argparse
import json
import sys

from engines.policy import ExitPolicy, GenerationConfig
from exporter.errors import DyVTEError

BACKENDS = ("torch",)


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
    run.add_argument("--backend", default="torch", choices=BACKENDS)
    run.add_argument("--exit-policy", help="dynamic | none | layer:K (default: dynamic if routers exist)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--temperature", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print one JSON object")
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
    from engines.backends.torch_backend import TorchBackend
    from engines.orchestrator import Runtime
    from exporter.models import load_model

    if args.package:
        raise DyVTEError(
            "running an exported package needs an exported-graph backend (onnxruntime/tensorrt), "
            "which this build does not have yet; use --model/--checkpoint with --backend torch"
        )
    if not args.model:
        raise DyVTEError("give a package directory or --model FAMILY (with --checkpoint DIR for real weights)")
    options = {k: v for k, v in (("vision_tower", args.vision_tower), ("template", args.template)) if v}
    if options and not args.checkpoint:
        raise DyVTEError("--vision-tower and --template apply to --checkpoint folders only")
    model = load_model(args.model, args.checkpoint, args.routers, **options)
    return Runtime(TorchBackend(model), model.processor)


def run(args) -> int:
    from exporter.models.base import load_image

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
    results = runtime.generate(prompts, policy, config)
    objects = [
        {
            "text": r.text,
            "input_ids": r.input_ids,
            "visual_span": list(r.visual_span) if r.visual_span else None,
            "generated_ids": r.generated_ids,
            "exit_layer": r.exit_layer,
            "num_layers": runtime.backend.shape.num_layers,
            "exit_policy": str(policy),
            "backend": args.backend,
            "router_logits": {str(k): v for k, v in r.router_logits.items()},
            "timings_ms": {k: round(v, 3) for k, v in r.timings_ms.items()},
        }
        for r in results
    ]
    if args.json:
        print(json.dumps(objects[0] if len(objects) == 1 else {"results": objects}))
    else:
        for obj in objects:
            exit_text = "never" if obj["exit_layer"] is None else f"after layer {obj['exit_layer']}"
            print(obj["text"])
            print(
                f"  [visual tokens exit: {exit_text} of {obj['num_layers']}; policy {obj['exit_policy']}; "
                f"{len(obj['generated_ids'])} tokens in {obj['timings_ms']['total']:.0f} ms]",
                file=sys.stderr,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
    except DyVTEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1
