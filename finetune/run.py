"""One run, stage by stage: config → model → checkpoint → policy → loop → reports.

`run(cfg, run_dir)` is what the `finetune` command calls inside Hydra, and what tests call
in-process with a config composed by Hydra's compose API. Under DDP every rank runs it; only
rank 0 writes into the run directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from finetune import render
from finetune.audit import GradAudit, checksums, compare_checksums, frozen_tensors
from finetune.checkpoint.load import NeedsNormalBuild, check_expectations, load_checkpoint, wants_low_memory
from finetune.config import SavedWeights
from finetune.distributed import World, current_world, device_for, spawn
from finetune.errors import ConfigError, FinetuneError, RunDirError, TrainingError
from finetune.model import base_param_names, build_model, pick_device
from finetune.policy import apply_plan, check_optimizer_matches, optimizer_defaults, param_groups, plan_training
from finetune.state import BEST, LAST, load_training_state, rng_state, save_training_state, save_weights, set_rng_state, write_atomic, write_json

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def file_digest(path: str) -> str:
    target = Path(path)
    if target.is_dir():
        return ""
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trainability_json(plan, audit: GradAudit) -> dict:
    return {
        "params": [asdict(p) for p in plan.params],
        "totals": plan.totals(),
        "groups": [asdict(g) for g in plan.groups],
        "frozen_norms": plan.frozen_norms,
        "audit": audit.to_json(),
    }


def previous_status(run_dir: Path) -> str | None:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return None
    import json

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


def run(cfg: DictConfig, run_dir: Path, world: World | None = None, started: float | None = None) -> dict:
    """One run. `world`: this process's rank (None: one process, or the ranks torchrun started;
    with trainer.nproc > 1 this process becomes rank 0 and spawns the others)."""
    run_dir = Path(run_dir)
    started = time.perf_counter() if started is None else started
    if world is None:
        world = current_world()
        if cfg.trainer.nproc > 1 and not cfg.dry_run:
            check_distributed_config(cfg)
            return spawn(run_as_rank, cfg.trainer.nproc, pick_device(cfg.trainer.device).type, resolved(cfg), run_dir, started)
    if cfg.dry_run:
        check_dry_run_dir(run_dir)
    resume_from = None if cfg.dry_run else check_run_dir(run_dir, cfg.trainer.resume)
    if world.is_distributed:
        check_distributed_config(cfg)
        world.barrier()  # every rank has looked at the run directory before rank 0 writes to it
    seed_everything(cfg.seed)

    report = None
    if cfg.checkpoint.path and wants_low_memory(cfg.checkpoint):
        model, edits, report = build_and_load_low_memory(cfg)
    else:
        model, edits = build_model(cfg.model)
    sources: dict[str, str] = {}
    if cfg.checkpoint.path:
        if report is None:
            # Several ranks memory-map the file (shared page cache) rather than each reading a copy.
            report = load_checkpoint(model, cfg.checkpoint, base_param_names(model, edits), mmap=world.is_distributed)
        try:
            check_expectations(report, cfg.checkpoint.expect, model, base_param_names(model, edits))
        finally:
            render.show(render.format_load_report(report))
        sources = report.sources()
    else:
        sources = {name: "new" for name, _ in model.named_parameters()}
        log.info("checkpoint.path is null: training from scratch, every parameter is new")

    lr, weight_decay = optimizer_defaults(cfg.optim.optimizer)
    plan = plan_training(model, sources, cfg.policy, lr, weight_decay)
    apply_plan(model, plan)
    render.show(render.format_trainability(plan))
    audit = GradAudit()
    if world.is_main:
        if report is not None:
            write_json(run_dir / "load_report.json", report.to_json())
        write_json(run_dir / "trainability.json", trainability_json(plan, audit))

    if cfg.dry_run:
        summary = base_summary("dry_run", time.perf_counter() - started, world_size=world.size)
        if world.is_main:
            write_json(run_dir / "summary.json", summary)
        return summary
    return train(cfg, run_dir, model, plan, audit, resume_from, started, lr, weight_decay, world)


def run_as_rank(world: World, cfg: DictConfig, run_dir: Path, started: float) -> dict:
    """What each of the trainer.nproc processes runs (a module-level function: spawn pickles it).
    `started` is rank 0's clock (the only rank that reports wall_s)."""
    return run(cfg, run_dir, world, started)


def resolved(cfg: DictConfig) -> DictConfig:
    """A copy with every interpolation resolved here, where Hydra's resolvers are available:
    spawned ranks receive plain values."""
    import copy

    cfg = copy.deepcopy(cfg)
    OmegaConf.resolve(cfg)
    return cfg


