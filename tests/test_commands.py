"""The command layer: console scripts name the commands' mains, nothing imports a command, and an
exception that is not a user error ends `finetune` as one line with its traceback in the run's log."""

from __future__ import annotations

import ast
import importlib
import io
import json
import logging
import math
import os
from pathlib import Path

import pytest
from command_line import MODULES

import finetune

PACKAGE = Path(finetune.__file__).resolve().parent
TESTS_CONF = Path(__file__).parent / "conf"


def test_console_scripts_name_each_commands_main():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(MODULES)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module == f"finetune.commands.{name.removeprefix('finetune-') if '-' in name else 'finetune'}"
        main = getattr(importlib.import_module(module), attr)
        assert callable(main)
        runs_as = importlib.import_module(MODULES[name])  # how the tests start it: python -m <module>
        if runs_as.__name__ == "finetune":
            runs_as = importlib.import_module("finetune.__main__")
        assert runs_as.main is main, name


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_nothing_imports_a_command():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel.name == "__main__.py":
            continue
        commands = {m for m in _imported_modules(path) if m == "finetune.commands" or m.startswith("finetune.commands.")}
        assert not commands, f"{rel} imports {sorted(commands)}"


# ---- an exception that is not a user error ----------------------------------------------------


RAISING = ["--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny", "checkpoint.path=null",
           "model.base._target_=tiny.TinyNetRaising", "trainer.epochs=1", "trainer.progress=false",
           "trainer.tensorboard=false"]
RAISED = "IndexError: adapter mask index 16 is out of bounds for dimension 0 with size 16"


@pytest.mark.slow
def test_a_model_raising_in_forward_is_one_line_with_the_traceback_in_the_log(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("finetune", *RAISING, f"hydra.run.dir={run_dir}")
    assert result.returncode == 1, result.stdout + result.stderr
    log_file = (run_dir / "finetune.log").resolve()
    assert result.stderr.strip().splitlines() == [f"finetune: error: {RAISED} (traceback in {log_file})"]
    assert "Traceback" not in result.stdout + result.stderr
    log = log_file.read_text()
    assert log.count("Traceback (most recent call last)") == 1 and "in forward" in log and RAISED in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == RAISED
    assert not (run_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_full_error_reraises_an_unexpected_exception(cli, cli_env, tmp_path):
    result = cli("finetune", *RAISING, f"hydra.run.dir={tmp_path / 'run'}", env={**cli_env, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "in forward" in result.stderr and "finetune: error:" not in result.stderr


@pytest.fixture
def traceback_file(tmp_path):
    """The finetune.traceback logger as the job logging config sets it up: to a file only."""
    logger = logging.getLogger("finetune.traceback")
    handler = logging.FileHandler(tmp_path / "finetune.log")
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [handler], False
    yield Path(handler.baseFilename)
    handler.close()
    logger.handlers, logger.propagate = saved


def _raise(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_an_exception_the_run_did_not_log_is_logged_once(traceback_file, capsys):
    from finetune.commands.finetune import report_unexpected
    from finetune.distributed import SINGLE

    report_unexpected(_raise(KeyError("layer9")), SINGLE, already_logged=False)
    assert capsys.readouterr().err == f"finetune: error: KeyError: 'layer9' (traceback in {traceback_file})\n"
    assert traceback_file.read_text().count("Traceback (most recent call last)") == 1

    report_unexpected(_raise(ValueError("first line\nsecond line")), SINGLE, already_logged=True)
    assert capsys.readouterr().err == f"finetune: error: ValueError: first line (traceback in {traceback_file})\n"
    assert "ValueError" not in traceback_file.read_text()  # the run had logged it: not twice


def test_without_a_log_file_the_line_says_how_to_see_the_traceback(capsys):
    from finetune.commands.finetune import report_unexpected
    from finetune.distributed import World

    logger = logging.getLogger("finetune.traceback")
    saved = logger.handlers
    logger.handlers = []  # ranks > 0: their job logging writes no file
    try:
        report_unexpected(_raise(RuntimeError("boom")), World(rank=1, size=2, local_rank=1), already_logged=False)
    finally:
        logger.handlers = saved
    assert capsys.readouterr().err == "[rank1] finetune: error: RuntimeError: boom (HYDRA_FULL_ERROR=1 shows the traceback)\n"


def test_a_failed_multirun_job_returns_nan_and_keeps_a_newer_summary(tmp_path):
    import time

    from finetune.commands.finetune import job_failed

    assert math.isnan(job_failed(tmp_path, time.time(), "IndexError: boom"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "IndexError: boom"
    (tmp_path / "summary.json").write_text('{"status": "failed", "error": "from the run"}')
    started = os.stat(tmp_path / "summary.json").st_mtime - 1  # the run wrote it after this attempt started
    assert math.isnan(job_failed(tmp_path, started, "IndexError: boom"))
    assert json.loads((tmp_path / "summary.json").read_text())["error"] == "from the run"
