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
                    ) from exc
                changed += 1
        if changed == 0:
            sample = ", ".join(list(current.values())[:3])
            raise CheckpointError(
                f"checkpoint.remap[{i}] (pattern {rule.pattern!r}) matches no checkpoint key.",
                f"fix the pattern or remove the rule; keys at this point look like: {sample}",
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