def check_distributed_config(cfg) -> None:
    if cfg.trainer.skip_nonfinite:
        raise ConfigError(
            "trainer.skip_nonfinite is not supported with several processes: a batch skipped on one "
            "rank would leave the others waiting in the gradient all-reduce.",
            "set trainer.skip_nonfinite=false (a non-finite loss then stops the run with a resumable checkpoint)",
        )


def build_and_load_low_memory(cfg):
    """Build on the meta device, memory-map the checkpoint, assign its tensors, and initialise only
    the modules it does not provide. Falls back to a normal build where a module cannot."""
    try:
        with torch.device("meta"):
            model, edits = build_model(cfg.model)
        report = load_checkpoint(model, cfg.checkpoint, base_param_names(model, edits), low_memory=True)
        return model, edits, report
    except NeedsNormalBuild as exc:
        reason = str(exc)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # a constructor that cannot run on meta
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("checkpoint.low_memory: building normally instead (%s)", reason)
    seed_everything(cfg.seed)
    model, edits = build_model(cfg.model)
    return model, edits, None


def base_summary(status: str, wall_s: float, **fields) -> dict:
    return {
        "status": status,
        "epochs": 0,
        "steps": 0,
        "wall_s": round(wall_s, 3),
        "world_size": 1,  # the processes that trained (DDP ranks)
        "ranks_in_sync": None,  # under DDP: whether all ranks ended with identical parameters
        "resumed_from": None,
        "best": None,
        "final": {},
        "throughput": {"train_samples_per_s": None},
        "torch_threads": torch.get_num_threads(),
        **fields,
    }


