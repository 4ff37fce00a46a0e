"""Exports, each verified before it is written: the artifact runs over the validation data beside the
trained model, and only one that reproduces it is moved into the run directory.

- A training run with lora ops writes `merged.safetensors` and `adapter/` by itself (`export_lora`).
- `finetune-export RUN_DIR --format ...` writes the deployable artifacts of any finished run
  (`export_run`): `merged.safetensors` (lora runs), `model.pt2` (torch.export), `model.onnx`.

Verification is one pass over the validation data: every batch goes through the trained model and
through each artifact's model as its user loads it (artifacts.py), in float32, and
`export_report.json` records, per artifact, the largest absolute difference of the outputs, the
output scale (the largest absolute output of the trained model) and each metric of both. An
artifact passes when the difference is within the tolerance × the output scale; one that does not
is not written, and the run (or the command) fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.adapters import NotPeftExpressible
from finetune.artifacts import ADAPTER, MERGED, ONNX, PROGRAM, ArtifactError, ExampleInputs, stage_merged, \
    stage_onnx, stage_peft_adapter, stage_program
from finetune.data import ShardSampler
from finetune.errors import TrainingError
from finetune.model import AppliedEdit
from finetune.state import fsync_dir, write_json
from finetune.task import Task, move_to

log = logging.getLogger(__name__)

EXPORT_REPORT = "export_report.json"


class ExportError(TrainingError):
    """An exported artifact does not reproduce the trained model."""


@dataclass
class ArtifactCheck:
    file: str
    max_abs_diff: float | None = None
    output_scale: float | None = None  # the largest absolute output of the trained model
    metrics: dict[str, list[float]] = field(default_factory=dict)  # val/<name> -> [trained, exported]
    ok: bool | None = None  # None: not verified (see note)
    tolerance: float | None = None  # the relative tolerance it was held to
    note: str | None = None


@dataclass
class ExportReport:
    tolerance: float  # relative to the output scale
    artifacts: list[ArtifactCheck] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # [{file, reason}]: artifacts not written, and why
    compared: str = "float32 outputs (the task's prediction; its loss where it has none) on the validation data"
    batches: int = 0

    def to_json(self) -> dict:
        out = asdict(self)
        for artifact in out["artifacts"]:
            for key in ("note", "tolerance"):
                if artifact[key] is None:
                    del artifact[key]
        return out

    @property
    def failed(self) -> list[ArtifactCheck]:
        return [a for a in self.artifacts if a.ok is False]


# ---- the comparison pass ----------------------------------------------------------------------------
def _compared(step) -> torch.Tensor:
    return (step.prediction if step.prediction is not None else step.loss).detach().float()


class _Totals:
    """val/loss (per target, as loop.evaluate averages it) and the task's metrics of one model."""

    def __init__(self, task: Task, device: torch.device):
        self.task = task
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)
        for metric in task.metrics.values():
            # Rank 0 exports alone, over the whole validation set: a torchmetrics metric must not wait
            # in compute() for the other ranks (they are done).
            if hasattr(metric, "sync_on_compute"):
                metric.sync_on_compute = False
                metric._to_sync = False
        task.reset_metrics()

    def add(self, step) -> None:
        self.loss += step.loss.detach().double() * step.count
        self.count += step.count
        self.task.update_metrics(step)

    def values(self) -> dict[str, float]:
        out = {"val/loss": (self.loss / self.count).item() if self.count.item() else float("nan")}
        out.update({f"val/{k}": float(v) for k, v in self.task.compute_metrics().items()})
        return out


def whole_validation_set(loader: DataLoader) -> DataLoader:
    """The validation loader over every sample (a DDP rank's loader holds its shard only)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShardSampler) and sampler.indices.start == 0 and sampler.indices.step == 1:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=ShardSampler(len(loader.dataset), 0, 1),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn)


@torch.no_grad()
def compare(task_cfg, trained: nn.Module, exported: dict[str, nn.Module], loader: DataLoader,
            device: torch.device) -> tuple[dict[str, ArtifactCheck], int]:
    """One pass over `loader`: each batch through the trained model and each exported one (float32,
    eval mode). Returns per artifact its largest absolute output difference and both models' metrics."""
    totals = {name: _Totals(Task.from_config(task_cfg).to(device), device) for name in ["", *exported]}
    diffs = {name: torch.zeros((), device=device) for name in exported}
    scale = torch.zeros((), device=device)
    trained.eval()
    for model in exported.values():
        try:
            model.eval()
        except NotImplementedError:  # a torch.export program: traced in eval mode already
            pass
    batches = 0
    for batch in loader:
        batch = move_to(batch, device)
        reference = totals[""].task.step(trained, batch)
        totals[""].add(reference)
        expected = _compared(reference)
        scale = torch.maximum(scale, expected.abs().max())
        for name, model in exported.items():
            step = totals[name].task.step(model, batch)
            totals[name].add(step)
            got = _compared(step)
            diff = (got - expected).abs().max() if got.shape == expected.shape else torch.tensor(float("inf"), device=device)
            diffs[name] = torch.maximum(diffs[name], diff)  # NaN stays NaN: never within a tolerance
        batches += 1
    reference = totals[""].values()
    checks = {}
    for name in exported:
        values = totals[name].values()
        checks[name] = ArtifactCheck(name, float(diffs[name]), float(scale),
                                     {k: [reference[k], values.get(k, float("nan"))] for k in reference})
    return checks, batches


