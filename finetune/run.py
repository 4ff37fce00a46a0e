"""One run, stage by stage: config → model → checkpoint → policy → session + fit → reports.

`run(cfg, run_dir)` is what the `finetune` command calls inside Hydra, and what tests call
in-process with a config composed by Hydra's compose API. Under DDP every rank runs it; only
rank 0 writes into the run directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.console import tables
from finetune.audit import GradAudit
from finetune.checkpoint.load import NeedsNormalBuild, check_expectations, checkpoint_paths, load_checkpoint, wants_low_memory
from finetune.config import SavedWeights, check_loggers, check_no_additions, early_stop_settings, ema_settings
from finetune.distributed import World, current_world, spawn
from finetune.errors import ConfigError, TrainingError
from finetune.model import build_model, pick_device
from finetune.policy import apply_plan, optimizer_defaults, plan_training
from finetune.run_files import LOAD_REPORT, Summary, check_dry_run_dir, check_run_dir, write_trainability
from finetune.run_lock import hold_run_dir
from finetune.session import read_resume, seed_everything
from finetune.state import BEST, save_weights, write_atomic, write_json

log = logging.getLogger(__name__)
traceback_log = logging.getLogger("finetune.traceback")  # job_logging sends it to finetune.log only


def run(cfg: DictConfig, run_dir: Path, world: World | None = None, started: float | None = None) -> dict:
    """One run. `world`: this process's rank (None: one process, or the ranks torchrun started;
    with trainer.nproc > 1 this process becomes rank 0 and spawns the others)."""
    if world is None:  # the process that owns the run (rank 0) holds its directory until it ends
        with hold_run_dir(Path(run_dir), current_world(), cfg):
            return run_held(cfg, run_dir, world, started)
    return run_held(cfg, run_dir, world, started)  # a rank trainer.nproc spawned: rank 0 holds the directory


def run_held(cfg: DictConfig, run_dir: Path, world: World | None, started: float | None) -> dict:
    run_dir = Path(run_dir)
    started = time.perf_counter() if started is None else started
    check_no_additions(cfg)
    ema_settings(cfg.trainer.ema)  # typed Any in the schema (an override sets them from null): checked here
    early_stop_settings(cfg.trainer.early_stop)
    check_loggers(cfg.logger)
    checkpoint_paths(cfg.checkpoint.path)  # typed Any (a path or a list of paths): checked before anything is built
    if world is None:
        world = current_world()
        if cfg.trainer.nproc > 1 and not cfg.dry_run:
            check_distributed_config(cfg)
            return spawn(run_as_rank, cfg.trainer.nproc, pick_device(cfg.trainer.device).type, resolved(cfg), run_dir, started)
    if cfg.logger.mlflow.enabled and world.is_main and not cfg.dry_run:
        from finetune.tracking import warm_up

        warm_up(cfg.logger.mlflow)  # while the model and data are built, not during the first training steps
    if cfg.dry_run:
        check_dry_run_dir(run_dir)
    resume_from = None if cfg.dry_run else check_run_dir(run_dir, cfg.trainer.resume)
    if resume_from is not None:  # verified before any report is written: a refusal leaves the earlier run's as they are
        resume_from = read_resume(resume_from, cfg, world)
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
            report = load_checkpoint(model, cfg.checkpoint, edits, mmap=world.is_distributed)
        try:
            check_expectations(report, cfg.checkpoint.expect, model, edits)
        finally:
            tables.show(tables.format_load_report(report))
        sources = report.sources()
    else:
        sources = {name: "new" for name, _ in model.named_parameters()}
        log.info("checkpoint.path is null: training from scratch, every parameter is new")

    lr, weight_decay = optimizer_defaults(cfg.optim.optimizer)
    added_by = {key: e.rule for e in edits if e.keys is not None for key in e.keys}
    inserted = [e.name for e in edits if e.op in ("after", "before")]
    plan = plan_training(model, sources, cfg.policy, lr, weight_decay, added_by, inserted)
    apply_plan(model, plan)
    tables.show(tables.format_trainability(plan))
    audit = GradAudit()
    if cfg.dry_run and cfg.dry_run_batches != 0:
        dry_run_batches(cfg, model, audit)  # before any report is written: a failure leaves the directory as it was
    if world.is_main:
        if report is not None:
            write_json(run_dir / LOAD_REPORT, report.to_json())
        write_trainability(run_dir, plan, audit)

    if cfg.dry_run:
        summary = Summary("dry_run", wall_s=time.perf_counter() - started, world_size=world.size)
        return summary.write(run_dir) if world.is_main else summary.to_json()
    return train(cfg, run_dir, model, edits, plan, audit, resume_from, started, lr, weight_decay, world)


def dry_run_batches(cfg, model, audit: GradAudit) -> None:
    """The dry run's forward/backward pass: wiring errors and the gradient audit's answer."""
    from finetune.loop import dry_run_pass

    if cfg.dry_run_batches < 0:
        raise ConfigError(f"dry_run_batches={cfg.dry_run_batches} is negative.", "use 0 (load only) or a number of batches, e.g. 1")
    done = dry_run_pass(cfg, model, audit)
    log.info("dry run: %d training batch(es) forward and backward, no optimizer step, nothing saved", done)


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
        report = load_checkpoint(model, cfg.checkpoint, edits, low_memory=True)
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
    """summary.json of a run that stopped before training reported anything (commands use it)."""
    return Summary(status, wall_s=wall_s, **fields).to_json()


def train(cfg, run_dir: Path, model, edits, plan, audit: GradAudit, resume_from: Path | None, started: float,
          lr: float, weight_decay: float, world: World) -> dict:
    """Open the session, fit, and write what a run leaves: weights, curves, summary. Any exception
    on the way ends with a `failed` summary (its traceback goes to finetune.log) and is re-raised."""
    from finetune.console.progress import log_above_progress_bars
    from finetune.loop import fit
    from finetune.session import open_session
    from finetune.signals import StopRequest

    session = None
    try:
        session = open_session(cfg, run_dir, model, plan, audit, resume_from, world, lr, weight_decay)
        # Under DDP a signal twice within a second is one request (a launcher may forward what
        # the process already got).
        with StopRequest(repeat_grace_s=1.0 if world.is_distributed else 0.0) as stop, \
                log_above_progress_bars(cfg.trainer.progress and world.is_main):
            status = fit(session, stop)  # "completed" only after an epoch end, whose weights were checked finite
    except BaseException as exc:
        if isinstance(exc, Exception):
            traceback_log.error("training failed", exc_info=exc)
        if world.is_main:
            write_failed(run_dir, session, exc, started, world)
        end_tracking(session, "failed")
        raise
    finally:
        if session is not None:
            session.metrics_log.close()
    try:
        summary = finish(session, edits, status, stop, started)
    except BaseException:
        end_tracking(session, "failed")
        raise
    end_tracking(session, summary["status"])
    return summary


def end_tracking(session, status: str) -> None:
    """After summary.json: the trackers (MLflow) get the reports and the run's status."""
    if session is not None:
        session.metrics_log.end(status)


