"""`python export.py --model vila`: export a DyVTE model to a deployable package, then validate it.

The built-in model of the family is used unless `--checkpoint DIR` points at a local checkpoint in
its native layout. The package (ONNX graphs split at the exit, the hyper-network, a manifest) goes
to `./exports/<model>` by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.core.errors import DyVTEError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model family: vila, llava, internvl, eagle")
    p.add_argument("--checkpoint", help="local checkpoint folder in the family's native layout")
    p.add_argument("--routers", help="DyVTE router weights (.safetensors file or folder) to use instead")
    p.add_argument("--vision-tower", help="local vision tower folder (original LLaVA layout)")
    p.add_argument("--template", help="conversation template of original layouts (vicuna_v1, llama_3, hermes_2)")
    p.add_argument("--output", help="package directory (default: ./exports/<model>); an existing package there is "
                   "replaced, anything else only with --force")
    p.add_argument("--force", action="store_true",
                   help="replace --output even when it is not a package (never the checkpoint or another input)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default="fp32",
                   help="fp32/fp16 float graphs; int8/int4: weight-only quantized decoder and LM head "
                        "(ONNX Runtime's MatMulNBits quantizer, symmetric, block-wise; see exporter/quantize.py)")
    p.add_argument("--quant-block", type=int, help="int8/int4: weights per scale along K (power of two >= 16 "
                   "dividing the hidden size; default int8 32, int4 16)")
    p.add_argument("--exit-window", help="START:END layers after which the exit may happen (inclusive), "
                   "'auto' to calibrate on sample inputs, 'none' for no exit; default: every layer")
    p.add_argument("--backend", choices=("onnx", "tensorrt", "all"), default="onnx",
                   help="onnx: ONNX graphs; tensorrt/all: also build TensorRT engines (needs a GPU)")
    p.add_argument("--no-validate", action="store_true", help="skip the parity validation after export")
    p.add_argument("--images", help="folder of images for calibration/validation (default: built-in samples)")
    p.add_argument("--prompts", help="text file, one prompt per line, for calibration/validation")
    p.add_argument("--thresholds", help="JSON file overriding the parity thresholds of the precision")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the checkpoint's weights on disk: each graph's share is read memory-mapped while it "
                        "exports, and the validation's PyTorch reference reads each layer's while it runs. "
                        "Default: on when the weights exceed half the available memory")
    p.add_argument("--low-memory-report", action=argparse.BooleanOptionalAction, default=None,
                   help="run the parity report's ONNX Runtime side graph by graph (one graph's session open at a "
                        "time, no fused decode graph): slower, but within the streaming budget. Default: on when "
                        "streaming, or when the package's weights exceed half the available memory")
    return p


def choose_plan(args, model, runtime_samples):
    from exporter.plan import SplitPlan

    layers = model.shape.num_layers
    if args.exit_window == "auto":
        if model.routers is None:
            raise DyVTEError("--exit-window auto calibrates with the routers, and this model has none")
        from engines.backends.torch_backend import TorchBackend
        from engines.orchestrator import Runtime
        from engines.policy import GenerationConfig

        runtime = Runtime(TorchBackend(model), model.processor)
        results = runtime.generate(runtime_samples(runtime), "dynamic", GenerationConfig(max_new_tokens=1))
        plan = SplitPlan.from_exit_layers([r.exit_layer for r in results], layers)
        print(f"calibration: exit layers {sorted(str(r.exit_layer) for r in results)} -> window {plan.window}",
              file=sys.stderr)
        return plan
    return SplitPlan.parse(args.exit_window, layers)


def check_args(args) -> Path:
    """Every flag checked before any work starts (nothing is loaded or written yet); returns the
    output path. Each problem is one `DyVTEError` naming the flag."""
    from exporter.output import check_output
    from validation.report_cli import read_thresholds
    from validation.samples import read_prompts, user_pairs

    window = args.exit_window
    if window not in (None, "auto", "none"):
        parts = window.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
            raise DyVTEError(f"bad --exit-window {window!r}; use START:END with 0 <= START <= END (layers, "
                             "0-based, inclusive), auto or none")
    if args.images:
        user_pairs(args.images, args.prompts)
    elif args.prompts:
        read_prompts(args.prompts)
        raise DyVTEError("--prompts needs --images (a folder of images to ask about)")
    read_thresholds(args.thresholds)
    if args.backend in ("tensorrt", "all"):
        from engines.backends.tensorrt_build import environment_problem

        problem = environment_problem()
        if problem:
            raise DyVTEError(f"--backend {args.backend} builds TensorRT engines, which cannot run here: {problem}")
    for flag in ("checkpoint", "routers", "vision_tower"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise DyVTEError(f"--{flag.replace('_', '-')} {value} does not exist")
    protect = (args.checkpoint, args.routers, args.vision_tower, args.images, args.prompts, args.thresholds)
    return check_output(Path(args.output or Path("exports") / args.model), args.force, protect)


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    previous = None
    try:  # SIGTERM is handled like Ctrl-C: the partial package is removed, nothing is left behind
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (an embedding application owns the signals)
        pass
    try:
        return run_cli(run, args, interrupted="interrupted: no package was written")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from exporter.models import load_model
    from exporter.package import export_onnx
    from validation.samples import sample_prompts

    output = check_args(args)
    options = {k: v for k, v in (("vision_tower", args.vision_tower), ("template", args.template)) if v}
    materialize, stream = None, False
    if args.checkpoint is None:
        if args.stream:
            raise DyVTEError("--stream needs --checkpoint (the built-in models are small and load eagerly)")
    else:
        from exporter.streaming import checkpoint_folders, choose_streaming, stream_weights

        try:
            stream, why = choose_streaming(checkpoint_folders(args.checkpoint, options), args.stream)
        except DyVTEError:  # not a readable checkpoint: the family's loader says why
            stream, why = bool(args.stream), "checkpoint size unknown"
        print(f"streaming: {'on' if stream else 'off'} ({why})", file=sys.stderr)
        if stream and args.exit_window == "auto":
            raise DyVTEError("--exit-window auto runs the model to calibrate; give START:END with --stream")
        materialize = stream_weights if stream else None
    model = load_model(args.model, args.checkpoint, args.routers, lazy=stream, **options)
    from exporter.quantize import check_config
    from engines.core.precision import get_precision

    check_config(get_precision(args.precision), args.quant_block, model.shape)  # before any export work
    samples = lambda runtime: sample_prompts(runtime, args.images, args.prompts)  # noqa: E731
    plan = choose_plan(args, model, samples)
    source = {"family": args.model, "checkpoint": args.checkpoint, "routers": args.routers, **options}
    protect = (args.checkpoint, args.routers, args.vision_tower, args.images, args.prompts, args.thresholds)
    package = export_onnx(model, output, args.precision, plan, progress=not args.no_progress,
                          source=source, materialize=materialize, force=args.force, protect=protect,
                          quant_block=args.quant_block)
    print(f"package written: {package}")
    if args.backend in ("tensorrt", "all"):
        from engines.backends.tensorrt_build import build_engines

        build_engines(package)
    if args.no_validate:
        return 0
    from validation.parity import validate_package
    from validation.report_cli import read_thresholds

    report = validate_package(package, model=model, images=args.images, prompts=args.prompts,
                              thresholds=read_thresholds(args.thresholds), progress=not args.no_progress,
                              low_memory=args.low_memory_report)
    print(report.summary())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
