"""What a run with lora ops leaves beside model.safetensors, each verified before it is written:

- `merged.safetensors`: the adapters folded into the base weights, the adapter tensors gone: the
  state of model B built without its lora ops, loaded into that model with strict=True here.
- `adapter/`: the adapters alone in PEFT's format (`adapter_model.safetensors`,
  `adapter_config.json`), plus -- as PEFT's `modules_to_save` -- every other module whose tensors
  are not what the checkpoint gives (a new head, an inserted adapter), loaded here with
  `peft.PeftModel.from_pretrained` onto model B without its lora ops, as built from the checkpoint.

Verification is one pass over the validation data: every batch goes through the trained model and
through each artifact's model, in float32, and `export_report.json` records, per artifact, the
largest absolute difference of the outputs, the output scale (the largest absolute output of the
trained model) and each metric of both. An artifact passes when the difference is within
`trainer.export_tolerance` × the output scale; one that does not is not written, and the run fails.
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

from finetune.adapters import NotPeftExpressible, lora_modules, merged_state_dict, peft_config, peft_state_dict
from finetune.data import ShardSampler
from finetune.errors import TrainingError
from finetune.model import AppliedEdit, build_model
from finetune.state import fsync_dir, write_atomic, write_json
from finetune.task import Task, move_to

log = logging.getLogger(__name__)

EXPORT_REPORT = "export_report.json"
MERGED = "merged.safetensors"
ADAPTER = "adapter"


class ExportError(TrainingError):
    """An exported artifact does not reproduce the trained model."""


@dataclass
class ArtifactCheck:
    file: str
    max_abs_diff: float | None = None
    output_scale: float | None = None  # the largest absolute output of the trained model
    metrics: dict[str, list[float]] = field(default_factory=dict)  # val/<name> -> [trained, exported]
    ok: bool | None = None  # None: not verified (see note)
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
            if artifact["note"] is None:
                del artifact["note"]
        return out

    @property
    def failed(self) -> list[ArtifactCheck]:
        return [a for a in self.artifacts if a.ok is False]


# ---- building the models the artifacts load into --------------------------------------------------
def _build_without_lora(model_cfg, state: dict[str, torch.Tensor]) -> nn.Module:
    """Model B without its lora ops, holding `state` (strict). Built on the meta device and assigned
    where the model allows it (no second random init of the whole model), else built normally."""
    try:
        with torch.device("meta"):
            model, _ = build_model(model_cfg, lora=False)
        model.load_state_dict(state, strict=True, assign=True)
        if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            return model
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    model, _ = build_model(model_cfg, lora=False)
    model.load_state_dict(state, strict=True)
    return model


def _base_from_checkpoint(cfg) -> tuple[nn.Module, list[AppliedEdit]]:
    """What a PEFT user starts from: model B without its lora ops, loaded from checkpoint.path."""
    from finetune.checkpoint.load import load_checkpoint

    model, edits = build_model(cfg.model, lora=False)
    load_checkpoint(model, cfg.checkpoint, edits, mmap=True)
    return model, edits


def _modules_to_save(model: nn.Module, base: nn.Module, base_keys: list[str]) -> list[str]:
    """The modules of the trained model whose tensors are not the base's: the adapter must carry
    them (PEFT's modules_to_save). Raises NotPeftExpressible where PEFT cannot say it."""
    trained = model.state_dict()
    base_sd = base.state_dict()
    differs = [k for k in base_keys if k not in base_sd or trained[k].shape != base_sd[k].shape
               or not torch.equal(trained[k], base_sd[k].to(trained[k].device))]
    owners = sorted({k.rpartition(".")[0] for k in differs})
    if "" in owners:
        top = [k for k in differs if "." not in k]
        raise NotPeftExpressible(f"top-level tensors changed in training ({', '.join(top[:4])}); PEFT's modules_to_save "
                                 "takes modules only")
    wrapped = lora_modules(model)
    changed_base = [o for o in owners if o in wrapped]
    if changed_base:
        raise NotPeftExpressible(f"the base weights of {len(changed_base)} LoRA-wrapped module(s) changed in training "
                                 f"({', '.join(changed_base[:4])}: policy.unfreeze or policy.train?); a PEFT adapter applies to "
                                 "the checkpoint's base weights")
    owners = sorted({_widest(o, set(differs), list(trained), wrapped) for o in owners})
    top_owners = [o for o in owners if not any(o.startswith(other + ".") for other in owners)]
    names = [n for n, _ in base.named_modules() if n]
    for owner in top_owners:
        inside = [w for w in wrapped if w.startswith(owner + ".")]
        if inside:
            raise NotPeftExpressible(f"'{owner}' changed in training and holds LoRA-wrapped modules ({inside[0]}); PEFT "
                                     "cannot save a module that it also adapts")
        clash = [n for n in names if n != owner and n.endswith(owner)]
        if clash:
            raise NotPeftExpressible(f"'{owner}' changed in training, and PEFT finds modules_to_save by name suffix: "
                                     f"it would also take '{clash[0]}'")
    return top_owners


def _widest(owner: str, differs: set[str], keys: list[str], wrapped) -> str:
    """The highest module above `owner` all of whose tensors changed and that holds no adapter (an
    inserted `adapter`, not its `adapter.down` and `adapter.up`): the module PEFT saves whole."""
    best = owner
    parts = owner.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:depth])
        inside = [k for k in keys if k.startswith(candidate + ".")]
        if any(k not in differs for k in inside) or any(w.startswith(candidate + ".") for w in wrapped):
            break
        best = candidate
    return best


