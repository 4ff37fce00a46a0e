"""The run's loggers (config group `logger`): metrics.csv in long format (`epoch,step,split,name,value`),
appended and flushed as it goes, always; TensorBoard and MLflow (finetune/tracking.py) when selected."""

from __future__ import annotations

import csv
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FIELDS = ["epoch", "step", "split", "name", "value"]


class MetricsLog:
    """Every value goes to metrics.csv and, when given, to TensorBoard (`tensorboard_dir`) and MLflow (`tracker`)."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None,
                 tensorboard_flush_secs: int = 120):
        self.path = path
        self.tracker = None  # tracking.MlflowLog, attached by open_metrics_log
        self._tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint we resume from.
            self._tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None,
                                              flush_secs=tensorboard_flush_secs)
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        new = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(FIELDS)
            self._file.flush()

    def _truncate_after(self, step: int) -> None:
        """Drop rows a killed run logged after the checkpoint we resume from: they will be redone."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if len(r) == 5 and int(r[1]) <= step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def log(self, epoch: int, step: int, split: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.writerow([epoch, step, split, name, f"{value:.6g}"])
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)
            if self.tracker is not None:
                self.tracker.log(step, f"{split}/{name}", value)
        self._file.flush()

    def close(self) -> None:
        """The files; MLflow goes on until `end`, after summary.json."""
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def end(self, status: str) -> None:
        """The run ended with `status` (summary.json is written): MLflow gets the reports and the status."""
        if self.tracker is not None:
            self.tracker.end(status)


class NoMetricsLog:
    """What ranks > 0 log to under DDP: nothing (rank 0 logs the values all-reduced over ranks)."""

    def log(self, epoch: int, step: int, split: str, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...
    def end(self, status: str) -> None: ...


def open_metrics_log(cfg, run_dir: Path, resume_step: int | None) -> MetricsLog:
    """metrics.csv (truncated after `resume_step` on a resume), and the loggers `logger` selects."""
    loggers = cfg.logger
    tensorboard = tensorboard_wanted(cfg.trainer.tensorboard, loggers.tensorboard.enabled)
    metrics_log = MetricsLog(run_dir / "metrics.csv", resume_step, run_dir / "tensorboard" if tensorboard else None,
                             loggers.tensorboard.flush_secs)
    if loggers.mlflow.enabled:
        from finetune.tracking import earlier_values, start_mlflow

        earlier = earlier_values(read_metrics(metrics_log.path)) if resume_step is not None else []
        metrics_log.tracker = start_mlflow(cfg, run_dir, earlier)
    return metrics_log


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"]), "step": int(r["step"]), "value": float(r["value"])} for r in csv.DictReader(f)]


def tensorboard_wanted(setting: bool | None, listed: bool = True) -> bool:
    """trainer.tensorboard, kept from before the `logger` group: false is off, true is on (an error
    without the tensorboard package); null follows `logger` (listed: on when the package is installed)."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting and not installed:
        from finetune.errors import ConfigError

        raise ConfigError("trainer.tensorboard=true but the tensorboard package is not installed.",
                          "pip install tensorboard, or set trainer.tensorboard=false")
    if setting is not None:
        return bool(setting)
    if listed and not installed:
        log.info("logger lists tensorboard but the tensorboard package is not installed: no TensorBoard events "
                 "(pip install tensorboard)")
    return listed and installed
