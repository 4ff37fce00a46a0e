"""Entry points. User errors become one message and an exit code; tracebacks are for bugs
(or for HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finetune import config as _config  # noqa: F401  (registers the schema and resolvers)
from finetune.errors import FinetuneError
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
    try:
        summary = run(cfg, run_dir)
    except FinetuneError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_error(exc)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # The sweep goes on; this job's row in sweep_summary.csv says why it failed.
            from finetune.run import base_summary
            from finetune.state import write_json

            if not (run_dir / "summary.json").exists():
                write_json(run_dir / "summary.json", base_summary("failed", 0.0, error=str(exc)))
            raise
        sys.exit(exc.exit_code)
    status = summary["status"]
    log.info("%s: %s", status, run_dir)
    if status == "interrupted":
        print(f"finetune: interrupted; resume with the same command and hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(summary.get("exit_code", 130))
    best = summary.get("best") or {}
    return best.get("value")


def main() -> None:
    _hydra_main()


def inspect_main(argv: list[str] | None = None) -> None:
    from finetune.inspection import main as inspect

    sys.exit(inspect(sys.argv[1:] if argv is None else argv))


def eval_main(argv: list[str] | None = None) -> None:
    from finetune.evaluate import main as evaluate

    sys.exit(evaluate(argv))


def summary_main(argv: list[str] | None = None) -> None:
    from finetune.sweep import main as summarize

    sys.exit(summarize(argv))
