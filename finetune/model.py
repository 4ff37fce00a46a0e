"""Build model B: the base architecture, then the added modules of `model.add`, in order.

Edits never rename an existing parameter, so a checkpoint of the base still matches by name:
- `replace` puts the new module at the same attribute (`fc` stays `fc`);
- `after` / `before` register the new module under its own `name` beside `at` (on the same
  parent) and route `at`'s output (or input) through it with a forward hook, which works for
  any architecture whether its `forward` calls attributes or iterates a Sequential.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from finetune.config import EditOp
from finetune.errors import ConfigError


@dataclass(frozen=True)
class AppliedEdit:
    op: str
    at: str
    name: str  # dotted name of the new module in model B
    module_type: str


def _instantiate_module(spec, what: str) -> nn.Module:
    if spec is None or "_target_" not in spec:
        raise ConfigError(
            f"{what} has no `_target_`.",
            "give a factory, e.g. {_target_: torchvision.models.resnet18, num_classes: 10}",
        )
    try:
        module = instantiate(spec, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(
            f"could not build {what} ({spec['_target_']}): {type(cause).__name__}: {cause}",
            "check the `_target_` path (importable from PYTHONPATH) and its arguments",
        ) from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"{what} ({spec['_target_']}) returned {type(module).__name__}, not a torch.nn.Module.",
            "point `_target_` at a class or function that returns an nn.Module",
        )
    return module


def _split_parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    module_names = [name for name, _ in model.named_modules() if name]
    if dotted not in module_names:
        close = difflib.get_close_matches(dotted, module_names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"top-level modules: {', '.join(n for n in module_names if '.' not in n)}"
        raise ConfigError(f"model.add: no submodule named '{dotted}' in the base model.", hint)
    parent_name, _, leaf = dotted.rpartition(".")
    return model.get_submodule(parent_name), leaf


def _apply_edit(model: nn.Module, edit, index: int) -> AppliedEdit:
    op = EditOp(edit.op) if not isinstance(edit.op, EditOp) else edit.op
    new_module = _instantiate_module(edit.module, f"model.add[{index}].module")
    parent, leaf = _split_parent(model, edit.at)
    prefix = edit.at.rpartition(".")[0]

    if op is EditOp.replace:
        if edit.name not in (None, leaf):
            raise ConfigError(
                f"model.add[{index}]: `replace` keeps the name '{leaf}', so `name: {edit.name}` cannot apply.",
                "drop `name` from a replace edit",
            )
        parent._modules[leaf] = new_module
        return AppliedEdit(op.value, edit.at, edit.at, type(new_module).__name__)

    if not edit.name or "." in edit.name:
        raise ConfigError(
            f"model.add[{index}]: `{op.value}` needs a `name` (one identifier) for the new module.",
            f"e.g. {{op: {op.value}, at: {edit.at}, name: adapter1, module: ...}}",
        )
    if hasattr(parent, edit.name):
        raise ConfigError(
            f"model.add[{index}]: '{edit.name}' already exists beside '{edit.at}'.",
            "choose a `name` that the base model does not use",
        )
    parent.add_module(edit.name, new_module)
    target = parent.get_submodule(leaf)
    if op is EditOp.after:
        target.register_forward_hook(lambda _m, _inputs, output: new_module(output))
    else:
        target.register_forward_pre_hook(lambda _m, inputs: (new_module(*inputs),))
    full_name = f"{prefix}.{edit.name}" if prefix else edit.name
    return AppliedEdit(op.value, edit.at, full_name, type(new_module).__name__)


def build_model(model_cfg) -> tuple[nn.Module, list[AppliedEdit]]:
    """Instantiate `model.base` and apply `model.add`; returns the model and what was added."""
    model = _instantiate_module(model_cfg.base, "model.base")
    edits = [_apply_edit(model, edit, i) for i, edit in enumerate(model_cfg.add)]
    return model, edits


def base_param_names(model: nn.Module, edits: list[AppliedEdit]) -> list[str]:
    """Names of parameters that belong to the base architecture (not inside an added module)."""
    added = tuple(e.name + "." for e in edits)
    return [n for n, _ in model.named_parameters() if not n.startswith(added)]


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"trainer.device={requested!r} is not a device: {exc}", "use auto, cpu, cuda, cuda:1 or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but CUDA is not available here.", "use trainer.device=auto or cpu")
    return device
