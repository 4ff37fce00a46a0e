"""Tensors and the storage behind them: which state-dict keys are one tensor (tied weights), how to
tie them again after an assign, and copies where storage must not be shared."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def tied_keys(model: nn.Module, state_keys: Iterable[str] | None = None) -> list[list[str]]:
    """State-dict keys that name one tensor (tied weights: an LM's input embedding and output
    projection), by object identity, so it holds on the meta device too. `state_keys`: the model's
    state_dict keys, where the caller has them already."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(tensor), []).append(name)
    keys = set(model.state_dict() if state_keys is None else state_keys)
    return [group for group in ([n for n in names if n in keys] for names in names_of.values()) if len(group) > 1]


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of each tensor whose storage an earlier one already uses."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if storage in seen else tensor
        if storage is not None:
            seen.add(storage)
    return out


def retie(model: nn.Module, ties: list[list[str]]) -> None:
    """Point every name of a tie group at the first name's tensor object."""
    for first, *others in ties:
        owner, _, leaf = first.rpartition(".")
        module = model.get_submodule(owner)
        tensor = module._parameters.get(leaf, module._buffers.get(leaf))
        for name in others:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            (module._parameters if leaf in module._parameters else module._buffers)[leaf] = tensor
