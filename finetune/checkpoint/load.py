"""Match checkpoint keys against the model, load non-strictly, and check the declared expectations."""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from finetune.checkpoint.adapt import adapt_tensor
from finetune.checkpoint.read import read_checkpoint
from finetune.checkpoint.remap import dominant_prefix, map_keys
from finetune.checkpoint.report import LoadReport, Mismatch, RemapSuggestion
from finetune.config import ShapePolicy
from finetune.errors import CheckpointError

log = logging.getLogger(__name__)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def match_and_load(model: nn.Module, checkpoint: dict[str, torch.Tensor], names: dict[str, str], shape_policy: ShapePolicy, report: LoadReport) -> None:
    """Fill `report` with loaded/missing/unexpected/mismatched and load the matched tensors."""
    model_sd = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    mismatched: dict[str, Mismatch] = {}
    refused: list[str] = []
    for orig, name in names.items():
        tensor = checkpoint[orig]
        fresh = model_sd.get(name)
        if fresh is None:
            report.unexpected.append(name)
            continue
        if tensor.shape != fresh.shape:
            if shape_policy is ShapePolicy.error:
                refused.append(f"{name}: checkpoint {_shape(tensor)} vs model {_shape(fresh)}")
            elif shape_policy is ShapePolicy.skip:
                mismatched[name] = Mismatch(name, _shape(fresh), _shape(tensor), "skipped", "kept the model's own init")
            else:
                to_load[name], detail = adapt_tensor(name, fresh, tensor)
                mismatched[name] = Mismatch(name, _shape(fresh), _shape(tensor), "adapted", detail)
            continue
        if tensor.dtype != fresh.dtype:
            report.casts[name] = f"{str(tensor.dtype).removeprefix('torch.')}->{str(fresh.dtype).removeprefix('torch.')}"
            tensor = tensor.to(fresh.dtype)
        to_load[name] = tensor
    if refused:
        shown = "\n    ".join(refused[:10]) + (f"\n    ... and {len(refused) - 10} more" if len(refused) > 10 else "")
        raise CheckpointError(
            f"{len(refused)} checkpoint tensor(s) do not fit the model's shapes:\n    {shown}",
            "if these modules are new (e.g. a head for a new label set), set checkpoint.on_shape_mismatch=skip "
            "(keep the new init) or adapt (copy what fits); or drop the keys with checkpoint.ignore",
        )
    for key in model_sd:
        if key in mismatched:
            report.mismatched.append(mismatched[key])
        elif key in to_load:
            report.loaded.append(key)
        else:
            report.missing.append(key)
    result = model.load_state_dict(to_load, strict=False)
    # Our accounting must agree with PyTorch's: a disagreement is a bug, not a user error.
    # (PyTorch never lists BatchNorm's num_batches_tracked as missing; we do: it is a state_dict key.)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= set(report.missing) | {m.key for m in report.mismatched if m.action == "skipped"}


def suggest_remaps(missing: Sequence[str], unexpected: Sequence[str], shapes_missing: dict, shapes_unexpected: dict) -> list[RemapSuggestion]:
    """Prefix renames that would turn unexpected keys into missing ones with the same shapes."""
    by_suffix: dict[str, list[str]] = {}
    for key in missing:
        parts = key.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(key)
    rules: Counter = Counter()
    for key in unexpected:
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            suffix = ".".join(parts[i:]) if i < len(parts) else None
            if suffix is None:
                break
            candidates = [m for m in by_suffix.get(suffix, []) if shapes_missing[m] == shapes_unexpected[key]]
            if candidates:
                old_prefix = key[: len(key) - len(suffix)]
                for m in candidates[:1]:
                    rules[(old_prefix, m[: len(m) - len(suffix)])] += 1
                break
    suggestions = []
    for (old, new), count in rules.most_common(5):
        if count >= 2 or len(unexpected) == 1:
            suggestions.append(RemapSuggestion(pattern="^" + old.replace(".", r"\."), replace=new, keys=count))
    return suggestions


