"""Sweeps: what a multirun job does before it runs, and the sweep summary.

A job limits its torch threads to its share of the cores (parallel launchers), and a job whose
directory already holds a completed run of the same config is skipped, so rerunning a sweep
command with the same `hydra.sweep.dir` finishes what is left (interrupted jobs resume from
their `checkpoints/last.pt`).

The summary — `sweep_summary.csv`, `sweep_summary.md`, `sweep.png` in the sweep directory, one
row per job — is kept current by a Hydra callback after every job, completed when the multirun
ends, and can be rewritten any time by `finetune-summary SWEEP_DIR`. It reads only the job
directories, so failed, killed and missing jobs get rows too.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

FIELDS = ["job", "overrides", "status", "metric", "best", "best_epoch", "wall_s", "threads", "run_dir", "error"]
FAILED = ("failed", "missing", "unreadable", "interrupted")
SUMMARY_FILES = ("sweep_summary.csv", "sweep_summary.md", "sweep.png")


# ---- inside a job --------------------------------------------------------------------------------


def limit_threads(launcher_cfg: Any) -> int:
    """Give each parallel job its share of the cores, so jobs never oversubscribe the machine.

    joblib runs `n_jobs` processes at once (-1: one per core); submitit gives a job `cpus_per_task`.
    The basic launcher runs one job at a time and keeps torch's default."""
    import torch

    cores = os.cpu_count() or 1
    n_jobs = launcher_cfg.get("n_jobs") if launcher_cfg is not None else None
    cpus = launcher_cfg.get("cpus_per_task") if launcher_cfg is not None else None
    if n_jobs:
        parallel = cores if n_jobs < 0 else min(int(n_jobs), cores)
        torch.set_num_threads(max(1, cores // parallel))
    elif cpus:
        torch.set_num_threads(max(1, int(cpus)))
    return torch.get_num_threads()


def completed_result(run_dir: Path, cfg) -> float | None:
    """The monitored value of a completed run of this same config in `run_dir`, else None.

    A completed job is recognised by its summary.json and the resolved config stored in its
    model.safetensors, so a sweep dir reused with other settings is never mistaken for done."""
    summary_file = run_dir / "summary.json"
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("status") != "completed":
        return None
    from omegaconf import OmegaConf

    from finetune.errors import RunDirError

    saved = saved_config(run_dir)  # raises DamagedRun
    if saved != OmegaConf.to_yaml(cfg, resolve=True):
        raise RunDirError(
            f"{run_dir} holds a completed run of a different config: it is not overwritten.",
            "rerun the sweep with its original settings to finish it, or give a new hydra.sweep.dir",
        )
    best = summary.get("best") or {}
    return best.get("value")


class DamagedRun(Exception):
    """A job directory whose summary says completed but whose weights cannot be read."""


def saved_config(run_dir: Path) -> str | None:
    """The resolved config a completed run stored in its model.safetensors (header only)."""
    from finetune.checkpoint.read import safetensors_header
    from finetune.errors import FinetuneError

    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise DamagedRun("completed, but model.safetensors is missing")
    try:
        header, _ = safetensors_header(weights)
    except FinetuneError as exc:
        raise DamagedRun(f"completed, but model.safetensors is damaged ({exc.problem.replace(str(weights), 'the file')})") from None
    return (header.get("__metadata__") or {}).get("config")


DAMAGED_FIX = "delete this job's directory and rerun the sweep to run it again"


# ---- the summary ---------------------------------------------------------------------------------


def _read_yaml(path: Path):
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def job_row(job_dir: Path) -> dict:
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    row = {"job": job_dir.name, "overrides": " ".join(overrides), "run_dir": str(job_dir)}
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except FileNotFoundError:
        # Started (Hydra wrote its config) but never finished: killed, or still running.
        return {**row, "status": "missing", "error": "no summary.json: killed, or still running"}
    except (OSError, ValueError):
        return {**row, "status": "unreadable", "error": "summary.json is not valid JSON"}
    best = summary.get("best") or {}
    error = summary.get("error") or ""
    if summary.get("status") == "completed":
        try:
            saved_config(job_dir)
        except DamagedRun as exc:
            return {**row, "status": "failed", "error": f"{exc}: {DAMAGED_FIX}"}
    return {**row, "status": summary.get("status"), "metric": best.get("metric", ""), "best": best.get("value", ""),
            "best_epoch": best.get("epoch", ""), "wall_s": summary.get("wall_s", ""),
            "threads": summary.get("torch_threads", ""), "error": error.splitlines()[0] if error else ""}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Hydra job directories (they hold `.hydra/`), numbered ones in numeric order."""
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def monitor_mode(sweep_dir: Path, jobs: list[Path]) -> str:
    """max | min: what the jobs' summaries say (trainer.mode=auto is resolved there), else their config."""
    for job in jobs:
        try:
            mode = (json.loads((job / "summary.json").read_text()).get("best") or {}).get("mode")
        except (OSError, ValueError, AttributeError):
            mode = None
        if mode in ("max", "min"):
            return mode
    for job in jobs:
        config = _read_yaml(job / ".hydra" / "config.yaml") or {}
        mode = (config.get("trainer") or {}).get("mode")
        if mode in ("max", "min"):
            return mode
        mode = (config.get("task") or {}).get("mode")
        if mode in ("max", "min"):
            return mode
    return "max"


def best_row(rows: list[dict], mode: str) -> dict | None:
    scored = [r for r in rows if r["status"] == "completed" and _number(r.get("best")) is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: _number(r["best"]))


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def markdown(rows: list[dict], best: dict | None, mode: str, sweep_dir: Path) -> str:
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    failed = [r for r in rows if r["status"] in FAILED]
    lines = [f"# Sweep summary: {sweep_dir}", ""]
    lines.append(f"{len(rows)} jobs: {len(rows) - len(failed)} ok, {len(failed)} failed or unfinished. "
                 f"Best = {'highest' if mode == 'max' else 'lowest'} {metric}.")
    if best is not None:
        lines += ["", f"**Best: job {best['job']}**, {metric} = {_fmt(best['best'])} (epoch {best['best_epoch']}): "
                  f"`{best['overrides'] or '(no overrides)'}`"]
    lines += ["", f"| job | status | {metric} | epoch | wall s | threads | overrides | note |",
              "|---:|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        mark = " ★" if best is not None and r is best else ""
        note = r.get("error", "").replace("|", "\\|")
        lines.append(f"| {r['job']}{mark} | {r['status']} | {_fmt(r.get('best', ''))} | {r.get('best_epoch', '')} | "
                     f"{_fmt(r.get('wall_s', ''), 1)} | {r.get('threads', '')} | `{r['overrides']}` | {note} |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 4) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.{digits}f}"


def write_sweep_summary(sweep_dir: Path, plot: bool = True) -> tuple[list[dict], dict | None]:
    """Write the CSV and Markdown summaries (and the plot) of SWEEP_DIR; return the rows and the best."""
    from finetune.state import write_atomic

    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir)
    rows = [job_row(d) for d in jobs]
    mode = monitor_mode(sweep_dir, jobs)
    best = best_row(rows, mode)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)

    write_atomic(sweep_dir / "sweep_summary.csv", write_csv)
    write_atomic(sweep_dir / "sweep_summary.md", lambda tmp: tmp.write_text(markdown(rows, best, mode, sweep_dir)))
    if plot:
        try:
            from finetune.console.plots import plot_sweep
        except ImportError:  # matplotlib is optional
            pass
        else:
            plot_sweep(rows, best, sweep_dir / "sweep.png")
    return rows, best


def print_summary(rows: list[dict], best: dict | None, sweep_dir: Path) -> None:
    for r in rows:
        mark = "*" if best is not None and r is best else " "
        detail = r["overrides"] if r["status"] not in FAILED else f"{r['overrides']}  ({r.get('error') or r['status']})"
        print(f" {mark}{r['job']:>4}  {r['status'] or '':11s} {_fmt(r.get('best', '')):>8}  {detail}")
    if best is not None:
        print(f"best: job {best['job']}  {best['metric']} = {_fmt(best['best'])}  {best['overrides']}  ({best['run_dir']})")
    failed = [r for r in rows if r["status"] in FAILED]
    if failed:
        print(f"{len(failed)} of {len(rows)} jobs did not complete: {', '.join(r['job'] for r in failed)}; "
              "rerun the same command with the same hydra.sweep.dir to retry them (completed jobs are skipped)")
    print(f"sweep summary: {sweep_dir / 'sweep_summary.md'} (csv, png beside it)")


class SummaryLock:
    """An exclusive lock file in the sweep dir: parallel jobs rewrite the summary one at a time."""

    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / ".sweep_summary.lock"

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


class SweepSummaryCallback(Callback):
    """Hydra callback: refresh the sweep summary after each job, finish it when the multirun ends.

    A job that failed makes the sweep exit with status 1 after the summary is written."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        from finetune.errors import FinetuneError

        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            try:
                with SummaryLock(sweep_dir):
                    write_sweep_summary(sweep_dir, plot=False)
            except FinetuneError as exc:  # best effort between jobs: the end of the sweep must succeed
                log.warning("sweep summary not refreshed after this job: %s", exc.problem)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from finetune.console.messages import report_error
        from finetune.errors import FinetuneError

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            with SummaryLock(sweep_dir):
                rows, best = write_sweep_summary(sweep_dir)
        except FinetuneError as exc:  # a full disk: the sweep has no summary, so it did not succeed
            report_error(exc)
            sys.exit(exc.exit_code)
        print_summary(rows, best, sweep_dir)
        if any(r["status"] in FAILED for r in rows):
            sys.exit(1)

