"""Layer-wise lr decay: each parameter's depth, from the input (0) to the output (max_depth).

`policy.layer_decay: d` scales the lr of a parameter at depth k by d^(max_depth − k), as timm's
`param_groups_layer_decay` (BEiT's recipe). The depth comes from, in order:

1. `policy.layer_groups`, a declared list of regexes over parameter names from the input to the
   output: a parameter's depth is the index of the first that matches (`re.search`). A regex with a
   numeric capture group (`^blocks\\.(\\d+)\\.`) spans one depth per number it captures, in number order.
2. the model's own `group_matcher(coarse=False)` (timm's models have one), grouped as timm's
   `group_parameters` does: what it leaves unmatched (the head) is the top depth.
3. module order: the model's top-level children in the order of `named_parameters`, a container of
   blocks (an nn.Sequential / nn.ModuleList whose children have children: `layer1` of a ResNet, a
   ViT's `blocks`) split into its blocks; a parameter of the root itself is a depth of its own.

Depths are counted over every parameter, new ones included: a new head keeps the top depth (so the
last pretrained block gets d¹, as in timm), but a new parameter itself has no depth and takes
`policy.new_lr_mult` instead (policy.py). Modules that model.add inserted (after / before) take no
place in module order: they are registered last, not where they run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from finetune.errors import PolicyError
from finetune.matching import closest_names, listed

CONTAINERS = (nn.Sequential, nn.ModuleList)
FROM_LAYER_GROUPS = "policy.layer_groups"
FROM_GROUP_MATCHER = "group_matcher"
FROM_MODULE_ORDER = "module order"


@dataclass
class LayerDepths:
    """Every parameter's depth (new ones included: they hold their place), and where it came from."""

    depths: dict[str, int]
    source: str  # policy.layer_groups | group_matcher | module order

    @property
    def max_depth(self) -> int:
        return max(self.depths.values(), default=0)


def layer_depths(model: nn.Module, layer_groups: Sequence[str], new_names: set[str],
                 inserted: Sequence[str] = ()) -> LayerDepths:
    """Depths of `model`'s parameters. `new_names`: parameters the checkpoint did not provide (they
    may match no layer_groups regex); `inserted`: modules model.add put after/before another."""
    names = [n for n, _ in model.named_parameters()]
    if layer_groups:
        return LayerDepths(depths_from_regexes(names, layer_groups, new_names), FROM_LAYER_GROUPS)
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        return LayerDepths(depths_from_group_matcher(model, matcher), FROM_GROUP_MATCHER)
    return LayerDepths(depths_from_module_order(model, inserted), FROM_MODULE_ORDER)


def compact(keys: dict[str, tuple]) -> dict[str, int]:
    """Sortable keys -> consecutive depths 0, 1, 2... in key order."""
    order = {key: depth for depth, key in enumerate(sorted(set(keys.values())))}
    return {name: order[key] for name, key in keys.items()}


def depths_from_regexes(names: Sequence[str], layer_groups: Sequence[str], new_names: set[str]) -> dict[str, int]:
    compiled = []
    for i, pattern in enumerate(layer_groups):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise PolicyError(f"policy.layer_groups[{i}] {pattern!r} is not a regular expression: {exc}.",
                              "write a Python regex over parameter names, e.g. '^blocks\\.(\\d+)\\.'", group="policy") from exc
    keys: dict[str, tuple] = {}
    hits = [0] * len(compiled)
    unmatched = []
    for name in names:
        for i, regex in enumerate(compiled):
            found = regex.search(name)
            if found:
                hits[i] += 1
                numbers = tuple(int(g) for g in found.groups() if g is not None and g.isdigit())
                keys[name] = (i, *numbers)
                break
        else:
            if name not in new_names:
                unmatched.append(name)
    for i, count in enumerate(hits):
        if not count:
            pattern = layer_groups[i]
            close = closest_names(pattern.lstrip("^").replace("\\.", ".").split("(")[0], names)
            raise PolicyError(
                f"policy.layer_groups[{i}] {pattern!r} matches no parameter (before it, none of the earlier regexes "
                "took them all).",
                (f"closest parameter names: {', '.join(close)}" if close else f"parameter names look like: {listed(names, 3)}")
                + " (regexes are searched in each dotted parameter name; a parameter takes the first that matches)",
                group="policy")
    if unmatched:
        raise PolicyError(
            f"policy.layer_groups: {len(unmatched)} parameter(s) from the checkpoint match no regex, so they have no "
            f"depth: {listed(unmatched)}.",
            "add a regex for them where they sit between the input and the output (the list runs from the input to "
            "the output), or '.' last to put everything else at the top",
            group="policy")
    width = max((len(k) for k in keys.values()), default=1)
    return compact({n: k + (-1,) * (width - len(k)) for n, k in keys.items()})


def depths_from_group_matcher(model: nn.Module, matcher) -> dict[str, int]:
    """timm's own grouping (`group_parameters(model, model.group_matcher(coarse=False), reverse=True)`)."""
    try:
        from timm.models import group_parameters
    except ImportError as exc:
        raise PolicyError(
            f"policy.layer_decay: {type(model).__name__} has a group_matcher() (timm's convention), and reading it "
            "needs timm, which is not installed.",
            "pip install timm, or declare the depths with policy.layer_groups (regexes from the input to the output)",
            group="policy") from exc
    return dict(group_parameters(model, matcher(coarse=False), reverse=True))


def _is_block_container(module: nn.Module) -> bool:
    """An nn.Sequential / nn.ModuleList of blocks (children that have children), not of layers."""
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    return isinstance(module, CONTAINERS) and bool(children) and all(any(True for _ in c.children()) for c in children)


def _unit(model: nn.Module, name: str) -> str:
    """The module-order unit of a parameter: its top-level child, or a block of a container of blocks."""
    parts = name.split(".")
    if len(parts) == 1:
        return name
    top = model.get_submodule(parts[0])
    if len(parts) > 2 and _is_block_container(top):
        return ".".join(parts[:2])
    return parts[0]


def depths_from_module_order(model: nn.Module, inserted: Sequence[str]) -> dict[str, int]:
    units: dict[str, int] = {}
    depths: dict[str, int] = {}
    inside = lambda name: any(name == m or name.startswith(m + ".") for m in inserted)  # noqa: E731
    for name, _ in model.named_parameters():
        if inside(name):
            continue
        depths[name] = units.setdefault(_unit(model, name), len(units))
    top = max(depths.values(), default=0)
    for name, _ in model.named_parameters():  # inserted modules: new, no depth of their own
        depths.setdefault(name, top)
    return depths


def check_layer_decay(policy) -> None:
    """policy.layer_decay in (0, 1]; policy.layer_groups only with it (else they would be ignored)."""
    decay = policy.layer_decay
    if decay is None:
        if policy.layer_groups:
            raise PolicyError("policy.layer_groups is set but policy.layer_decay is null: the depths would not be used.",
                              "set policy.layer_decay (e.g. 0.75), or remove policy.layer_groups", group="policy")
        return
    if not 0.0 < float(decay) <= 1.0:
        raise PolicyError(f"policy.layer_decay={decay} is not in (0, 1].",
                          "e.g. policy.layer_decay=0.75 (each depth below the top gets 0.75× the lr of the one above)",
                          group="policy")


def depth_scale(decay: float, depth: int, max_depth: int) -> float:
    return float(decay) ** (max_depth - depth)
