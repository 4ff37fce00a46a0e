"""LoRA and DoRA on the modules of a built model, in place, without renaming a base parameter.

`add_lora(module, rank, alpha, dropout, dora)` turns a Linear, Conv1d, Conv2d, Embedding or
transformers' Conv1D into a subclass of its own type (a `LoRALinear` is an `nn.Linear`) that keeps
its Parameter objects (`weight`, `bias`: the same tensors, the same names) and gains, beside them,

    lora_a  [rank, in]     (conv: [rank, in, *kernel]; Embedding: [rank, num_embeddings])
    lora_b  [out, rank]    (conv: [out, rank, 1, ...]; Embedding: [embedding_dim, rank])
    lora_magnitude [out]   (DoRA only; Embedding: [embedding_dim])

    y = base(x) + (alpha / rank) * B(A(dropout(x)))                                    LoRA
    y = base(x) + (m / |W + s BA| - 1) * (base(x) - bias) + m / |W + s BA| * s B(A(dropout(x)))   DoRA

B starts at zero (A: Kaiming-uniform like PEFT's; a normal draw for embeddings), and DoRA's
magnitude starts at the per-output norm of W, so before training the output is the base's, bit for
bit. The norm |W + s BA| is detached, as the DoRA paper (section 4.3) and PEFT do. Embeddings take
no dropout (their inputs are indices). DoRA's magnitude depends on W: a checkpoint loaded after the
build must be followed by `init_dora_magnitudes` (checkpoint/load.py does it).

The arithmetic follows PEFT's LoRA layers, so `peft_state_dict` / `peft_config` write the adapters
in PEFT's format, and `merged_weight` folds them into the base weight (model B without its lora ops
then loads the result with strict=True).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LORA_PARAMS = ("lora_a", "lora_b", "lora_magnitude")
WRAPPABLE = "Linear, Conv1d, Conv2d, Embedding, transformers' Conv1D"


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's attention and MLP): a Linear with its weight stored [in, out]."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


class LoRALayer:
    """What every LoRA module shares; the kind-specific arithmetic is in the subclasses below.

    Placed before the base type in the MRO: `super().forward(x)` is the base module's own forward.
    """

    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_dora: bool

    # ---- set-up --------------------------------------------------------------------------------
    def _setup_lora(self, rank: int, alpha: float, dropout: float, dora: bool) -> None:
        self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_dora = int(rank), float(alpha), float(dropout), bool(dora)
        weight = self.weight
        a_shape, b_shape = self._lora_shapes()
        make = lambda shape: nn.Parameter(torch.empty(shape, dtype=weight.dtype, device=weight.device))  # noqa: E731
        self.lora_a = make(a_shape)
        self.lora_b = make(b_shape)
        if self.lora_dora:
            self.lora_magnitude = make((b_shape[0],))
        self.reset_lora_parameters()

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def lora_param_names(self) -> tuple[str, ...]:
        return ("lora_a", "lora_b", "lora_magnitude") if self.lora_dora else ("lora_a", "lora_b")

    def reset_parameters(self) -> None:
        """The base module's own init, then the adapter's (what a low-memory build calls on the
        tensors the checkpoint does not provide; the others are still on the meta device, where an
        init is a no-op, and are assigned from the checkpoint afterwards)."""
        base_reset = getattr(super(), "reset_parameters", None)
        if base_reset is not None:
            base_reset()
        else:
            self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self) -> None:  # transformers' Conv1D has no reset_parameters(): its constructor's init
        with torch.no_grad():
            nn.init.normal_(self.weight, std=0.02)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            self._init_a(self.lora_a)
            nn.init.zeros_(self.lora_b)
        self.init_dora_magnitude()

    def _init_a(self, a: torch.Tensor) -> None:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init

    def init_dora_magnitude(self) -> None:
        """m = |W + s BA| per output: the module's output is unchanged. A no-op without DoRA, and
        while W is still on the meta device (a low-memory build: called again after loading)."""
        if not self.lora_dora or self.weight.is_meta or self.lora_magnitude.is_meta:
            return
        with torch.no_grad():
            self.lora_magnitude.copy_(self._weight_norm())

    # ---- arithmetic ----------------------------------------------------------------------------
    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, training=True) if self.lora_dropout and self.training else x

    def delta_weight(self) -> torch.Tensor:
        """s BA in the layout of `weight`."""
        return self.lora_scale * self._delta(self.lora_a, self.lora_b)

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        """|W + s BA| per output, in the weight's dtype and outside autocast (detached: DoRA's
        gradient does not flow through the norm)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return self._norm(self.weight + self.delta_weight().to(self.weight.dtype))

    def _magnitude_scale(self) -> torch.Tensor:
        return self.lora_magnitude / self._weight_norm()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super().forward(x, *args, **kwargs)
        dropped = self._dropped(x)
        lora = self._lora_out(dropped)
        if not self.lora_dora:
            return torch.add(out, lora, alpha=self.lora_scale)  # one kernel for the scale and the sum
        scale = self._out_view(self._magnitude_scale()).to(out.dtype)
        base = self._base_without_bias(dropped) if dropped is not x else self._minus_bias(out)
        return out + (scale - 1) * base + scale * (self.lora_scale * lora)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight that gives this module's output without the adapter (computed in float32)."""
        weight = self.weight.float()
        merged = weight + self.lora_scale * self._delta(self.lora_a.float(), self.lora_b.float())
        if self.lora_dora:
            norm = self._norm(merged)
            merged = self._weight_view(self.lora_magnitude.float() / norm) * merged
        return merged.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}"
                + (f", lora_dropout={self.lora_dropout:g}" if self.lora_dropout else "") + (", dora=True" if self.lora_dora else ""))

    # ---- PEFT's names and shapes ---------------------------------------------------------------
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This module's adapter under PEFT's parameter names (relative to the module)."""
        out = {"lora_A.weight": self.lora_a, "lora_B.weight": self.lora_b}
        if self.lora_dora:
            out["lora_magnitude_vector"] = self.lora_magnitude
        return out

    # ---- per kind: shapes, the low-rank path, the norm and its broadcasting ---------------------
    def _lora_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def _lora_out(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_view(self, per_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _out_view(self, per_output: torch.Tensor) -> torch.Tensor:
        return per_output  # outputs hold the features last

    def _minus_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out - self._out_view(self.bias)

    def _base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _LinearLoRA(LoRALayer):
    """nn.Linear: weight [out, in]."""

    def _lora_shapes(self):
        return (self.lora_rank, self.in_features), (self.out_features, self.lora_rank)

    def _lora_out(self, x):
        return F.linear(F.linear(x, self.lora_a), self.lora_b)

    def _delta(self, a, b):
        return b @ a

    def _norm(self, weight):
        return torch.linalg.norm(weight, dim=1)

    def _weight_view(self, per_output):
        return per_output[:, None]

    def _base_without_bias(self, x):
        return F.linear(x, self.weight)


class _OutputsLast(LoRALayer):
    """Layers whose weight keeps the output features in its last dimension ([in, out]: transformers'
    Conv1D, an Embedding's [num, dim]): the delta is (BA)^T and DoRA's norms run over dim 0."""

    def _delta(self, a, b):
        return (b @ a).T

    def _norm(self, weight):
        return torch.linalg.norm(weight, dim=0)

    def _weight_view(self, per_output):
        return per_output[None, :]


class _Conv1DLoRA(_OutputsLast):
    """transformers' Conv1D: weight [in, out] (`nx`, `nf`); PEFT calls it fan_in_fan_out."""

    def _lora_shapes(self):
        return (self.lora_rank, self.weight.shape[0]), (self.weight.shape[1], self.lora_rank)

    def _lora_out(self, x):
        return F.linear(F.linear(x, self.lora_a), self.lora_b)

    def _base_without_bias(self, x):
        return x @ self.weight


class _ConvLoRA(LoRALayer):
    """nn.Conv1d / nn.Conv2d (groups 1, dilation 1, zero padding): A is a conv with the base's
    kernel, stride and padding into `rank` channels, B a 1x1 conv out of them (PEFT's layout)."""

    def _lora_shapes(self):
        ones = (1,) * (self.weight.dim() - 2)
        return (self.lora_rank, self.in_channels, *self.kernel_size), (self.out_channels, self.lora_rank, *ones)

    def _conv(self, x, weight, stride, padding):
        conv = F.conv1d if self.weight.dim() == 3 else F.conv2d
        return conv(x, weight, None, stride, padding)

    def _lora_out(self, x):
        ones = (1,) * (self.weight.dim() - 2)
        return self._conv(self._conv(x, self.lora_a, self.stride, self.padding), self.lora_b, ones, 0)

    def _delta(self, a, b):
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(self.weight.shape)

    def _norm(self, weight):
        return torch.linalg.norm(weight.flatten(1), dim=1)

    def _weight_view(self, per_output):
        return per_output.view(-1, *(1,) * (self.weight.dim() - 1))

    def _out_view(self, per_output):
        return per_output.view(1, -1, *(1,) * (self.weight.dim() - 2))

    def _base_without_bias(self, x):
        return self._conv_forward(x, self.weight, None)

    def peft_tensors(self):
        out = super().peft_tensors()
        if self.lora_dora:  # PEFT keeps a conv's magnitude shaped [1, out, 1, ...]
            out["lora_magnitude_vector"] = self._out_view(self.lora_magnitude)
        return out


class _EmbeddingLoRA(_OutputsLast):
    """nn.Embedding: weight [num_embeddings, dim]; A is looked up like the weight, B maps rank -> dim.
    DoRA scales the output features: y = m / |W + s BA| * (E[x] + s A[x] B)."""

    def _lora_shapes(self):
        return (self.lora_rank, self.num_embeddings), (self.embedding_dim, self.lora_rank)

    def _init_a(self, a):
        nn.init.normal_(a)  # PEFT draws the embedding's factor from N(0, 1) (and zeroes the other)

    def _dropped(self, x):
        return x

    def _lora_out(self, x):
        return F.embedding(x, self.lora_a.T, self.padding_idx) @ self.lora_b.T

    def forward(self, x, *args, **kwargs):
        if not self.lora_dora:
            return super().forward(x, *args, **kwargs)
        out = super(LoRALayer, self).forward(x, *args, **kwargs)  # the base type's own forward
        scale = self._magnitude_scale().to(out.dtype)
        return scale * (out + self.lora_scale * self._lora_out(x))

    def peft_tensors(self):
        out = {"lora_embedding_A": self.lora_a, "lora_embedding_B": self.lora_b}
        if self.lora_dora:
            out["lora_magnitude_vector"] = self.lora_magnitude
        return out


class LoRALinear(_LinearLoRA, nn.Linear):
    pass


class LoRAConv1d(_ConvLoRA, nn.Conv1d):
    pass


class LoRAConv2d(_ConvLoRA, nn.Conv2d):
    pass


class LoRAEmbedding(_EmbeddingLoRA, nn.Embedding):
    pass


_CLASSES: dict[type, type] = {nn.Linear: LoRALinear, nn.Conv1d: LoRAConv1d, nn.Conv2d: LoRAConv2d, nn.Embedding: LoRAEmbedding}


def lora_kind(module: nn.Module) -> tuple[type | None, str | None]:
    """(the LoRA arithmetic for `module`, None) or (None, why it cannot be wrapped)."""
    if isinstance(module, LoRALayer):
        return None, "already has a LoRA adapter"
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) or _is_hf_conv1d(module):
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return None, "its weight is not a floating-point tensor (quantized?)"
    if isinstance(module, nn.Linear):
        return _LinearLoRA, None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            return None, f"a grouped convolution (groups={module.groups})"
        if any(d != 1 for d in module.dilation):
            return None, f"a dilated convolution (dilation={tuple(module.dilation)})"
        if module.padding_mode != "zeros":
            return None, f"padding_mode={module.padding_mode!r}"
        return _ConvLoRA, None
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.sparse:
            return None, "an Embedding with max_norm or sparse gradients"
        return _EmbeddingLoRA, None
    if _is_hf_conv1d(module):
        return _Conv1DLoRA, None
    return None, None


