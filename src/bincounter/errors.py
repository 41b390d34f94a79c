"""The one exception type users see: the CLI prints its message as a single line, never a traceback."""


class BincounterError(Exception):
    """A user-facing failure (bad input, missing data, unreachable service) with a one-line message."""
