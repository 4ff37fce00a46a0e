"""Generated data and tiny models for every provided task (importable as `task_data`).

Each dataset is a learnable function of its inputs, so a few steps of training move the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

FEATURES = 8


def _inputs(n: int, seed: int) -> tuple[torch.Generator, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(n, FEATURES, generator=g)


def multilabel(n: int = 64, seed: int = 0, labels: int = 5) -> Dataset:
    """(x, multi-hot float (labels,)): label j is on when x·w_j > 0."""
    g, x = _inputs(n, seed)
    w = torch.randn(FEATURES, labels, generator=torch.Generator().manual_seed(123))
    return TensorDataset(x, (x @ w > 0).float())


def regression(n: int = 64, seed: int = 0) -> Dataset:
    """(x, float target ()): a linear function plus noise."""
    g, x = _inputs(n, seed)
    w = torch.linspace(-1, 1, FEATURES)
    return TensorDataset(x, x @ w + 0.05 * torch.randn(n, generator=g))


def segmentation(n: int = 16, seed: int = 0, size: int = 16, classes: int = 3) -> Dataset:
    """(image (3, H, W), mask (H, W) long): the class of a pixel is its brightest channel; a border
    of 255 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    masks = images[:, :classes].argmax(dim=1)
    masks[:, 0, :] = 255
    masks[:, :, 0] = 255
    return TensorDataset(images, masks)


class TokenDataset(Dataset):
    """Dict samples {input_ids, attention_mask, labels} of a counting language (next = current + 1 mod
    vocab), variable lengths right-padded to `length` (pad id 0, labels -100 on padding)."""

    def __init__(self, n: int = 48, seed: int = 0, vocab: int = 11, length: int = 12):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            size = int(torch.randint(4, length + 1, (), generator=g))
            start = int(torch.randint(1, vocab, (), generator=g))
            ids = (start + torch.arange(length)) % (vocab - 1) + 1  # ids 1..vocab-1; 0 is padding
            mask = torch.arange(length) < size
            self.samples.append({"input_ids": torch.where(mask, ids, 0), "attention_mask": mask.long(),
                                 "labels": torch.where(mask, ids, -100)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class DictClassification(Dataset):
    """Dict samples {features, labels}: the classification data of `tiny`, keyword style."""

    def __init__(self, n: int = 64, seed: int = 0, classes: int = 3):
        g, self.x = _inputs(n, seed)
        self.y = (self.x[:, :classes]).argmax(dim=1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.x[index], "labels": self.y[index]}


def mlp(out_features: int, in_features: int = FEATURES, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class TinySegNet(nn.Module):
    """Returns {"out": logits (B, C, H, W)} like torchvision's segmentation models."""

    def __init__(self, classes: int = 3, width: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": self.classifier(self.backbone(x))}


@dataclass
class LMOutput:
    """Like transformers' ModelOutput: a dataclass with `logits` (and `loss` when labels are given)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class TinyLM(nn.Module):
    """Embedding → MLP → vocabulary, called with keywords; computes its own shifted loss with labels."""

    def __init__(self, vocab: int = 11, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None) -> LMOutput:
        logits = self.lm_head(self.body(self.embed(input_ids)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return LMOutput(logits=logits, loss=loss)


class KeywordNet(nn.Module):
    """Classification called with a keyword (`features=`), returning {"logits": ...}."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.net = mlp(classes)

    def forward(self, features: torch.Tensor) -> dict:
        return {"logits": self.net(features)}


class TwoLossNet(nn.Module):
    """Computes a dict of losses itself (detection-style): {"loss_cls", "loss_reg"}."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.net = mlp(classes + 1)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        out = self.net(features)
        return {"loss_cls": nn.functional.cross_entropy(out[:, :-1], labels),
                "loss_reg": out[:, -1].square().mean()}
