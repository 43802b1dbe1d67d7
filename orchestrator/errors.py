"""The one exception type for user mistakes: the CLI prints its message on one line."""

from workers.contract.errors import first_line

__all__ = ["KvorchError", "first_line"]


class KvorchError(Exception):
    """Bad input or environment; the message names the problem and the fix."""
