"""The run directory's files as dataclasses ↔ JSON (DESIGN.md: run-directory contract).

`summary.json` is built in one place, `Summary`; `trainability.json` from the plan and the audit;
and the checks that refuse to overwrite a finished run read them back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune.errors import RunDirError
from finetune.state import LAST, write_json

SUMMARY = "summary.json"
TRAINABILITY = "trainability.json"
LOAD_REPORT = "load_report.json"


@dataclass
class Summary:
    """summary.json. `epochs`: epochs completed; `steps`: optimizer steps done."""

    status: str  # completed | interrupted | failed | dry_run
    epochs: int = 0
    steps: int = 0
    wall_s: float = 0.0
    world_size: int = 1  # the processes that trained (DDP ranks)
    ranks_in_sync: bool | None = None  # under DDP: whether all ranks ended with identical parameters
    resumed_from: dict | None = None  # {epoch, step} of the checkpoint this run resumed from
    resume_changes: dict | None = None  # settings its resumes changed (allowed ones): {dotted key: [old, new]}
    best: dict | None = None  # {metric, value, epoch, mode}
    final: dict = field(default_factory=dict)  # the last validation metrics
    throughput: dict = field(default_factory=lambda: {"train_samples_per_s": None})
    torch_threads: int = field(default_factory=torch.get_num_threads)
    stopped_early: dict | None = None  # {epoch, best_epoch} when trainer.early_stop ended training
    skipped_nonfinite: int | None = None  # batches skipped under trainer.skip_nonfinite (training runs)
    skipped_samples: int | None = None  # unreadable samples skipped under data.skip_bad_samples (when on)
    error: str | None = None
    signal: str | None = None
    exit_code: int | None = None

    @classmethod
    def of_training(cls, status: str, progress, wall_s: float, monitor: str, mode: str, world_size: int,
                    resumed_from: dict | None = None, **fields) -> "Summary":
        """The summary of a training run that got as far as `progress` (loop.Progress)."""
        p = progress
        values = dict(
            status=status,
            epochs=p.epoch - 1,
            steps=p.step,
            wall_s=wall_s,
            world_size=world_size,
            resumed_from=resumed_from,
            best=None if p.best_value is None else {"metric": monitor, "value": p.best_value, "epoch": p.best_epoch, "mode": mode},
            final=dict(p.final),
            throughput={"train_samples_per_s": round(p.train_samples / p.train_seconds, 2) if p.train_seconds else None},
            skipped_nonfinite=p.skipped_nonfinite,
            resume_changes=dict(getattr(p, "resume_changes", None) or {}) or None,
            stopped_early=getattr(p, "stopped_early", None),
        )
        return cls(**{**values, **fields})

    def to_json(self) -> dict:
        out = asdict(self)
        out["wall_s"] = round(self.wall_s, 3)
        for optional in ("resume_changes", "skipped_nonfinite", "skipped_samples", "error", "signal", "exit_code"):
            if out[optional] is None:
                del out[optional]
        return out

    def write(self, run_dir: Path) -> dict:
        summary = self.to_json()
        write_json(Path(run_dir) / SUMMARY, summary)
        return summary


def trainability_json(plan, audit) -> dict:
    return {
        "params": [asdict(p) for p in plan.params],
        "totals": plan.totals(),
        "groups": [asdict(g) for g in plan.groups],
        "frozen_norms": plan.frozen_norms,
        "group_overlaps": [asdict(o) for o in plan.overlaps],  # policy.groups that lost parameters to a narrower glob
        "model_no_weight_decay": plan.model_no_weight_decay,
        "layer_decay": plan.layer_decay.to_json() if plan.layer_decay is not None else None,  # each param's `depth`
        "audit": audit.to_json(),
    }


def write_trainability(run_dir: Path, plan, audit) -> None:
    write_json(Path(run_dir) / TRAINABILITY, trainability_json(plan, audit))


def previous_status(run_dir: Path) -> str | None:
    summary = Path(run_dir) / SUMMARY
    if not summary.exists():
        return None
    try:
        return json.loads(summary.read_text()).get("status")
    except ValueError:
        return "unreadable"


def check_dry_run_dir(run_dir: Path) -> None:
    """A dry run may only replace another dry run's reports, never a training run's."""
    status = previous_status(run_dir)
    if (status not in (None, "dry_run")) or (run_dir / LAST).exists():
        raise RunDirError(
            f"{run_dir} holds a training run (status {status or 'unknown'}): a dry run would overwrite its reports.",
            "dry-run in a new directory (the default hydra.run.dir is timestamped)",
        )


def check_run_dir(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, or None. Refuses to overwrite a finished run."""
    if previous_status(run_dir) == "completed":
        raise RunDirError(
            f"{run_dir} already holds a completed run (summary.json): it is not overwritten.",
            "start a new run directory (the default hydra.run.dir is timestamped), or delete that one",
        )
    if resume not in ("auto", "never"):
        path = Path(resume).expanduser()
        if not path.is_file():
            raise RunDirError(f"trainer.resume={resume}: no such checkpoint.", "give the path of a checkpoints/last.pt, or resume=auto")
        return path
    last = run_dir / LAST
    if last.exists():
        if resume == "never":
            raise RunDirError(
                f"{run_dir} holds a training checkpoint ({LAST}) and trainer.resume=never: it would be overwritten.",
                "use trainer.resume=auto to continue that run, or a new run directory",
            )
        return last
    return None
