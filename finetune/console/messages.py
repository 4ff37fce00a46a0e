"""A user error as every command and the sweep callback print it: one message, its fix, where it was declared."""

from __future__ import annotations

import sys

from finetune.errors import FinetuneError


def report_error(exc: FinetuneError, origin: str | None = None, prog: str = "finetune") -> None:
    """A user error as the commands print it: the problem, then the fix (then, for an error about a
    declaration, where the config group holding it came from)."""
    print(f"{prog}: error: {exc.problem}", file=sys.stderr)
    if exc.fix:
        print(f"  fix: {exc.fix}", file=sys.stderr)
    if origin:
        print(f"  declared in: {origin}", file=sys.stderr)
