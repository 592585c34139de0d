"""Starting worker processes from a user's script: refuse, in one line, a call that would hang.

``synth`` (a spawn process pool) and ``build`` on a LocalCluster start processes that import the
caller's main module again. In a script whose call is not under ``if __name__ == "__main__":``
each child runs the call again: Python stops them with a long traceback (Dask) or the parent
waits forever on dead children (a process pool). The call's line in the main script is checked
against the script's syntax tree before any process starts.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from types import FrameType

from pipeline.errors import MorphsetError


class UnguardedMain(MorphsetError):
    """The API was called at the top level of a script, outside ``if __name__ == "__main__":``."""


@functools.cache
def _guarded_lines(path: str) -> frozenset[int] | None:
    """Line numbers inside ``if __name__ == "__main__":`` blocks of a script (None if unreadable)."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    lines: set[int] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and "__main__" in ast.unparse(node.test)
            and "__name__" in ast.unparse(node.test)
        ):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return frozenset(lines)


def refuse_unguarded_main(what: str) -> None:
    """Raise :class:`UnguardedMain` when the current call comes from the top level of the main
    script outside an ``if __name__ == "__main__":`` block (processes would re-run it)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py"):
        return  # an interactive session, `python -c`, a notebook, pytest: nothing is re-imported
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_globals.get("__name__") in ("__main__", "__mp_main__")
            and frame.f_code.co_name == "<module>"
        ):
            guarded = _guarded_lines(str(path))
            if guarded is not None and frame.f_lineno not in guarded:
                raise UnguardedMain(
                    f"{path}:{frame.f_lineno}: {what} starts worker processes, which import this script "
                    'again: put the call under `if __name__ == "__main__":` (README, "From Python")'
                )
            return
        frame = frame.f_back
