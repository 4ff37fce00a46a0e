"""Match checkpoint keys against the model, load non-strictly, and check the declared expectations."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from finetune.adapters import init_dora_magnitudes
from finetune.checkpoint.adapt import adapt_tensor
from finetune.checkpoint.read import read_checkpoint
from finetune.checkpoint.remap import dominant_prefix, map_keys, suggest_rules
from finetune.checkpoint.report import LoadReport, Mismatch
from finetune.config import ShapePolicy
from finetune.errors import CheckpointError, ConfigError
from finetune.finite import count_nonfinite, nonfinite_keys
from finetune.storage import retie, tied_keys, unshared
from finetune.matching import glob_matches, listed, require_matches
from finetune.model import AppliedEdit, base_param_names

log = logging.getLogger(__name__)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


DEFAULT_RULE = Mismatch.rule  # "checkpoint.on_shape_mismatch"


@dataclass
class ShapeRules:
    """The shape policy per model key: the first `checkpoint.shape_overrides` entry whose globs
    match the key decides; else the `replace` op that put the key's module in (a new module of
    another size: its keys are skipped, the op is their declaration); else `checkpoint.on_shape_mismatch`."""

    default: ShapePolicy
    overrides: list[tuple[str, list[str], ShapePolicy]] = field(default_factory=list)  # (rule, globs, action)
    replaced: list[AppliedEdit] = field(default_factory=list)

    def action_for(self, key: str) -> tuple[ShapePolicy, str]:
        for rule, globs, action in self.overrides:
            if any(glob_matches(g, key) for g in globs):
                return action, rule
        edit = declaring_edit(self.replaced, key)
        if edit is not None:
            return ShapePolicy.skip, edit.rule
        return self.default, DEFAULT_RULE


def declaring_edit(edits: Sequence[AppliedEdit], key: str) -> AppliedEdit | None:
    """The `model.add` op that put in the module holding `key` (the last one, where edits nest)."""
    return next((e for e in reversed(edits) if e.covers(key)), None)


def shape_rules(ckpt_cfg, model_keys: Sequence[str], edits: Sequence[AppliedEdit] = ()) -> ShapeRules:
    """Read `on_shape_mismatch` and `shape_overrides`. Like every rule, each override must match
    some model key: a glob that matches nothing is a typo, not a policy."""
    from omegaconf import OmegaConf

    overrides = []
    for i, entry in enumerate(ckpt_cfg.get("shape_overrides") or []):
        rule = f"checkpoint.shape_overrides[{i}]"
        if OmegaConf.is_config(entry) and (OmegaConf.is_missing(entry, "keys") or OmegaConf.is_missing(entry, "action")):
            raise ConfigError(f"{rule} needs both `keys` and `action`.", "e.g. {keys: 'head.*', action: adapt}", group="checkpoint")
        keys = entry["keys"]  # by item: `entry.keys` is DictConfig's method
        keys = OmegaConf.to_container(keys) if OmegaConf.is_config(keys) else keys
        globs = [keys] if isinstance(keys, str) else keys
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ConfigError(f"{rule}.keys={keys!r} is not a glob or a list of globs.",
                              "e.g. keys: 'head.*' or keys: ['head.*', pos_embed]", group="checkpoint")
        require_matches(globs, model_keys, f"{rule}.keys", what="model key")
        overrides.append((rule, globs, ShapePolicy(entry["action"])))
    # A lora op's tensors of another size (a checkpoint of a run with another rank) are skipped like a
    # replaced module's: the op is their declaration.
    replaced = [e for e in edits if e.op in ("replace", "lora")]
    return ShapeRules(ShapePolicy(ckpt_cfg.on_shape_mismatch), overrides, replaced)


class NeedsNormalBuild(Exception):
    """The meta-device path cannot initialise some new module: build the model normally instead."""


def materialize_new(model: nn.Module, new_keys: set[str]) -> list[str]:
    """Give real storage to the modules that hold keys the checkpoint does not provide, and
    initialise them with their own `reset_parameters()`. A module whose keys are all new is
    materialised whole (so its own reset sees its children: an Adapter's init_scale applies). A
    module that is partly new (a LoRA-wrapped Linear: its adapter is new, its weight comes from the
    checkpoint) gets storage for its new tensors only: the others stay on the meta device, where
    its reset leaves them alone, until the checkpoint's tensors are assigned -- so a reset never
    touches a loaded weight, and no memory is spent on a copy about to be replaced.
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
        if name in whole:
            module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
        else:
            _materialize_own(module, name, new_keys)
        resets = [module] if hasattr(module, "reset_parameters") else [m for m in module.modules() if hasattr(m, "reset_parameters")]
        if not resets:
            raise NeedsNormalBuild(f"{name or 'the model'} ({type(module).__name__}) has no reset_parameters()")
        with torch.no_grad():
            for m in resets:
                m.reset_parameters()
    return chosen


def _materialize_own(module: nn.Module, name: str, new_keys: set[str]) -> None:
    """Real (empty) storage for the module's own tensors that are new; the rest stay as they are."""
    prefix = f"{name}." if name else ""
    for table in (module._parameters, module._buffers):
        for key, tensor in table.items():
            if tensor is None or prefix + key not in new_keys or not tensor.is_meta:
                continue
            fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            table[key] = nn.Parameter(fresh, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fresh


def match_and_load(model: nn.Module, checkpoint: dict[str, torch.Tensor], names: dict[str, str],
                   shape_policy: ShapePolicy | ShapeRules, report: LoadReport, low_memory: bool = False,
                   mapped: bool = False) -> None:
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
    # Before anything is assigned: a NaN or Inf brought in from the checkpoint is named now, not
    # found in the saved weights of a "completed" run.
    # The checkpoint's own tensors (not cast copies): with `mapped`, the check hands the pages it reads back.
    incoming = {name: checkpoint[orig] for orig, name in names.items() if name in to_load or name in to_adapt}
    report.nonfinite = {name: count_nonfinite(incoming[name]) for name in nonfinite_keys(incoming, mapped)}
    if refused:
        shown = "\n    ".join(refused[:10]) + (f"\n    ... and {len(refused) - 10} more" if len(refused) > 10 else "")
        raise CheckpointError(
            f"{len(refused)} checkpoint tensor(s) do not fit the model's shapes:\n    {shown}",
            "if these modules are new (e.g. a head for a new label set), set checkpoint.on_shape_mismatch=skip "
            "(keep the new init) or adapt (copy what fits), or per key: "
            "checkpoint.shape_overrides=[{keys: 'head.*', action: skip}]; or drop the keys with checkpoint.ignore",
            group="checkpoint",
        )
    ties = tied_keys(model, model_sd)
    fill_tied_twins(ties, to_load, mismatched, report)
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
    # A tied twin is filled through its first name (one tensor). Assigned, a checkpoint's tensors that
    # share storage would make parameters alias: each gets its own.
    to_load = {k: v for k, v in to_load.items() if k not in report.tied}
    result = model.load_state_dict(unshared(to_load) if low_memory else to_load, strict=False, assign=low_memory)
    if low_memory:  # assign gave the first name a new Parameter: point its twins at it again
        retie(model, ties)
    # Our accounting must agree with PyTorch's: a disagreement is a bug, not a user error.
    # (PyTorch never lists BatchNorm's num_batches_tracked as missing; we do: it is a state_dict key.)
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) <= set(report.missing) | set(report.tied) | {
        m.key for m in report.mismatched if m.action == "skipped"}
    if low_memory:
        still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if still_meta:
            raise NeedsNormalBuild(f"{len(still_meta)} tensors stayed on the meta device, e.g. {still_meta[0]}")


def fill_tied_twins(ties: list[list[str]], to_load: dict[str, torch.Tensor], mismatched: dict, report: LoadReport) -> None:
    """A tied key the checkpoint does not hold by name is loaded through its twin (`report.tied`);
    twins the checkpoint holds with different values are a warning (the model keeps one tensor)."""
    for group in ties:
        present = [k for k in group if k in to_load]
        if not present:
            continue
        source = present[0]
        differing = [k for k in present[1:] if not torch.equal(to_load[k], to_load[source])]
        if differing:
            report.warnings.append(
                f"tied keys {source} and {', '.join(differing)} are one tensor in the model but differ in the "
                f"checkpoint: the model holds the values of {present[-1]}")
        for key in group:
            if key not in to_load and key not in mismatched:
                to_load[key] = to_load[source]
                report.tied[key] = source


def declare_by_edits(report: LoadReport, edits: Sequence[AppliedEdit]) -> None:
    """Keys the `model.add` ops account for: every key of a module an op created, or of a module a
    `replace` put in, that the checkpoint cannot fill (missing), and the checkpoint keys of a
    replaced module that the new one no longer has (unexpected). The op is their declaration:
    `checkpoint.expect` need not repeat them. (Mismatched keys of a replaced module carry the op as
    their `rule`.)"""
    replaced = [e for e in edits if e.op == "replace"]
    for key in report.missing:
        edit = declaring_edit(edits, key)
        if edit is not None:
            report.declared[key] = edit.rule
    for key in report.unexpected:
        edit = declaring_edit(replaced, key)
        if edit is not None:
            report.declared[key] = edit.rule


def _undeclared(keys: Sequence[str], globs: Sequence[str], declared: dict[str, str]) -> list[str]:
    return [k for k in keys if k not in declared and not any(glob_matches(g, k) for g in globs)]


def _suggested_fix(report: LoadReport) -> str | None:
    if not report.suggestions:
        return None
    rules = ", ".join(f"{{pattern: '{s.pattern}', replace: '{s.replace}'}}" for s in report.suggestions)
    gained = sum(s.keys for s in report.suggestions)
    return f"add checkpoint.remap=[{rules}] (verified: {gained} more checkpoint keys then load)"


def check_min_loaded(report: LoadReport, min_loaded: float | None, model: nn.Module, edits: Sequence[AppliedEdit]) -> None:
    """A checkpoint from which (almost) nothing of the base model loads is a mistake -- wrong keys,
    wrong file -- not a fine-tune: by default at least 10% of the base model's parameters (by count;
    modules `model.add` put in are not the base) must come from it, whole or adapted."""
    if min_loaded is None:
        return
    params = dict(model.named_parameters())
    base = base_param_names(model, list(edits))
    total = sum(params[n].numel() for n in base)
    if total == 0:
        return
    filled = set(report.loaded) | {m.key for m in report.mismatched if m.action == "adapted"}
    got = sum(params[n].numel() for n in base if n in filled)
    if got / total >= min_loaded:
        return
    loaded_keys = sum(1 for n in base if n in filled)
    fix = _suggested_fix(report) or (
        "the checkpoint's keys do not line up with the model's: compare them with "
        f"`finetune-inspect {report.checkpoint} model=...` and add checkpoint.remap rules, or point checkpoint.path at the right file")
    raise CheckpointError(
        f"only {got / total:.1%} of the base model's parameters loaded from the checkpoint ({loaded_keys} of {len(base)} "
        f"parameter tensors; checkpoint.expect.min_loaded={min_loaded}): the run would train from scratch.",
        f"{fix}; if the model really takes almost nothing from this checkpoint, lower checkpoint.expect.min_loaded (0 or null turns the check off)",
        group="checkpoint",
    )


def check_finite(report: LoadReport, allowed: Sequence[str], model_keys: Sequence[str]) -> None:
    """Checkpoint tensors holding NaN or Inf stop the run unless `checkpoint.expect.nonfinite` names them."""
    require_matches(allowed, model_keys, "checkpoint.expect.nonfinite", what="model key", error=CheckpointError)
    bad = [k for k in report.nonfinite if not any(glob_matches(g, k) for g in allowed)]
    if bad:
        shown = listed([f"{k} ({report.nonfinite[k]} values)" for k in bad])
        raise CheckpointError(
            f"{len(bad)} checkpoint tensor(s) hold NaN or Inf: {shown}. Loaded, they would train into (or be saved "
            "as) weights that are not numbers.",
            "the checkpoint is damaged or was saved after training diverged: use an earlier one; if the values are "
            "meant to be there (e.g. a -inf attention mask), declare the keys in checkpoint.expect.nonfinite",
            group="checkpoint",
        )


def check_expectations(report: LoadReport, expect, model: nn.Module, edits: Sequence[AppliedEdit] = ()) -> None:
    """The declared differences: `min_loaded` first (when nothing lines up, that is the cause), then
    `expect.missing` / `expect.unexpected` (each a list of globs: exactly these may differ, beside
    what the `model.add` ops declare); undeclared differences without a list are a warning."""
    check_min_loaded(report, expect.min_loaded, model, edits)
    model_keys = list(model.state_dict())
    check_finite(report, expect.nonfinite, model_keys)
    for field_name, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
        globs = getattr(expect, field_name)
        if globs is None:
            continue
        if field_name == "missing":
            require_matches(globs, model_keys, "checkpoint.expect.missing", what="model key", error=CheckpointError)
        surprises = _undeclared(keys, globs, report.declared)
        if surprises:
            shown = listed(surprises)
            suggested = _suggested_fix(report)
            raise CheckpointError(
                f"{len(surprises)} {field_name} key(s) not declared in checkpoint.expect.{field_name}: {shown}",
                f"if this is intended, add globs for them to checkpoint.expect.{field_name}; otherwise "
                + (suggested if suggested else "fix checkpoint.remap or checkpoint.path"),
                group="checkpoint",
            )
    undeclared = []
    missing = _undeclared(report.missing, [], report.declared)
    unexpected = _undeclared(report.unexpected, [], report.declared)
    if expect.missing is None and missing:
        undeclared.append(f"{len(missing)} model key(s) missing from the checkpoint (checkpoint.expect.missing)")
    if expect.unexpected is None and unexpected:
        undeclared.append(f"{len(unexpected)} checkpoint key(s) unused (checkpoint.expect.unexpected)")
    if undeclared:
        report.warnings.append(
            " and ".join(undeclared) + ", not declared: declare them (a list of globs) to make any other difference an error"
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
    path = Path(checkpoint_paths(ckpt_cfg.path)[0]).expanduser()
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) > LOW_MEMORY_AUTO_BYTES
    return path.is_file() and path.stat().st_size > LOW_MEMORY_AUTO_BYTES


def checkpoint_paths(path) -> list[str]:
    """checkpoint.path as a list: null -> [], a path -> [it], a list -> its entries (the base weights
    first, then files loaded over them: an adapter, ours or PEFT's)."""
    from omegaconf import ListConfig

    if path is None:
        return []
    entries = list(path) if isinstance(path, (list, tuple, ListConfig)) else [path]
    bad = [e for e in entries if not isinstance(e, str) or not e.strip()]
    if not entries or bad:
        raise ConfigError(f"checkpoint.path={path!r} is not a path or a list of paths.",
                          "checkpoint.path=base.safetensors, or checkpoint.path=[base.safetensors,adapter/adapter_model.safetensors]",
                          group="checkpoint")
    return [str(e) for e in entries]


def load_checkpoint(model: nn.Module, ckpt_cfg, edits: Sequence[AppliedEdit] = (), low_memory: bool = False,
                    mmap: bool = False) -> LoadReport:
    """Read, remap, match and load `ckpt_cfg.path` into `model`; the report accounts for every key.
    A list of paths: the first is the base (the remap, ignore, select and shape rules apply to it),
    each later one is loaded over it (`load_over`) and listed in the report's `files`.
    `edits`: what `model.add` put in (their keys are declared by the ops). `mmap`: read safetensors
    through a memory map even when copying into a built model (under DDP the ranks then share the
    page cache instead of each holding a whole copy)."""
    paths = checkpoint_paths(ckpt_cfg.path)
    report = load_base(model, ckpt_cfg, paths[0], edits, low_memory, mmap)
    if len(paths) > 1:
        report.files.append(report.file_entry())
        for index, path in enumerate(paths[1:], 1):
            load_over(model, ckpt_cfg, path, index, edits, report, mmap)
    return report


def load_base(model: nn.Module, ckpt_cfg, path: str, edits: Sequence[AppliedEdit], low_memory: bool,
              mmap: bool) -> LoadReport:
    """The base checkpoint: read, remap, match, load; the report accounts for every key."""
    model_sd = model.state_dict()
    rules = shape_rules(ckpt_cfg, list(model_sd), edits)  # a config mistake fails before the checkpoint is read
    contents = read_checkpoint(path, ckpt_cfg.format.value, ckpt_cfg.select, zero_copy=low_memory or mmap)
    keys = list(contents.state_dict)
    extra = [p for p in [dominant_prefix(keys)] if p] if contents.format == "lightning" else []
    mapping = map_keys(keys, set(model_sd), ckpt_cfg.ignore, ckpt_cfg.remap, ckpt_cfg.auto_unwrap, extra)
    report = LoadReport(
        checkpoint=contents.files[0] if len(contents.files) == 1 else str(path),
        format=contents.format,
        selected=contents.selected,
        remapped=mapping.remapped,
        ignored=mapping.ignored,
        unwrapped=mapping.unwrapped,
    )
    match_and_load(model, contents.state_dict, mapping.names, rules, report, low_memory, contents.mapped)
    # DoRA's magnitude is the norm of the weight it wraps: drawn at the build (or on the meta device),
    # it must follow the weight just loaded, or the model's output is not the base's before training.
    init_dora_magnitudes(model, set(report.missing) | {m.key for m in report.mismatched if m.action == "skipped"})
    declare_by_edits(report, edits)
    if report.missing and report.unexpected:
        # A rule never fills a module that model.add created: its keys are new by declaration.
        created = [e for e in edits if e.op != "replace"]
        report.suggestions = suggest_rules(
            {k: tuple(t.shape) for k, t in contents.state_dict.items()},
            {k: tuple(t.shape) for k, t in model_sd.items() if declaring_edit(created, k) is None},
            ckpt_cfg.ignore, ckpt_cfg.remap, ckpt_cfg.auto_unwrap, extra,
        )
    return report


def load_over(model: nn.Module, ckpt_cfg, path: str, index: int, edits: Sequence[AppliedEdit], report: LoadReport,
              mmap: bool) -> None:
    """checkpoint.path[index], loaded over what the entries before it filled: a file of model B's own
    names (e.g. the adapters of an earlier run), or a PEFT adapter (renamed, its adapter_config.json
    checked against the lora ops). Every tensor must land: a key the model does not have, or a shape
    that does not fit, is an error (an adapter that loads in part is an adapter that silently does
    something else). `report` is updated: what this file filled is loaded, no longer missing."""
    from finetune.adapters import lora_modules
    from finetune.checkpoint.peft import check_adapter_config, from_peft, is_peft_adapter, read_adapter_config

    entry = f"checkpoint.path[{index}]"
    model_sd = model.state_dict()
    contents = read_checkpoint(path, "auto", "auto", zero_copy=mmap)
    state = contents.state_dict
    peft = is_peft_adapter(state)
    renamed: dict[str, str] = {}
    if peft:
        state, renamed = from_peft(state, model_sd)
    mapping = map_keys(list(state), set(model_sd), [], [], ckpt_cfg.auto_unwrap)
    by_peft = {peft_key: mapping.names.get(ours, ours) for peft_key, ours in renamed.items()}
    part = LoadReport(checkpoint=contents.files[0] if len(contents.files) == 1 else str(path),
                      format=f"{contents.format} (peft adapter)" if peft else contents.format,
                      remapped={**{k: v for k, v in by_peft.items() if k != v}, **mapping.remapped},
                      unwrapped=mapping.unwrapped)
    try:
        match_and_load(model, state, mapping.names, ShapeRules(ShapePolicy.error), part, mapped=contents.mapped)
    except CheckpointError as exc:
        raise CheckpointError(f"{entry} ({path}): {exc.problem}",
                              "a file loaded over the base must fit the model exactly: for an adapter, set the lora "
                              "op's rank to the adapter's (and its `at` to the modules the adapter targets)",
                              group="checkpoint") from None
    allowed = ckpt_cfg.expect.unexpected or []
    stray = [k for k in part.unexpected if not any(glob_matches(g, k) for g in allowed)]
    if stray:
        raise CheckpointError(
            f"{entry} ({path}): {len(stray)} tensor(s) have no place in the model: {listed(stray)}",
            "for an adapter, wrap the modules it targets with a lora op (`at` glob) or drop the file; keys meant to "
            "be dropped go in checkpoint.expect.unexpected", group="checkpoint")
    modules = lora_modules(model)
    filled = {k.rpartition(".")[0] for k in part.loaded if k.rpartition(".")[0] in modules}
    if peft and filled:
        config = read_adapter_config(Path(part.checkpoint))
        if config is None:
            report.warnings.append(f"{entry}: no adapter_config.json beside {part.checkpoint}: the adapter's "
                                   "lora_alpha / r could not be compared with the lora ops' alpha / rank")
        else:
            rules = {name: e.rule for e in edits if e.op == "lora" for name in e.targets}
            check_adapter_config(config, modules, filled, rules)
    newly = set(part.loaded)
    known = set(report.loaded) | newly
    report.loaded = [k for k in model_sd if k in known]
    report.missing = [k for k in report.missing if k not in newly]
    report.mismatched = [m for m in report.mismatched if m.key not in newly]
    report.declared = {k: v for k, v in report.declared.items() if k not in newly}
    report.unexpected += part.unexpected
    report.nonfinite.update(part.nonfinite)
    report.tied.update(part.tied)
    report.casts.update(part.casts)
    report.files.append(part.file_entry())
