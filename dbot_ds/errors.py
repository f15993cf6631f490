"""Errors a user can fix, and how a command reports them: one line naming the problem and the
fix (exit status 2), never a traceback. A bug is not a user error: it keeps its traceback."""

from __future__ import annotations

import re
import sys


class UserError(Exception):
    """Bad input or a state of the run the user must resolve (configs, exports, shards, locks)."""
    exit_code = 2


def message(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker raised it: torch re-raises it in the
    main process with the worker's traceback as its text ("Caught X in DataLoader worker ...
    Original Traceback ..."), whose last `X: ...` line is the message."""
    text = str(error)
    if "Original Traceback" in text:
        # the last such line: the traceback's own text may quote earlier ones
        lines = list(re.finditer(rf"^(?:[\w.]+\.)?{type(error).__name__}: ", text, re.M))
        text = text[lines[-1].end():] if lines else text
    return text.strip()


def run(func, args, prog: str) -> int:
    """func(args), with user errors (and missing files) as `prog: error: ...` on stderr."""
    try:
        return func(args) or 0
    except (UserError, FileNotFoundError) as e:
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
