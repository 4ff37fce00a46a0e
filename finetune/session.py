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
from finetune.errors import RunDirError
from finetune.model import pick_device
from finetune.policy import TrainPlan, check_optimizer_matches, param_groups, unfreeze
from finetune.state import load_training_state, rng_state, set_rng_state
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
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
        }

    def verify_frozen(self) -> None:
        """Compare the frozen tensors with their checksums at the start (into the audit)."""
        compare_checksums(self.frozen_checksums, checksums(frozen_tensors(self.model, self.plan)), self.audit)


def open_session(cfg: DictConfig, run_dir: Path, model: nn.Module, plan: TrainPlan, audit: GradAudit,
                 resume_from: Path | None, world: World, lr: float, weight_decay: float) -> Session:
    # Heavy imports only when training: a dry run never builds an optimizer (that imports torch._dynamo).
    from hydra.utils import instantiate

    from finetune.data import build_loaders
    from finetune.metrics_log import MetricsLog, NoMetricsLog, tensorboard_wanted

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

    state = load_resume_state(resume_from, cfg, world) if resume_from is not None else None
    progress = Progress(**state["progress"]) if state else Progress()
    progress.world_size = world.size
    metrics_log = NoMetricsLog()
    if world.is_main:
        tensorboard = tensorboard_wanted(cfg.trainer.tensorboard)
        metrics_log = MetricsLog(run_dir / "metrics.csv", resume_step=progress.step if state else None,
                                 tensorboard_dir=run_dir / "tensorboard" if tensorboard else None)
    session = Session(
        cfg=cfg, run_dir=run_dir, world=world, device=device, model=model, plan=plan, audit=audit, task=task,
        train_loader=train_loader, val_loader=val_loader, sampler=sampler, optimizer=optimizer, scheduler=scheduler,
        scaler=scaler, metrics_log=metrics_log, progress=progress, monitor=monitor, mode=mode,
        base_lr=lr, base_weight_decay=weight_decay, provenance=provenance(cfg),
    )
    if state is not None:
        restore(session, state)
    session.frozen_checksums = checksums(frozen_tensors(model, plan))
    return session


def load_resume_state(path: Path, cfg: DictConfig, world: World) -> dict:
    state = load_training_state(path)
    saved_model_cfg = state.get("config", {}).get("model")
    if saved_model_cfg is not None and saved_model_cfg != OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True):
        raise RunDirError(
            f"{path} was written for a different model config; resuming would mix two models.",
            "rerun with the original overrides, or start a new run directory",
        )
    check_resume_world(path, Progress(**state["progress"]), world)
    log.info("resuming from %s: epoch %d, step %d", path, state["progress"]["epoch"], state["progress"]["step"])
    return state


def restore(s: Session, state: dict) -> None:
    """Put the saved run back: the optimizer groups of its unfreezes, then every state."""
    for index in s.progress.unfrozen:  # the optimizer groups that existed when the state was saved
        add_unfrozen_groups(s, index)
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.scheduler is not None and state["scheduler"] is not None:
        s.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        s.scaler.load_state_dict(state["scaler"])
    for key, value in state["audit"].items():
        setattr(s.audit, key, value)
    restore_rng(state, s.world, s.cfg.seed)
    # epoch: epochs completed when the checkpoint was written; step: optimizer steps done.
    s.resumed_from = {"epoch": state["progress"]["epoch"] - 1, "step": state["progress"]["step"]}


def add_unfrozen_groups(s: Session, index: int) -> list[dict]:
    """policy.unfreeze[index]: make its parameters trainable and give them optimizer groups that
    follow the schedule."""
    entry = s.policy.unfreeze[index]
    groups = unfreeze(s.model, entry, index, s.base_lr, s.base_weight_decay, s.policy.decay_norm_and_bias)
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
    """A mid-epoch checkpoint counts each rank's batches: resume it with the same number of ranks."""
    if progress.batch and progress.world_size != world.size:
        raise RunDirError(
            f"{path} was written in the middle of an epoch by {progress.world_size} process(es); this run has {world.size}.",
            f"resume with {progress.world_size} (trainer.nproc={progress.world_size} or torchrun --nproc_per_node=...), "
            "or start a new run directory",
        )
    if progress.world_size != world.size:
        log.warning("resuming a run of %d process(es) with %d: the global batch changes to data.batch_size × %d",
                    progress.world_size, world.size, world.size)


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


def provenance(cfg: DictConfig) -> dict[str, str]:
    return {
        "source_checkpoint": str(cfg.checkpoint.path or ""),
        "source_sha256": file_digest(cfg.checkpoint.path) if cfg.checkpoint.path else "",
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "format": "pt",
    }


def file_digest(path: str) -> str:
    target = Path(path)
    if target.is_dir():
        return ""
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
