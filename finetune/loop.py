"""`fit(session, stop)`: train step, optimizer step, evaluate, checkpoint — top to bottom.

No host sync in the step (no `.item()`), except at log intervals, on the first step's audit and
on its re-check of exactly-zero gradients (steps 2..audit.ZERO_GRAD_STEPS, only while some remain).
Under DDP every rank runs this same loop in lockstep: forwards go through the DDP wrapper
(`net`), everything else (audit, checksums, state_dict, evaluation) uses the bare `model`, and
every decision that changes the control flow (stop, non-finite loss, best epoch) is taken on
values all-reduced across ranks, so all ranks take it at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.audit import audit_gradients, recheck_zero_gradients, report_unsettled
from finetune.batch_transform import BatchTransform, build_batch_transform, explained
from finetune.config import Precision
from finetune.console import tables
from finetune.console.progress import format_metrics, progress_bar
from finetune.distributed import SINGLE, StopVote, World
from finetune.errors import TrainingError
from finetune.finite import nonfinite_keys
from finetune.matching import listed
from finetune.model import pick_device, watch_edits
from finetune.policy import unfreeze_due
from finetune.run_files import write_trainability
from finetune.session import Session, add_unfrozen_groups
from finetune.signals import StopRequest
from finetune.state import BEST, LAST, rng_state, save_training_state, save_weights
from finetune.task import Task, batch_size, move_to

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # steps excluded from the throughput figure
EMA_PREFIX = "ema/"  # trainer.ema's metrics: val/ema/<name>


def autocast(device: torch.device, precision: Precision):
    if precision is Precision.fp32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision is Precision.bf16 else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def fit(s: Session, stop: StopRequest) -> str:
    """Run until the epochs or max_steps are done, or a signal asks to stop. Returns the status."""
    t, p, world = s.trainer, s.progress, s.world
    steps_per_epoch = math.ceil(len(s.train_loader) / t.grad_accum)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    vote = StopVote(world)  # a signal to any rank stops all ranks at the same step
    net = wrap(s)
    mark = time.perf_counter()
    try:
        while p.epoch <= t.epochs and p.step < total_steps and p.stopped_early is None:
            if apply_unfreezes(s):
                net = s.model  # drop the old wrapper (and its gradient hooks) first
                net = wrap(s)
            net.train()
            s.sampler.set_epoch(p.epoch, start=p.batch * s.train_loader.batch_size)
            batches_left = len(s.train_loader)  # the sampler already skips the p.batch seen ones
            bar = progress_bar(t.progress and world.is_main, total=p.batch + batches_left, initial=p.batch,
                               desc=f"epoch {p.epoch}/{t.epochs}")
            loss_sum = torch.zeros((), device=s.device)  # since the last log line
            logged_batches, micro, step_samples = 0, 0, 0
            stopping = False
            for batch in s.train_loader:
                closes_step = micro + 1 >= t.grad_accum or batches_left == 1
                loss, samples = train_step(s, net, batch, closes_step)
                p.batch += 1
                batches_left -= 1
                if loss is None:  # skipped: non-finite under trainer.skip_nonfinite
                    if batches_left > 0 or micro == 0:
                        continue
                else:
                    loss_sum += loss
                    logged_batches += 1
                    micro += 1
                    step_samples += samples
                if micro < t.grad_accum and batches_left > 0:
                    continue

                optimizer_step(s)
                if pending_step_unfreezes(s) and apply_unfreezes(s):
                    net = s.model
                    net = wrap(s)
                bar.update(micro)
                now = time.perf_counter()
                if p.step > WARMUP_STEPS:
                    p.train_seconds += now - mark
                    p.train_samples += step_samples * world.size  # every rank's batch is the same size
                mark, micro, step_samples = now, 0, 0

                if p.step % t.log_every == 0 or batches_left == 0:
                    log_train(s, loss_sum, logged_batches, total_steps, bar)
                    loss_sum.zero_()
                    logged_batches = 0
                stopping = vote.poll(stop.received is not None)
                if stopping or p.step >= total_steps:
                    break
                if t.checkpoint_every and p.step % t.checkpoint_every == 0 and batches_left > 0:
                    check_finite(s, global_sum(world, loss_sum))  # every step since the last log line
                    save_checkpoint(s)
                    mark = time.perf_counter()
            bar.close()

            if stopping and batches_left > 0:
                check_finite(s, global_sum(world, loss_sum))
                save_checkpoint(s)
                return "interrupted"
            # ---- end of epoch: evaluate, keep the best, checkpoint ----
            if end_of_epoch(s):
                break  # trainer.early_stop
            mark = time.perf_counter()
            if vote.settle(stop.received is not None):
                return "interrupted"
        report_unsettled(s.audit, p.step)  # ended before the re-check of exactly-zero gradients could settle
        return "completed"
    finally:
        vote.close()


# ---- the steps ---------------------------------------------------------------------------------
def train_step(s: Session, net: nn.Module, batch, closes_step: bool) -> tuple[torch.Tensor | None, int]:
    """Forward and backward of one micro-batch: (its detached loss, its samples), or (None, 0)
    when the loss is non-finite and trainer.skip_nonfinite skips it."""
    t = s.trainer
    batch = training_batch(batch, s.device, t.channels_last, s.batch_transform)
    if t.skip_nonfinite:  # the forward of a bad batch also moves BatchNorm statistics: keep a copy
        buffers_before = [b.detach().clone() for b in s.model.buffers()]
    first = s.progress.step == 0 and s.progress.batch == 0  # model.add's modules are checked on it
    with autocast(s.device, t.precision), no_sync(s, net, closes_step), \
            (watch_edits(s.model) if first else contextlib.nullcontext()), explained(s.batch_transform):
        step = s.task.step(net, batch)
    loss = step.loss
    if t.skip_nonfinite and not torch.isfinite(loss):  # opt-in: costs a host sync per batch
        with torch.no_grad():
            for buffer, saved in zip(s.model.buffers(), buffers_before):
                buffer.copy_(saved)
        s.progress.skipped_nonfinite += 1
        log.warning("non-finite loss at epoch %d, step %d: batch skipped (trainer.skip_nonfinite)", s.progress.epoch, s.progress.step + 1)
        return None, 0
    s.scaler.scale(loss / t.grad_accum).backward()
    return loss.detach(), batch_size(batch)


def training_batch(batch, device: torch.device, channels_last: bool, transform: BatchTransform | None):
    """A training batch on the device, through data.batch_transform (validation batches never are)."""
    batch = move_to(batch, device, channels_last=channels_last)
    return transform(batch) if transform is not None else batch


def optimizer_step(s: Session) -> None:
    """Unscale, audit the first step's gradients (and re-check the exactly-zero ones on the next
    steps), clip, step, zero, advance the schedule. The audit reads the bare model's gradients after
    the DDP all-reduce: every rank takes the same decision at the same step."""
    t, p = s.trainer, s.progress
    s.scaler.unscale_(s.optimizer)
    if not p.audit_done:
        audit_gradients(s.model, list(s.policy.allow_no_grad), s.audit)
        p.audit_done = True
        if s.world.is_main:
            write_trainability(s.run_dir, s.plan, s.audit)  # the audit's answer, as soon as it is known
    elif s.audit.zero_grad_pending and recheck_zero_gradients(s.model, s.audit, p.step + 1):
        if s.world.is_main:
            tables.show(tables.format_zero_grad_settled(s.audit))
            write_trainability(s.run_dir, s.plan, s.audit)  # the re-check's answer
    if t.clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), t.clip_grad_norm)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    if s.scheduler is not None:
        s.scheduler.step()
    p.step += 1
    if s.ema is not None and s.ema.due(p.step):
        s.ema.update(p.step)


def dry_run_pass(cfg, model: nn.Module, audit) -> int:
    """`dry_run_batches` training batches forward and backward, no optimizer step, nothing saved:
    wiring errors of model.add and the gradient audit answer "will it train?" before any training.
    Returns the number of batches passed."""
    from finetune.data import build_loaders

    wanted = cfg.dry_run_batches
    task = Task.from_config(cfg.task)
    task.monitor(cfg.trainer)  # an unknown trainer.monitor fails in a dry run too
    device = pick_device(cfg.trainer.device)
    model.to(device)
    task.to(device)
    train_loader, _, _ = build_loaders(cfg.data, cfg.seed, pin_memory=False)
    transform = build_batch_transform(cfg.data.batch_transform)
    model.train()
    done = 0
    for batch in train_loader:
        batch = training_batch(batch, device, cfg.trainer.channels_last, transform)
        with autocast(device, cfg.trainer.precision), (watch_edits(model) if done == 0 else contextlib.nullcontext()), \
                explained(transform):
            step = task.step(model, batch)
        (step.loss / wanted).backward()
        done += 1
        if done >= wanted:
            break
    if done == 0:
        raise TrainingError("the dry run found no training batch: data.train is empty.", "check data.train")
    audit_gradients(model, list(cfg.policy.allow_no_grad), audit, dry_run=True)
    model.zero_grad(set_to_none=True)
    return done


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, device: torch.device, precision: Precision,
             world: World = SINGLE) -> dict[str, float]:
    """val/loss (a mean over what the loss averages: targets, tokens, pixels) and the task's metrics,
    with one host sync at the end. Under DDP each rank evaluates its shard; loss sums are all-reduced
    and torchmetrics reduces the metric states, so every sample counts once."""
    model.eval()
    task.reset_metrics()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    part_sums: dict[str, torch.Tensor] = {}
    for batch in loader:
        batch = move_to(batch, device)
        with autocast(device, precision):
            step = task.step(model, batch)
        loss_sum += step.loss.detach().double() * step.count
        count += step.count
        for name, value in step.parts.items():
            part_sums[name] = part_sums.get(name, torch.zeros_like(loss_sum)) + value.detach().double() * step.count
        task.update_metrics(step)
    names = sorted(part_sums)
    totals = world.sum_(torch.stack([loss_sum, count, *(part_sums[n] for n in names)])).tolist()
    values = {"loss": totals[0] / totals[1]}
    values.update({name: total / totals[1] for name, total in zip(names, totals[2:])})
    values.update(task.compute_metrics())
    return values


def end_of_epoch(s: Session) -> bool:
    """Evaluate (the weights, and their average under trainer.ema), keep the best, write last.pt.
    True when trainer.early_stop ends training here."""
    p = s.progress
    s.world.broadcast_buffers(s.model)  # evaluate, on every rank, the model rank 0 saves
    val = evaluate(s.model, s.val_loader, s.task, s.device, s.trainer.precision, s.world)
    if s.ema is not None:
        with s.ema.swapped_in():
            val.update({f"{EMA_PREFIX}{k}": v for k, v in
                        evaluate(s.model, s.val_loader, s.task, s.device, s.trainer.precision, s.world).items()})
    p.final = {f"val/{k}": v for k, v in val.items()}
    s.metrics_log.log(p.epoch, p.step, "val", val)
    log.info("epoch %d/%d  step %d  %s", p.epoch, s.trainer.epochs, p.step, format_metrics(p.final))
    check_weights_finite(s)
    monitored = p.final.get(s.monitor)
    if monitored is not None and is_better(monitored, p.best_value, s.mode):
        p.best_value, p.best_epoch = monitored, p.epoch
        if s.world.is_main:  # checkpoints/best.safetensors: trainer.save=best makes it model.safetensors
            save_weights(s.run_dir / BEST, monitored_weights(s), s.provenance)
    stop = s.early_stop is not None and s.world.any(early_stop_due(s, monitored))  # every rank stops at the same epoch
    if stop:
        p.stopped_early = {"epoch": p.epoch, "best_epoch": p.best_epoch}
        waited = p.epochs_without_improvement
        log.info("early stop after epoch %d of %d: %s has not improved by more than min_delta=%g for %d epoch%s "
                 "(trainer.early_stop.patience); best %.6g at epoch %s", p.epoch, s.trainer.epochs, s.monitor,
                 s.early_stop.min_delta, waited, "s" if waited != 1 else "", p.best_value, p.best_epoch)
    p.epoch += 1
    p.batch = 0
    write_last(s)  # the weights were checked above
    return stop


def monitored_weights(s: Session) -> dict[str, torch.Tensor]:
    """What trainer.monitor judged: the EMA's weights for a val/ema/ metric, else the model's."""
    if s.ema is not None and s.monitor.startswith(f"val/{EMA_PREFIX}"):
        return s.ema.averaged_state_dict(s.model)
    return s.model.state_dict()


def early_stop_due(s: Session, monitored: float | None) -> bool:
    """trainer.early_stop (Lightning's EarlyStopping rule): an epoch improves when the monitored value
    beats the last improvement by more than min_delta; `patience` epochs without one stop training."""
    p, settings = s.progress, s.early_stop
    if settings is None or monitored is None:
        return False
    shifted = monitored - settings.min_delta if s.mode == "max" else monitored + settings.min_delta
    if is_better(shifted, p.early_stop_best, s.mode):
        p.early_stop_best, p.epochs_without_improvement = monitored, 0
        return False
    p.epochs_without_improvement += 1
    return p.epochs_without_improvement >= settings.patience


def save_checkpoint(s: Session) -> None:
    """checkpoints/last.pt, of weights checked finite: called on every rank."""
    check_weights_finite(s)
    write_last(s)


def write_last(s: Session) -> None:
    """checkpoints/last.pt: called on every rank (each rank's RNG goes into the file); rank 0 writes."""
    rngs = s.world.gather(rng_state())
    if s.world.is_main:
        save_training_state(s.run_dir / LAST, s.training_state(rngs))


def check_weights_finite(s: Session) -> None:
    """Before any weights are written: parameters and buffers (BatchNorm statistics included) hold
    numbers. Every rank holds the same values, so every rank stops here together."""
    bad = nonfinite_keys(s.model.state_dict())
    if s.ema is not None:
        bad += [f"{name} (EMA)" for name in nonfinite_keys(s.ema.shadow)]
    if bad:
        p = s.progress
        raise TrainingError(
            f"the model holds NaN or Inf at step {p.step} (epoch {p.epoch}) in {listed(bad)}; stopped before writing them.",
            "if a buffer (e.g. a BatchNorm running_var) is the only one, it came that way from the checkpoint or the "
            "data: check both; otherwise lower optim.optimizer.lr or set trainer.clip_grad_norm. The last good "
            "checkpoint, if any, is checkpoints/last.pt",
        )


# ---- policy over time --------------------------------------------------------------------------
def wrap(s: Session) -> nn.Module:
    """The DDP wrapper (the model itself for one process). DDP only syncs the parameters that
    required grad when it was built, so it is rebuilt after every unfreeze. Every trainable
    parameter must get a gradient in every step (the step-1 audit enforces it), so DDP needs no
    search for unused parameters, except where policy.allow_no_grad declares some."""
    return s.world.wrap(s.model, s.device, find_unused_parameters=bool(s.policy.allow_no_grad))


def apply_unfreezes(s: Session) -> bool:
    """Apply the policy.unfreeze entries due now; True when some were (then DDP must rewrap)."""
    p = s.progress
    due = [(index, entry) for index, entry in unfreeze_due(s.policy, p.epoch, p.step) if index not in p.unfrozen]
    for index, entry in due:
        s.verify_frozen()  # the last moment these tensors are frozen
        groups = add_unfrozen_groups(s, index)
        p.unfrozen.append(index)
        tensors = sum(len(g["params"]) for g in groups)
        s.audit.unfrozen.append({"index": index, "epoch": p.epoch, "step": p.step, "tensors": tensors})
        if s.ema is not None:
            s.ema.follow(s.model)  # averaged from their value now, which they held since the start
        log.info("unfroze %d tensors (policy.unfreeze[%d]) at epoch %d, step %d, lr %.3g",
                 tensors, index, p.epoch, p.step, float(s.base_lr * entry.lr_mult))
    if due and s.world.is_main:
        write_trainability(s.run_dir, s.plan, s.audit)
    return bool(due)


def pending_step_unfreezes(s: Session) -> bool:
    p = s.progress
    return any(e.at_step is not None and i not in p.unfrozen and p.step >= e.at_step for i, e in enumerate(s.policy.unfreeze))


# ---- small pieces ------------------------------------------------------------------------------
def no_sync(s: Session, net: nn.Module, closes_step: bool):
    """Under DDP, micro-batches that do not close an optimizer step skip the gradient all-reduce."""
    if s.world.is_distributed and not closes_step:
        return net.no_sync()
    return contextlib.nullcontext()


def log_train(s: Session, loss_sum: torch.Tensor, logged_batches: int, total_steps: int, bar) -> None:
    """The only host sync, once per log interval: the mean loss over all ranks' batches."""
    p, world = s.progress, s.world
    mean_loss = global_sum(world, loss_sum) / (max(logged_batches, 1) * world.size)
    check_finite(s, mean_loss)
    lr = s.optimizer.param_groups[0]["lr"]
    s.metrics_log.log(p.epoch, p.step, "train", {"loss": mean_loss, "lr": lr})
    # Throughput counts steps after the first WARMUP_STEPS; until then there is none to show.
    rate = f"{p.train_samples / p.train_seconds:.0f}" if p.train_seconds else "-"
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=rate, refresh=False)
    if not bar.enabled:
        log.info("epoch %d step %d/%d  loss %.4f  lr %.3g  %s samples/s", p.epoch, p.step, total_steps, mean_loss, lr, rate)


def global_sum(world: World, value: torch.Tensor) -> float:
    """`value` summed over all ranks (a host sync)."""
    return world.sum_(value.detach().clone()).item()


def check_finite(s: Session, loss: float) -> None:
    if not math.isfinite(loss):
        p = s.progress
        raise TrainingError(
            f"training loss is {loss} at step {p.step} (epoch {p.epoch}); stopped before writing bad weights.",
            "lower optim.optimizer.lr or set trainer.clip_grad_norm, check the data; the last good "
            "checkpoint is checkpoints/last.pt (rerun the same command to resume from it)",
        )


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best
