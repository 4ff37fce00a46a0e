"""LR schedules as config. A scheduler factory with a `total_steps` argument gets the run's
number of optimizer steps from the trainer, so configs never hard-code it."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, warmup_fraction: float = 0.0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up from 0, then cosine decay to `min_lr_ratio` × lr, stepped per optimizer step."""
    warmup = max(warmup_steps, int(round(warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