def _lora_class(base: type, kind: type) -> type:
    """A subclass of the module's own type with the LoRA arithmetic in front of it."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"LoRA{base.__name__}", (kind, base), {"__module__": __name__})
    return _CLASSES[base]


def add_lora(module: nn.Module, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False) -> nn.Module:
    """Give `module` a LoRA (or DoRA) adapter, in place: the object stays where it is (its parent,
    its hooks, every reference to it), its type becomes the LoRA subclass of its type, its base
    parameters stay the same Parameter objects. Returns it."""
    kind, why = lora_kind(module)
    if kind is None:
        raise TypeError(f"LoRA cannot wrap {type(module).__name__}" + (f": {why}" if why else ""))
    module.__class__ = _lora_class(type(module), kind)
    module._setup_lora(rank, alpha, dropout, dora)
    return module


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def init_dora_magnitudes(model: nn.Module, new_keys: set[str]) -> list[str]:
    """After loading a checkpoint: DoRA magnitudes the checkpoint did not provide start at the
    norm of the loaded weight (not the one the build drew), so the output is still the base's."""
    done = []
    for name, module in lora_modules(model).items():
        key = f"{name}.lora_magnitude" if name else "lora_magnitude"
        if module.lora_dora and key in new_keys:
            module.init_dora_magnitude()
            done.append(key)
    return done


