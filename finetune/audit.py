"""Checks that training does what the plan says: gradients reach every trainable parameter,
and frozen parameters (and frozen norm statistics) end exactly where they started."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import logging

from finetune.errors import AuditError
from finetune.matching import glob_matches
from finetune.policy import TrainPlan


log = logging.getLogger(__name__)


@dataclass
class GradAudit:
    checked: bool = False
    grad_flow_ok: bool | None = None
    no_grad: list[str] = field(default_factory=list)  # trainable, but no (or an all-zero) gradient
    nonfinite: list[str] = field(default_factory=list)
    allowed_no_grad: list[str] = field(default_factory=list)
    frozen_unchanged: bool | None = None
    changed_frozen: list[str] = field(default_factory=list)
    frozen_verified: list[str] = field(default_factory=list)  # frozen tensors whose checksums were compared
    unfrozen: list[dict] = field(default_factory=list)  # policy.unfreeze events: {index, epoch, step, tensors}

    def to_json(self) -> dict:
        return asdict(self)


def audit_gradients(model: nn.Module, allow_no_grad: list[str], audit: GradAudit) -> None:
    """Call after the first backward, before the optimizer step. Raises naming the parameters that got no gradient."""
    with_grad: list[tuple[str, torch.Tensor]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            audit.no_grad.append(name)
        else:
            with_grad.append((name, param.grad))
    if with_grad:
        # One batched reduction for all gradients: a single host sync.
        grads = [g.detach().float() for _, g in with_grad]
        norms = torch.stack(torch._foreach_norm(grads)).cpu()
        for (name, _), norm in zip(with_grad, norms.tolist()):
            if norm != norm or norm in (float("inf"), float("-inf")):
                audit.nonfinite.append(name)
            elif norm == 0.0:
                audit.no_grad.append(name)
    allowed = [n for n in audit.no_grad if any(glob_matches(g, n) for g in allow_no_grad)]
    audit.allowed_no_grad = allowed
    audit.no_grad = [n for n in audit.no_grad if n not in allowed]
    audit.checked = True
    audit.grad_flow_ok = not audit.no_grad and not audit.nonfinite
    if audit.no_grad:
        shown = ", ".join(audit.no_grad[:10]) + (f", ... ({len(audit.no_grad)} in all)" if len(audit.no_grad) > 10 else "")
        raise AuditError(
            f"{len(audit.no_grad)} trainable parameter(s) received no gradient on the first step: {shown}",
            "the module is probably never used in forward() (created in __init__ but not called), or its "
            "output does not reach the loss; wire it in, freeze it, or declare it in policy.allow_no_grad",
        )
    if audit.nonfinite:
        raise AuditError(
            f"non-finite (NaN/Inf) gradients on the first step in: {', '.join(audit.nonfinite[:10])}",
            "lower the learning rate, check the input normalisation, or use precision=fp32",
        )
    log.info("gradient audit: all %d trainable tensors received a finite, non-zero gradient on step 1%s", len(with_grad),
             f" ({len(allowed)} allowed without: policy.allow_no_grad)" if allowed else "")


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
