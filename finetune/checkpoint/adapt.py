"""Shape adaptation (`on_shape_mismatch: adapt`): fit a checkpoint tensor into a model slot.

Each function takes the model's freshly initialised tensor and the checkpoint's, and returns the
tensor to load plus a sentence saying what was done. What cannot be adapted raises.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from finetune.errors import CheckpointError


def _overlap(fresh: torch.Tensor, ckpt: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Linear/classifier heads and biases: copy the overlapping rows/columns, keep fresh init elsewhere."""
    out = fresh.detach().clone()
    region = tuple(slice(0, min(a, b)) for a, b in zip(fresh.shape, ckpt.shape))
    out[region] = ckpt[region].to(out.dtype)
    shared = "x".join(str(min(a, b)) for a, b in zip(fresh.shape, ckpt.shape))
    return out, f"copied the overlapping {shared} block; the rest keeps the module's own init"


def _input_channels(fresh: torch.Tensor, ckpt: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Conv with a different number of input channels, as timm's `adapt_input_conv`."""
    in_new, in_old = fresh.shape[1], ckpt.shape[1]
    weight = ckpt.to(fresh.dtype)
    if in_new == 1:
        return weight.sum(dim=1, keepdim=True), f"summed {in_old} input channels into 1"
    repeats = math.ceil(in_new / in_old)
    adapted = weight.repeat(1, repeats, 1, 1)[:, :in_new] * (in_old / in_new)
    return adapted, f"repeated {in_old} input channels to {in_new}, scaled by {in_old}/{in_new}"


def _position_embedding(fresh: torch.Tensor, ckpt: torch.Tensor) -> tuple[torch.Tensor, str]:
    """[1, N, C] position embeddings: keep prefix tokens, interpolate the grid (2-D if square)."""
    n_new, n_old = fresh.shape[1], ckpt.shape[1]
    for prefix in (0, 1, 2, 4, 8):
        g_old, g_new = math.isqrt(n_old - prefix), math.isqrt(n_new - prefix)
        if g_old * g_old == n_old - prefix and g_new * g_new == n_new - prefix:
            grid = ckpt[:, prefix:].float().reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1)
            out = torch.cat([ckpt[:, :prefix].float(), grid], dim=1).to(fresh.dtype)
            return out, f"kept {prefix} prefix token(s), resized the {g_old}x{g_old} grid to {g_new}x{g_new} (bicubic)"
    seq = F.interpolate(ckpt.float().transpose(1, 2), size=n_new, mode="linear", align_corners=False)
    return seq.transpose(1, 2).to(fresh.dtype), f"interpolated a length-{n_old} sequence to {n_new} (linear)"


def adapt_tensor(key: str, fresh: torch.Tensor, ckpt: torch.Tensor) -> tuple[torch.Tensor, str]:
    new, old = tuple(fresh.shape), tuple(ckpt.shape)
    if len(new) == len(old) <= 2:
        return _overlap(fresh, ckpt)
    if len(new) == len(old) == 4 and new[0] == old[0] and new[2:] == old[2:]:
        return _input_channels(fresh, ckpt)
    if len(new) == len(old) == 3 and new[0] == old[0] == 1 and new[2] == old[2]:
        return _position_embedding(fresh, ckpt)
    raise CheckpointError(
        f"cannot adapt '{key}': checkpoint shape {list(old)} to model shape {list(new)}.",
        "adapt handles heads/biases (overlap copy), conv input channels and position embeddings; "
        f"for this key use checkpoint.shape_overrides=[{{keys: '{key}', action: skip}}] (keeps the model's init), "
        "or drop it with checkpoint.ignore",
    )
