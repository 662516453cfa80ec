"""`python -m validation report PACKAGE`: re-run the parity validation of an exported package."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from engines.core.errors import DyVTEError


def add_arguments(parser) -> None:
    parser.add_argument("package", help="an exported package directory")
    parser.add_argument("--images", help="folder of images to validate on (default: built-in samples)")
    parser.add_argument("--prompts", help="text file, one prompt per line (with --images)")
    parser.add_argument("--thresholds", help="JSON file overriding the thresholds of the package's precision")
    parser.add_argument("--samples", type=int, default=8, help="number of built-in samples (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-speed", action="store_true", help="skip the latency measurements")
    parser.add_argument("--report-dir", help="folder for parity.json/parity.html (default: PACKAGE/report)")
    parser.add_argument("--low-memory-report", action=argparse.BooleanOptionalAction, default=None,
                        help="run ONNX Runtime graph by graph (one graph's session open at a time): slower, bounded "
                             "memory (default: when the reference streams or the weights exceed half the available "
                             "memory)")

def read_thresholds(path: str | None) -> dict | None:
    """The `--thresholds` file: a JSON object of known threshold names -> finite numbers in range."""
    from engines.core.manifest import read_regular
    from validation.parity import DEFAULT_THRESHOLDS

    if not path:
        return None
    try:
        data = json.loads(read_regular(Path(path), what="--thresholds file"))
    except ValueError as exc:
        raise DyVTEError(f"--thresholds {path} is not valid JSON: {exc}") from None
    known = DEFAULT_THRESHOLDS["fp32"]
    if not isinstance(data, dict):
        raise DyVTEError(f"--thresholds {path} must be a JSON object of name -> number ({', '.join(known)})")
    for key, value in data.items():
        if key not in known:
            raise DyVTEError(f"--thresholds {path}: unknown threshold {key!r}; known: {', '.join(known)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DyVTEError(f"--thresholds {path}: {key} must be a finite number, not {value!r}")
        bounded = key in ("min_cosine", "token_agreement", "exit_layer_agreement")
        if value < 0 or (bounded and value > 1):
            raise DyVTEError(f"--thresholds {path}: {key} must be in {'[0, 1]' if bounded else '[0, inf)'}, "
                             f"not {value!r}")
    return data


def run(args) -> int:
    from validation.parity import validate_package

    if args.samples < 1:
        raise DyVTEError(f"--samples must be at least 1, not {args.samples}")
    if args.max_new_tokens < 1:
        raise DyVTEError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if args.images:
        from validation.samples import user_pairs

        user_pairs(args.images, args.prompts)
    elif args.prompts:
        raise DyVTEError("--prompts needs --images (a folder of images to ask about)")
    report = validate_package(args.package, images=args.images, prompts=args.prompts,
                              thresholds=read_thresholds(args.thresholds), count=args.samples,
                              max_new_tokens=args.max_new_tokens, speed_repeats=0 if args.no_speed else 3,
                              report_dir=args.report_dir, low_memory=args.low_memory_report)
    print(report.summary())
    return 0 if report.passed else 1
