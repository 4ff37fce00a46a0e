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