def _undeclared(keys: Sequence[str], globs: Sequence[str]) -> list[str]:
    return [k for k in keys if not any(fnmatch.fnmatchcase(k, g) for g in globs)]


def check_expectations(report: LoadReport, expect, model: nn.Module, base_params: Sequence[str]) -> None:
    model_keys = list(model.state_dict())
    for field_name, keys, universe in (
        ("missing", report.missing, model_keys),
        ("unexpected", report.unexpected, report.unexpected),
    ):
        globs = getattr(expect, field_name)
        if globs is None:
            continue
        dead = [g for g in globs if not any(fnmatch.fnmatchcase(k, g) for k in universe)]
        if dead and field_name == "missing":
            raise CheckpointError(
                f"checkpoint.expect.missing glob(s) {dead} match no key of the model.",
                "fix the glob (names as in model.state_dict(), e.g. 'fc.*'), or remove it",
            )
        surprises = _undeclared(keys, globs)
        if surprises:
            shown = ", ".join(surprises[:8]) + (f", ... ({len(surprises)} in all)" if len(surprises) > 8 else "")
            raise CheckpointError(
                f"{len(surprises)} {field_name} key(s) not declared in checkpoint.expect.{field_name}: {shown}",
                f"if this is intended, add globs for them to checkpoint.expect.{field_name}; otherwise fix "
                "checkpoint.remap (see the suggestions above) or checkpoint.path",
            )
    undeclared = []
    if expect.missing is None and report.missing:
        undeclared.append(f"{len(report.missing)} model key(s) missing from the checkpoint (checkpoint.expect.missing)")
    if expect.unexpected is None and report.unexpected:
        undeclared.append(f"{len(report.unexpected)} checkpoint key(s) unused (checkpoint.expect.unexpected)")
    if undeclared:
        report.warnings.append(
            " and ".join(undeclared) + ", not declared: declare them (a list of globs) to make any other difference an error"
        )
    if expect.min_loaded is not None:
        params = dict(model.named_parameters())
        total = sum(params[n].numel() for n in base_params) or 1
        loaded = set(report.loaded)
        got = sum(params[n].numel() for n in base_params if n in loaded)
        if got / total < expect.min_loaded:
            raise CheckpointError(
                f"only {got / total:.1%} of the base model's parameters loaded (checkpoint.expect.min_loaded={expect.min_loaded}).",
                "the keys probably do not line up: read the suggested remap rules above, or run finetune-inspect on the checkpoint",
            )


def load_checkpoint(model: nn.Module, ckpt_cfg, base_params: Sequence[str]) -> LoadReport:
    contents = read_checkpoint(ckpt_cfg.path, ckpt_cfg.format.value, ckpt_cfg.select)
    keys = list(contents.state_dict)
    model_sd = model.state_dict()
    extra = [p for p in [dominant_prefix(keys)] if p] if contents.format == "lightning" else []
    mapping = map_keys(keys, set(model_sd), ckpt_cfg.ignore, ckpt_cfg.remap, ckpt_cfg.auto_unwrap, extra)
    report = LoadReport(
        checkpoint=contents.files[0] if len(contents.files) == 1 else str(ckpt_cfg.path),
        format=contents.format,
        selected=contents.selected,
        remapped=mapping.remapped,
        ignored=mapping.ignored,
        unwrapped=mapping.unwrapped,
    )
    match_and_load(model, contents.state_dict, mapping.names, ckpt_cfg.on_shape_mismatch, report)
    if report.missing and report.unexpected:
        reverse = {name: orig for orig, name in mapping.names.items()}
        report.suggestions = suggest_remaps(
            report.missing,
            report.unexpected,
            {k: _shape(model_sd[k]) for k in report.missing},
            {k: _shape(contents.state_dict[reverse[k]]) for k in report.unexpected},
        )
    return report
