"""Dataset factories for configs, beyond what torchvision's classes take directly."""

from __future__ import annotations

import torch
from torch.utils.data import Subset


def imagefolder_split(root: str, split: str, val_fraction: float = 0.2, seed: int = 0, transform=None):
    """One ImageFolder, split into train/val by a seeded permutation: the same files land in the
    same split in every run (and in the train and val configs, which each build their own copy)."""
    from torchvision.datasets import ImageFolder

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    dataset = ImageFolder(root, transform=transform)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(dataset) * val_fraction))
    subset = Subset(dataset, sorted(order[:n_val] if split == "val" else order[n_val:]))
    subset.classes = dataset.classes  # what users look for on an ImageFolder
    return subset