def train(cfg, run_dir: Path, model, plan, audit: GradAudit, resume_from: Path | None, started: float,
          lr: float, weight_decay: float, world: World) -> dict:
    # Heavy imports only when training: a dry run never builds an optimizer (that imports torch._dynamo).
    from hydra.utils import instantiate

    from finetune.data import build_loaders
    from finetune.loop import Loop, Progress
    from finetune.metrics_log import MetricsLog, NoMetricsLog, tensorboard_wanted
    from finetune.signals import StopRequest

    device = device_for(world, pick_device(cfg.trainer.device))
    model.to(device, memory_format=torch.channels_last) if cfg.trainer.channels_last else model.to(device)
    if cfg.trainer.compile:
        model.compile()  # in place: parameter names (and every file we write) stay the same
    train_loader, val_loader, sampler = build_loaders(cfg.data, cfg.seed, cfg.data.pin_memory and device.type == "cuda",
                                                      world.rank, world.size)
    if world.rank > 0:  # dropout and augmentations differ between ranks; rank 0 draws what one process draws
        seed_everything(rank_seed(cfg.seed, world.rank))
    optimizer = instantiate(cfg.optim.optimizer)(param_groups(model, plan))
    check_optimizer_matches(model, optimizer)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader)) if cfg.optim.scheduler else None

    progress = Progress()
    state = None
    if resume_from is not None:
        state = load_training_state(resume_from)
        saved_model_cfg = state.get("config", {}).get("model")
        if saved_model_cfg is not None and saved_model_cfg != OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True):
            raise RunDirError(
                f"{resume_from} was written for a different model config; resuming would mix two models.",
                "rerun with the original overrides, or start a new run directory",
            )
        progress = Progress(**state["progress"])
        check_resume_world(resume_from, progress, world)
        log.info("resuming from %s: epoch %d, step %d", resume_from, progress.epoch, progress.step)

    provenance = {
        "source_checkpoint": str(cfg.checkpoint.path or ""),
        "source_sha256": file_digest(cfg.checkpoint.path) if cfg.checkpoint.path else "",
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "format": "pt",
    }
    tensorboard = tensorboard_wanted(cfg.trainer.tensorboard)
    metrics = MetricsLog(run_dir / "metrics.csv", resume_step=progress.step if state else None,
                         tensorboard_dir=run_dir / "tensorboard" if tensorboard else None) if world.is_main else NoMetricsLog()

    def save_state(p: Progress) -> None:
        rngs = world.gather(rng_state())  # called on every rank: each rank's RNG goes into the file
        if not world.is_main:
            return
        save_training_state(run_dir / LAST, {
            "model": model.state_dict(),  # the bare model's: the same names as one process writes
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": loop.scaler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs if world.is_distributed else None,
            "progress": asdict(p),
            "audit": audit.to_json(),
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        })

    def save_best() -> None:
        if world.is_main:
            save_weights(run_dir / BEST, model.state_dict(), provenance)

    loop = Loop(model, optimizer, scheduler, train_loader, val_loader, sampler, cfg.trainer, cfg.policy, device,
                metrics, audit, lr, weight_decay, save_state, save_best, progress, world=world)
    if state is not None:
        loop.restore_unfreezes(progress.unfrozen)  # the optimizer groups that existed when the state was saved
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            loop.scaler.load_state_dict(state["scaler"])
        for key, value in state["audit"].items():
            setattr(audit, key, value)
        restore_rng(state, world, cfg.seed)

    before = checksums(frozen_tensors(model, plan))
    loop.verify_frozen = verify_frozen = lambda: compare_checksums(before, checksums(frozen_tensors(model, plan)), audit)
    status = "failed"
    try:
        # Under DDP a signal twice within a second is one request (a launcher may forward what
        # the process already got).
        with StopRequest(repeat_grace_s=1.0 if world.is_distributed else 0.0) as stop, \
                log_above_progress_bars(cfg.trainer.progress and world.is_main):
            status = loop.fit(stop)
    except FinetuneError as exc:
        if world.is_main:
            write_json(run_dir / "summary.json", base_summary("failed", time.perf_counter() - started, error=str(exc),
                                                               epochs=progress.epoch - 1, steps=progress.step,
                                                               world_size=world.size))
            write_json(run_dir / "trainability.json", trainability_json(plan, audit))
        raise
    finally:
        metrics.close()

    verify_frozen()
    in_sync = world.in_sync(model)
    if world.is_main:
        write_json(run_dir / "trainability.json", trainability_json(plan, audit))
    if audit.frozen_unchanged and audit.frozen_verified:
        log.info("frozen audit: %d frozen tensors verified unchanged while frozen (checksums)", len(audit.frozen_verified))
    elif not audit.frozen_unchanged:
        log.error("frozen tensors changed during training: %s", audit.changed_frozen[:10])
    if in_sync is False:
        fail_out_of_sync(run_dir, world, started, progress)
    if in_sync:
        log.info("ranks in sync: all %d ranks ended with bit-identical parameters", world.size)
    if status == "completed" and world.is_main:
        if cfg.trainer.save is SavedWeights.best and (run_dir / BEST).exists():
            import shutil

            write_atomic(run_dir / "model.safetensors", lambda tmp: shutil.copyfile(run_dir / BEST, tmp))
        else:
            save_weights(run_dir / "model.safetensors", model.state_dict(), provenance)
        plot_curves(run_dir)
    p = progress
    summary = base_summary(
        status,
        time.perf_counter() - started,
        epochs=p.epoch - 1,
        steps=p.step,
        # epoch: epochs completed when the checkpoint was written; step: optimizer steps done.
        resumed_from=None if state is None else {"epoch": state["progress"]["epoch"] - 1, "step": state["progress"]["step"]},
        best=None if p.best_value is None else {"metric": cfg.trainer.monitor, "value": p.best_value, "epoch": p.best_epoch},
        final=p.final,
        throughput={"train_samples_per_s": round(p.train_samples / p.train_seconds, 2) if p.train_seconds else None},
        skipped_nonfinite=p.skipped_nonfinite,
        world_size=world.size,
        ranks_in_sync=in_sync,
    )
    if stop.received:
        summary["signal"] = stop.received
        summary["exit_code"] = stop.exit_code
    if world.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


def rank_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


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


def check_resume_world(path: Path, progress, world: World) -> None:
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


def fail_out_of_sync(run_dir: Path, world: World, started: float, progress) -> None:
    """Ranks ended with different parameters: gradient synchronisation is broken. Nothing may pass
    for a finished run, so no model.safetensors; the status is failed."""
    error = TrainingError(
        f"the {world.size} ranks ended with different parameters (ranks_in_sync=false): gradients were not "
        "synchronised, so the weights are not what training on the whole data set gives. model.safetensors was not written.",
        "check for code that changes parameters on some ranks only or bypasses DDP's forward; report it if none",
    )
    log.error("%s", error.problem)
    if world.is_main:
        write_json(run_dir / "summary.json", base_summary("failed", time.perf_counter() - started, error=error.problem,
                                                           epochs=progress.epoch - 1, steps=progress.step,
                                                           world_size=world.size, ranks_in_sync=False))
    raise error


def log_above_progress_bars(enabled: bool):
    """While progress bars draw, log lines go through tqdm.write so the two never interleave."""
    import contextlib
    import sys

    if not (enabled and sys.stderr.isatty()):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


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


def plot_curves(run_dir: Path) -> None:
    try:
        from finetune.plots import plot_metrics
    except ImportError:  # matplotlib is optional
        log.info("matplotlib not installed: no curves.png (pip install matplotlib)")
        return
    plot_metrics(run_dir / "metrics.csv", run_dir / "curves.png")
