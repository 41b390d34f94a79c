"""The one exception type users see: the CLI prints its message as a single line, never a traceback."""

import re


class BincounterError(Exception):
    """A user-facing failure (bad input, missing data, unreachable service) with a one-line message."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error (MlflowException, botocore, OSError), without an HTML error page."""
    text = str(getattr(exc, "message", "") or exc).strip()
    text = re.split(r":?\s*<(?:!doctype|html)", text, maxsplit=1, flags=re.IGNORECASE)[0]
    return text.splitlines()[0] if text else type(exc).__name__


def user_message(exc: BincounterError) -> str:
    """What the CLI prints. Raised in a DataLoader worker (a shard that cannot be read mid-epoch), torch
    re-raises the error in the main process with the worker's traceback as its message ("Caught ... in
    DataLoader worker process 0. Original Traceback ..."); its last line holds the original message."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text
