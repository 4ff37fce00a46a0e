"""The provided tasks' metrics, as torchmetrics objects.

Each one sizes itself from the first prediction it sees (no `num_classes` key), accumulates on the
device with no host sync per batch, and is exact under DDP: torchmetrics sums (or concatenates) the
states of all ranks in `compute()`, and the validation sampler gives every sample to one rank only.

Predictions reach `update` class-last: (N, C) logits against (N,) class indices (the task flattens
segmentation and token predictions). `compute()` returns None when a metric does not apply (top-5
accuracy over 5 classes or fewer); the task then does not log it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class Accuracy(Metric):
    """Top-k accuracy of (N, C) logits against (N,) class indices; targets equal to `ignore_index`
    are not counted. With `top_k` ≥ C the metric does not apply (every sample would be correct)."""

    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, top_k: int = 1, ignore_index: int | None = -100, **kwargs):
        super().__init__(**kwargs)
        self.top_k, self.ignore_index = top_k, ignore_index
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("classes", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            preds, target = preds[keep], target[keep]
        classes = preds.shape[-1]
        self.classes = torch.clamp(self.classes, min=classes)
        if self.top_k == 1:
            hits = preds.argmax(dim=-1) == target
        else:
            hits = (preds.topk(min(self.top_k, classes), dim=-1).indices == target[:, None]).any(dim=-1)
        self.correct += hits.sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor | None:
        if self.top_k > 1 and self.classes <= self.top_k:
            return None
        return self.correct.double() / self.total.clamp(min=1)


class Perplexity(Metric):
    """exp(mean cross-entropy per target token) over the whole validation set: exp(val/loss) of a
    causal LM. Targets equal to `ignore_index` (padding) are not counted."""

    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 1.0

    def __init__(self, ignore_index: int = -100, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.nll += F.cross_entropy(preds.float(), target, ignore_index=self.ignore_index, reduction="sum").double()
        self.tokens += (target != self.ignore_index).sum()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp(min=1))


class _ConfusionMatrix(Metric):
    """A C×C confusion matrix (rows: target, columns: prediction) of (N, C) logits, sized on the
    first update; targets equal to `ignore_index` (e.g. segmentation's 255) are not counted."""

    full_state_update = False
    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, ignore_index: int | None = 255, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("confmat", torch.zeros(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        classes = preds.shape[-1]
        if self.confmat.numel() == 0:
            self.confmat = torch.zeros(classes * classes, dtype=torch.long, device=preds.device)
        predicted = preds.argmax(dim=-1)
        keep = (target >= 0) & (target < classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        cells = target[keep] * classes + predicted[keep]
        self.confmat += torch.bincount(cells, minlength=classes * classes)

    def matrix(self) -> torch.Tensor:
        classes = int(round(self.confmat.numel() ** 0.5))
        return self.confmat.reshape(classes, classes).double()


class MeanIoU(_ConfusionMatrix):
    """Mean intersection over union over the classes present in the targets or the predictions."""

    def compute(self) -> torch.Tensor:
        m = self.matrix()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        present = union > 0
        return (inter[present] / union[present]).mean() if present.any() else torch.zeros((), dtype=torch.float64)


class PixelAccuracy(_ConfusionMatrix):
    """Correct pixels over the pixels counted (ignore_index excluded)."""

    def compute(self) -> torch.Tensor:
        m = self.matrix()
        return m.diag().sum() / m.sum().clamp(min=1)


class MultilabelF1(Metric):
    """Macro F1 over labels of (N, C) logits against (N, C) multi-hot targets, a label predicted
    when its probability exceeds `threshold`. Labels never present nor predicted are left out."""

    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if self.tp.numel() == 0:
            self.tp, self.fp, self.fn = (torch.zeros(preds.shape[-1], dtype=torch.long, device=preds.device) for _ in range(3))
        predicted = preds.sigmoid() > self.threshold
        actual = target > 0.5
        self.tp += (predicted & actual).sum(0)
        self.fp += (predicted & ~actual).sum(0)
        self.fn += (~predicted & actual).sum(0)

    def compute(self) -> torch.Tensor:
        denominator = (2 * self.tp + self.fp + self.fn).double()
        counted = denominator > 0
        return (2 * self.tp[counted] / denominator[counted]).mean() if counted.any() else torch.zeros((), dtype=torch.float64)


class MultilabelAveragePrecision(Metric):
    """Macro mean average precision over labels (threshold-free), from every validation score."""

    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.scores.append(preds.float().sigmoid())
        self.labels.append((target > 0.5).long())

    def compute(self) -> torch.Tensor:
        from torchmetrics.functional.classification import multilabel_average_precision

        scores = torch.cat(self.scores) if isinstance(self.scores, list) else self.scores
        labels = torch.cat(self.labels) if isinstance(self.labels, list) else self.labels
        return multilabel_average_precision(scores, labels, num_labels=scores.shape[-1], average="macro")


class MeanAbsoluteError(Metric):
    """Mean absolute error over every target element."""

    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("error", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.error += (preds.double() - target.double()).abs().sum()
        self.count += target.numel()

    def compute(self) -> torch.Tensor:
        return self.error / self.count.clamp(min=1)


class MeanSquaredError(MeanAbsoluteError):
    """Mean squared error over every target element."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.error += (preds.double() - target.double()).square().sum()
        self.count += target.numel()
