"""The one exception type for user mistakes: the CLI prints its message on one line."""


class KvorchError(Exception):
    """Bad input or environment; the message names the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (its type name when it has none): what a one-line
    message quotes of a cause whose text runs to tracebacks (Ray's errors do)."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
