"""Datasets by `_target_`, and loaders whose order is a pure function of (seed, epoch).

The training order does not consume the global RNG, so a run resumed mid-epoch sees exactly
the batches (and the random augmentations) that the uninterrupted run would have seen.
Under DDP each rank takes every world_size-th sample of that same order (padded like
torch's DistributedSampler), so N ranks with batch B see the batches one process sees with N×B.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.errors import ConfigError, FinetuneError


class EpochSampler(Sampler[int]):
    """A permutation of the dataset drawn from (seed, epoch), this rank's share of it, and `start`
    to skip the samples of that share already seen.

    With several ranks the permutation is padded with its own first samples to a multiple of
    `world_size` (as DistributedSampler does), so every rank gets the same number of samples
    and takes the same number of steps; the padded samples are trained on twice in that epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        if self.world_size > 1:
            total = self.per_rank * self.world_size
            order = order.repeat(math.ceil(total / self.size))[:total][self.rank::self.world_size]
        return iter(order[self.start:].tolist())

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        return self.per_rank - self.start


class ShardSampler(Sampler[int]):
    """Evaluation order: every world_size-th sample from `rank`, no padding, so across ranks
    every sample is counted exactly once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_dataset(spec, split: str) -> Dataset:
    if spec is None or "_target_" not in spec:
        raise ConfigError(f"data.{split} has no `_target_`.", f"give a dataset factory, e.g. data.{split}={{_target_: torchvision.datasets.ImageFolder, root: ...}}")
    try:
        dataset = instantiate(spec, _convert_="all")
    except (InstantiationException, OmegaConfBaseException) as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, FinetuneError):  # the factory's own message names the problem and the fix
            raise cause from None
        if isinstance(exc, OmegaConfBaseException):
            raise ConfigError(f"data.{split}: {str(exc).splitlines()[0]}", "set the missing value, e.g. data.root=/path/to/images") from exc
        raise ConfigError(
            f"could not build data.{split} ({spec['_target_']}): {type(cause).__name__}: {cause}",
            f"check data.{split} (paths are relative to the directory you launched from)",
        ) from exc
    if len(dataset) == 0:
        raise ConfigError(f"data.{split} ({spec['_target_']}) is empty.", f"point data.{split} at a folder with samples")
    return dataset


def build_collate(spec):
    """data.collate: a `_target_` that returns a collate_fn (samples -> batch); null: torch's default."""
    if spec is None:
        return None
    try:
        collate = instantiate(spec, _convert_="all")
    except (InstantiationException, OmegaConfBaseException) as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, FinetuneError):
            raise cause from None
        raise ConfigError(f"could not build data.collate: {type(cause).__name__}: {cause}",
                          "give data.collate a _target_ returning a callable, e.g. {_target_: mypkg.PadCollate, _partial_: ...}") from exc
    if not callable(collate):
        raise ConfigError(f"data.collate built a {type(collate).__name__}, which is not callable.",
                          "point data.collate at a class with __call__(samples) or use _partial_: true on a function")
    return collate


def build_loaders(data_cfg, seed: int, pin_memory: bool, rank: int = 0,
                  world_size: int = 1) -> tuple[DataLoader, DataLoader, EpochSampler]:
    """`data.batch_size` is per process: under DDP the global batch is batch_size × world_size."""
    train_set = build_dataset(data_cfg.train, "train")
    val_set = build_dataset(data_cfg.val, "val")
    sampler = EpochSampler(len(train_set), seed, rank=rank, world_size=world_size)
    common = dict(
        batch_size=data_cfg.batch_size,
        num_workers=data_cfg.num_workers,
        pin_memory=pin_memory,
        persistent_workers=data_cfg.persistent_workers and data_cfg.num_workers > 0,
        collate_fn=build_collate(data_cfg.get("collate")),
    )
    # Own generators: creating a loader iterator must not draw from the global RNG. They seed the
    # loader workers' augmentations, which then differ between ranks (rank 0's: as one process).
    train = DataLoader(train_set, sampler=sampler, generator=torch.Generator().manual_seed(seed + rank), **common)
    val = DataLoader(val_set, sampler=ShardSampler(len(val_set), rank, world_size),
                     generator=torch.Generator().manual_seed(seed + rank), **common)
    return train, val, sampler
