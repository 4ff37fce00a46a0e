"""curves.png (training curves, panels from the task) and sweep.png (a sweep's results)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from finetune.metrics_log import read_metrics  # noqa: E402

EMA = "ema/"  # trainer.ema's validation metrics: val/ema/<name> (loop.EMA_PREFIX)


@dataclass
class MetricAxis:
    """How one validation metric is drawn: its name (without val/) and the range its values live in."""

    name: str
    lower: float | None = None
    upper: float | None = None

    @property
    def unit_range(self) -> bool:
        return self.lower == 0.0 and self.upper == 1.0


def plot_metrics(metrics_csv: Path, out: Path, loss_label: str = "loss", metrics: list[MetricAxis] = ()) -> None:
    """One loss panel (train and val, and the parts of a dict of losses), one panel for the metrics
    that live in [0, 1] (accuracy, F1, mIoU...), and one panel each for the others (MAE, perplexity).
    Under trainer.ema each validation curve has the EMA's (val/ema/<name>) beside it, dashed, in its colour."""
    from finetune.state import write_atomic

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in read_metrics(metrics_csv):
        series[(row["split"], row["name"])].append((row["step"], row["value"]))
    metrics = [m for m in metrics if ("val", m.name) in series]
    scores = [m for m in metrics if m.unit_range]
    others = [m for m in metrics if not m.unit_range]
    panels = 1 + bool(scores) + len(others)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])

    ax_loss = axes.pop(0)
    known = {("train", "loss"), ("train", "lr")} | {("val", m.name) for m in metrics}
    for split, style in (("train", "-"), ("val", "o-")):
        for (s, name), points in sorted(series.items()):
            if s != split or (name != "loss" and (s, name) in known) or name == "lr" or name.startswith(EMA):
                continue
            steps, values = zip(*points)
            dashed = "--" if name != "loss" else style
            line = ax_loss.plot(steps, values, dashed if split == "train" else style, label=f"{split} {name}", markersize=4)
            if split == "val" and name == "loss":
                plot_ema(ax_loss, series, name, line[0].get_color())
    ax_loss.set(xlabel="optimizer step", ylabel=loss_label, title="loss")
    if scores:
        ax = axes.pop(0)
        for m in scores:
            steps, values = zip(*series[("val", m.name)])
            line = ax.plot(steps, values, "o-", label=f"val {m.name}", markersize=4)
            plot_ema(ax, series, m.name, line[0].get_color())
        ylabel = scores[0].name if len(scores) == 1 else "score"
        ax.set(xlabel="optimizer step", ylabel=ylabel, title="validation " + ", ".join(m.name for m in scores), ylim=(0, 1.02))
    for ax, m in zip(axes, others):
        steps, values = zip(*series[("val", m.name)])
        line = ax.plot(steps, values, "o-", label=f"val {m.name}", markersize=4)
        values = values + plot_ema(ax, series, m.name, line[0].get_color())
        ax.set(xlabel="optimizer step", ylabel=m.name, title=f"validation {m.name}")
        if m.lower is not None and min(values) >= m.lower:
            ax.set_ylim(bottom=m.lower if m.lower == 0.0 else None)
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_ema(ax, series: dict, name: str, color: str) -> tuple[float, ...]:
    """val/ema/<name> beside val/<name>, when trainer.ema logged it; returns its values."""
    points = series.get(("val", EMA + name))
    if not points:
        return ()
    steps, values = zip(*points)
    ax.plot(steps, values, "s--", color=color, label=f"val {name} (EMA)", markersize=4, alpha=0.85)
    return values


def swept_values(rows: list[dict]) -> dict[str, list[str | None]]:
    """override key -> each job's value, for the keys whose value differs between jobs."""
    parsed = []
    for row in rows:
        pairs = (item.split("=", 1) for item in row["overrides"].split() if "=" in item)
        parsed.append({k.lstrip("+~"): v for k, v in pairs if not k.startswith("hydra.")})
    keys = sorted({k for p in parsed for k in p})
    return {k: [p.get(k) for p in parsed] for k in keys if len({p.get(k) for p in parsed}) > 1}


def plot_sweep(rows: list[dict], best: dict | None, out: Path) -> None:
    """sweep.png: the monitored metric of each job, then against each swept setting (up to 3)."""
    from finetune.state import write_atomic

    def score(row):
        try:
            value = float(row.get("best"))
        except (TypeError, ValueError):
            return None
        return None if value != value else value  # NaN: failed

    scores = [score(r) if r["status"] == "completed" else None for r in rows]
    swept = list(swept_values(rows).items())[:3]
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    fig, axes = plt.subplots(1, 1 + len(swept), figsize=(4.5 * (1 + len(swept)), 3.8), squeeze=False)
    axes = axes[0]
    ok = [(i, s) for i, s in enumerate(scores) if s is not None]
    bad = [i for i, s in enumerate(scores) if s is None]
    if ok:
        axes[0].bar([i for i, _ in ok], [s for _, s in ok], color="tab:blue")
    if bad:
        axes[0].scatter(bad, [0.0] * len(bad), marker="x", color="tab:red", s=60, zorder=3, clip_on=False,
                        label="failed / unfinished")
        axes[0].legend(loc="best")
    axes[0].set_xticks(range(len(rows)), [r["job"] for r in rows])
    axes[0].set(xlabel="job", ylabel=metric, title="best per job")
    for ax, (key, values) in zip(axes[1:], swept):
        numeric = all(_is_number(v) for v in values if v is not None)
        labels = sorted({v for v in values if v is not None})
        pts = [(float(v) if numeric else labels.index(v), s, rows[i] is best)
               for i, (v, s) in enumerate(zip(values, scores)) if v is not None and s is not None]
        xs = [x for x, _, _ in pts]
        ax.scatter(xs, [s for _, s, _ in pts], color="tab:blue")
        if numeric:
            if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
            ax.set_xlim(-0.5, len(labels) - 0.5)
        for x, s, is_best in pts:
            if is_best:
                ax.scatter([x], [s], s=160, facecolors="none", edgecolors="tab:orange", linewidths=2, label="best")
                ax.legend(loc="best")
        ax.margins(x=0.1, y=0.15)
        ax.set(xlabel=key, ylabel=metric, title=key)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
