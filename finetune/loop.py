"""Train and evaluate. Reads top to bottom: AMP, accumulation, audit, checkpointing all visible.

No host sync in the step (no `.item()`), except at log intervals and on the first step's audit.
Under DDP every rank runs this same loop in lockstep: forwards go through the DDP wrapper
(`net`), everything else (audit, checksums, state_dict, evaluation) uses the bare `model`, and
every decision that changes the control flow (stop, non-finite loss, best epoch) is taken on
values all-reduced across ranks, so all ranks take it at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from finetune.audit import GradAudit, audit_gradients
from finetune.config import MonitorMode, Precision
from finetune.distributed import SINGLE, StopVote, World
from finetune.errors import TrainingError
from finetune.metrics_log import MetricsLog
from finetune.policy import check_optimizer_matches, unfreeze, unfreeze_due
from finetune.signals import StopRequest

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # steps excluded from the throughput figure


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


def autocast(device: torch.device, precision: Precision):
    if precision is Precision.fp32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision is Precision.bf16 else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: Precision,
             world: World = SINGLE) -> dict[str, float]:
    """Mean loss and top-1 accuracy (and top-5 with more than 5 classes); one host sync at the end.
    Under DDP each rank evaluates its shard and the sums are all-reduced: every sample counts once."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    correct5 = torch.zeros((), device=device, dtype=torch.int64)
    count, num_classes = 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        num_classes = logits.shape[1]
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct += (top[:, 0] == targets).sum()
        correct5 += (top == targets[:, None]).any(dim=1).sum()
        count += targets.numel()
    sums = torch.stack([loss_sum, correct.double(), correct5.double(), torch.tensor(float(count), device=device, dtype=torch.float64)])
    loss_total, correct_total, correct5_total, count_total = world.sum_(sums).tolist()
    num_classes = int(world.max_(torch.tensor([num_classes])).item())
    values = {"loss": loss_total / count_total, "acc": correct_total / count_total}
    if num_classes > 5:
        values["top5"] = correct5_total / count_total
    return values


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
class Loop:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: object
    trainer: object  # TrainerConfig
    policy: object  # PolicyConfig
    device: torch.device
    metrics: MetricsLog
    audit: GradAudit
    base_lr: float
    base_weight_decay: float
    save_state: Callable[[Progress], None]  # writes checkpoints/last.pt
    save_best: Callable[[], None]
    progress: Progress = field(default_factory=Progress)
    verify_frozen: Callable[[], None] = lambda: None  # compares frozen tensors with their checksums at the start
    world: World = SINGLE

    def __post_init__(self) -> None:
        # Loss scaling for fp16 on CUDA; a no-op otherwise. Its state is part of checkpoints/last.pt.
        fp16_cuda = self.trainer.precision is Precision.fp16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16_cuda)
        self.net: nn.Module = self.model  # what training forwards go through (DDP's wrapper under DDP)
        self.progress.world_size = self.world.size

    def wrap(self) -> None:
        """(Re)build the DDP wrapper: DDP only syncs the parameters that required grad when it was
        built, so this runs again after every unfreeze. Every trainable parameter must get a
        gradient in every step (the step-1 audit enforces it), so DDP needs no search for unused
        parameters, except where policy.allow_no_grad declares some."""
        self.net = self.model  # drop the old wrapper (and its gradient hooks) first
        self.net = self.world.wrap(self.model, self.device, find_unused_parameters=bool(self.policy.allow_no_grad))

    def no_sync(self, closes_step: bool):
        """Under DDP, micro-batches that do not close an optimizer step skip the gradient all-reduce."""
        if self.world.is_distributed and not closes_step:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def global_sum(self, value: torch.Tensor) -> float:
        """`value` summed over all ranks (a host sync)."""
        return self.world.sum_(value.detach().clone()).item()

    def evaluate(self) -> dict[str, float]:
        self.world.broadcast_buffers(self.model)  # evaluate, on every rank, the model rank 0 saves
        return evaluate(self.model, self.val_loader, self.device, self.trainer.precision, self.world)

    def autocast(self):
        return autocast(self.device, self.trainer.precision)

    # ---- policy over time -------------------------------------------------------------------
    def apply_unfreezes(self) -> None:
        p = self.progress
        unfrozen_before = len(p.unfrozen)
        self._apply_unfreezes()
        if len(p.unfrozen) > unfrozen_before:
            self.wrap()

    def _apply_unfreezes(self) -> None:
        p = self.progress
        for index, entry in unfreeze_due(self.policy, p.epoch, p.step):
            if index in p.unfrozen:
                continue
            self.verify_frozen()  # the last moment these tensors are frozen
            groups = self._unfreeze(index)
            p.unfrozen.append(index)
            self.audit.unfrozen.append({"index": index, "epoch": p.epoch, "step": p.step,
                                        "tensors": sum(len(g["params"]) for g in groups)})
            log.info("unfroze %d tensors (policy.unfreeze[%d]) at epoch %d, step %d, lr %.3g",
                     sum(len(g["params"]) for g in groups), index, p.epoch, p.step, float(self.base_lr * entry.lr_mult))

    def _unfreeze(self, index: int) -> list[dict]:
        entry = self.policy.unfreeze[index]
        groups = unfreeze(self.model, entry, index, self.base_lr, self.base_weight_decay, self.policy.decay_norm_and_bias)
        for group in groups:
            self.optimizer.add_param_group(group)
            add_group_to_scheduler(self.scheduler, group)
        check_optimizer_matches(self.model, self.optimizer)
        return groups

    def restore_unfreezes(self, indices: list[int]) -> None:
        """On resume: redo, in order, the unfreezes the saved run had done, so the optimizer has
        the same groups before its state is loaded."""
        for index in indices:
            self._unfreeze(index)

    def pending_step_unfreezes(self) -> bool:
        return any(e.at_step is not None and i not in self.progress.unfrozen and self.progress.step >= e.at_step
                   for i, e in enumerate(self.policy.unfreeze))

    # ---- training ---------------------------------------------------------------------------
    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            p = self.progress
            raise TrainingError(
                f"training loss is {loss} at step {p.step} (epoch {p.epoch}); stopped before writing bad weights.",
                "lower optim.optimizer.lr or set trainer.clip_grad_norm, check the data; the last good "
                "checkpoint is checkpoints/last.pt (rerun the same command to resume from it)",
            )

    def is_better(self, value: float) -> bool:
        best = self.progress.best_value
        if best is None:
            return True
        return value > best if self.trainer.mode is MonitorMode.max else value < best

    def fit(self, stop: StopRequest) -> str:
        """Run until the epochs or max_steps are done, or a signal asks to stop. Returns the status."""
        vote = StopVote(self.world)  # a signal to any rank stops all ranks at the same step
        status = self._fit(stop, vote)
        vote.close()
        return status

    def _fit(self, stop: StopRequest, vote: StopVote) -> str:
        t, p, world = self.trainer, self.progress, self.world
        steps_per_epoch = math.ceil(len(self.train_loader) / t.grad_accum)
        total_steps = t.max_steps or steps_per_epoch * t.epochs
        scaler = self.scaler
        monitor_split, _, monitor_name = t.monitor.partition("/")
        self.wrap()
        mark = time.perf_counter()

        while p.epoch <= t.epochs and p.step < total_steps:
            self.apply_unfreezes()
            self.net.train()
            self.sampler.set_epoch(p.epoch, start=p.batch * self.train_loader.batch_size)
            batches_left = len(self.train_loader)  # the sampler already skips the p.batch seen ones
            bar = progress_bar(t.progress and world.is_main, total=p.batch + batches_left, initial=p.batch,
                               desc=f"epoch {p.epoch}/{t.epochs}")
            loss_sum = torch.zeros((), device=self.device)  # since the last log line
            logged_batches, micro, step_samples = 0, 0, 0
            stopping = False
            for inputs, targets in self.train_loader:
                inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                if t.channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                if t.skip_nonfinite:  # the forward of a bad batch also moves BatchNorm statistics: keep a copy
                    buffers_before = [b.detach().clone() for b in self.model.buffers()]
                with self.autocast(), self.no_sync(closes_step=micro + 1 >= t.grad_accum or batches_left == 1):
                    loss = F.cross_entropy(self.net(inputs), targets)
                if t.skip_nonfinite and not torch.isfinite(loss):  # opt-in: costs a host sync per batch
                    with torch.no_grad():
                        for buffer, saved in zip(self.model.buffers(), buffers_before):
                            buffer.copy_(saved)
                    p.skipped_nonfinite += 1
                    log.warning("non-finite loss at epoch %d, step %d: batch skipped (trainer.skip_nonfinite)", p.epoch, p.step + 1)
                    p.batch += 1
                    batches_left -= 1
                    if batches_left > 0 or micro == 0:
                        continue
                    loss = torch.zeros((), device=self.device, requires_grad=True)  # close the last step cleanly
                scaler.scale(loss / t.grad_accum).backward()
                loss_sum += loss.detach()
                logged_batches += 1
                micro += 1
                step_samples += targets.shape[0]
                p.batch += 1
                batches_left -= 1
                if micro < t.grad_accum and batches_left > 0:
                    continue

                # ---- one optimizer step ----
                scaler.unscale_(self.optimizer)
                if not p.audit_done:
                    audit_gradients(self.model, list(self.policy.allow_no_grad), self.audit)
                    p.audit_done = True
                if t.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad_norm)
                scaler.step(self.optimizer)
                scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.scheduler is not None:
                    self.scheduler.step()
                p.step += 1
                if self.pending_step_unfreezes():
                    self.apply_unfreezes()
                bar.update(micro)
                now = time.perf_counter()
                if p.step > WARMUP_STEPS:
                    p.train_seconds += now - mark
                    p.train_samples += step_samples * world.size  # every rank's batch is the same size
                mark, micro, step_samples = now, 0, 0

                if p.step % t.log_every == 0 or batches_left == 0:
                    # The only host sync, once per log interval: the mean over all ranks' batches.
                    mean_loss = self.global_sum(loss_sum) / (logged_batches * world.size)
                    self.check_finite(mean_loss)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.metrics.log(p.epoch, p.step, "train", {"loss": mean_loss, "lr": lr})
                    # Throughput counts steps after the first WARMUP_STEPS; until then there is none to show.
                    rate = f"{p.train_samples / p.train_seconds:.0f}" if p.train_seconds else "-"
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", samples_s=rate, refresh=False)
                    if not bar.enabled:
                        log.info("epoch %d step %d/%d  loss %.4f  lr %.3g  %s samples/s", p.epoch, p.step, total_steps, mean_loss, lr, rate)
                    loss_sum.zero_()
                    logged_batches = 0
                stopping = vote.poll(stop.received is not None)
                if stopping or p.step >= total_steps:
                    break
                if t.checkpoint_every and p.step % t.checkpoint_every == 0 and batches_left > 0:
                    self.check_finite(self.global_sum(loss_sum))  # every step since the last log line
                    self.save_state(p)
                    mark = time.perf_counter()
            bar.close()

            if stopping and batches_left > 0:
                self.check_finite(self.global_sum(loss_sum))
                self.save_state(p)
                return "interrupted"
            # ---- end of epoch: evaluate, keep the best, checkpoint ----
            val = self.evaluate()
            p.final = {f"val/{k}": v for k, v in val.items()}
            self.metrics.log(p.epoch, p.step, "val", val)
            log.info("epoch %d/%d  step %d  val loss %.4f  val acc %.4f%s", p.epoch, t.epochs, p.step, val["loss"], val["acc"],
                     f"  top5 {val['top5']:.4f}" if "top5" in val else "")
            monitored = p.final.get(t.monitor) if monitor_split == "val" else None
            if monitored is not None and self.is_better(monitored):
                p.best_value, p.best_epoch = monitored, p.epoch
                self.save_best()
            p.epoch += 1
            p.batch = 0
            self.save_state(p)
            mark = time.perf_counter()
            if vote.settle(stop.received is not None):
                return "interrupted"
        return "completed"


class _NoBar:
    enabled = False

    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs) -> None: ...
    def close(self) -> None: ...


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=True, dynamic_ncols=True)
    bar.enabled = True
    return bar
