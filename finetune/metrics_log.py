"""metrics.csv in long format (`epoch,step,split,name,value`), appended and flushed as it goes."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

FIELDS = ["epoch", "step", "split", "name", "value"]


class MetricsLog:
    """Every value goes to metrics.csv and, when `tensorboard_dir` is given, to TensorBoard."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path = path
        self._tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint we resume from.
            self._tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)
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
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class NoMetricsLog:
    """What ranks > 0 log to under DDP: nothing (rank 0 logs the values all-reduced over ranks)."""

    def log(self, epoch: int, step: int, split: str, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"]), "step": int(r["step"]), "value": float(r["value"])} for r in csv.DictReader(f)]


def tensorboard_wanted(setting: bool | None) -> bool:
    """null: on when the tensorboard package is installed; true without it is an error."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if setting and not installed:
        from finetune.errors import ConfigError

        raise ConfigError("trainer.tensorboard=true but the tensorboard package is not installed.",
                          "pip install tensorboard, or set trainer.tensorboard=false")
    return installed if setting is None else bool(setting)
