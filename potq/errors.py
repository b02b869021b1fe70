"""The one exception type a user sees.

Everything the user can get wrong (a missing file, a bit width out of range, a corrupt checkpoint)
raises :class:`PotqError` with a single line that says what to do. The CLI prints that line to
stderr and exits with code 2; anything else is a bug and keeps its traceback.
"""


class PotqError(Exception):
    """A user-facing error: its message is one line that says what went wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for the one-line PotqError contract."""
    line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return line if len(line) <= 200 else line[:200] + "..."

