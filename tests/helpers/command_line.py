"""The command line of each finetune command, for tests that run it for real in a subprocess.

Each runs as `python -m <module>` with the interpreter running the tests, so the code under test
is the one on its path (a console script installed in the environment may belong to another
checkout). tests/test_commands.py checks that the console scripts name these same functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def command_env(cache: Path) -> dict[str, str]:
    """The environment a test runs a command in: the demo-data cache, a headless plot backend, the
    test helpers importable (test configs name `_target_`s in them), no HYDRA_FULL_ERROR."""
    env = {**os.environ, "FINETUNE_CACHE": str(cache), "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *filter(None, [env.get("PYTHONPATH")])])
    return env


def finetune_side_by_side(root: Path, runs: dict[str, list[str]], env: dict[str, str], timeout: float = 240) -> dict[str, Path]:
    """`finetune` once per entry of `runs` (name -> its arguments), all started together, each into
    root/name; every one must exit 0. Returns the run directories by name."""
    procs = {name: subprocess.Popen([*command("finetune"), *args, f"hydra.run.dir={root / name}"], cwd=root, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
    return {name: root / name for name in runs}
