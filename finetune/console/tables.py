"""Console presentation: the load report, the trainability plan and a checkpoint's tensors as
tables grouped by module.

Keys are grouped by module prefix with layer indices compressed (`layer{1..4}.*`), so a
ResNet-50 fits on one screen; the JSON files keep every key. Output goes through the
`finetune.report` logger, so it lands on the console and in Hydra's job log.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

from finetune.checkpoint.report import LoadReport, Mismatch
from finetune.policy import TrainPlan

log = logging.getLogger("finetune.report")
_TRAILING_NUMBER = re.compile(r"^(.*?)(\d+)$")
MAX_ROWS = 14


def _pattern(parts: Sequence[str]) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
    shape, numbers = [], []
    for part in parts:
        m = _TRAILING_NUMBER.match(part)
        shape.append(m.group(1) + "#" if m else part)
        numbers.append(int(m.group(2)) if m else None)
    return tuple(shape), tuple(numbers)


def _format_numbers(values: set[int]) -> str:
    ordered = sorted(values)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    return "{" + ",".join(map(str, ordered)) + "}"


def _groups_at(keys: list[str], depth: int, category: Callable[[str], str], leaves: bool = False) -> list[tuple[str, str, list[str]]]:
    """(label, category, keys) for keys grouped by their first `depth` dotted parts, indices
    compressed. Without `leaves`, a group stops at the module (never the parameter name)."""
    groups: OrderedDict[tuple, list] = OrderedDict()
    for key in keys:
        parts = key.split(".")
        shape, numbers = _pattern(parts[:depth] if leaves else parts[: min(depth, len(parts) - 1)] or parts[:1])
        groups.setdefault((shape, category(key)), []).append((numbers, key))
    out = []
    for (shape, cat), members in groups.items():
        label_parts = []
        for i, part in enumerate(shape):
            values = {nums[i] for nums, _ in members if nums[i] is not None}
            label_parts.append(part.replace("#", _format_numbers(values)) if values else part)
        is_leaf = all(len(k.split(".")) == len(shape) for _, k in members)
        out.append((".".join(label_parts) + ("" if is_leaf else ".*"), cat, [k for _, k in members]))
    return out


def _split_mixed(keys: list[str], depth: int, category: Callable[[str], str], out: "OrderedDict[str, list[str]]",
                 leaves: bool = False) -> None:
    """Place groups in `out`; where one label would hold keys of different categories, go deeper
    (down to single parameters if need be)."""
    groups = _groups_at(keys, depth, category, leaves)
    categories: dict[str, set] = {}
    for label, cat, _ in groups:
        categories.setdefault(label, set()).add(cat)
    deepest = max(len(k.split(".")) for k in keys)
    done: set[str] = set()
    for label, _, members in groups:
        if len(categories[label]) > 1 and depth < deepest:
            if label not in done:  # split all keys under this label together, one level deeper
                done.add(label)
                _split_mixed([k for lb, _, ms in groups if lb == label for k in ms], depth + 1, category, out, leaves=True)
        else:
            out.setdefault(label, []).extend(members)


def group_keys(keys: Iterable[str], category: Callable[[str], str] | None = None) -> "OrderedDict[str, list[str]]":
    """Group dotted keys by module prefix, compressing indices (`layer{1..4}.*`).

    Keys of different `category` (loaded/missing, trainable/frozen) never share a row: where a
    module mixes them, its row splits one level deeper. The prefix depth grows while the
    table stays short and has fewer than 3 rows.
    """
    keys = list(keys)
    if not keys:
        return OrderedDict()
    category = category or (lambda _key: "")
    depth, rows = 1, 0
    for candidate in (1, 2, 3):
        count = len({label for label, _, _ in _groups_at(keys, candidate, category)})
        if rows and count > MAX_ROWS:
            break
        depth, rows = candidate, count
        if count >= 3:
            break
    out: OrderedDict[str, list[str]] = OrderedDict()
    _split_mixed(keys, depth, category, out)
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns aligned: the first `left` to the left (names), the rest to the right (numbers)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(["  " + fmt(headers), "  " + rule, *("  " + fmt(r) for r in rows)])


def human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def _sample(mapping: dict[str, str], n: int = 2) -> str:
    return ", ".join(f"{a} -> {b}" for a, b in list(mapping.items())[:n])


def _under(keys: list[str]) -> str:
    """`adapter2.*` for keys that all lie under `adapter2` (one op's module); a lora op's tensors by
    module (`blocks.{0..11}.attn.qkv.lora_*`); else their groups."""
    if all(is_adapter_key(k) for k in keys):
        return ", ".join(label for label, _ in adapter_groups(keys))
    common = []
    for parts in zip(*(k.split(".") for k in keys)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    depth = len(common) if all(len(k.split(".")) > len(common) for k in keys) else 0
    return ".".join(common[:depth]) + ".*" if depth else ", ".join(group_keys(keys))


def _by_rule(declared: dict[str, str]) -> "OrderedDict[str, list[str]]":
    out: OrderedDict[str, list[str]] = OrderedDict()
    for key, rule in declared.items():
        out.setdefault(rule, []).append(key)
    return out


ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude")  # adapters.LORA_PARAMS: the console does not import the model


def is_adapter_key(key: str) -> bool:
    return key.rpartition(".")[2] in ADAPTER_LEAVES


def adapter_groups(keys: Iterable[str], category: Callable[[str], str] | None = None,
                   rule_of: Callable[[str], str | None] | None = None) -> list[tuple[str, list[str]]]:
    """LoRA tensors grouped by the op that made them and the modules they sit in, indices
    compressed: (`blocks.{0..11}.attn.qkv.lora_* (model.add[0] lora)`, keys). Where tensors of one
    pattern differ in `category` (loaded or missing, trainable or not), they get rows of their own."""
    category = category or (lambda _key: "")
    rule_of = rule_of or (lambda _key: None)
    by_rule: OrderedDict[str | None, OrderedDict[str, list[str]]] = OrderedDict()
    for key in keys:
        by_rule.setdefault(rule_of(key), OrderedDict()).setdefault(key.rpartition(".")[0], []).append(key)
    out = []
    for rule, modules in by_rule.items():
        kind = {m: "|".join(sorted({category(k) for k in members})) for m, members in modules.items()}
        depth = max(len(m.split(".")) for m in modules)
        for label, _, names in _groups_at(list(modules), depth, kind.get, leaves=True):
            members = [k for m in names for k in modules[m]]
            leaves = sorted({k.rpartition(".")[2] for k in members})
            leaf = "lora_*" if len(leaves) > 1 else leaves[0]
            out.append((f"{label}.{leaf}" + (f" ({_short_rule(rule)})" if rule else ""), members))
    return out


def _short_rule(rule: str) -> str:
    """`model.add[0] (lora blocks.*.attn.qkv)` -> `model.add[0] lora`."""
    head, _, rest = rule.partition(" (")
    return f"{head} {rest.split(' ', 1)[0]}" if rest else head


def format_load_report(report: LoadReport) -> str:
    status: dict[str, str] = {k: "loaded" for k in report.loaded}
    status.update({k: "missing" for k in report.missing})
    status.update({m.key: m.action for m in report.mismatched})
    remapped_targets = set(report.remapped.values())
    rows = []
    adapters = [k for k in status if is_adapter_key(k)]
    groups = list(group_keys([k for k in status if not is_adapter_key(k)], status.get).items())
    groups += adapter_groups(adapters, status.get, report.declared.get)
    for label, keys in groups:
        count = lambda s: sum(1 for k in keys if status[k] == s) or ""
        rows.append([label, len(keys), count("loaded"), count("missing"), count("skipped"), count("adapted"),
                     sum(1 for k in keys if k in remapped_targets) or ""])
    c = report.counts
    lines = [
        f"Load report: {report.checkpoint}{f' + {len(report.files) - 1} more' if report.files else ''} ({report.format}{', entry ' + repr(report.selected) if report.selected else ''})",
        f"  {c['loaded']} loaded, {c['missing']} missing (new), {c['mismatched']} mismatched, "
        f"{c['unexpected']} unexpected, {c['ignored']} ignored, {c['remapped']} remapped",
        _table(["model keys", "keys", "loaded", "missing", "skipped", "adapted", "remapped"], rows),
    ]
    for i, part in enumerate(report.files):
        counts = part["counts"]
        filled = ", ".join(group_keys(part["loaded"])) if i else f"{counts['loaded']} keys"
        lines.append(f"  checkpoint.path[{i}] {part['checkpoint']} -- {part['format']}: {counts['loaded']} loaded "
                     f"({filled}), {counts['remapped']} renamed, {counts['unexpected']} unexpected")
    for m in report.mismatched:
        by = f" by {m.rule}" if m.rule != Mismatch.rule else ""
        lines.append(f"  mismatched {m.key}: checkpoint {m.checkpoint_shape} -> model {m.model_shape}: {m.action}{by} ({m.detail})")
    for rule, keys in _by_rule(report.declared).items():
        missing = [k for k in keys if k not in set(report.unexpected)]
        unused = [k for k in keys if k in set(report.unexpected)]
        parts = ([f"{_under(missing)} new ({len(missing)} missing)"] if missing else []) + \
                ([f"{_under(unused)} of the replaced module unused ({len(unused)} unexpected)"] if unused else [])
        lines.append(f"  declared by {rule}: {'; '.join(parts)}")
    if report.unexpected:
        groups = group_keys(report.unexpected)
        lines.append("  unexpected (in the checkpoint, unused): " + ", ".join(f"{g} ({len(k)})" for g, k in groups.items()))
    if report.ignored:
        groups = group_keys(report.ignored)
        lines.append("  ignored by checkpoint.ignore: " + ", ".join(f"{g} ({len(k)})" for g, k in groups.items()))
    if report.remapped:
        how = f"automatic unwrap of {', '.join(repr(p) for p in report.unwrapped)}" if report.unwrapped else "checkpoint.remap"
        lines.append(f"  remapped {len(report.remapped)} keys ({how}; rules first), e.g. {_sample(report.remapped)}")
    if report.casts:
        lines.append(f"  cast {len(report.casts)} tensors to the model's dtype, e.g. {_sample(report.casts, 1)}")
    for s in report.suggestions:
        lines.append(f"  suggestion (verified): remap rule {{pattern: '{s.pattern}', replace: '{s.replace}'}} "
                     f"makes {s.keys} more checkpoint key{'s' if s.keys != 1 else ''} load")
    for key, twin in report.tied.items():
        lines.append(f"  tied: {key} is {twin} in the model, loaded through it")
    if report.nonfinite:
        lines.append("  non-finite (NaN/Inf) values in: " + ", ".join(f"{k} ({n})" for k, n in report.nonfinite.items()))
    for w in report.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


FROZEN_BY = {"model": "by the model", "policy.freeze": "policy.freeze", "policy.new": "policy.new"}


def _trainability_row(label: str, params: list) -> list[str]:
    trainable = sum(p.numel for p in params if p.trainable)
    frozen = sum(p.numel for p in params if not p.trainable)
    sources = sorted({p.source for p in params})
    lrs = sorted({p.lr for p in params if p.lr is not None})
    why = sorted({FROZEN_BY[p.frozen_by] for p in params if p.frozen_by})
    return [label, human(trainable + frozen), human(trainable) if trainable else "",
            (human(frozen) + (f" ({', '.join(why)})" if why else "")) if frozen else "",
            "/".join(sources), ", ".join(f"{lr:.2g}" for lr in lrs) or "-"]


def _plan_kind(p) -> str:
    return f"{p.trainable}/{p.source}/{p.lr}/{p.frozen_by}"


def _adapter_rows(params: list) -> list[list[str]]:
    """One row per lora op and wrapped-module pattern, indices compressed:
    `blocks.{0..11}.attn.qkv.lora_* (model.add[0] lora)`; rows split where their tensors differ
    (trainable or not, source, lr)."""
    by_name = {p.name: p for p in params}
    groups = adapter_groups(by_name, lambda n: _plan_kind(by_name[n]), lambda n: by_name[n].added_by)
    return [_trainability_row(label, [by_name[n] for n in names]) for label, names in groups]


def _adapter_line(plan: TrainPlan, total: int) -> str | None:
    adapters = [p for p in plan.params if p.added_by]
    if not adapters:
        return None
    parts = []
    for rule in dict.fromkeys(p.added_by for p in adapters):
        mine = [p for p in adapters if p.added_by == rule]
        modules = len({p.name.rpartition(".")[0] for p in mine})
        parts.append(f"{rule}: {human(sum(p.numel for p in mine))} on {modules} module{'s' if modules != 1 else ''}")
    numel = sum(p.numel for p in adapters)
    return f"  adapters: {'; '.join(parts)} -- {human(numel)} parameters, {100 * numel / max(1, total):.2f}% of the model"


def _module_rows(params: list) -> list[list[str]]:
    """Rows by module prefix (indices compressed), split where trainability, source or lr differ;
    adapters by the op that made them."""
    by_name = {p.name: p for p in params if not p.added_by}
    kind = lambda n: _plan_kind(by_name[n])  # noqa: E731
    rows = [_trainability_row(label, [by_name[n] for n in names]) for label, names in group_keys(by_name, kind).items()]
    return rows + _adapter_rows([p for p in params if p.added_by])


def _depth_label(keys: list[str], limit: int = 4) -> str:
    """The modules at one depth: their common prefix (`blocks.3.*`), else each module's first two
    parts (`blocks.11.*, norm.*`)."""
    common = []
    for parts in zip(*(k.split(".") for k in keys)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if common and all(len(k.split(".")) > len(common) for k in keys):
        return ".".join(common) + ".*"
    labels = [label for label, _, _ in _groups_at(keys, 2, lambda _key: "")]
    return ", ".join(labels[:limit]) + (f", ... ({len(labels) - limit} more)" if len(labels) > limit else "")


def _depth_rows(plan: TrainPlan) -> list[list[str]]:
    """policy.layer_decay: one row per depth, input to output, with its lr factor; then the new
    parameters (no depth), by module."""
    decay = plan.layer_decay
    rows = []
    for depth in range(decay.max_depth + 1):
        members = [p for p in plan.params if p.depth == depth]
        if members:
            rows.append([str(depth), *_trainability_row(_depth_label([p.name for p in members]), members),
                         f"{decay.scale(depth):.3g}"])
    rows += [["-", *row, "new"] for row in _module_rows([p for p in plan.params if p.depth is None])]
    return rows


def _groups_line(plan: TrainPlan) -> str:
    if plan.layer_decay is not None and len(plan.groups) > 6:  # one per depth: the table shows their lrs
        lrs = [g.lr for g in plan.groups]
        return (f"  optimizer groups: {len(plan.groups)} (one per group, depth and weight decay; lr {min(lrs):.3g} .. "
                f"{max(lrs):.3g}; each parameter's in trainability.json)")
    return "  optimizer groups: " + "; ".join(f"{g.name} ({len(g.params)} tensor{'s' if len(g.params) != 1 else ''}, lr {g.lr:.3g}, wd {g.weight_decay:g})" for g in plan.groups)


def format_trainability(plan: TrainPlan) -> str:
    totals = plan.totals()
    by_source = ", ".join(f"{src}: {human(v['trainable'])} trainable / {human(v['frozen'])} frozen" for src, v in totals["by_source"].items())
    headers = ["parameters", "numel", "trainable", "frozen", "source", "lr"]
    if plan.layer_decay is not None:
        table = _table(["depth", *headers, "lr ×"], _depth_rows(plan), left=2)
    else:
        table = _table(headers, _module_rows(plan.params))
    lines = [
        f"Trainability: {human(totals['trainable'])} of {human(totals['params'])} parameters train "
        f"({100 * totals['trainable'] / max(1, totals['params']):.1f}%); {by_source}",
        table,
        _groups_line(plan),
    ]
    if plan.layer_decay is not None:
        d = plan.layer_decay
        lines.append(f"  layer decay {d.decay:g}: depths 0..{d.max_depth} from {d.depth_from}; lr × {d.decay:g}^({d.max_depth} − depth); "
                     "new parameters (depth -) keep policy.new_lr_mult")
    adapter_line = _adapter_line(plan, totals["params"])
    if adapter_line:
        lines.append(adapter_line)
    if plan.frozen_norms:
        lines.append(f"  norm layers kept in eval mode (policy.bn=freeze_stats): {len(plan.frozen_norms)}")
    held = [p for p in plan.params if p.frozen_by == "model"]
    if held:
        lines.append(f"  frozen by the model: {len(held)} tensor{'s' if len(held) != 1 else ''} came with requires_grad=False and stay frozen "
                     f"({', '.join(group_keys({p.name: p for p in held}))}); name them in policy.train to train them")
    if plan.model_no_weight_decay:
        lines.append(f"  no weight decay, as the model's no_weight_decay() asks: {', '.join(plan.model_no_weight_decay)}")
    for overlap in plan.overlaps:
        what = f"{len(overlap.params)} tensor{'s' if len(overlap.params) != 1 else ''} ({', '.join(group_keys(overlap.params))})"
        if overlap.winner == "new":
            lines.append(f"  policy.{overlap.loser} also matches {what} that are new: they take policy.new_lr_mult "
                         "(a group takes new parameters only through a glob that matches nothing else)")
        else:
            lines.append(f"  policy.{overlap.loser} also matches {what} that go to policy.{overlap.winner}: the narrowest glob wins")
    return "\n".join(lines)


def format_zero_grad_settled(audit) -> str:
    """The gradient audit's re-check, once every exactly-zero gradient of step 1 has turned
    non-zero (audit.GradAudit): one line, the tensors grouped by module."""
    cleared = audit.zero_grad_cleared_at
    by = max(cleared.values(), default=audit.zero_grad_checked_to)
    groups = ", ".join(group_keys(cleared))
    return (f"gradient audit: {len(cleared)} trainable tensor{'s' if len(cleared) != 1 else ''} exactly zero on step 1, "
            f"non-zero by step {by} (zero-initialised paths that opened): {groups}")


def format_tensor_listing(path: str, fmt: str, infos: Sequence) -> str:
    """A checkpoint's tensors (inspection.TensorInfo: name, shape, dtype, numel, bytes) by prefix."""
    by_name = {i.name: i for i in infos}
    rows = []
    for label, names in group_keys(by_name).items():
        members = [by_name[n] for n in names]
        dtypes = sorted({m.dtype for m in members})
        example = members[0]
        rows.append([label, len(members), human(sum(m.numel for m in members)), f"{sum(m.bytes for m in members) / 2**20:.2f} MiB",
                     "/".join(dtypes), f"{example.name.split('.')[-1]} {example.shape}"])
    total = sum(i.bytes for i in infos)
    head = f"{path} ({fmt}): {len(infos)} tensors, {human(sum(i.numel for i in infos))} elements, {total / 2**20:.2f} MiB"
    return head + "\n" + _table(["prefix", "tensors", "numel", "size", "dtype", "e.g."], rows)


def format_export_report(report) -> str:
    """export.ExportReport: one row per artifact, its largest output difference against the trained
    model, what was allowed, and each metric as trained / exported."""
    metric_names = list(dict.fromkeys(k for a in report.artifacts for k in a.metrics))
    rows = []
    for a in report.artifacts:
        if a.ok is None:
            rows.append([a.file, "-", "-", *["-"] * len(metric_names), f"not verified: {a.note}"])
            continue
        allowed = a.tolerance or report.tolerance
        rows.append([a.file, f"{a.max_abs_diff:.1e}", f"{allowed * a.output_scale:.1e}",
                     *(f"{a.metrics[k][0]:.4g} / {a.metrics[k][1]:.4g}" if k in a.metrics else "-" for k in metric_names),
                     "verified" if a.ok else "FAILED"])
    head = (f"Export: {len(report.artifacts)} artifact(s) run over {report.batches} validation batches beside the trained "
            f"model; allowed difference {report.tolerance:g} x the trained model's largest output")
    lines = [head]
    if rows:
        lines.append(_table(["artifact", "max |diff|", "allowed", *(f"{k} trained / exported" for k in metric_names), ""], rows))
    lines += [f"  not written: {s['file']}: {s['reason']}" for s in report.skipped]
    return "\n".join(lines)


def show(text: str) -> None:
    log.info("%s", text)
