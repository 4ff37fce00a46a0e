"""cfg → everything a training run holds: device, loaders, task, optimizer, scheduler, loss scaler,
metrics log, progress — and, on resume, the restore of a saved training state.

`open_session` builds it once; `loop.fit` then reads and advances it. Nothing is patched in later.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from finetune.audit import GradAudit, checksums, compare_checksums, frozen_tensors
from finetune.config import Precision
from finetune.distributed import World, device_for
from finetune.errors import CheckpointError, RunDirError
from finetune.model import pick_device
from finetune.policy import TrainPlan, check_optimizer_matches, param_groups, unfreeze
from finetune.state import load_training_state, set_rng_state
from finetune.task import Task

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


@dataclass
class Progress:
    """Where training stands; everything resume needs besides the module/optimizer states."""

    epoch: int = 1  # 1-based epoch in progress
    batch: int = 0  # micro-batches of `epoch` already consumed
    step: int = 0  # optimizer steps done
    best_value: float | None = None
    best_epoch: int | None = None
    unfrozen: list[int] = field(default_factory=list)  # indices of policy.unfreeze applied
    final: dict = field(default_factory=dict)  # last validation metrics
    audit_done: bool = False
    train_samples: int = 0  # counted after the warm-up steps
    train_seconds: float = 0.0
    skipped_nonfinite: int = 0  # batches skipped under trainer.skip_nonfinite
    world_size: int = 1  # processes that trained: `batch` counts each rank's batches
    resume_changes: dict = field(default_factory=dict)  # settings resumes changed: {dotted key: [first, latest]}
    # trainer.early_stop: the monitored value to improve on by min_delta, epochs since it last did, the stop
    early_stop_best: float | None = None
    epochs_without_improvement: int = 0
    stopped_early: dict | None = None  # {epoch, best_epoch} once it stopped


@dataclass
class Session:
    cfg: DictConfig  # the whole run config (trainer, policy, seed...)
    run_dir: Path
    world: World
    device: torch.device
    model: nn.Module  # the bare model: state_dict, audits and evaluation use it (DDP wraps it in fit)
    plan: TrainPlan
    audit: GradAudit
    task: Task
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Any  # data.EpochSampler
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    scaler: torch.amp.GradScaler
    metrics_log: Any  # metrics_log.MetricsLog (NoMetricsLog on ranks > 0)
    progress: Progress
    monitor: str  # val/<name> that picks the best epoch
    mode: str  # max | min
    base_lr: float
    base_weight_decay: float
    provenance: dict[str, str]  # metadata written into every .safetensors
    resumed_from: dict | None = None  # {epoch, step} of the restored checkpoint
    frozen_checksums: dict[str, int] = field(default_factory=dict)  # frozen tensors at the start
    ema: Any | None = None  # ema.WeightEma under trainer.ema
    early_stop: Any | None = None  # config.EarlyStopConfig under trainer.early_stop
    batch_transform: Any | None = None  # data.batch_transform (batch_transform.BatchTransform): training batches only

    @property
    def trainer(self):
        return self.cfg.trainer

    @property
    def policy(self):
        return self.cfg.policy

    def training_state(self, rngs: list[dict]) -> dict:
        """What checkpoints/last.pt holds; `rngs`: every rank's RNG state, in rank order."""
        return {
            "model": self.model.state_dict(),  # the bare model's: the same names as one process writes
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs if self.world.is_distributed else None,
            "progress": asdict(self.progress),
            "audit": self.audit.to_json(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
        }

    def verify_frozen(self) -> None:
        """Compare the frozen tensors with their checksums at the start (into the audit)."""
        compare_checksums(self.frozen_checksums, checksums(frozen_tensors(self.model, self.plan)), self.audit)


def open_session(cfg: DictConfig, run_dir: Path, model: nn.Module, plan: TrainPlan, audit: GradAudit,
                 resume_from: "Path | Resume | None", world: World, lr: float, weight_decay: float) -> Session:
    """`resume_from`: a training state `read_resume` verified at the start of the run (or its path)."""
    # Heavy imports only when training: a dry run never builds an optimizer (that imports torch._dynamo).
    from hydra.utils import instantiate

    from finetune.config import early_stop_settings, ema_settings
    from finetune.batch_transform import build_batch_transform
    from finetune.data import build_loaders
    from finetune.ema import WeightEma
    from finetune.metrics_log import NoMetricsLog, open_metrics_log

    task = Task.from_config(cfg.task)
    monitor, mode = task.monitor(cfg.trainer)  # an unknown monitor fails here, before any step
    device = device_for(world, pick_device(cfg.trainer.device))
    model.to(device, memory_format=torch.channels_last) if cfg.trainer.channels_last else model.to(device)
    task.to(device)
    if cfg.trainer.compile:
        model.compile()  # in place: parameter names (and every file we write) stay the same
    train_loader, val_loader, sampler = build_loaders(cfg.data, cfg.seed, cfg.data.pin_memory and device.type == "cuda",
                                                      world.rank, world.size)
    if world.rank > 0:  # dropout and augmentations differ between ranks; rank 0 draws what one process draws
        seed_everything(rank_seed(cfg.seed, world.rank))
    optimizer = instantiate(cfg.optim.optimizer)(param_groups(model, plan))
    check_optimizer_matches(model, optimizer)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader)) if cfg.optim.scheduler else None
    # Loss scaling for fp16 on CUDA; a no-op otherwise. Its state is part of checkpoints/last.pt.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision is Precision.fp16 and device.type == "cuda")

    resume = read_resume(Path(resume_from), cfg, world) if isinstance(resume_from, (str, Path)) else resume_from
    state = resume.take() if resume is not None else None
    progress = Progress(**state["progress"]) if state else Progress()
    progress.world_size = world.size
    if resume is not None:
        progress.resume_changes = merge_changes(progress.resume_changes, resume.changes)
    session = Session(
        cfg=cfg, run_dir=run_dir, world=world, device=device, model=model, plan=plan, audit=audit, task=task,
        train_loader=train_loader, val_loader=val_loader, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, metrics_log=NoMetricsLog(), progress=progress, monitor=monitor, mode=mode,
        base_lr=lr, base_weight_decay=weight_decay, provenance=provenance(cfg, run_dir),
        early_stop=early_stop_settings(cfg.trainer.early_stop),
        batch_transform=build_batch_transform(cfg.data.batch_transform),
    )
    ema = ema_settings(cfg.trainer.ema)
    if ema is not None:  # from the weights training starts from (a resume restores its own below)
        session.ema = WeightEma.from_settings(model, ema, device)
    if state is not None:
        restore(session, state, resume.path)  # before metrics.csv is touched
        del state
    if world.is_main:  # only rank 0 logs (csv, TensorBoard, MLflow)
        session.metrics_log = open_metrics_log(cfg, run_dir, resume_step=progress.step if resume else None)
    session.frozen_checksums = checksums(frozen_tensors(model, plan))
    return session


