"""trainer.ema: an exponential moving average of the trained weights, with timm's ModelEmaV3 semantics
(`timm/utils/model_ema.py`): the update `ema.lerp_(weights, 1 - decay)` after optimizer steps, the
decay of `get_decay` (0 at the first update, which copies the weights; then `decay`, or timm's
warm-up `1 - (1 + step / gamma) ** -power` capped at it), buffers not averaged (timm's
`exclude_buffers=True`: BatchNorm statistics are the model's own).

Only the parameters that train are averaged: a frozen one equals its own average (the average of a
constant is that constant, bit for bit), so it needs no copy, and a LoRA run keeps a copy of its
adapters, not of the base model. A parameter a policy.unfreeze makes trainable joins with its value
at that moment, which is what an average of every parameter would hold for it then. Evaluating the
average swaps its values into the model and back, tensor by tensor: no second model is built.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

WARMUP_POWER = 2 / 3  # timm's warmup_power default


def warmup_gamma(decay: float, warmup_steps: int | None) -> float | None:
    """timm's warmup_gamma for which the warm-up curve reaches `decay` after `warmup_steps` updates
    (None: no warm-up). Solves 1 - (1 + steps / gamma) ** -power = decay for gamma."""
    if not warmup_steps or decay <= 0.0:
        return None
    return warmup_steps / ((1.0 - decay) ** (-1.0 / WARMUP_POWER) - 1.0)


class WeightEma:
    """The average of a model's trainable parameters, kept on `device`."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int | None = None, every_n_steps: int = 1,
                 device: torch.device | None = None):
        self.decay = decay
        self.gamma = warmup_gamma(decay, warmup_steps)
        self.every_n_steps = every_n_steps
        self.device = device
        self.params: dict[str, nn.Parameter] = {}  # the model's live tensors, by name
        self.shadow: dict[str, torch.Tensor] = {}  # their averages, by the same names
        self.follow(model)

    @classmethod
    def from_settings(cls, model: nn.Module, settings, model_device: torch.device) -> "WeightEma":
        """From trainer.ema (config.EmaConfig); device null: the model's."""
        device = torch.device(settings.device) if settings.device else model_device
        return cls(model, settings.decay, settings.warmup_steps, settings.every_n_steps, device)

    def follow(self, model: nn.Module) -> list[str]:
        """Average the parameters that train now and were not averaged yet, from their value now.
        Returns their names."""
        added = [name for name, p in model.named_parameters() if p.requires_grad and name not in self.params]
        live = dict(model.named_parameters())
        for name in added:
            self.params[name] = live[name]
            self.shadow[name] = live[name].detach().to(self.device or live[name].device, copy=True)
        return added

    def get_decay(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based): timm's get_decay."""
        step = max(0, step - 1)
        if step <= 0:
            return 0.0
        if self.gamma is None:
            return self.decay
        decay = 1 - (1 + step / self.gamma) ** -WARMUP_POWER
        return max(min(decay, self.decay), 0.0)

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """One update, on the device of the average: no host sync (unless that device is another
        one than the model's, which copies the weights there)."""
        if not self.shadow:
            return
        averages = list(self.shadow.values())
        weights = [p.detach().to(a.device) for p, a in zip(self.params.values(), averages)]
        torch._foreach_lerp_(averages, weights, 1.0 - self.get_decay(step))

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the averages inside the block and its own weights again after it
        (exactly: the values are exchanged, not recomputed)."""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def _exchange(self) -> None:
        for name, p in self.params.items():
            average = self.shadow[name]
            held = p.detach().clone()
            p.copy_(average)
            average.copy_(held)

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state_dict with the averages in place of the trained parameters (every name of
        a tied parameter included)."""
        by_tensor = {id(self.params[name]): average for name, average in self.shadow.items()}
        return {key: by_tensor.get(id(value), value).detach() for key, value in model.state_dict(keep_vars=True).items()}

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        """The averages of a checkpoint: the same names as this run averages (ValueError otherwise)."""
        saved = state["shadow"]
        if set(saved) != set(self.shadow):
            extra, missing = sorted(set(saved) - set(self.shadow)), sorted(set(self.shadow) - set(saved))
            raise ValueError(f"its EMA averages other parameters (only in the checkpoint: {extra[:3]}; "
                             f"only in this run: {missing[:3]})")
        with torch.no_grad():
            for name, value in saved.items():
                self.shadow[name].copy_(value)
