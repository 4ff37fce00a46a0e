"""Datasets by `_target_`, and loaders whose order is a pure function of (seed, epoch).

The training order does not consume the global RNG, so a run resumed mid-epoch sees exactly
the batches (and the random augmentations) that the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Iterator

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.errors import ConfigError


class EpochSampler(Sampler[int]):
    """A permutation of the dataset drawn from (seed, epoch); `start` skips samples already seen."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.start, self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return self.size - self.start


def build_dataset(spec, split: str) -> Dataset:
    if spec is None or "_target_" not in spec:
        raise ConfigError(f"data.{split} has no `_target_`.", f"give a dataset factory, e.g. data.{split}={{_target_: torchvision.datasets.ImageFolder, root: ...}}")
    try:
        dataset = instantiate(spec, _convert_="all")
    except (InstantiationException, OmegaConfBaseException) as exc:
        cause = exc.__cause__ or exc
        if isinstance(exc, OmegaConfBaseException):
            raise ConfigError(f"data.{split}: {str(exc).splitlines()[0]}", "set the missing value, e.g. data.root=/path/to/images") from exc
        raise ConfigError(
            f"could not build data.{split} ({spec['_target_']}): {type(cause).__name__}: {cause}",
            f"check data.{split} (paths are relative to the directory you launched from)",
        ) from exc
    if len(dataset) == 0:
        raise ConfigError(f"data.{split} ({spec['_target_']}) is empty.", f"point data.{split} at a folder with samples")
    return dataset


def build_loaders(data_cfg, seed: int, pin_memory: bool) -> tuple[DataLoader, DataLoader, EpochSampler]:
    train_set = build_dataset(data_cfg.train, "train")
    val_set = build_dataset(data_cfg.val, "val")
    sampler = EpochSampler(len(train_set), seed)
    common = dict(
        batch_size=data_cfg.batch_size,
        num_workers=data_cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=data_cfg.persistent_workers and data_cfg.num_workers > 0,
    )
    # Own generators: creating a loader iterator must not draw from the global RNG.
    train = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(seed), **common)
    val = DataLoader(val_set, shuffle=False, generator=torch.Generator().manual_seed(seed), **common)
    return train, val, sampler