def write_failed(run_dir: Path, session, exc: BaseException, started: float, world: World) -> None:
    error = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
    wall_s = time.perf_counter() - started
    if session is None:
        Summary("failed", wall_s=wall_s, world_size=world.size, error=error).write(run_dir)
        return
    Summary.of_training("failed", session.progress, wall_s, session.monitor, session.mode, world.size,
                        session.resumed_from, error=error, skipped_nonfinite=None).write(run_dir)
    write_trainability(run_dir, session.plan, session.audit)


def finish(s, edits, status: str, stop, started: float) -> dict:
    """After fit: the frozen audit, the ranks' agreement, model.safetensors, curves.png, the
    verified exports of lora runs (merged.safetensors, adapter/), summary.json."""
    world, run_dir, audit = s.world, s.run_dir, s.audit
    s.verify_frozen()
    in_sync = world.in_sync(s.model, s.ema.shadow if s.ema is not None else None)  # the EMAs agree too
    if world.is_main:
        write_trainability(run_dir, s.plan, audit)
    if audit.frozen_unchanged and audit.frozen_verified:
        log.info("frozen audit: %d frozen tensors verified unchanged while frozen (checksums)", len(audit.frozen_verified))
    elif not audit.frozen_unchanged:
        log.error("frozen tensors changed during training: %s", audit.changed_frozen[:10])
    if in_sync is False:
        fail_out_of_sync(s, started)
    if in_sync:
        log.info("ranks in sync: all %d ranks ended with bit-identical parameters%s", world.size,
                 " and EMA averages" if s.ema is not None else "")
    if status == "completed" and world.is_main:
        if s.trainer.save is SavedWeights.best and (run_dir / BEST).exists():
            import shutil

            write_atomic(run_dir / "model.safetensors", lambda tmp: shutil.copyfile(run_dir / BEST, tmp))
        else:
            save_weights(run_dir / "model.safetensors", s.model.state_dict(), s.provenance)
        if s.ema is not None:  # its averages were checked finite at the last epoch end, as the weights were
            save_weights(run_dir / "model_ema.safetensors", s.ema.averaged_state_dict(s.model), s.provenance)
        plot_curves(s)
        export(s, edits, started)
    extra = {"signal": stop.received, "exit_code": stop.exit_code} if stop.received else {}
    if s.cfg.data.skip_bad_samples:
        extra["skipped_samples"] = s.train_loader.dataset.skipped + s.val_loader.dataset.skipped
        log.info("data.skip_bad_samples: %d unreadable sample(s) skipped (this process)", extra["skipped_samples"])
    summary = Summary.of_training(status, s.progress, time.perf_counter() - started, s.monitor, s.mode, world.size,
                                  s.resumed_from, ranks_in_sync=in_sync, **extra)
    return summary.write(run_dir) if world.is_main else summary.to_json()