# ---- resume: what may differ from the run that wrote the checkpoint ---------------------------------
#
# A resume continues the run that wrote checkpoints/last.pt: every setting that changes what it
# computes must be the one the checkpoint was trained with (its config is stored inside it). These
# only extend the run, change how it is watched, or where the same computation runs (trainer.device,
# compile, channels_last: floating-point rounding may differ, as between any two machines); a resume
# may change them, and summary.json records the change in `resume_changes`. Every other key -- the
# model, checkpoint, data, task, optim, policy, seed and the rest of trainer, keys added later too --
# is compared (trainer.ema but its device, and trainer.early_stop: what is averaged, when training ends). The number
# of processes is compared as the world size (trainer.nproc or torchrun's): it sets the global batch.
RESUME_MAY_CHANGE = ("trainer.resume", "trainer.progress", "trainer.log_every", "trainer.checkpoint_every",
                     "trainer.tensorboard", "trainer.device", "trainer.compile", "trainer.channels_last",
                     "data.pin_memory", "logger", "logging", "dry_run_batches", "trainer.ema.device")
RESUME_MAY_RAISE = ("trainer.epochs", "trainer.max_steps")  # null max_steps: no limit, the highest
RESUME_WORLD_KEYS = ("trainer.nproc",)  # compared as the world size, by check_resume_world
_ABSENT = "(absent)"


@dataclass
class Resume:
    """A training state read and checked at the start of a run, before any report is written."""

    path: Path
    state: dict | None
    changes: dict[str, list]  # allowed differences from the checkpoint's config: {dotted key: [saved, now]}

    def take(self) -> dict:
        """The state, once: the session restores it, and the memory is not held for the whole run."""
        state, self.state = self.state, None
        if state is None:
            raise RuntimeError(f"the training state of {self.path} was already restored")
        return state


def read_resume(path: Path, cfg: DictConfig, world: World) -> Resume:
    """Verify a checkpoint to resume from (digest, contents, config, world size). Called at the start
    of a run, so a refusal leaves the earlier run's reports as they were."""
    state = load_training_state(path)
    check_progress(path, state["progress"])
    changes = check_resume_config(path, state["config"], cfg)
    check_resume_world(path, Progress(**state["progress"]), world)
    log.info("resuming from %s: epoch %d, step %d", path, state["progress"]["epoch"], state["progress"]["step"])
    if changes:
        log.info("resuming with changed settings (they extend or observe the run; recorded in summary.json): %s",
                 "; ".join(f"{key}: {show(old)} -> {show(new)}" for key, (old, new) in changes.items()))
    return Resume(Path(path), state, changes)