# ---- what a LoRA run exports -------------------------------------------------------------------
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every adapter folded into its base weight and the adapter
    tensors gone: the state of model B built without its lora ops (tensors detached, on the CPU;
    the unchanged ones are the model's own tensors, not copies)."""
    merged = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in lora_modules(model).items():
        prefix = f"{name}." if name else ""
        merged[prefix + "weight"] = module.merged_weight()
        for param in module.lora_param_names:
            merged.pop(prefix + param, None)
    return merged


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's keys: `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`
    (`lora_embedding_A` / `_B` for embeddings) and, with DoRA, `.lora_magnitude_vector`."""
    out = {}
    for name, module in lora_modules(model).items():
        for key, tensor in module.peft_tensors().items():
            out[f"base_model.model.{name}.{key}"] = tensor.detach()
    return out


class NotPeftExpressible(Exception):
    """The adapters (or the run) use something PEFT's one-adapter config cannot say."""


def peft_config(model: nn.Module, modules_to_save: list[str]) -> dict:
    """adapter_config.json for the model's adapters, as PEFT's LoraConfig writes it. Several
    lora ops of different rank or alpha become rank_pattern / alpha_pattern entries."""
    modules = lora_modules(model)
    if not modules:
        raise NotPeftExpressible("no LoRA modules")
    first = next(iter(modules.values()))
    if len({m.lora_dora for m in modules.values()}) > 1:
        raise NotPeftExpressible("some lora ops use DoRA and some do not; PEFT's use_dora is one flag for all")
    conv1d = {_is_hf_conv1d(m) for m in modules.values()}
    if len(conv1d) > 1:
        raise NotPeftExpressible("the targets mix transformers' Conv1D with other layers; PEFT's fan_in_fan_out is one flag for all")
    rank_pattern = {n: m.lora_rank for n, m in modules.items() if m.lora_rank != first.lora_rank}
    alpha_pattern = {n: m.lora_alpha for n, m in modules.items() if m.lora_alpha != first.lora_alpha}
    alpha = int(first.lora_alpha) if float(first.lora_alpha).is_integer() else first.lora_alpha
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": first.lora_rank,
        "lora_alpha": alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": sorted(modules),
        "fan_in_fan_out": conv1d == {True},
        "bias": "none",
        "use_dora": first.lora_dora,
        "use_rslora": False,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
    }
