"""The one exception type users see.

Anything a user can get wrong (a path, a flag, a checkpoint, an image, a prompt) raises
`DyVTEError` with a one-line message that says what to do; the CLIs print it and exit non-zero.
"""


class DyVTEError(Exception):
    """A user-facing error: the message is printed as is, without a traceback."""
