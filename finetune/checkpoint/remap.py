"""Key surgery as pure functions: names in, names out, plus a record of what changed.

Order (DESIGN.md): user `ignore` → user `remap` rules → automatic unwrap of wrapper prefixes
(only when it increases the number of keys that match the model). Like torchtune's
`get_mapped_key`, nothing is dropped silently: a rule that matches nothing is an error.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from finetune.errors import CheckpointError

# Prefixes that wrappers add: DataParallel/DDP, torch.compile, Lightning's usual attribute name.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class KeyMapping:
    """`names` maps each kept original checkpoint key to its final name (same order)."""

    names: dict[str, str]
    ignored: list[str] = field(default_factory=list)
    unwrapped: list[str] = field(default_factory=list)  # prefixes removed automatically, in order

    @property
    def remapped(self) -> dict[str, str]:
        return {orig: new for orig, new in self.names.items() if orig != new}


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CheckpointError(
            f"{where}: {pattern!r} is not a valid regular expression ({exc}).",
            "escape literal dots and brackets, e.g. '^backbone\\.' (in YAML, use single quotes)",
            group="checkpoint",
        ) from exc


def drop_ignored(keys: Sequence[str], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split keys into (kept, ignored). Every pattern must match at least one key."""
    compiled = [(p, _compile(p, "checkpoint.ignore")) for p in patterns]
    hits = Counter()
    kept, ignored = [], []
    for key in keys:
        matched = [p for p, rx in compiled if rx.search(key)]
        hits.update(matched)
        (ignored if matched else kept).append(key)
    unused = [p for p, _ in compiled if hits[p] == 0]
    if unused:
        raise CheckpointError(
            f"checkpoint.ignore pattern(s) {unused} match no checkpoint key.",
            f"fix or remove them; checkpoint keys look like: {', '.join(list(keys)[:3])}",
            group="checkpoint",
        )
    return kept, ignored


def apply_rules(names: dict[str, str], rules: Iterable) -> dict[str, str]:
    """Apply `remap` rules in order to every current name. Every rule must change some key."""
    current = dict(names)
    for i, rule in enumerate(rules):
        rx = _compile(rule.pattern, f"checkpoint.remap[{i}].pattern")
        changed = 0
        for orig, name in current.items():
            if rx.search(name):
                try:
                    current[orig] = rx.sub(rule.replace, name)
                except (re.error, IndexError) as exc:
                    raise CheckpointError(
                        f"checkpoint.remap[{i}]: replacement {rule.replace!r} is invalid for pattern {rule.pattern!r} ({exc}).",
                        "refer only to groups the pattern defines (\\1, \\g<name>)",
                        group="checkpoint",
                    ) from exc
                changed += 1
        if changed == 0:
            sample = ", ".join(list(current.values())[:3])
            raise CheckpointError(
                f"checkpoint.remap[{i}] (pattern {rule.pattern!r}) matches no checkpoint key.",
                f"fix the pattern or remove the rule; keys at this point look like: {sample}",
                group="checkpoint",
            )
    return current


