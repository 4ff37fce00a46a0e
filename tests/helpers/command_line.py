"""The command line of each finetune command, for tests that run it for real in a subprocess.

Each runs as `python -m <module>` with the interpreter running the tests, so the code under test
is the one on its path (a console script installed in the environment may belong to another
checkout). tests/test_commands.py checks that the console scripts name these same functions.
"""

from __future__ import annotations

import sys

MODULES = {
    "finetune": "finetune",
    "finetune-inspect": "finetune.commands.inspect",
    "finetune-eval": "finetune.commands.eval",
    "finetune-export": "finetune.commands.export",
    "finetune-summary": "finetune.commands.summary",
}


def command(name: str) -> list[str]:
    """`finetune-eval` -> [python, -m, finetune.commands.eval]; `python` -> [python]."""
    if name == "python":
        return [sys.executable]
    return [sys.executable, "-m", MODULES[name]]
