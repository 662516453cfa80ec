"""`python -m validation report PACKAGE`: re-run the parity validation of an exported package."""

from __future__ import annotations

import json
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


def read_thresholds(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DyVTEError(f"cannot read thresholds {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DyVTEError(f"thresholds {path} must be a JSON object of name -> number")
    return data


def run(args) -> int:
    from validation.parity import validate_package

    report = validate_package(args.package, images=args.images, prompts=args.prompts,
                              thresholds=read_thresholds(args.thresholds), count=args.samples,
                              max_new_tokens=args.max_new_tokens, speed_repeats=0 if args.no_speed else 3)
    print(report.summary())
    return 0 if report.passed else 1
