"""The commands, one module each: `finetune`, `finetune-inspect`, `finetune-eval`, `finetune-summary`.

They sit on top of the package: each parses its arguments, calls the stages, and turns errors into
one message and an exit code. Nothing imports a command.
"""

from __future__ import annotations

import sys

from finetune.errors import FinetuneError


def report_error(exc: FinetuneError) -> None:
    """A user error as the commands print it: the problem, then the fix."""
    print(f"finetune: error: {exc.problem}", file=sys.stderr)
    if exc.fix:
        print(f"  fix: {exc.fix}", file=sys.stderr)
