"""metrics.csv in long format (`epoch,step,split,name,value`), appended and flushed as it goes."""

from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ["epoch", "step", "split", "name", "value"]


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
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
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "epoch": int(r["epoch"]), "step": int(r["step"]), "value": float(r["value"])} for r in csv.DictReader(f)]
