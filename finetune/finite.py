"""Which tensors hold NaN or Inf: checked on what a checkpoint brings in, and on the model before
any weights are written, so no run claims success over bad values (a NaN BatchNorm `running_var`
trains without a non-finite loss and ends up in the saved weights)."""

from __future__ import annotations

from typing import Mapping

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """One pass over the tensor, no tensor-sized temporary: the float64 sum of finite float32/16
    values cannot overflow, so it is finite exactly when every value is (float64 tensors, whose sum
    can overflow, are checked element by element when the sum is not finite)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return True
    return tensor.dtype == torch.float64 and bool(torch.isfinite(tensor).all())


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys whose floating-point values include NaN or Inf, in order."""
    return [key for key, tensor in tensors.items() if not all_finite(tensor.detach())]


def count_nonfinite(tensor: torch.Tensor) -> int:
    return int((~torch.isfinite(tensor.detach())).sum())
