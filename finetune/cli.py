"""Entry points. User errors become one message and an exit code; tracebacks are for bugs
(or for HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune import config as _config  # noqa: F401  (registers the schema and resolvers)
from finetune import distributed
from finetune.errors import ConfigError, FinetuneError
from finetune.paths import config_dir

log = logging.getLogger("finetune")


def report_error(exc: FinetuneError) -> None:
    print(f"finetune: error: {exc.problem}", file=sys.stderr)
    if exc.fix:
        print(f"  fix: {exc.fix}", file=sys.stderr)


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
        from finetune.sweep import completed_result, limit_threads

        limit_threads(hydra_cfg.launcher)
        try:
            done = completed_result(run_dir, cfg)
        except FinetuneError as exc:  # the sweep dir holds another sweep: stop before touching it
            report_error(exc)
            sys.exit(exc.exit_code)
        if done is not None:  # a rerun of the sweep: this job finished before
            log.info("job %s already completed in %s: skipped", hydra_cfg.job.num, run_dir)
            return done
    started = time.time()
    try:
        summary = run(cfg, run_dir)
    except FinetuneError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not world.is_main:  # rank 0 reports it; a rank's own error is marked with its rank
            print(f"[rank{world.rank}] ", end="", file=sys.stderr)
        report_error(exc)
        if multirun:
            # The sweep goes on; this job's row in the sweep summary says why it failed, and a
            # NaN tells an Optuna sweeper the trial failed.
            from finetune.run import base_summary
            from finetune.state import write_json

            previous = run_dir / "summary.json"
            if not previous.exists() or previous.stat().st_mtime < started:  # none from this attempt
                write_json(run_dir / "summary.json", base_summary("failed", 0.0, error=str(exc)))
            return float("nan")
        sys.exit(exc.exit_code)
    status = summary["status"]
    log.info("%s: %s", status, run_dir)
    if status == "interrupted":
        if world.is_main:
            print(f"finetune: interrupted; resume with the same command and hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(summary.get("exit_code", 130))
    best = summary.get("best") or {}
    return best.get("value")


def main() -> None:
    world = distributed.torchrun_world()
    if world is None:
        _hydra_main()
        return
    torchrun_main(world)


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


def inspect_main(argv: list[str] | None = None) -> None:
    from finetune.inspection import main as inspect

    sys.exit(inspect(sys.argv[1:] if argv is None else argv))


def eval_main(argv: list[str] | None = None) -> None:
    from finetune.evaluate import main as evaluate

    sys.exit(evaluate(argv))


def summary_main(argv: list[str] | None = None) -> None:
    from finetune.sweep import main as summarize

    sys.exit(summarize(argv))
