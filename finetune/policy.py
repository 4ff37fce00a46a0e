"""The train policy: which parameters train, in which optimizer group, at which lr and weight decay.

Whether a parameter trains: `policy.train` globs > frozen by the model (requires_grad=False as
built) > `policy.new` (for parameters the checkpoint did not provide) > `policy.freeze` globs >
trainable. A glob matches a parameter name or a module prefix (finetune.matching).

Its optimizer group, where `policy.groups` overlap: the narrowest glob wins, the one that matches
the fewest parameters (`blocks.11` beats `blocks`); two groups that tie are an error. A new
parameter (not from the checkpoint) takes `policy.new_lr_mult`, unless a group names it with a
glob that matches new parameters only (`head`): a new adapter inside `blocks` is not the blocks'.
Every group that lost parameters is reported. Biases, norm weights and what the model's `no_weight_decay()` names get no decay.

With `policy.layer_decay: d`, a parameter's lr is further scaled by d^(max_depth − depth), its depth
from finetune.layer_decay; a new parameter has no depth and keeps its multiplier (`new_lr_mult`, or a
group's). One optimizer group per (group, depth, weight decay); policy.unfreeze's groups decay too.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from finetune.config import NewParams, NormMode
from finetune.errors import PolicyError
from finetune.layer_decay import check_layer_decay, depth_scale, layer_depths
from finetune.matching import glob_matches, require_matches

log = logging.getLogger(__name__)
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
    frozen_by: str | None = None  # model (requires_grad=False as built) | policy.freeze | policy.new
    added_by: str | None = None  # the model.add op that created the tensor inside an existing module (lora)
    depth: int | None = None  # under policy.layer_decay: 0 at the input .. max_depth at the output; None: new


@dataclass
class Overlap:
    """Parameters that two claims (policy.groups entries, or policy.new) both matched: `winner`
    (the narrowest glob) took them from `loser`."""

    winner: str
    loser: str
    params: list[str]


@dataclass
class GroupPlan:
    name: str
    params: list[str]
    lr: float
    weight_decay: float


@dataclass
class LayerDecayPlan:
    """policy.layer_decay as planned: lr × decay^(max_depth − depth)."""

    decay: float
    max_depth: int
    depth_from: str  # policy.layer_groups | group_matcher | module order
    depths: dict[str, int] = field(default_factory=dict, repr=False)  # every parameter's place, new ones too

    def to_json(self) -> dict:
        return {"decay": self.decay, "max_depth": self.max_depth, "depth_from": self.depth_from}

    def scale(self, depth: int | None) -> float:
        return 1.0 if depth is None else depth_scale(self.decay, depth, self.max_depth)


@dataclass
class TrainPlan:
    params: list[ParamPlan]
    groups: list[GroupPlan]
    frozen_norms: list[str] = field(default_factory=list)  # norm modules kept in eval mode
    overlaps: list[Overlap] = field(default_factory=list)  # how overlapping policy.groups were resolved
    model_no_weight_decay: list[str] = field(default_factory=list)  # the model's no_weight_decay() names
    layer_decay: LayerDecayPlan | None = None

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


def model_no_weight_decay(model: nn.Module) -> list[str]:
    """Names the model itself exempts from weight decay: timm's `no_weight_decay()` convention
    (`pos_embed`, `cls_token`, ...), asked of every submodule that has one (names prefixed by it)."""
    globs: list[str] = []
    for prefix, module in model.named_modules():
        method = getattr(module, "no_weight_decay", None)
        if not callable(method):
            continue
        try:
            names = method()
        except Exception:  # a model's hook is advice: one that fails is skipped, not fatal
            continue
        globs.extend(f"{prefix}.{n}" if prefix else str(n) for n in names)
    return globs


@dataclass(frozen=True)
class _Claim:
    """A policy.groups entry's (or policy.new's) claim on a parameter, by the narrowest of its
    globs that matched it."""

    label: str  # groups[0] | new
    index: int | None  # policy.groups index, None for policy.new
    size: int  # how many parameters that glob matches: the smaller, the more specific
    only_new: bool = True  # that glob matches new parameters only (it is about them)


def _group_claims(names: Sequence[str], policy, new_names: set[str]) -> dict[str, list[_Claim]]:
    claims: dict[str, list[_Claim]] = {}
    for i, group in enumerate(policy.groups):
        require_matches(group.params, names, f"policy.groups[{i}].params", error=PolicyError)
        best: dict[str, _Claim] = {}
        for glob in group.params:
            hits = [n for n in names if glob_matches(glob, n)]
            claim = _Claim(f"groups[{i}]", i, len(hits), all(n in new_names for n in hits))
            for n in hits:
                if n not in best or (claim.only_new, -claim.size) > (best[n].only_new, -best[n].size):
                    best[n] = claim
        for n, claim in best.items():
            claims.setdefault(n, []).append(claim)
    for n in new_names:
        claims.setdefault(n, []).append(_Claim("new", None, len(new_names)))
    return claims


def _resolve(name: str, claims: list[_Claim]) -> _Claim:
    """A new parameter goes to a group only through a glob that matches new parameters only (one
    written for them: `head`, `adapter*`), else to policy.new; otherwise the narrowest glob wins,
    and two groups that tie are ambiguous."""
    new = next((c for c in claims if c.index is None), None)
    groups = [c for c in claims if c.index is not None]
    if new is not None:
        groups = [c for c in groups if c.only_new]
        if not groups:
            return new
    narrowest = min(c.size for c in groups)
    best = [c for c in groups if c.size == narrowest]
    if len(best) > 1:
        a, b = best[0], best[1]
        raise PolicyError(
            f"policy.{a.label} and policy.{b.label} both claim '{name}' with globs of the same reach ({narrowest} parameters each).",
            f"make one of them narrower (the narrowest glob wins where groups overlap), or remove '{name}' from one",
        )
    return best[0]


def plan_training(model: nn.Module, sources: dict[str, str], policy, lr: float, weight_decay: float,
                  added_by: dict[str, str] | None = None, inserted: Sequence[str] = ()) -> TrainPlan:
    """Call on the model as built and loaded, before apply_plan: parameters the model itself
    created with requires_grad=False (its constructor, or a library such as PEFT) stay frozen
    unless policy.train names them. `added_by`: parameter -> the model.add op that created it
    inside an existing module (a lora op's adapters), for the reports. `inserted`: the modules
    model.add put after/before another (they take no place in the module order of layer decay)."""
    added_by = added_by or {}
    check_layer_decay(policy)
    params = dict(model.named_parameters())
    names = list(params)
    try:
        forced = require_matches(policy.train, names, "policy.train", error=PolicyError)
    except PolicyError as exc:
        if "lora_" in exc.problem and not any(".lora_" in n for n in names):  # policy=lora without a lora op
            raise PolicyError(exc.problem + " The model has no LoRA adapters.",
                              "add a lora op to model.add, e.g. {op: lora, at: 'blocks.*.attn.qkv', rank: 8, alpha: 16} "
                              "(policy=lora trains the adapters it creates), or choose another policy") from exc
        raise
    frozen = require_matches(policy.freeze, names, "policy.freeze", error=PolicyError)
    require_matches(policy.allow_no_grad, names, "policy.allow_no_grad", error=PolicyError)
    by_model = {n for n, p in params.items() if not p.requires_grad}
    new_names = {n for n in names if sources.get(n, "checkpoint") != "checkpoint"}
    for i, glob in enumerate(policy.freeze):
        hits = {n for n in names if glob_matches(glob, n)}
        if policy.new is NewParams.train and hits <= new_names:
            raise PolicyError(
                f"policy.freeze[{i}] {glob!r} matches only new parameters, which policy.new=train keeps trainable.",
                "to freeze new parameters set policy.new=freeze (and list exceptions in policy.train)",
            )

    def frozen_by(name: str) -> str | None:
        """None if it trains, else what froze it."""
        if name in forced:
            return None
        if name in by_model:
            return "model"
        if name in new_names:
            return None if policy.new is NewParams.train else "policy.new"
        return "policy.freeze" if name in frozen else None

    decay = plan_layer_decay(model, policy, names, sources, inserted)
    depth_of = decay_depths(decay, sources)
    claims = _group_claims(names, policy, new_names)
    no_decay_globs = model_no_weight_decay(model) if not policy.decay_norm_and_bias else []
    groups: dict[str, GroupPlan] = {}
    plans = []
    shadowed: dict[tuple[str, str], list[str]] = {}  # (winner, loser) -> parameters
    for name in names:
        param = params[name]
        source = sources.get(name, "checkpoint")
        why = frozen_by(name)
        depth = depth_of.get(name)
        if why is not None:
            plans.append(ParamPlan(name, list(param.shape), param.numel(), source, False, None, None, None, why,
                                   added_by.get(name), depth))
            continue
        mine = claims.get(name, [])
        claim = _resolve(name, mine) if mine else None
        for other in mine:
            if other is not claim and claim is not None and other.index is not None:  # a group lost them
                shadowed.setdefault((claim.label, other.label), []).append(name)
        spec = policy.groups[claim.index] if claim is not None and claim.index is not None else None
        if spec is not None:
            base, mult = claim.label, float(spec.lr_mult)
        elif claim is not None and policy.new_lr_mult != 1:  # policy.new's claim
            base, mult = "new", float(policy.new_lr_mult)
        else:
            base, mult = "default", 1.0
        wd = weight_decay if spec is None or spec.weight_decay is None else float(spec.weight_decay)
        if depth is not None:
            base = f"{base}/depth{depth}"
        if not policy.decay_norm_and_bias and (is_no_decay(name, param) or any(glob_matches(g, name) for g in no_decay_globs)):
            wd, base = 0.0, base + "/no_decay"
        group_lr = lr * mult * (decay.scale(depth) if decay is not None else 1.0)
        groups.setdefault(base, GroupPlan(base, [], group_lr, wd)).params.append(name)
        plans.append(ParamPlan(name, list(param.shape), param.numel(), source, True, group_lr, wd, base,
                               added_by=added_by.get(name), depth=depth))

    if not any(p.trainable for p in plans):
        held = sum(1 for p in plans if p.frozen_by == "model")
        raise PolicyError(
            "nothing is trainable: every parameter is frozen"
            + (f" ({held} tensors frozen by the model itself, requires_grad=False as built)." if held else " by the policy."),
            "name what should train in policy.train (it wins over the model's own freezing), narrow policy.freeze, "
            "or set policy.new=train",
        )
    stuck = [p.name for p in plans if p.source != "checkpoint" and p.frozen_by == "policy.freeze" and policy.new is NewParams.train]
    if stuck:
        raise PolicyError(f"new parameters would stay frozen although policy.new=train: {stuck[:8]}", "check policy.freeze")
    overlaps = [Overlap(winner, loser, members) for (winner, loser), members in shadowed.items()]

    frozen_norms = []
    if policy.bn is NormMode.freeze_stats:
        trainable_set = {p.name for p in plans if p.trainable}
        for mod_name, module in model.named_modules():
            own = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
            if isinstance(module, _NORM_TYPES) and own and not any(n in trainable_set for n in own):
                frozen_norms.append(mod_name)
    ordered = list(groups.values())
    if decay is not None:  # the top (full-lr) groups first: what logs as `lr` is the base schedule's
        ordered.sort(key=lambda g: -_group_depth(g.name, decay.max_depth))
    return TrainPlan(plans, ordered, frozen_norms, overlaps, no_decay_globs, decay)


def plan_layer_decay(model: nn.Module, policy, names: Sequence[str], sources: dict[str, str],
                     inserted: Sequence[str]) -> LayerDecayPlan | None:
    """policy.layer_decay's depths (None when it is off), logged with where they came from."""
    if policy.layer_decay is None:
        return None
    new_names = {n for n in names if sources.get(n, "checkpoint") == "new"}
    depths = layer_depths(model, list(policy.layer_groups), new_names, inserted)
    plan = LayerDecayPlan(float(policy.layer_decay), depths.max_depth, depths.source, depths.depths)
    if depths.max_depth == 0:
        log.warning("policy.layer_decay: every parameter is at one depth (from %s), so the decay changes nothing; "
                    "declare the depths with policy.layer_groups", depths.source)
    return plan


def decay_depths(decay: LayerDecayPlan | None, sources: dict[str, str]) -> dict[str, int]:
    """Depths of the parameters that have one: none without layer decay, none for a new parameter."""
    if decay is None:
        return {}
    return {n: d for n, d in decay.depths.items() if sources.get(n, "checkpoint") != "new"}


def _group_depth(name: str, top: int) -> int:
    """The depth in a group's name (`default/depth3/no_decay`); a group without one sits at the top."""
    for part in name.split("/"):
        if part.startswith("depth") and part[5:].isdigit():
            return int(part[5:])
    return top + 1


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


def unfreeze(model: nn.Module, entry, index: int, lr: float, weight_decay: float, decay_norm_and_bias: bool,
             plan: TrainPlan | None = None) -> list[dict]:
    """Make the entry's frozen parameters trainable; returns the optimizer groups to add: at lr ×
    lr_mult (× the layer decay of each depth, where policy.layer_decay is set: one group per depth,
    top first), each with a no-decay twin for biases and norm weights."""
    names = list(dict(model.named_parameters()))
    chosen = require_matches(entry.params, names, f"policy.unfreeze[{index}].params", error=PolicyError)
    named = [(n, p) for n, p in model.named_parameters() if n in chosen and not p.requires_grad]
    for _, p in named:
        p.requires_grad_(True)
    layer_decay = plan.layer_decay if plan is not None else None
    depth_of = {p.name: p.depth for p in plan.params if p.depth is not None} if plan is not None else {}
    depths = sorted({depth_of.get(n) for n, _ in named}, key=lambda d: -1 if d is None else -d - 2)
    groups = []
    for depth in depths:
        at_depth = [(n, p) for n, p in named if depth_of.get(n) == depth]
        label = f"unfreeze[{index}]" + (f"/depth{depth}" if depth is not None else "")
        group_lr = lr * float(entry.lr_mult) * (layer_decay.scale(depth) if layer_decay is not None else 1.0)
        decay = [p for n, p in at_depth if decay_norm_and_bias or not is_no_decay(n, p)]
        no_decay = [p for n, p in at_depth if not decay_norm_and_bias and is_no_decay(n, p)]
        groups += [{"params": decay, "lr": group_lr, "weight_decay": weight_decay, "name": label},
                   {"params": no_decay, "lr": group_lr, "weight_decay": 0.0, "name": f"{label}/no_decay"}]
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
