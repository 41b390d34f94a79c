"""The one exception type users see: the CLI prints its message as a single line, never a traceback."""

import re


class BincounterError(Exception):
    """A user-facing failure (bad input, missing data, unreachable service) with a one-line message."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error (MlflowException, botocore, OSError), without an HTML error page."""
    text = str(getattr(exc, "message", "") or exc).strip()
    text = re.split(r":?\s*<(?:!doctype|html)", text, maxsplit=1, flags=re.IGNORECASE)[0]
    return text.splitlines()[0] if text else type(exc).__name__
