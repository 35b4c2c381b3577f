"""The one user-facing failure type of the command line."""


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""
