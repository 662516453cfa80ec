"""The one exception type users see.

Anything a user can get wrong (a path, a flag, a checkpoint, an image, a prompt) raises
`DyVTEError` with a one-line message that says what to do; the CLIs print it and exit non-zero.
"""


class DyVTEError(Exception):
    """A user-facing error: the message is printed as is, without a traceback."""


def run_cli(handler, args, interrupted: str = "interrupted") -> int:
    """Run a CLI handler: user errors become `error: <message>` on stderr and exit status 2."""
    import sys

    try:
        return handler(args)
    except DyVTEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def wrap_load_errors(what: str, fn, *args, **kwargs):
    """Run a third-party loader (transformers, safetensors) and turn its failures into one-line
    user errors naming `what`; the original exception stays attached as the cause."""
    try:
        return fn(*args, **kwargs)
    except DyVTEError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise DyVTEError(f"cannot load {what}: {msg}") from exc


def warn(message: str) -> None:
    """A one-line warning on stderr (`warning: ...`): something accepted that the user should know about."""
    import sys

    print(f"warning: {message}", file=sys.stderr)