def _strip(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {o: (n[len(prefix):] if n.startswith(prefix) else n) for o, n in names.items()}


def _matches(names: dict[str, str], model_keys: set[str]) -> int:
    return sum(1 for n in names.values() if n in model_keys)


def auto_unwrap(names: dict[str, str], model_keys: set[str], extra_prefixes: Sequence[str] = ()) -> tuple[dict[str, str], list[str]]:
    """Strip wrapper prefixes, greedily, as long as each strip increases the number of matches."""
    current, removed = dict(names), []
    singles = list(dict.fromkeys([*WRAPPER_PREFIXES, *extra_prefixes]))
    # Wrappers stack (DDP around torch.compile: `module._orig_mod.`), and one layer alone may match nothing.
    candidates = singles + [a + b for a in singles for b in singles if a != b]
    while True:
        base = _matches(current, model_keys)
        best = max(((_matches(_strip(current, p), model_keys), p) for p in candidates), default=(base, None))
        if best[0] <= base:
            return current, removed
        current, removed = _strip(current, best[1]), [*removed, best[1]]


def check_collisions(names: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for orig, name in names.items():
        if name in seen:
            raise CheckpointError(
                f"checkpoint keys '{seen[name]}' and '{orig}' both map to '{name}' after ignore/remap/unwrap.",
                "make the remap rules more specific, or drop one of them with checkpoint.ignore",
                group="checkpoint",
            )
        seen[name] = orig


def map_keys(keys: Sequence[str], model_keys: set[str], ignore: Sequence[str], rules: Sequence, auto: bool, extra_prefixes: Sequence[str] = ()) -> KeyMapping:
    kept, ignored = drop_ignored(keys, ignore)
    names = apply_rules({k: k for k in kept}, rules)
    unwrapped: list[str] = []
    if auto:
        names, unwrapped = auto_unwrap(names, model_keys, extra_prefixes)
    check_collisions(names)
    return KeyMapping(names=names, ignored=ignored, unwrapped=unwrapped)


def dominant_prefix(keys: Sequence[str]) -> str | None:
    """The first dotted segment most keys share (Lightning's attribute name, e.g. 'net.')."""
    firsts = Counter(k.split(".", 1)[0] + "." for k in keys if "." in k)
    if not firsts:
        return None
    prefix, count = firsts.most_common(1)[0]
    return prefix if count > len(keys) // 2 else None


# ---- suggested rules -------------------------------------------------------------------------

MAX_SUGGESTED_RULES = 4
_CANDIDATES_TRIED = 12


def _fitting(names: dict[str, str], model_shapes: dict[str, tuple], ckpt_shapes: dict[str, tuple]) -> int:
    """How many checkpoint keys land on a model key of the same shape."""
    return sum(1 for orig, name in names.items() if model_shapes.get(name) == ckpt_shapes[orig])


def _prefix_candidates(names: dict[str, str], model_shapes: dict[str, tuple], ckpt_shapes: dict[str, tuple]) -> Counter:
    """(old prefix, new prefix) pairs that would move a key that fits nothing onto a model key that
    nothing fills, of the same shape and with the longest common dotted suffix: a prefix stripped
    (`module.x` -> `x`), added (`x` -> `bert.x`) or swapped (`backbone.x` -> `encoder.x`)."""
    filled = {name for orig, name in names.items() if model_shapes.get(name) == ckpt_shapes[orig]}
    by_suffix: dict[str, list[str]] = {}
    for key in model_shapes:
        if key not in filled:
            parts = key.split(".")
            for i in range(len(parts)):
                by_suffix.setdefault(".".join(parts[i:]), []).append(key)
    votes: Counter = Counter()
    for orig, name in names.items():
        if name in filled:
            continue
        parts = name.split(".")
        for i in range(len(parts)):  # longest suffix first: the whole name (a prefix added) included
            suffix = ".".join(parts[i:])
            targets = [m for m in by_suffix.get(suffix, []) if model_shapes[m] == ckpt_shapes[orig]]
            if targets:
                old = name[: len(name) - len(suffix)]
                votes.update({(old, m[: len(m) - len(suffix)]) for m in targets[:3]})
                break
    return votes


def suggest_rules(ckpt_shapes: dict[str, tuple], model_shapes: dict[str, tuple], ignore: Sequence[str],
                  rules: Sequence, auto: bool, extra_prefixes: Sequence[str] = ()) -> list:
    """Remap rules that would make more checkpoint keys load, each verified before it is suggested:
    appended to the configured rules and run through the same `map_keys` a run uses, it must raise
    no error (it matches something, makes no collision) and increase the number of keys that land
    on a model key of their shape. Greedy: the best rule first, then the next on top of it."""
    from finetune.checkpoint.report import RemapSuggestion

    keys, model_keys = list(ckpt_shapes), set(model_shapes)
    chosen: list[RemapRuleSpec] = []

    def mapped(extra: Sequence) -> dict[str, str] | None:
        try:
            kept, _ = drop_ignored(keys, ignore)
            names = apply_rules({k: k for k in kept}, [*rules, *extra])
            if auto:
                names, _ = auto_unwrap(names, model_keys, extra_prefixes)
            check_collisions(names)
            return names
        except CheckpointError:
            return None

    suggestions = []
    current = mapped([])
    if current is None:
        return []
    score = _fitting(current, model_shapes, ckpt_shapes)
    for _ in range(MAX_SUGGESTED_RULES):
        # Candidates come from the names the new rule will see: after the configured rules, before the unwrap.
        kept, _ = drop_ignored(keys, ignore)
        before_unwrap = apply_rules({k: k for k in kept}, [*rules, *chosen])
        best = None
        for (old, new), _votes in _prefix_candidates(before_unwrap, model_shapes, ckpt_shapes).most_common(_CANDIDATES_TRIED):
            rule = RemapRuleSpec("^" + re.escape(old), new.replace("\\", "\\\\"))
            names = mapped([*chosen, rule])
            gain = -1 if names is None else _fitting(names, model_shapes, ckpt_shapes) - score
            # One key that happens to share a shape is no evidence; a rule must move at least two.
            if gain > (1 if len(keys) > 1 else 0) and (best is None or gain > best[1]):
                best = (rule, gain)
        if best is None:
            break
        chosen.append(best[0])
        score += best[1]
        suggestions.append(RemapSuggestion(pattern=best[0].pattern, replace=best[0].replace, keys=best[1]))
    return suggestions


@dataclass(frozen=True)
class RemapRuleSpec:
    """A rule as `apply_rules` reads it (the shape of a `checkpoint.remap` entry)."""

    pattern: str
    replace: str
