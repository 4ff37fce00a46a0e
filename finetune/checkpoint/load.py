"""Match checkpoint keys against the model, load non-strictly, and check the declared expectations."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from finetune.checkpoint.adapt import adapt_tensor
from finetune.checkpoint.read import read_checkpoint
from finetune.checkpoint.remap import dominant_prefix, map_keys
from finetune.checkpoint.report import LoadReport, Mismatch, RemapSuggestion
from finetune.config import ShapePolicy
from finetune.errors import CheckpointError, ConfigError
from finetune.matching import glob_matches, require_matches

log = logging.getLogger(__name__)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


DEFAULT_RULE = Mismatch.rule  # "checkpoint.on_shape_mismatch"


@dataclass
class ShapeRules:
    """The shape policy per model key: the first `checkpoint.shape_overrides` entry whose globs
    match the key decides, else `checkpoint.on_shape_mismatch`."""

    default: ShapePolicy
    overrides: list[tuple[str, list[str], ShapePolicy]] = field(default_factory=list)  # (rule, globs, action)

    def action_for(self, key: str) -> tuple[ShapePolicy, str]:
        for rule, globs, action in self.overrides:
            if any(glob_matches(g, key) for g in globs):
                return action, rule
        return self.default, DEFAULT_RULE


def shape_rules(ckpt_cfg, model_keys: Sequence[str]) -> ShapeRules:
    """Read `on_shape_mismatch` and `shape_overrides`. Like every rule, each override must match
    some model key: a glob that matches nothing is a typo, not a policy."""
    from omegaconf import OmegaConf

    overrides = []
    for i, entry in enumerate(ckpt_cfg.get("shape_overrides") or []):
        rule = f"checkpoint.shape_overrides[{i}]"
        if OmegaConf.is_config(entry) and (OmegaConf.is_missing(entry, "keys") or OmegaConf.is_missing(entry, "action")):
            raise ConfigError(f"{rule} needs both `keys` and `action`.", "e.g. {keys: 'head.*', action: adapt}")
        keys = entry["keys"]  # by item: `entry.keys` is DictConfig's method
        keys = OmegaConf.to_container(keys) if OmegaConf.is_config(keys) else keys
        globs = [keys] if isinstance(keys, str) else keys
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ConfigError(f"{rule}.keys={keys!r} is not a glob or a list of globs.", "e.g. keys: 'head.*' or keys: ['head.*', pos_embed]")
        require_matches(globs, model_keys, f"{rule}.keys", what="model key")
        overrides.append((rule, globs, ShapePolicy(entry["action"])))
    return ShapeRules(ShapePolicy(ckpt_cfg.on_shape_mismatch), overrides)


class NeedsNormalBuild(Exception):
    """The meta-device path cannot initialise some new module: build the model normally instead."""


def materialize_new(model: nn.Module, new_keys: set[str]) -> list[str]:
    """Give real storage to the modules that hold keys the checkpoint does not provide, and
    initialise them with their own `reset_parameters()`. A module whose keys are all new is
    materialised whole (so its own reset sees its children: an Adapter's init_scale applies).
    Returns the materialised module names; raises NeedsNormalBuild where no reset exists."""
    owned = {}  # module name -> its state keys (recursive)
    for key in model.state_dict():
        parts = key.split(".")
        for i in range(len(parts)):
            owned.setdefault(".".join(parts[:i]), []).append(key)
    chosen: list[str] = []
    whole: set[str] = set()
    for name, module in model.named_modules():
        if any(name == w or name.startswith(w + ".") or w == "" for w in whole):
            continue  # inside a module materialised whole
        keys = owned.get(name, [])
        own = [f"{name}.{n}" if name else n for n, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))]
        if keys and all(k in new_keys for k in keys):
            chosen.append(name)
            whole.add(name)
        elif any(k in new_keys for k in own):
            chosen.append(name)  # partly new: materialise its own tensors; loaded ones are assigned after
    for name in chosen:
        module = model.get_submodule(name)
        # As module.to_empty(device="cpu"), without torch.empty_like on meta tensors: its Python reference
        # implementation imports sympy on first use (~0.4 s, most of a low-memory dry run).
        module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"), recurse=name in whole)
        resets = [module] if hasattr(module, "reset_parameters") else [m for m in module.modules() if hasattr(m, "reset_parameters")]
        if not resets:
            raise NeedsNormalBuild(f"{name or 'the model'} ({type(module).__name__}) has no reset_parameters()")
        with torch.no_grad():
            for m in resets:
                m.reset_parameters()
    return chosen


def match_and_load(model: nn.Module, checkpoint: dict[str, torch.Tensor], names: dict[str, str],
                   shape_policy: ShapePolicy | ShapeRules, report: LoadReport, low_memory: bool = False) -> None:
    """Fill `report` with loaded/missing/unexpected/mismatched and load the matched tensors.

    With `low_memory` the model is on the meta device: new modules are materialised and reset,
    and checkpoint tensors are assigned (not copied) into the model.
    """
    rules = shape_policy if isinstance(shape_policy, ShapeRules) else ShapeRules(shape_policy)
    model_sd = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    to_adapt: dict[str, torch.Tensor] = {}
    mismatched: dict[str, Mismatch] = {}
    refused: list[str] = []
    for orig, name in names.items():
        tensor = checkpoint[orig]
        fresh = model_sd.get(name)
        if fresh is None:
            report.unexpected.append(name)
            continue
        if tensor.shape != fresh.shape:
            action, rule = rules.action_for(name)
            if action is ShapePolicy.error:
                by = "" if rule == DEFAULT_RULE else f" ({rule}: error)"
                refused.append(f"{name}: checkpoint {_shape(tensor)} vs model {_shape(fresh)}{by}")
            elif action is ShapePolicy.skip:
                mismatched[name] = Mismatch(name, _shape(fresh), _shape(tensor), "skipped", "kept the model's own init", rule)
            else:
                to_adapt[name] = tensor
                mismatched[name] = Mismatch(name, _shape(fresh), _shape(tensor), "adapted", rule=rule)
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
            "(keep the new init) or adapt (copy what fits), or per key: "
            "checkpoint.shape_overrides=[{keys: 'head.*', action: skip}]; or drop the keys with checkpoint.ignore",
        )
    for key in model_sd:
        if key in mismatched:
            report.mismatched.append(mismatched[key])
        elif key in to_load:
            report.loaded.append(key)
        else:
            report.missing.append(key)
    if low_memory:
        materialize_new(model, set(report.missing) | set(mismatched))
        report.init = "reset_parameters"
        model_sd = model.state_dict()
    for name, tensor in to_adapt.items():
        to_load[name], mismatched[name].detail = adapt_tensor(name, model_sd[name], tensor)
    result = model.load_state_dict(to_load, strict=False, assign=low_memory)
    # Our accounting must agree with PyTorch's: a disagreement is a bug, not a user error.
    # (PyTorch never lists BatchNorm's num_batches_tracked as missing; we do: it is a state_dict key.)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= set(report.missing) | {m.key for m in report.mismatched if m.action == "skipped"}
    if low_memory:
        still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if still_meta:
            raise NeedsNormalBuild(f"{len(still_meta)} tensors stayed on the meta device, e.g. {still_meta[0]}")


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
    return [k for k in keys if not any(glob_matches(g, k) for g in globs)]


def check_expectations(report: LoadReport, expect, model: nn.Module, base_params: Sequence[str]) -> None:
    model_keys = list(model.state_dict())
    for field_name, keys, universe in (
        ("missing", report.missing, model_keys),
        ("unexpected", report.unexpected, report.unexpected),
    ):
        globs = getattr(expect, field_name)
        if globs is None:
            continue
        if field_name == "missing":
            require_matches(globs, universe, "checkpoint.expect.missing", what="model key", error=CheckpointError)
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


LOW_MEMORY_AUTO_BYTES = 512 * 2**20


def wants_low_memory(ckpt_cfg) -> bool:
    """checkpoint.low_memory: true | false | auto (checkpoint files over 512 MB)."""
    setting = ckpt_cfg.low_memory
    if isinstance(setting, bool):
        return setting
    if str(setting).lower() in ("true", "false"):
        return str(setting).lower() == "true"
    if str(setting) != "auto":
        raise CheckpointError(f"checkpoint.low_memory={setting!r} is not auto, true or false.", "use auto, true or false")
    from pathlib import Path

    path = Path(str(ckpt_cfg.path)).expanduser()
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) > LOW_MEMORY_AUTO_BYTES
    return path.is_file() and path.stat().st_size > LOW_MEMORY_AUTO_BYTES


def load_checkpoint(model: nn.Module, ckpt_cfg, base_params: Sequence[str], low_memory: bool = False,
                    mmap: bool = False) -> LoadReport:
    """`mmap`: read safetensors through a memory map even when copying into a built model (under
    DDP the ranks then share the page cache instead of each holding a whole copy)."""
    model_sd = model.state_dict()
    rules = shape_rules(ckpt_cfg, list(model_sd))  # a config mistake fails before the checkpoint is read
    contents = read_checkpoint(ckpt_cfg.path, ckpt_cfg.format.value, ckpt_cfg.select, zero_copy=low_memory or mmap)
    keys = list(contents.state_dict)
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
    match_and_load(model, contents.state_dict, mapping.names, rules, report, low_memory)
    if report.missing and report.unexpected:
        reverse = {name: orig for orig, name in mapping.names.items()}
        report.suggestions = suggest_remaps(
            report.missing,
            report.unexpected,
            {k: _shape(model_sd[k]) for k in report.missing},
            {k: _shape(contents.state_dict[reverse[k]]) for k in report.unexpected},
        )
    return report