# ---- staging, publishing, reporting -----------------------------------------------------------------
STAGING = ".export.staged"  # artifacts are written here, and moved into the run directory once verified
FORMATS = {"safetensors": MERGED, "torch_export": PROGRAM, "onnx": ONNX}


def _publish(staged: Path, final: Path) -> None:
    """Move a verified artifact (file or folder, and an ONNX file's external data) into place."""
    for source, target in [(staged, final), (staged.with_name(staged.name + ".data"), final.with_name(final.name + ".data"))]:
        if not source.exists():
            continue
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(source, target)
    fsync_dir(final.parent)


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _shown(name: str) -> str:
    return f"{name}/" if name == ADAPTER else name


def verify_and_publish(task_cfg, run_dir: Path, trained: nn.Module, exported: dict[str, nn.Module], staging: Path,
                       report: "ExportReport", loader: DataLoader, device: torch.device) -> None:
    """One pass over `loader` comparing each staged artifact's model with `trained`; the ones within
    the tolerance are moved from `staging` into `run_dir`. Appends a check per artifact to `report`."""
    if not exported:
        return
    checks, report.batches = compare(task_cfg, trained, exported, whole_validation_set(loader), device)
    for name, check in checks.items():
        check.file = _shown(name)
        check.tolerance = report.tolerance
        check.ok = check.max_abs_diff <= report.tolerance * max(check.output_scale, 1e-12)
        report.artifacts.append(check)
        if check.ok:
            _publish(staging / name, run_dir / name)


def log_report(report: "ExportReport") -> None:
    for check in report.artifacts:
        if check.ok is None:
            log.warning("export: %s: %s", check.file, check.note)
            continue
        metrics = ", ".join(f"{k.removeprefix('val/')} {a:.4g} / {b:.4g}" for k, (a, b) in check.metrics.items())
        log.info("export: %s %s on %d validation batches: outputs within %.1e of the trained model's (allowed %.1e = "
                 "%.0e x output scale %.3g); %s (trained / exported)", check.file, "verified" if check.ok else "FAILED",
                 report.batches, check.max_abs_diff, report.tolerance * check.output_scale, report.tolerance,
                 check.output_scale, metrics)


def raise_if_failed(report: "ExportReport") -> None:
    if not report.failed:
        return
    shown = "; ".join(f"{c.file} differs by {c.max_abs_diff:.3g} (allowed {report.tolerance:g} × output scale "
                      f"{c.output_scale:.3g} = {report.tolerance * c.output_scale:.3g})" for c in report.failed)
    raise ExportError(
        f"export verification failed on the validation data: {shown}; not written (export_report.json has the numbers). "
        "model.safetensors holds the trained weights.",
        "a merge or an export is exact up to float rounding: a larger difference means the artifact does not compute "
        "what the model does (report it); if it is rounding in a large model, raise the tolerance "
        "(trainer.export_tolerance, finetune-export --tolerance)",
    )


