"""`finetune [overrides]`: one run, or a sweep with --multirun (also `python -m finetune`, and each
rank of `torchrun -m finetune`).

A user error (FinetuneError) ends as one message with its fix and the error's exit code. Any other
exception escaping the run -- a bug, a user's model raising inside forward -- ends as one line
naming it and the log file that holds its traceback, and exit code 1. HYDRA_FULL_ERROR=1 shows
tracebacks instead. Under --multirun a failed job does not stop the sweep: its summary.json says
why, and it returns NaN (an Optuna sweeper reads that as a failed trial).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune import config as _config  # noqa: F401  (registers the schema and resolvers)
from finetune import distributed
from finetune.commands import config_origin, report_error
from finetune.errors import ConfigError, FinetuneError
from finetune.paths import config_dir

log = logging.getLogger("finetune")

# conf/hydra/launcher/joblib.yaml takes the name of the joblib plugin's own config on purpose (so
# hydra/launcher=joblib is the launcher that survives a job's hard death); Hydra warns about the shared
# name on every config load, in the launcher's workers too (they import this module with the task).
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema",
                        category=UserWarning)
traceback_log = logging.getLogger("finetune.traceback")  # job_logging sends it to the run's log file only


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from finetune.run import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    world = distributed.current_world()
    if world.is_distributed and world.is_main:
        distributed.announce_run_dir(str(run_dir.resolve()))  # the other ranks wait for it in main()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        from finetune.sweep import DAMAGED_FIX, DamagedRun, completed_result, limit_threads

        limit_threads(hydra_cfg.launcher)
        try:
            done = completed_result(run_dir, cfg)
        except FinetuneError as exc:  # the sweep dir holds another sweep: stop before touching it
            report_error(exc)
            sys.exit(exc.exit_code)
        except DamagedRun as exc:  # the job failed; its files stay as they are, its row says why
            log.error("job %s in %s: %s; %s", hydra_cfg.job.num, run_dir, exc, DAMAGED_FIX)
            return float("nan")
        if done is not None:  # a rerun of the sweep: this job finished before
            log.info("job %s already completed in %s: skipped", hydra_cfg.job.num, run_dir)
            return done
    started = time.time()
    logged = _LoggedTracebacks()
    traceback_log.addFilter(logged)
    try:
        summary = run(cfg, run_dir)
    except FinetuneError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not world.is_main:  # rank 0 reports it; a rank's own error is marked with its rank
            print(f"[rank{world.rank}] ", end="", file=sys.stderr)
        report_error(exc, config_origin(exc.group))
        if multirun:
            return job_failed(run_dir, started, str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:  # not the user's input: a bug, or user code (a model's forward) raising
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_unexpected(exc, world, already_logged=logged.holds(exc))
        if multirun:
            return job_failed(run_dir, started, f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    finally:
        traceback_log.removeFilter(logged)
    status = summary["status"]
    log.info("%s: %s", status, run_dir)
    if status == "interrupted":
        if world.is_main:
            print(f"finetune: interrupted; resume with the same command and hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(summary.get("exit_code", 130))
    best = summary.get("best") or {}
    return best.get("value")


def job_failed(run_dir: Path, started: float, error: str) -> float:
    """A multirun job that failed: the sweep goes on; the job's row in the sweep summary says why."""
    from finetune.run import base_summary
    from finetune.state import write_json

    from finetune.run_files import previous_status

    previous = run_dir / "summary.json"
    # Not over this attempt's own summary, nor over an earlier run's results (an interrupted run
    # whose resume was refused keeps its summary); an earlier failure's record is replaced.
    if not previous.exists() or (previous.stat().st_mtime < started and previous_status(run_dir) == "failed"):
        write_json(run_dir / "summary.json", base_summary("failed", 0.0, error=error))
    return float("nan")


def report_unexpected(exc: Exception, world: distributed.World, already_logged: bool) -> None:
    """One console line; the traceback goes to the run's log file (once), never to the console."""
    log_file = next((Path(h.baseFilename) for h in traceback_log.handlers if isinstance(h, logging.FileHandler)), None)
    if log_file is not None and not already_logged:
        traceback_log.error("%s escaped the run", type(exc).__name__, exc_info=exc)
    where = f"traceback in {log_file}" if log_file is not None else "HYDRA_FULL_ERROR=1 shows the traceback"
    message = str(exc).strip().splitlines()
    rank = "" if world.is_main else f"[rank{world.rank}] "
    print(f"{rank}finetune: error: {type(exc).__name__}: {message[0] if message else ''} ({where})", file=sys.stderr)


class _LoggedTracebacks(logging.Filter):
    """Remembers the exceptions whose tracebacks the run already logged (run.py logs a failed training's)."""

    def __init__(self) -> None:
        super().__init__()
        self.exceptions: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            self.exceptions.append(record.exc_info[1])
        return True

    def holds(self, exc: BaseException) -> bool:
        return any(e is exc for e in self.exceptions)


def main(argv: list[str] | None = None) -> int:
    """`argv`: the arguments after the command name (None: sys.argv[1:])."""
    with _command_line(argv):
        world = distributed.torchrun_world()
        if world is None:
            _hydra_main()
        else:
            torchrun_main(world)
    return 0


def torchrun_main(world: distributed.World) -> None:
    """One rank of `torchrun --nproc_per_node=N -m finetune ...`: join the process group, then run
    Hydra in the directory rank 0's Hydra chose (ranks start at slightly different instants, so a
    timestamped hydra.run.dir would differ, and each rank would reserve its own)."""
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        if world.is_main:
            report_error(ConfigError("--multirun under torchrun: every rank would launch the whole sweep.",
                                     "run the sweep without torchrun and set trainer.nproc=N for DDP inside each job"))
        sys.exit(2)
    distributed.init_from_env(world)
    try:
        if not world.is_main:
            run_dir = distributed.wait_for_run_dir()
            if not run_dir:
                sys.exit(0)  # rank 0 stopped before a run (--help, --cfg, or an error it reports)
            sys.argv += distributed.follower_overrides(run_dir)
        _hydra_main()
    finally:
        if world.is_main:
            distributed.announce_run_dir(None)  # unblocks the others if Hydra stopped before the run
        distributed.teardown()


@contextlib.contextmanager
def _command_line(argv: list[str] | None):
    """Hydra reads its arguments from sys.argv: give it `argv` for the length of the command."""
    if argv is None:
        yield
        return
    saved = sys.argv
    sys.argv = [saved[0] if saved else "finetune", *argv]
    try:
        yield
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
