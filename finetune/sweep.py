"""Sweep summary of a multirun directory: one row per job, robust to failed and missing jobs.

Written by a Hydra callback at the end of a multirun, and by `finetune-summary SWEEP_DIR`
(Hydra's `on_multirun_end` does not fire when a job raised).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

FIELDS = ["job", "overrides", "status", "metric", "best", "best_epoch", "wall_s", "run_dir", "error"]


def _job_row(job_dir: Path) -> dict:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = ""
    if overrides_file.exists():
        import yaml

        overrides = " ".join(yaml.safe_load(overrides_file.read_text()) or [])
    row = {"job": job_dir.name, "overrides": overrides, "run_dir": str(job_dir)}
    summary_file = job_dir / "summary.json"
    if not summary_file.exists():
        # Started (Hydra wrote its config) but never finished: killed, or failed before training.
        return {**row, "status": "missing"}
    try:
        summary = json.loads(summary_file.read_text())
    except ValueError:
        return {**row, "status": "unreadable"}
    best = summary.get("best") or {}
    return {**row, "status": summary.get("status"), "metric": best.get("metric", ""), "best": best.get("value", ""),
            "best_epoch": best.get("epoch", ""), "wall_s": summary.get("wall_s", ""),
            "error": (summary.get("error") or "").splitlines()[0] if summary.get("error") else ""}


def write_sweep_summary(sweep_dir: Path) -> list[dict]:
    """Write SWEEP_DIR/sweep_summary.csv (one row per job directory, in job order) and return the rows."""
    from finetune.state import write_atomic

    sweep_dir = Path(sweep_dir)
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()),
                  key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    rows = [_job_row(d) for d in jobs]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(sweep_dir / "sweep_summary.csv", write)
    return rows


class SweepSummaryCallback(Callback):
    """Hydra callback: write sweep_summary.csv when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = write_sweep_summary(sweep_dir)
            print(f"sweep summary: {sweep_dir / 'sweep_summary.csv'} ({len(rows)} jobs)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="finetune-summary", description="(Re)write sweep_summary.csv of a multirun directory.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.sweep_dir.is_dir():
        print(f"finetune-summary: error: {args.sweep_dir} is not a directory.\n  fix: pass a multirun directory "
              "(e.g. multirun/DATE/TIME)", file=sys.stderr)
        return 2
    rows = write_sweep_summary(args.sweep_dir)
    for row in rows:
        print(f"  {row['job']:>4}  {row['status'] or '':11s} {row.get('best', '')!s:>8}  {row['overrides']}")
    print(f"wrote {args.sweep_dir / 'sweep_summary.csv'} ({len(rows)} jobs)")
    return 0