def write_peft_adapter(model: nn.Module, directory: Path, modules_to_save: list[str] = ()) -> dict:
    """`directory`/adapter_model.safetensors and adapter_config.json: the model's adapters as PEFT
    saves them, plus the whole state of each module in `modules_to_save` (under
    `base_model.model.<module>.<tensor>`, as PEFT saves those). Returns the config written."""
    from safetensors.torch import save_file

    from finetune.storage import unshared

    config = peft_config(model, list(modules_to_save))
    tensors = peft_state_dict(model)
    for key, value in model.state_dict().items():
        if any(key.startswith(owner + ".") for owner in modules_to_save):
            tensors[f"base_model.model.{key}"] = value.detach()
    payload = unshared({k: v.contiguous().cpu() for k, v in tensors.items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "adapter_model.safetensors", lambda tmp: save_file(payload, str(tmp), metadata={"format": "pt"}))
    write_atomic(directory / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return config


def _stage_adapter(cfg, model: nn.Module, directory: Path) -> nn.Module | None:
    """Write the PEFT adapter into `directory`; returns the PeftModel that loads it onto the base
    built from the checkpoint (None when peft is not installed). Raises NotPeftExpressible."""
    if not cfg.checkpoint.path:
        raise NotPeftExpressible("checkpoint.path is null: the base weights are this run's own random init, which no "
                                 "base model holds")
    base, _ = _base_from_checkpoint(cfg)
    base.to(next(model.parameters()).device)
    lora_keys = {f"{n}.{p}" for n, m in lora_modules(model).items() for p in m.lora_param_names}
    base_keys = [k for k in model.state_dict() if k not in lora_keys]
    write_peft_adapter(model, directory, _modules_to_save(model, base, base_keys))
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel.from_pretrained(base, str(directory), is_trainable=False)


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
    for model in [trained, *exported.values()]:
        model.eval()
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


# ---- the export -------------------------------------------------------------------------------------
def _publish(staged: Path, final: Path) -> None:
    """Move a verified artifact (file or folder) into place; a folder left by an earlier try goes."""
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(final.parent)


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def export_lora(cfg, run_dir: Path, model: nn.Module, edits: list[AppliedEdit], val_loader: DataLoader,
                device: torch.device, metadata: dict[str, str]) -> ExportReport | None:
    """Write, verify and record merged.safetensors and adapter/ of a run with lora ops (None: the
    run has none). Raises ExportError, after writing export_report.json, when an artifact is
    outside the tolerance: that artifact is not written."""
    if not any(e.op == "lora" for e in edits):
        return None
    from safetensors.torch import load_file, save_file

    from finetune.storage import unshared

    run_dir = Path(run_dir)
    report = ExportReport(tolerance=float(cfg.trainer.export_tolerance))
    staged = {MERGED: run_dir / f".{MERGED}.staged", ADAPTER: run_dir / f".{ADAPTER}.staged"}
    exported: dict[str, nn.Module] = {}
    notes: dict[str, str] = {}
    try:
        merged = unshared({k: v.contiguous().cpu() for k, v in merged_state_dict(model).items()})
        write_atomic(staged[MERGED], lambda tmp, tensors=merged: save_file(tensors, str(tmp), metadata={**metadata, "lora": "merged"}))
        del merged
        exported[MERGED] = _build_without_lora(cfg.model, load_file(str(staged[MERGED]))).to(device)
        try:
            peft_model = _stage_adapter(cfg, model, staged[ADAPTER])
        except NotPeftExpressible as why:
            _discard(staged[ADAPTER])
            report.skipped.append({"file": f"{ADAPTER}/", "reason": str(why)})
            log.warning("%s/ not written: %s (merged.safetensors holds the fine-tuned model)", ADAPTER, why)
        else:
            if peft_model is None:
                notes[ADAPTER] = "peft is not installed: written, not verified (pip install peft)"
            else:
                exported[ADAPTER] = peft_model.to(device)

        checks, report.batches = compare(cfg.task, model, exported, whole_validation_set(val_loader), device)
        for name in (MERGED, ADAPTER):
            shown = name if name == MERGED else f"{name}/"
            if name in checks:
                check = checks[name]
                check.file = shown
                check.ok = check.max_abs_diff <= report.tolerance * max(check.output_scale, 1e-12)
                report.artifacts.append(check)
            elif name in notes:
                report.artifacts.append(ArtifactCheck(shown, note=notes[name]))
        for check in report.artifacts:
            name = check.file.rstrip("/")
            if check.ok is not False:
                _publish(staged[name], run_dir / name)
    finally:
        for path in staged.values():
            _discard(path)
    write_json(run_dir / EXPORT_REPORT, report.to_json())
    for check in report.artifacts:
        if check.ok is None:
            log.warning("export: %s: %s", check.file, check.note)
            continue
        metrics = ", ".join(f"{k.removeprefix('val/')} {a:.4g} / {b:.4g}" for k, (a, b) in check.metrics.items())
        log.info("export: %s %s on %d validation batches: outputs within %.1e of the trained model's (allowed %.1e = "
                 "%.0e x output scale %.3g); %s (trained / exported)", check.file, "verified" if check.ok else "FAILED",
                 report.batches, check.max_abs_diff, report.tolerance * check.output_scale, report.tolerance,
                 check.output_scale, metrics)
    if report.failed:
        shown = "; ".join(f"{c.file} differs by {c.max_abs_diff:.3g} (allowed {report.tolerance:g} × output scale "
                          f"{c.output_scale:.3g} = {report.tolerance * c.output_scale:.3g})" for c in report.failed)
        raise ExportError(
            f"export verification failed on the validation data: {shown}; not written (export_report.json has the numbers). "
            "model.safetensors holds the trained weights.",
            "a merge is exact up to float rounding: a larger difference means the model's forward does not use the "
            "wrapped module as a plain layer (report it); if it is rounding in a large model, raise trainer.export_tolerance",
        )
    return report
