"""The one exception type users see.

Anything raised as a `WorkbenchError` is the user's problem (bad input, a
missing file, an unreachable hub) and the CLI prints it as one line on stderr
and exits non-zero. Anything else is our bug and keeps its traceback.
"""


class WorkbenchError(Exception):
    """A problem the user can fix; its message is one line that says how."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """`e`'s message on one line (whitespace collapsed, at most `limit` characters), or its type's name if it has none."""
    text = " ".join(str(e).split())
    return text[:limit] if text else type(e).__name__
