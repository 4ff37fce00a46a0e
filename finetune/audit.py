"""Checks that training does what the plan says: gradients reach every trainable parameter,
and frozen parameters (and frozen norm statistics) end exactly where they started.

The gradient audit tells two cases apart on the first optimizer step:

- `grad is None`: the tensor is not in the autograd graph (its module is never called in
  forward(), or its output does not reach the loss). An error on step 1.
- a gradient that is present but exactly zero: the tensor is in the graph, but a zero-initialised
  path blocks it for now (timm's ResNet zero-initialises the last BatchNorm of each block; LoRA's
  B starts at zero, so A gets a zero gradient on step 1). Such tensors are re-checked after each
  of the next optimizer steps, and are an error only if one stays exactly zero for all of the
  first `ZERO_GRAD_STEPS` steps.

Every decision reads the bare model's gradients after the DDP all-reduce, so every rank decides
the same at the same step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from finetune.errors import AuditError
from finetune.matching import glob_matches, listed
from finetune.policy import TrainPlan


log = logging.getLogger(__name__)

ZERO_GRAD_STEPS = 5  # a gradient exactly zero on each of the first this-many optimizer steps is an error


@dataclass
class GradAudit:
    checked: bool = False
    # True: every trainable tensor got a finite gradient and every exactly-zero one has turned non-zero;
    # None: not checked yet, or some are still exactly zero (zero_grad_pending); False: an error.
    grad_flow_ok: bool | None = None
    no_grad: list[str] = field(default_factory=list)  # trainable, but grad None on step 1: not in the autograd graph
    zero_grad: list[str] = field(default_factory=list)  # trainable, a gradient present but exactly zero on step 1
    zero_grad_pending: list[str] = field(default_factory=list)  # of zero_grad: exactly zero at every check so far
    zero_grad_cleared_at: dict[str, int] = field(default_factory=dict)  # name -> optimizer step of its first non-zero gradient
    zero_grad_checked_to: int = 0  # the last optimizer step at which zero_grad_pending was checked
    zero_grad_steps: int = ZERO_GRAD_STEPS  # still exactly zero after this many optimizer steps: an error
    nonfinite: list[str] = field(default_factory=list)
    allowed_no_grad: list[str] = field(default_factory=list)  # exempted by policy.allow_no_grad (either kind)
    frozen_unchanged: bool | None = None
    changed_frozen: list[str] = field(default_factory=list)
    frozen_verified: list[str] = field(default_factory=list)  # frozen tensors whose checksums were compared
    unfrozen: list[dict] = field(default_factory=list)  # policy.unfreeze events: {index, epoch, step, tensors}

    def to_json(self) -> dict:
        return asdict(self)



def _grad_norms(grads: list[torch.Tensor]) -> list[float]:
    """One batched reduction over all the gradients: a single host sync."""
    if not grads:
        return []
    return torch.stack(torch._foreach_norm([g.detach().float() for g in grads])).cpu().tolist()


def audit_gradients(model: nn.Module, allow_no_grad: list[str], audit: GradAudit, *, dry_run: bool = False) -> None:
    """Call after the first backward (under DDP: after the all-reduce), before the optimizer step.

    Raises naming the trainable parameters whose gradient is None (not in the graph) or non-finite.
    Those whose gradient is exactly zero go to `audit.zero_grad_pending`: training re-checks them
    with `recheck_zero_gradients` after each of the next optimizer steps. `dry_run=True` (batches
    passed forward and backward, no optimizer step to follow): the same errors, and the exactly-zero
    ones are reported with a warning, not failed (nothing can open a zero path without a step).
    """
    when = "on the dry run's batches" if dry_run else "on the first step"
    none: list[str] = []
    with_grad: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            none.append(name)
        else:
            with_grad.append((name, param.grad))
    zero: list[str] = []
    audit.nonfinite = []
    for (name, _), norm in zip(with_grad, _grad_norms([g for _, g in with_grad])):
        if not math.isfinite(norm):
            audit.nonfinite.append(name)
        elif norm == 0.0:
            zero.append(name)
    allowed = [n for n in none + zero if any(glob_matches(g, n) for g in allow_no_grad)]
    audit.allowed_no_grad = allowed
    audit.no_grad = [n for n in none if n not in allowed]
    audit.zero_grad = [n for n in zero if n not in allowed]
    audit.zero_grad_pending = list(audit.zero_grad)
    audit.zero_grad_cleared_at = {}
    audit.zero_grad_checked_to = 0 if dry_run else 1
    audit.zero_grad_steps = ZERO_GRAD_STEPS
    audit.checked = True
    if audit.no_grad or audit.nonfinite:
        audit.grad_flow_ok = False
    else:
        audit.grad_flow_ok = None if audit.zero_grad_pending else True
    if audit.no_grad:
        raise AuditError(
            f"{len(audit.no_grad)} trainable parameter(s) received no gradient {when}: {listed(audit.no_grad, 10)}",
            "the module is probably never used in forward() (created in __init__ but not called), or its "
            "output does not reach the loss; wire it in, freeze it, or declare it in policy.allow_no_grad",
        )
    if audit.nonfinite:
        raise AuditError(
            f"non-finite (NaN/Inf) gradients {when} in: {', '.join(audit.nonfinite[:10])}",
            "lower the learning rate, check the input normalisation, or use precision=fp32",
        )
    exempt = f" ({len(allowed)} allowed without: policy.allow_no_grad)" if allowed else ""
    finite = len(with_grad) - (len(zero) - len(audit.zero_grad))  # the allowed exactly-zero ones aside
    if not audit.zero_grad:
        log.info("gradient audit: all %d trainable tensors received a finite, non-zero gradient %s%s",
                 finite, "on the dry run's batches" if dry_run else "on step 1", exempt)
    elif dry_run:
        log.warning("gradient audit: %d trainable tensor(s) have a gradient that is exactly zero on the dry run's "
                    "batches; re-checked over the first training steps (a zero-initialised path, e.g. a zero gate "
                    "or a zero-init norm weight, opens after an optimizer step): %s%s",
                    len(audit.zero_grad), listed(audit.zero_grad, 10), exempt)
    else:
        log.info("gradient audit: %d trainable tensors received a finite gradient on step 1; %d of them exactly zero "
                 "(a zero-initialised path?), re-checked after each optimizer step until non-zero (at most %d steps)%s",
                 finite, len(audit.zero_grad), ZERO_GRAD_STEPS, exempt)


def recheck_zero_gradients(model: nn.Module, audit: GradAudit, step: int) -> bool:
    """Re-check the tensors whose gradient was exactly zero so far, at optimizer step `step` (1-based:
    2, 3, ...): after the backward (under DDP: after the all-reduce), before the optimizer step.

    Costs one batched norm and one host sync, and only while some are pending. Returns True when this
    check settled the audit (every one has turned non-zero). Raises AuditError when some are still
    exactly zero at step `audit.zero_grad_steps`.
    """
    pending = audit.zero_grad_pending
    if not pending:
        return False
    params = dict(model.named_parameters())
    present = [(n, params[n].grad) for n in pending if n in params and params[n].grad is not None]
    # Non-zero, or non-finite (NaN/Inf): either way something reaches it, the path is open.
    opened = {n for (n, _), norm in zip(present, _grad_norms([g for _, g in present])) if norm != 0.0}
    for name in pending:
        if name in opened:
            audit.zero_grad_cleared_at[name] = step
    audit.zero_grad_pending = [n for n in pending if n not in opened]
    audit.zero_grad_checked_to = step
    if not audit.zero_grad_pending:
        audit.grad_flow_ok = True
        return True
    if step >= audit.zero_grad_steps:
        audit.grad_flow_ok = False
        stuck = audit.zero_grad_pending
        raise AuditError(
            f"{len(stuck)} trainable parameter(s) have a gradient that is present but exactly zero on each of the "
            f"first {step} optimizer steps: {listed(stuck, 10)}. They are in the graph, but blocked: a zero-initialised "
            "or zero-gated path (a gate, scale or projection at 0) that never opened, or a dead activation",
            "initialise the gate/scale non-zero and check the module's init (a zero weight upstream of it stays "
            "zero if its own gradient is zero too), or declare them in policy.allow_no_grad",
        )
    return False


def report_unsettled(audit: GradAudit, steps: int) -> None:
    """At the end of training (`steps` optimizer steps done): tensors still exactly zero because
    training ended before `audit.zero_grad_steps` steps are reported with a warning, not failed."""
    if audit.zero_grad_pending:
        log.warning("gradient audit: training ended after %d optimizer step(s), before the %d-step re-check: %d "
                    "trainable tensor(s) still have an exactly-zero gradient: %s", steps,
                    audit.zero_grad_steps, len(audit.zero_grad_pending), listed(audit.zero_grad_pending, 10))


def frozen_tensors(model: nn.Module, plan: TrainPlan) -> dict[str, torch.Tensor]:
    """Parameters frozen now, plus the running statistics of norm layers kept in eval mode.

    Called before and after training; tensors unfrozen in between (policy.unfreeze) drop out.
    """
    tensors = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    for mod_name in plan.frozen_norms:
        module = model.get_submodule(mod_name)
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        tensors.update({prefix + n: b for n, b in module.named_buffers(recurse=False)})
    return tensors


_INT_OF_SIZE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


@torch.no_grad()
def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per tensor, the sum of its bit patterns read as integers: one cheap pass, no copy, and
    exact: any change of any element changes it (unlike a float sum, which can round it away)."""
    if not tensors:
        return {}
    sums = [t.detach().view(_INT_OF_SIZE[t.element_size()]).sum(dtype=torch.int64) for t in tensors.values()]
    return dict(zip(tensors, torch.stack(sums).cpu().tolist()))


def compare_checksums(before: dict, after: dict, audit: GradAudit) -> None:
    """Tensors frozen both in `before` and now must be bit-for-bit where they were. Called at
    the end of training and before each policy.unfreeze, so every tensor is checked at the last
    moment it was frozen; findings accumulate."""
    changed = [n for n in before if n in after and before[n] != after[n] and n not in audit.changed_frozen]
    audit.changed_frozen.extend(changed)
    audit.frozen_verified = sorted(set(audit.frozen_verified) | (set(before) & set(after)))
    audit.frozen_unchanged = not audit.changed_frozen
