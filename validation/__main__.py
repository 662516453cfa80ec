"""`python -m validation <command>`: checks of a model fitted with DyVTE.

Commands: `report PACKAGE` (parity of an exported package; `python -m validation PACKAGE` is the
same), `accuracy` (answers under each exit policy, with FLOPs), `bench` (what DyVTE buys, side by
side), `memory` (anonymous memory of a loaded package and its batches), `export-bench` (a random
real-size checkpoint of a family exported streamed, with validation: peak memory), `serve-bench`
(the Ray Serve endpoint under load). One subparser per
command, each module exposing `add_arguments(parser)` and `run(args) -> int`; errors print
`error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from engines.core.errors import run_cli


COMMANDS = {
    "report": ("validation.report_cli", "parity of an exported package against the PyTorch reference"),
    "accuracy": ("validation.accuracy", "accuracy, exit layers and FLOPs of none / dynamic / layer:K"),
    "bench": ("validation.bench", "DyVTE vs no exit vs monolithic graph vs transformers, side by side"),
    "memory": ("validation.memory_bench", "anonymous memory after load and batches of 1 and 8, x package size"),
    "export-bench": ("validation.export_bench", "random real-size checkpoint exported streamed + validated: "
                                                 "peak RSS, size, time"),
    "serve-bench": ("validation.serve_bench", "the Ray Serve endpoint under load: in-flight batching vs one at a "
                                              "time vs exit off"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "report")  # python -m validation PACKAGE
    args = build_parser().parse_args(argv)
    return run_cli(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