def check_progress(path: Path, saved: dict) -> None:
    unknown = sorted(set(saved) - set(Progress.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"cannot resume from {path}: its progress has fields this finetune does not know: "
                              f"{', '.join(unknown)} (written by a newer version?).",
                              "resume with the finetune version that wrote it, or start a new run directory")


def check_resume_config(path: Path, saved: dict, cfg: DictConfig) -> dict[str, list]:
    """The allowed differences between the checkpoint's config and this run's ({key: [saved, now]});
    refuses, naming every key with both values, when anything else differs."""
    now = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    allowed, refused = {}, {}
    for key, (old, new) in config_differences(saved, now).items():
        if _under(key, RESUME_WORLD_KEYS):
            continue
        if old == _ABSENT and new == schema_default(key):
            continue  # a key added to the schema since the checkpoint: its default keeps the old behaviour
        if _under(key, RESUME_MAY_CHANGE) or (key in RESUME_MAY_RAISE and raises(old, new)):
            allowed[key] = [old, new]
        else:
            refused[key] = (old, new)
    if refused:
        sections = list(dict.fromkeys(key.split(".")[0] for key in refused))
        what = " and ".join([", ".join(sections[:-1]), sections[-1]] if len(sections) > 1 else sections)
        lines = "".join(f"\n    {key}: {show(old)} in the checkpoint, {show(new)} now"
                        + (" (lowered: only raising it extends the run)" if key in RESUME_MAY_RAISE else "")
                        for key, (old, new) in refused.items())
        restore_overrides = [f"{key}={show(old)}" for key, (old, _) in refused.items()
                             if old != _ABSENT and not isinstance(old, (dict, list))][:3]
        raise RunDirError(
            f"{path} was written for a different {what} config; resuming would mix two runs. "
            f"It differs in what changes the result:{lines}",
            "rerun with the checkpoint's settings" + (f" (e.g. {' '.join(restore_overrides)})" if restore_overrides else "")
            + ", or start a new run directory for the new ones (the default hydra.run.dir is timestamped)",
        )
    return allowed


def config_differences(old, new, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (old, new)} where two resolved configs differ; list items are keys too
    (`model.add.1.module`, as in an override). A key only one side has shows `(absent)` on the other."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for key in [*old, *(k for k in new if k not in old)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(config_differences(old.get(key, _ABSENT), new.get(key, _ABSENT), name))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = {}
        for i, (a, b) in enumerate(zip(old, new)):
            out.update(config_differences(a, b, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {} if old == new else {prefix or "(the whole config)": (old, new)}


def merge_changes(recorded: dict, changes: dict) -> dict:
    """Changes over several resumes: {key: [value before the first change, latest value]}."""
    merged = {key: list(value) for key, value in recorded.items()}
    for key, (old, new) in changes.items():
        first = merged[key][0] if key in merged else old
        if first == new:
            merged.pop(key, None)
        else:
            merged[key] = [first, new]
    return merged


def raises(old, new) -> bool:
    if new is None:
        return True  # no limit
    return old is not None and old != _ABSENT and isinstance(old, int) and isinstance(new, int) and new >= old


def schema_default(key: str):
    from finetune.config import FinetuneConfig

    node = OmegaConf.select(OmegaConf.structured(FinetuneConfig), key, default=_ABSENT, throw_on_missing=False)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=False, enum_to_str=True)
    return getattr(node, "value", node) if not isinstance(node, (str, int, float, bool, type(None))) else node


def show(value) -> str:
    import json

    text = value if value == _ABSENT else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def restore(s: Session, state: dict, path: Path | None = None) -> None:
    """Put the saved run back: the optimizer groups of its unfreezes, then every state. A state that
    does not fit (a foreign file whose config claims this run's) is one CheckpointError."""
    try:
        for index in s.progress.unfrozen:  # the optimizer groups that existed when the state was saved
            add_unfrozen_groups(s, index)
        s.model.load_state_dict(state["model"])
        settings = {key for group in s.optimizer.param_groups for key in group if key != "params"}
        s.optimizer.load_state_dict(state["optimizer"])
        check_optimizer_state(s.optimizer, settings)
        if s.scheduler is not None and state["scheduler"] is not None:
            s.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            s.scaler.load_state_dict(state["scaler"])
        for key, value in state["audit"].items():
            setattr(s.audit, key, value)
        restore_rng(state, s.world, s.cfg.seed)
        if s.ema is not None:
            s.ema.follow(s.model)  # the parameters the restored unfreezes made trainable
            s.ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(
            f"cannot resume from {path or 'the checkpoint'}: its state does not fit this run's model and optimizer: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            "resume from a checkpoints/last.pt of this run, or start a new run directory",
        ) from exc
    # epoch: epochs completed when the checkpoint was written; step: optimizer steps done.
    s.resumed_from = {"epoch": state["progress"]["epoch"] - 1, "step": state["progress"]["step"]}


def check_optimizer_state(optimizer: torch.optim.Optimizer, settings: set[str]) -> None:
    """The restored groups hold this optimizer's settings (`settings`: its groups' keys before the
    load; keys a newer torch added are filled in by the load itself). Another optimizer's state would
    otherwise fail at the first step, far from its cause."""
    for group in optimizer.param_groups:
        missing = settings - set(group)
        if missing:
            raise ValueError(f"its optimizer groups lack {', '.join(sorted(missing))} ({type(optimizer).__name__}'s settings)")


def add_unfrozen_groups(s: Session, index: int) -> list[dict]:
    """policy.unfreeze[index]: make its parameters trainable and give them optimizer groups that
    follow the schedule."""
    entry = s.policy.unfreeze[index]
    groups = unfreeze(s.model, entry, index, s.base_lr, s.base_weight_decay, s.policy.decay_norm_and_bias, s.plan)
    for group in groups:
        s.optimizer.add_param_group(group)
        add_group_to_scheduler(s.scheduler, group)
    check_optimizer_matches(s.model, s.optimizer)
    return groups


def add_group_to_scheduler(scheduler, group: dict) -> None:
    """LR schedulers keep per-group lists (base lrs, LambdaLR's lambdas): extend them for a new group,
    which then follows the same schedule from its own lr."""
    if scheduler is None:
        return
    group.setdefault("initial_lr", group["lr"])
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs.append(group["initial_lr"])
    if hasattr(scheduler, "lr_lambdas"):  # LambdaLR, MultiplicativeLR (and warmup_cosine)
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        if type(scheduler).__name__ == "LambdaLR":  # join at the schedule's current point
            group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[0](scheduler.last_epoch)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr.append(group["lr"])


def restore_rng(state: dict, world: World, seed: int) -> None:
    """Each rank continues its own random stream; with another number of ranks than the saved
    run, ranks > 0 start a new one."""
    saved = state.get("rng_ranks")
    if saved and len(saved) == world.size:
        set_rng_state(saved[world.rank])
        return
    set_rng_state(state["rng"])
    if world.rank > 0:
        seed_everything(rank_seed(seed, world.rank) + state["progress"]["step"])


def check_resume_world(path: Path, progress: Progress, world: World) -> None:
    """The checkpoint's number of processes: `data.batch_size` is per process, so another number
    changes the global batch (and a mid-epoch checkpoint counts each rank's batches)."""
    if progress.world_size != world.size:
        where = "in the middle of an epoch" if progress.batch else "at an epoch's end"
        raise RunDirError(
            f"{path} was written {where} by {progress.world_size} process(es); this run has {world.size}: the global "
            f"batch (data.batch_size × processes) would change from {progress.world_size}× to {world.size}× data.batch_size.",
            f"resume with {progress.world_size} (trainer.nproc={progress.world_size} or torchrun --nproc_per_node=...), "
            "or start a new run directory",
        )


def build_scheduler(cfg, optimizer, batches_per_epoch: int):
    """Instantiate optim.scheduler; a factory taking `total_steps` gets the run's step count."""
    import inspect
    import math

    from hydra.utils import instantiate

    factory = instantiate(cfg.optim.scheduler)
    func = getattr(factory, "func", factory)
    try:
        wants_total = "total_steps" in inspect.signature(func).parameters and "total_steps" not in getattr(factory, "keywords", {})
    except (TypeError, ValueError):
        wants_total = False
    if wants_total:
        total = cfg.trainer.max_steps or math.ceil(batches_per_epoch / cfg.trainer.grad_accum) * cfg.trainer.epochs
        return factory(optimizer, total_steps=total)
    return factory(optimizer)


def provenance(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, str]:
    """The metadata of every .safetensors a run writes: its source checkpoint, its resolved config and
    the sha256 of `.hydra/config.yaml` as the run started (commands that rebuild from the run
    directory refuse that file once it no longer matches)."""
    from finetune.run_lock import config_sha256

    from finetune.checkpoint.load import checkpoint_paths

    paths = checkpoint_paths(cfg.checkpoint.path)  # several: the base, then the files loaded over it
    recorded = {
        "source_checkpoint": ",".join(paths),
        "source_sha256": ",".join(file_digest(p) for p in paths),
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "format": "pt",
    }
    digest = config_sha256(run_dir) if run_dir is not None else None
    if digest:
        recorded["config_sha256"] = digest
    return recorded


def file_digest(path: str) -> str:
    target = Path(path)
    if target.is_dir():
        return ""
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
