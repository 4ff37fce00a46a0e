"""Names as users write them: one meaning of a glob, and one answer when a name matches nothing.

A glob is `fnmatch` over a dotted name, and it also covers everything under it: `layer1` matches
`layer1`, `layer1.0.conv1.weight` and the rest of `layer1.*`. The same rule holds wherever a glob
is read: `policy.freeze` / `train` / `groups` / `unfreeze` / `allow_no_grad`,
`checkpoint.expect.missing` / `unexpected` and `checkpoint.shape_overrides`.

Every glob a user writes must match something: one that matches nothing is a typo, not a policy,
and the error names the closest names that exist.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Iterable, Sequence

from finetune.errors import ConfigError


def glob_matches(glob: str, name: str) -> bool:
    """`name` is `glob`, or lies under it (`glob.*`)."""
    return fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(name, glob + ".*")


def matching(globs: Iterable[str], names: Iterable[str]) -> list[str]:
    """The names any of `globs` matches, in the order of `names`."""
    globs = list(globs)
    return [n for n in names if any(glob_matches(g, n) for g in globs)]


def module_prefixes(names: Iterable[str]) -> list[str]:
    """Every dotted prefix of the names (`a.b.c` gives `a`, `a.b`, `a.b.c`), sorted."""
    return sorted({".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)})


def closest_names(query: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Names (and module prefixes of names) that look most like `query`, best first."""
    literal = query.rstrip(".*") or query
    candidates = module_prefixes(names)
    close = difflib.get_close_matches(literal, candidates, n=n, cutoff=0.4)
    if not close:  # a glob's literal head (`blocks.1` of `blocks.1*.attn`) may still say where to look
        head = literal.split("*")[0].split("?")[0].split("[")[0].rstrip(".")
        close = [c for c in candidates if head and c.startswith(head)][:n]
    return close


def listed(names: Sequence[str], limit: int = 8) -> str:
    """Names for a message: the first `limit`, then how many there are in all."""
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def no_match_hint(query: str, names: Sequence[str], what: str) -> str:
    close = closest_names(query, names)
    if close:
        return f"closest {what} names: {', '.join(close)}"
    return f"{what} names look like: {', '.join(list(names)[:3])}"


def require_matches(globs: Iterable[str], names: Sequence[str], where: str, what: str = "parameter",
                    error: type[ConfigError] = ConfigError) -> set[str]:
    """The names matched by any glob; a glob that matches none raises `error` naming the closest names."""
    matched: set[str] = set()
    for glob in globs:
        hits = {n for n in names if glob_matches(glob, n)}
        if not hits:
            raise error(
                f"{where}: glob {glob!r} matches no {what}.",
                no_match_hint(glob, names, what)
                + " (globs are fnmatch over dotted names; 'layer1' also covers everything under it, 'layer1.*')",
                group=where.split(".", 1)[0],
            )
        matched |= hits
    return matched
