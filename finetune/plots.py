"""curves.png: train/val loss and validation accuracy over steps, from metrics.csv."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from finetune.metrics_log import read_metrics  # noqa: E402


def plot_metrics(metrics_csv: Path, out: Path) -> None:
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in read_metrics(metrics_csv):
        series[(row["split"], row["name"])].append((row["step"], row["value"]))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        if (split, "loss") in series:
            steps, values = zip(*series[(split, "loss")])
            ax_loss.plot(steps, values, style, label=f"{split} loss", markersize=4)
    for name in ("acc", "top5"):
        if ("val", name) in series:
            steps, values = zip(*series[("val", name)])
            ax_acc.plot(steps, values, "o-", label=f"val {name}", markersize=4)
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", title="validation accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


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