# ---- a training run with lora ops ------------------------------------------------------------------
def export_lora(cfg, run_dir: Path, model: nn.Module, edits: list[AppliedEdit], val_loader: DataLoader,
                device: torch.device, metadata: dict[str, str]) -> ExportReport | None:
    """Write, verify and record merged.safetensors and adapter/ of a run with lora ops (None: the
    run has none). Raises ExportError, after writing export_report.json, when an artifact is
    outside the tolerance: that artifact is not written."""
    if not any(e.op == "lora" for e in edits):
        return None
    run_dir = Path(run_dir)
    report = ExportReport(tolerance=float(cfg.trainer.export_tolerance))
    staging = run_dir / STAGING
    _discard(staging)
    staging.mkdir()
    try:
        exported = {MERGED: stage_merged(cfg.model, model, staging / MERGED, metadata).to(device)}
        note = None
        try:
            peft_model = stage_peft_adapter(cfg, model, staging / ADAPTER)
        except NotPeftExpressible as why:
            report.skipped.append({"file": f"{ADAPTER}/", "reason": str(why)})
            log.warning("%s/ not written: %s (merged.safetensors holds the fine-tuned model)", ADAPTER, why)
        else:
            if peft_model is None:
                note = ArtifactCheck(f"{ADAPTER}/", note="peft is not installed: written, not verified (pip install peft)")
                _publish(staging / ADAPTER, run_dir / ADAPTER)
            else:
                exported[ADAPTER] = peft_model.to(device)
        verify_and_publish(cfg.task, run_dir, model, exported, staging, report, val_loader, device)
        if note is not None:
            report.artifacts.append(note)
    finally:
        _discard(staging)
    write_json(run_dir / EXPORT_REPORT, report.to_json())
    log_report(report)
    raise_if_failed(report)
    return report


# ---- finetune-export: any finished run ------------------------------------------------------------
def deployable_model(model_cfg, model: nn.Module, edits: list[AppliedEdit], staging: Path,
                     metadata: dict[str, str]) -> tuple[nn.Module, bool]:
    """The model a deployment runs: model B with its adapters merged (its merged.safetensors staged
    in `staging`) for a run with lora ops, else the trained model itself. Also: whether it merged."""
    if any(e.op == "lora" for e in edits):
        return stage_merged(model_cfg, model, staging / MERGED, metadata), True
    return model, False


def example_inputs(task_cfg, loader: DataLoader, device: torch.device) -> ExampleInputs:
    """The first validation batch's model inputs, as the task passes them: what the exporters trace."""
    batch = next(iter(loader), None)
    if batch is None:
        raise ExportError("the validation data is empty: nothing to trace the export with, nor to verify it on.",
                          "check data.val of the run's config")
    args, kwargs, _ = Task.from_config(task_cfg).split(move_to(batch, device))
    return ExampleInputs(tuple(args), dict(kwargs))


def export_run(cfg, run_dir: Path, model: nn.Module, edits: list[AppliedEdit], val_loader: DataLoader,
               device: torch.device, formats: list[str], tolerance: float, metadata: dict[str, str]) -> ExportReport:
    """Write and verify the artifacts `formats` name (keys of FORMATS) for a finished run. The
    report keeps the earlier entries of export_report.json for other files. Raises ExportError,
    after writing the report, when an artifact is outside the tolerance: that one is not written;
    ArtifactError when an exporter cannot convert the model (nothing written)."""
    run_dir = Path(run_dir)
    report = ExportReport(tolerance=float(tolerance))
    staging = run_dir / STAGING
    _discard(staging)
    staging.mkdir()
    model.eval()
    try:
        deployable, merged = deployable_model(cfg.model, model, edits, staging, metadata)
        deployable.to(device).eval()
        exported: dict[str, nn.Module] = {}
        if "safetensors" in formats:
            if merged:
                exported[MERGED] = deployable
            else:
                report.skipped.append({"file": MERGED, "reason": "the run has no lora ops: model.safetensors is "
                                       "already the plain model's weights"})
        wants_program = [f for f in ("torch_export", "onnx") if f in formats]
        if wants_program:
            example = example_inputs(cfg.task, val_loader, device)
            if "torch_export" in formats:
                exported[PROGRAM] = stage_program(deployable, example, staging / PROGRAM)
            if "onnx" in formats:
                exported[ONNX] = stage_onnx(deployable, example, staging / ONNX)
        verify_and_publish(cfg.task, run_dir, model, exported, staging, report, val_loader, device)
    finally:
        _discard(staging)
    write_json(run_dir / EXPORT_REPORT, merged_with_earlier(run_dir / EXPORT_REPORT, report))
    log_report(report)
    raise_if_failed(report)
    return report


def merged_with_earlier(path: Path, report: ExportReport) -> dict:
    """This report's JSON with the earlier report's entries for the files this one did not touch."""
    out = report.to_json()
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return out
    touched = {a["file"] for a in out["artifacts"]} | {s["file"] for s in out["skipped"]}
    out["artifacts"] = [a for a in earlier.get("artifacts", []) if a.get("file") not in touched] + out["artifacts"]
    out["skipped"] = [s for s in earlier.get("skipped", []) if s.get("file") not in touched] + out["skipped"]
    return out
