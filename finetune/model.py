"""Build model B: the base architecture, then the added modules of `model.add`, in order.

Edits never rename an existing parameter, so a checkpoint of the base still matches by name:
- `replace` puts the new module at the same attribute (`fc` stays `fc`);
- `after` / `before` register the new module under its own `name` and route `at`'s output (or
  input) through it with a forward hook, so it runs exactly once, where `at` runs, whether the
  model's `forward` calls attributes or iterates a container. It is registered beside `at`, on
  the same parent, unless that parent is a container that iterates its children (nn.Sequential,
  nn.ModuleList, nn.ModuleDict: a ViT's `blocks`, a ResNet's `layer4`): then on the nearest
  ancestor that is not one, so no container ever runs it a second time
  (`after blocks.5, name adapter5` gives `adapter5`, `after bert.encoder.layer.3` gives
  `bert.encoder.adapter3`).
- `lora` gives every Linear / Conv1d / Conv2d / Embedding / transformers Conv1D that the glob `at`
  matches a LoRA adapter in place (finetune/adapters.py): `blocks.0.attn.qkv.weight` keeps its
  name, and the adapter's tensors sit beside it (`blocks.0.attn.qkv.lora_a`, `.lora_b`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from finetune.adapters import WRAPPABLE, add_lora, lora_kind
from finetune.config import EditOp
from finetune.errors import ConfigError
from finetune.matching import closest_names, glob_matches
from finetune.storage import tied_keys

log = logging.getLogger(__name__)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class WiringError(ConfigError):
    """An added module does not fit where model.add put it (found on the first forward pass)."""

    def __init__(self, problem: str, fix: str | None = None, group: str | None = "model"):
        super().__init__(problem, fix, group)


@dataclass(frozen=True)
class AppliedEdit:
    op: str
    at: str
    name: str  # dotted name of the new module in model B (for replace: `at`; for lora: the glob)
    module_type: str
    index: int = 0  # position in model.add
    # The state_dict keys the op created, where it created tensors inside existing modules (lora:
    # `blocks.0.attn.qkv.lora_a`, ...); None: everything under `name` is the op's.
    keys: frozenset[str] | None = None
    targets: tuple[str, ...] = ()  # lora: the modules it wrapped

    @property
    def rule(self) -> str:
        """How messages and reports name the edit: `model.add[1] (after layer2)`."""
        return f"model.add[{self.index}] ({self.op} {self.at})"

    def covers(self, key: str) -> bool:
        """`key` (a parameter or state_dict key of model B) is one this edit put in: a key of the
        module it added, or one of the tensors it created (lora: never the base weight it wraps)."""
        if self.keys is not None:
            return key in self.keys
        return key == self.name or key.startswith(self.name + ".")


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        return str(list(value.shape))
    if isinstance(value, (tuple, list)) and value:
        return f"{type(value).__name__}({_shape(value[0])}, ...)"
    return type(value).__name__


class _Inserted:
    """Runs an added module on the first tensor of `at`'s output (`after`) or input (`before`);
    the other elements of a tuple output / the other arguments pass through unchanged. A module
    that fails there raises one message naming the edit, the module and the shape it got."""

    def __init__(self, home: nn.Module, attribute: str, edit: AppliedEdit):
        # The module is looked up where it is registered at every call, not held: whatever sits there
        # now runs (PEFT's modules_to_save replaces it with a wrapper when an adapter is loaded).
        self.home = home
        self.attribute = attribute
        self.edit = edit

    @property
    def module(self) -> nn.Module:
        return self.home._modules[self.attribute]

    def run(self, value):
        try:
            return self.module(value)
        except WiringError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            where = "output" if self.edit.op == "after" else "input"
            raise WiringError(
                f"{self.edit.rule}: the new module '{self.edit.name}' ({self.edit.module_type}) failed on the "
                f"{where} of '{self.edit.at}', shape {_shape(value)}: {type(exc).__name__}: {first}",
                f"give the module the sizes of the {where} of '{self.edit.at}' (its channels / features), "
                "or insert it somewhere else",
            ) from exc


class RunAfter(_Inserted):
    def __call__(self, _module, _inputs, output):
        if isinstance(output, torch.Tensor):
            return self.run(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.run(output[0]), *output[1:])
        raise WiringError(
            f"{self.edit.rule}: '{self.edit.at}' returns {type(output).__name__}, not a tensor or a tuple "
            "starting with one, so the new module has nothing to run on.",
            "insert it after a submodule that returns a tensor, or wrap the output yourself in a module used with op: replace",
        )


class RunBefore(_Inserted):
    def __call__(self, _module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (self.run(args[0]), *args[1:]), kwargs
        raise WiringError(
            f"{self.edit.rule}: '{self.edit.at}' was called without a tensor as its first positional argument "
            f"(positional: {_shape(args)}, keywords: {sorted(kwargs)}), so the new module has nothing to run on.",
            "insert it before a submodule called with its input as the first positional argument",
        )


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


def _module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _check_at(model: nn.Module, dotted: str, index: int) -> None:
    names = _module_names(model)
    if dotted not in names:
        close = closest_names(dotted, names)
        hint = (f"closest module names: {', '.join(close)}" if close
                else f"top-level modules: {', '.join(n for n in names if '.' not in n)}")
        raise ConfigError(f"model.add[{index}]: no submodule named '{dotted}' in the model.", hint, group="model")


def _home(model: nn.Module, at: str) -> str:
    """Where an after/before module is registered: the parent of `at`, or, when that parent is a
    container that iterates its children, the nearest ancestor that is not one ('' is the root)."""
    parts = at.split(".")[:-1]
    while parts and isinstance(model.get_submodule(".".join(parts)), CONTAINERS):
        parts.pop()
    home = ".".join(parts)
    if not parts and isinstance(model, CONTAINERS):
        # The root itself iterates its children (a bare nn.Sequential): hang the module on `at`.
        target = model.get_submodule(at)
        if isinstance(target, CONTAINERS):
            raise ConfigError(
                f"'{at}' and every module above it are containers that run their children in order "
                "(nn.Sequential / ModuleList / ModuleDict): an added module registered on any of them would run twice.",
                f"insert it after or before a submodule of '{at}', or use op: replace with an nn.Sequential of both",
            )
        return at
    return home


LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "dora": False}


def _lora_settings(edit, op: EditOp, index: int) -> dict:
    """rank / alpha / dropout / dora of a lora op (defaults filled in); an error on other ops."""
    given = {key: edit.get(key) if hasattr(edit, "get") else getattr(edit, key, None) for key in LORA_DEFAULTS}
    if op is not EditOp.lora:
        named = [key for key, value in given.items() if value is not None]
        if named:
            raise ConfigError(f"model.add[{index}]: {', '.join(named)} only apply to op: lora, not {op.value}.",
                              f"remove {', '.join(named)} from model.add[{index}], or make it {{op: lora, at: GLOB, ...}}",
                              group="model")
        return {}
    settings = {key: LORA_DEFAULTS[key] if value is None else value for key, value in given.items()}
    if int(settings["rank"]) < 1:
        raise ConfigError(f"model.add[{index}]: lora rank={settings['rank']}; it must be at least 1.", "e.g. rank: 8", group="model")
    if not float(settings["alpha"]) > 0:
        raise ConfigError(f"model.add[{index}]: lora alpha={settings['alpha']}; it must be positive (the update is "
                          "scaled by alpha / rank).", "e.g. alpha: 16 (twice the rank is common)", group="model")
    if not 0.0 <= float(settings["dropout"]) < 1.0:
        raise ConfigError(f"model.add[{index}]: lora dropout={settings['dropout']} is not in [0, 1).", "e.g. dropout: 0.05",
                          group="model")
    for key in ("module", "name"):
        if (edit.get(key) if hasattr(edit, "get") else getattr(edit, key, None)) is not None:
            raise ConfigError(f"model.add[{index}]: op lora wraps the modules that `at` matches; it takes no `{key}`.",
                              f"remove `{key}` from model.add[{index}]", group="model")
    return settings


def _described(model: nn.Module, names: list[str]) -> str:
    return ", ".join(f"{n} ({type(model.get_submodule(n)).__name__})" for n in names)


def _apply_lora(model: nn.Module, edit, index: int, settings: dict) -> AppliedEdit:
    """Wrap every module `at` matches (matching.py's glob: a name, or anything under it) that LoRA
    can wrap. A glob that matches none of those is an error naming the closest modules and types."""
    rule = f"model.add[{index}] (lora {edit.at})"
    named = [(name, module) for name, module in model.named_modules() if name and glob_matches(edit.at, name)]
    targets, refused = [], []
    for name, module in named:
        kind, why = lora_kind(module)
        parent = model.get_submodule(name.rpartition(".")[0])
        if kind is not None and isinstance(parent, nn.MultiheadAttention):
            kind, why = None, "nn.MultiheadAttention reads its out_proj's weight directly and never calls it"
        if kind is not None:
            targets.append((name, module))
        elif why is not None:
            refused.append(f"{name} ({type(module).__name__}: {why})")
    if not targets:
        names = [n for n, _ in model.named_modules() if n]
        if named:
            shown = refused[:4] or [_described(model, [n for n, _ in named[:4]])]
            problem = (f"{rule}: the glob matches {len(named)} module(s), none of a type LoRA can wrap ({WRAPPABLE}): "
                       + "; ".join(shown) + (" ..." if len(named) > 4 else ""))
        else:
            problem = f"{rule}: the glob matches no module."
        wrappable = [n for n, m in model.named_modules() if n and lora_kind(m)[0] is not None]
        close = closest_names(edit.at, wrappable) or closest_names(edit.at, names)
        hint = (f"closest module names: {_described(model, close)}" if close
                else f"modules LoRA can wrap look like: {_described(model, wrappable[:3])}")
        raise ConfigError(problem, hint + " (globs are fnmatch over dotted module names; 'blocks.0.attn' also covers "
                          "the modules under it)", group="model")
    if refused:
        log.info("%s: left alone %d matched module(s) LoRA cannot wrap: %s", rule, len(refused), "; ".join(refused[:5]))
    tied = {key: group for group in tied_keys(model) for key in group}
    for name, _ in targets:
        group = tied.get(f"{name}.weight")
        if group:
            others = [k for k in group if k != f"{name}.weight"]
            raise ConfigError(f"{rule}: the weight of '{name}' is tied to {', '.join(others)} (one tensor); a LoRA "
                              "update merged into it would change both.",
                              f"narrow the glob so it leaves '{name}' out", group="model")
    keys = []
    for name, module in targets:
        add_lora(module, int(settings["rank"]), float(settings["alpha"]), float(settings["dropout"]), bool(settings["dora"]))
        keys += [f"{name}.{param}" for param in module.lora_param_names]
    types = sorted({type(m).__name__.removeprefix("LoRA") for _, m in targets})
    return AppliedEdit(EditOp.lora.value, edit.at, edit.at, f"LoRA on {len(targets)} {'/'.join(types)}", index,
                       keys=frozenset(keys), targets=tuple(name for name, _ in targets))


def _apply_edit(model: nn.Module, edit, index: int) -> AppliedEdit:
    op = EditOp(edit.op) if not isinstance(edit.op, EditOp) else edit.op
    settings = _lora_settings(edit, op, index)
    if op is EditOp.lora:
        return _apply_lora(model, edit, index, settings)
    _check_at(model, edit.at, index)
    new_module = _instantiate_module(edit.module, f"model.add[{index}].module")
    parent_name, _, leaf = edit.at.rpartition(".")

    if op is EditOp.replace:
        if edit.name not in (None, leaf):
            raise ConfigError(
                f"model.add[{index}]: `replace` keeps the name '{leaf}', so `name: {edit.name}` cannot apply.",
                "drop `name` from a replace edit",
                group="model",
            )
        model.get_submodule(parent_name)._modules[leaf] = new_module
        return AppliedEdit(op.value, edit.at, edit.at, type(new_module).__name__, index)

    if not edit.name or "." in edit.name:
        raise ConfigError(
            f"model.add[{index}]: `{op.value}` needs a `name` (one identifier) for the new module.",
            f"e.g. {{op: {op.value}, at: {edit.at}, name: adapter1, module: ...}}",
            group="model",
        )
    home_name = _home(model, edit.at)
    home = model.get_submodule(home_name)
    full_name = f"{home_name}.{edit.name}" if home_name else edit.name
    if hasattr(home, edit.name):
        raise ConfigError(
            f"model.add[{index}]: '{full_name}' already exists in the model.",
            "choose a `name` that the model does not use",
            group="model",
        )
    home.add_module(edit.name, new_module)
    applied = AppliedEdit(op.value, edit.at, full_name, type(new_module).__name__, index)
    target = model.get_submodule(edit.at)
    if op is EditOp.after:
        target.register_forward_hook(RunAfter(home, edit.name, applied))
    else:
        target.register_forward_pre_hook(RunBefore(home, edit.name, applied), with_kwargs=True)
    return applied


def build_model(model_cfg, lora: bool = True) -> tuple[nn.Module, list[AppliedEdit]]:
    """Instantiate `model.base` and apply `model.add`; returns the model and what was added.
    `lora=False`: without the lora ops (the model that merged.safetensors loads into)."""
    model = _instantiate_module(model_cfg.base, "model.base")
    edits = [_apply_edit(model, edit, i) for i, edit in enumerate(model_cfg.add)
             if lora or _op(edit) is not EditOp.lora]
    return model, edits


def _op(edit) -> EditOp:
    return edit.op if isinstance(edit.op, EditOp) else EditOp(edit.op)


def inserted_edits(model: nn.Module) -> list[AppliedEdit]:
    """The after/before edits wired into `model` (read from their hooks), in model.add order."""
    found = {}
    for module in model.modules():
        for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]:
            if isinstance(hook, _Inserted):
                found[hook.edit.index] = hook.edit
    return [found[i] for i in sorted(found)]


@contextlib.contextmanager
def watch_edits(model: nn.Module):
    """Around the first forward pass: each after/before module must run exactly as often as its
    `at` (never a second time from a container), and when the forward fails downstream of a
    module that changed the shape it was given, the error names that edit and both shapes."""
    inserted = inserted_edits(model)
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[str, str]] = {}
    handles = []

    def counter(key):
        def hook(_module, inputs, output):
            calls[key] = calls.get(key, 0) + 1
            if key.startswith("new:") and inputs and isinstance(output, torch.Tensor) and isinstance(inputs[0], torch.Tensor):
                if inputs[0].shape != output.shape:
                    shapes[key[4:]] = (_shape(inputs[0]), _shape(output))
        return hook

    for e in inserted:
        handles.append(model.get_submodule(e.name).register_forward_hook(counter("new:" + e.name)))
        handles.append(model.get_submodule(e.at).register_forward_hook(counter("at:" + e.name)))
    try:
        yield
    except WiringError:
        raise
    except Exception as exc:
        changed = [e for e in inserted if e.name in shapes]
        if not changed:
            raise
        e = changed[-1]
        before, after = shapes[e.name]
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise WiringError(
            f"the forward pass failed after {e.rule} ('{e.name}', {e.module_type}) changed the shape it was given "
            f"from {before} to {after}: {type(exc).__name__}: {first}",
            f"a module inserted with `{e.op}` must give what comes next the shape it expects: make '{e.name}' "
            f"return {before}, or adapt the modules after it",
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    for e in inserted:
        ran, at_ran = calls.get("new:" + e.name, 0), calls.get("at:" + e.name, 0)
        if ran > at_ran:
            raise WiringError(
                f"{e.rule}: the new module '{e.name}' ran {ran} times in one forward pass, but '{e.at}' ran "
                f"{at_ran}: something besides the hook calls it (a parent that iterates its children?).",
                f"name a different `at`, or register the module yourself; report it if '{e.name}'s parent does not iterate",
            )


def base_param_names(model: nn.Module, edits: list[AppliedEdit]) -> list[str]:
    """Names of parameters that belong to the base architecture (not inside an added module)."""
    return [n for n, _ in model.named_parameters() if not any(e.covers(n) for e in edits)]


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
