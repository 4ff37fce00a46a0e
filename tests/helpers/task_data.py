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

    def __init__(self, vocab: int = 11, width: int = 16, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.lm_head = nn.Linear(width, vocab)
        if tie:  # input and output embeddings are one tensor, as in GPT-2
            self.lm_head.weight = self.embed.weight

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


# ---- evaluation of every provided task, for one process and for 2 ranks -----------------------

def load_task_config(name: str):
    """conf/task/<name>.yaml validated by the task schema, as the run composes it."""
    from omegaconf import OmegaConf

    from finetune.config import TaskConfig
    from finetune.paths import config_dir

    return OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(f"{config_dir()}/task/{name}.yaml"))


def _evaluation_cases() -> dict:
    """task name -> (model, validation set): sizes that do not divide by 2 ranks or by the batch."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(41, FEATURES, generator=g)
    classes = TensorDataset(x, torch.randint(0, 7, (41,), generator=g))
    return {
        "classification": (mlp(7), classes),
        "multilabel": (mlp(5), multilabel(41, seed=3)),
        "regression": (mlp(1), regression(41, seed=4)),
        "segmentation": (TinySegNet(), segmentation(13, seed=2)),
        "causal_lm": (TinyLM(), TokenDataset(n=23, seed=6)),
    }


def evaluate_every_task(world) -> dict:
    """finetune.loop.evaluate of each provided task on this rank's validation shard (every rank
    builds the same models: the same seed)."""
    from torch.utils.data import DataLoader

    from finetune.config import Precision
    from finetune.data import ShardSampler
    from finetune.loop import evaluate
    from finetune.task import Task

    results = {}
    for name, (model, val) in _evaluation_cases().items():
        loader = DataLoader(val, batch_size=4, sampler=ShardSampler(len(val), world.rank, world.size))
        task = Task.from_config(load_task_config(name), name)
        results[name] = evaluate(model, loader, task, torch.device("cpu"), Precision.fp32, world)
    return results
