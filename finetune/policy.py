"""The train policy: which parameters train, in which optimizer group, at which lr and weight decay.

Precedence for each parameter: `policy.train` globs > `policy.new` (for parameters the checkpoint
did not provide) > `policy.freeze` globs > trainable. A glob matches a parameter name
(`layer1.0.conv.weight`) or a module prefix (`layer1` matches everything under it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
import torch
from torch import nn

from finetune.config import NewParams, NormMode
from finetune.errors import PolicyError
from finetune.matching import glob_matches, require_matches

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ParamPlan:
    name: str
    shape: list[int]
    numel: int
    source: str  # checkpoint | new | adapted
    trainable: bool
    lr: float | None
    weight_decay: float | None
    group: str | None


@dataclass
class GroupPlan:
    name: str
    params: list[str]
    lr: float
    weight_decay: float


@dataclass
class TrainPlan:
    params: list[ParamPlan]
    groups: list[GroupPlan]
    frozen_norms: list[str] = field(default_factory=list)  # norm modules kept in eval mode

    @property
    def trainable_names(self) -> list[str]:
        return [p.name for p in self.params if p.trainable]

    @property
    def frozen_names(self) -> list[str]:
        return [p.name for p in self.params if not p.trainable]

    def totals(self) -> dict:
        out: dict = {"params": 0, "trainable": 0, "frozen": 0, "by_source": {}}
        for p in self.params:
            kind = "trainable" if p.trainable else "frozen"
            out["params"] += p.numel
            out[kind] += p.numel
            src = out["by_source"].setdefault(p.source, {"trainable": 0, "frozen": 0})
            src[kind] += p.numel
        return out


def optimizer_defaults(optimizer_cfg) -> tuple[float, float]:
    """(lr, weight_decay) the optimizer will use: from the config, else its signature defaults.

    Reads the class without constructing it: building an optimizer imports torch._dynamo (~1.3 s).
    """
    from hydra._internal.utils import _locate

    spec = dict(optimizer_cfg)
    params = {}
    try:
        params = inspect.signature(_locate(spec["_target_"])).parameters
    except Exception:  # an unimportable target fails later with Hydra's own message
        pass

    def pick(key: str) -> float:
        if key in spec:
            return float(spec[key])
        default = params[key].default if key in params else 0.0
        return float(default) if isinstance(default, (int, float)) else 0.0

    return pick("lr"), pick("weight_decay")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm weights (1-D tensors), as timm's param_groups_weight_decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def plan_training(model: nn.Module, sources: dict[str, str], policy, lr: float, weight_decay: float) -> TrainPlan:
    params = dict(model.named_parameters())
    names = list(params)
    forced = require_matches(policy.train, names, "policy.train", error=PolicyError)
    frozen = require_matches(policy.freeze, names, "policy.freeze", error=PolicyError)
    require_matches(policy.allow_no_grad, names, "policy.allow_no_grad", error=PolicyError)
    new_names = {n for n in names if sources.get(n, "checkpoint") != "checkpoint"}
    for i, glob in enumerate(policy.freeze):
        hits = {n for n in names if glob_matches(glob, n)}
        if policy.new is NewParams.train and hits <= new_names:
            raise PolicyError(
                f"policy.freeze[{i}] {glob!r} matches only new parameters, which policy.new=train keeps trainable.",
                "to freeze new parameters set policy.new=freeze (and list exceptions in policy.train)",
            )

    def trainable(name: str) -> bool:
        if name in forced:
            return True
        if name in new_names:
            return policy.new is NewParams.train
        return name not in frozen

    group_specs = list(policy.groups)
    group_members = [require_matches(g.params, names, f"policy.groups[{i}].params", error=PolicyError) for i, g in enumerate(group_specs)]
    groups: dict[str, GroupPlan] = {}
    plans = []
    for name in names:
        param = params[name]
        train = trainable(name)
        if train:
            idx = next((i for i, members in enumerate(group_members) if name in members), None)
            spec = group_specs[idx] if idx is not None else None
            base = "default" if idx is None else f"groups[{idx}]"
            mult = 1.0 if spec is None else float(spec.lr_mult)
            if spec is None and name in new_names and policy.new_lr_mult != 1:
                base, mult = "new", float(policy.new_lr_mult)
            wd = weight_decay if spec is None or spec.weight_decay is None else float(spec.weight_decay)
            if not policy.decay_norm_and_bias and is_no_decay(name, param):
                wd, base = 0.0, base + "/no_decay"
            group_lr = lr * mult
            groups.setdefault(base, GroupPlan(base, [], group_lr, wd)).params.append(name)
            plans.append(ParamPlan(name, list(param.shape), param.numel(), sources.get(name, "checkpoint"), True, group_lr, wd, base))
        else:
            plans.append(ParamPlan(name, list(param.shape), param.numel(), sources.get(name, "checkpoint"), False, None, None, None))

    if not any(p.trainable for p in plans):
        raise PolicyError(
            "nothing is trainable: every parameter is frozen by the policy.",
            "narrow policy.freeze, add globs to policy.train, or set policy.new=train",
        )
    stuck = [p.name for p in plans if p.source != "checkpoint" and not p.trainable and policy.new is NewParams.train]
    if stuck:
        raise PolicyError(f"new parameters would stay frozen although policy.new=train: {stuck[:8]}", "check policy.freeze")

    frozen_norms = []
    if policy.bn is NormMode.freeze_stats:
        trainable_set = {p.name for p in plans if p.trainable}
        for mod_name, module in model.named_modules():
            own = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
            if isinstance(module, _NORM_TYPES) and own and not any(n in trainable_set for n in own):
                frozen_norms.append(mod_name)
    return TrainPlan(plans, list(groups.values()), frozen_norms)


def _keep_eval(module: nn.Module, _inputs) -> None:
    # Still fully frozen? (policy.unfreeze may have made it trainable since.)
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        module.eval()


def apply_plan(model: nn.Module, plan: TrainPlan) -> None:
    """Set requires_grad as planned; keep fully frozen norm layers in eval mode in every forward."""
    trainable = set(plan.trainable_names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    for mod_name in plan.frozen_norms:
        # A forward pre-hook, not an override of train(): it holds whatever calls model.train().
        model.get_submodule(mod_name).register_forward_pre_hook(_keep_eval)


def param_groups(model: nn.Module, plan: TrainPlan) -> list[dict]:
    params = dict(model.named_parameters())
    return [
        {"params": [params[n] for n in g.params], "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name}
        for g in plan.groups
    ]


def unfreeze_due(policy, epoch: int, step: int) -> list[tuple[int, object]]:
    """Unfreeze entries whose time has come at the start of `epoch` (1-based) / before `step`."""
    due = []
    for i, entry in enumerate(policy.unfreeze):
        if (entry.at_epoch is not None and epoch >= entry.at_epoch) or (entry.at_step is not None and step >= entry.at_step):
            due.append((i, entry))
    return due


def unfreeze(model: nn.Module, entry, index: int, lr: float, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Make the entry's frozen parameters trainable; returns the optimizer groups to add
    (one at lr × lr_mult, and its no-decay twin for biases and norm weights)."""
    names = list(dict(model.named_parameters()))
    chosen = require_matches(entry.params, names, f"policy.unfreeze[{index}].params", error=PolicyError)
    named = [(n, p) for n, p in model.named_parameters() if n in chosen and not p.requires_grad]
    for _, p in named:
        p.requires_grad_(True)
    decay = [p for n, p in named if decay_norm_and_bias or not is_no_decay(n, p)]
    no_decay = [p for n, p in named if not decay_norm_and_bias and is_no_decay(n, p)]
    group_lr = lr * float(entry.lr_mult)
    groups = [{"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": f"unfreeze[{index}]"},
              {"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"unfreeze[{index}]/no_decay"}]
    return [g for g in groups if g["params"]]


def check_optimizer_matches(model: nn.Module, optimizer) -> None:
    """The optimizer holds exactly the trainable parameters: no frozen one (no decay or momentum
    creeping in), no trainable one left out. A mismatch is a bug in the plan, so it asserts."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if in_optimizer != trainable:
        names = {id(p): n for n, p in model.named_parameters()}
        extra = [names.get(i, "?") for i in in_optimizer - trainable]
        left_out = [names.get(i, "?") for i in trainable - in_optimizer]
        raise AssertionError(f"optimizer/trainable mismatch: frozen in optimizer {extra[:5]}, trainable left out {left_out[:5]}")
