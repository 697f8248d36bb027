"""Errors that end a command with a clear message instead of a traceback.

Exit codes: 1 when the input was read but is invalid (bad rows, failed checks, an input artifact of the wrong
kind), 2 for a usage error or an unreadable input (docs/design.md).
"""


class RLHFError(Exception):
    """A failure the user can act on; the CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class InvalidInput(RLHFError):
    """The input was read but is invalid (exit 1)."""

    exit_code = 1


class UsageError(RLHFError):
    """Bad command line, bad config, or an input that cannot be read (exit 2)."""

    exit_code = 2