def export(s, edits, started: float) -> None:
    """merged.safetensors and adapter/ of a run with lora ops, from the weights model.safetensors
    holds, each verified on the validation data (export.py). A failure fails the run."""
    from finetune.export import export_lora

    if not any(e.op == "lora" for e in edits):
        return
    try:
        if s.trainer.save is SavedWeights.best and (s.run_dir / BEST).exists():
            from safetensors.torch import load_file

            s.model.load_state_dict(load_file(str(s.run_dir / BEST), device=str(s.device)))
        export_lora(s.cfg, s.run_dir, s.model, edits, s.val_loader, s.device, s.provenance)
    except BaseException as exc:
        if isinstance(exc, Exception):
            traceback_log.error("export failed", exc_info=exc)
        write_failed(s.run_dir, s, exc, started, s.world)
        raise


def fail_out_of_sync(s, started: float) -> None:
    """Ranks ended with different parameters: gradient synchronisation is broken. Nothing may pass
    for a finished run, so no model.safetensors; the status is failed."""
    world = s.world
    error = TrainingError(
        f"the {world.size} ranks ended with different parameters (ranks_in_sync=false): gradients were not "
        "synchronised, so the weights are not what training on the whole data set gives. model.safetensors was not written.",
        "check for code that changes parameters on some ranks only or bypasses DDP's forward; report it if none",
    )
    log.error("%s", error.problem)
    if world.is_main:
        Summary.of_training("failed", s.progress, time.perf_counter() - started, s.monitor, s.mode, world.size,
                            s.resumed_from, ranks_in_sync=False, error=error.problem, skipped_nonfinite=None).write(s.run_dir)
    raise error


def plot_curves(s) -> None:
    try:
        from finetune.console.plots import MetricAxis, plot_metrics
    except ImportError:  # matplotlib is optional
        log.info("matplotlib not installed: no curves.png (pip install matplotlib)")
        return
    axes = [MetricAxis(name, lower, upper) for name, (lower, upper) in s.task.metric_ranges().items()]
    plot_metrics(s.run_dir / "metrics.csv", s.run_dir / "curves.png", s.task.loss_label(), axes)
