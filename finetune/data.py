"""Datasets by `_target_`, and loaders whose order is a pure function of (seed, epoch).

The training order does not consume the global RNG, so a run resumed mid-epoch sees exactly
the batches (and the random augmentations) that the uninterrupted run would have seen.
Under DDP each rank takes every world_size-th sample of that same order (padded like
torch's DistributedSampler), so N ranks with batch B see the batches one process sees with N×B.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset, Sampler

from finetune.errors import ConfigError, FinetuneError

log = logging.getLogger(__name__)


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


class SampleError(FinetuneError):
    """A sample that cannot be read (a corrupt or truncated image), naming its file."""

    def __init__(self, problem: str, fix: str | None = None, group: str | None = "data"):
        if fix is None and "Original Traceback" in problem:
            # Re-raised by a DataLoader worker as SampleError(<its traceback text>): keep our own lines.
            last = problem.rsplit(f"{type(self).__name__}: ", 1)[-1]
            problem, _, fix = (part.strip() for part in last.partition("\n  fix: "))
        super().__init__(problem, fix or None, group)


def _unreadable(exc: BaseException) -> bool:
    """What decoding a damaged file raises (PIL: OSError for a truncated file, UnidentifiedImageError,
    SyntaxError for a broken PNG chunk, DecompressionBombError); a bug in a dataset is not this."""
    return isinstance(exc, (OSError, SyntaxError, EOFError)) or type(exc).__name__ == "DecompressionBombError"


def sample_source(dataset: Dataset, index: int) -> str:
    """The file behind sample `index` where the dataset says (torchvision's `samples` / `imgs`,
    through Subsets), else its index."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    try:
        return str(samples[index][0])
    except (TypeError, IndexError, KeyError):
        return f"sample {index}"


class CheckedSamples(Dataset):
    """A dataset whose unreadable samples name their file: an error (with the fix), or, with
    `data.skip_bad_samples`, a warning and the next readable sample in its place, counted across
    loader workers in `skipped`."""

    def __init__(self, dataset: Dataset, split: str, skip: bool, workers: int = 0):
        import multiprocessing

        self.dataset, self.split, self.skip = dataset, split, skip
        # The count crosses loader worker processes only through shared memory (a lock-guarded value).
        self._skipped = multiprocessing.get_context().Value("q", 0) if skip and workers else None
        self._skipped_here = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # `classes`, `samples`, ... of the wrapped dataset
        if name.startswith("__") or name in ("dataset", "split", "skip", "_skipped", "_skipped_here"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def skipped(self) -> int:
        return self._skipped.value if self._skipped is not None else self._skipped_here

    def __getitem__(self, index: int):
        for attempt in range(len(self.dataset)):
            current = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[current]
            except Exception as exc:
                if not _unreadable(exc):
                    raise
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if not self.skip:
                    raise SampleError(
                        f"data.{self.split}: {sample_source(self.dataset, current)} cannot be read ({reason}).",
                        "replace or delete the file (a download or copy that was cut short is the usual cause); "
                        "or set data.skip_bad_samples=true to train without unreadable samples (they are counted)",
                    ) from exc
                if self._skipped is None:
                    self._skipped_here += 1
                else:
                    with self._skipped.get_lock():
                        self._skipped.value += 1
                log.warning("data.%s: skipped %s (%s; data.skip_bad_samples)", self.split, sample_source(self.dataset, current), reason)
        raise SampleError(f"data.{self.split}: no sample can be read.", "check the data path and the files' format")


def class_names(dataset: Dataset) -> dict[str, int] | None:
    """The dataset's class -> index map, where it has one (torchvision's `class_to_idx` or `classes`)."""
    mapping = getattr(dataset, "class_to_idx", None)
    if isinstance(mapping, dict):
        return dict(mapping)
    classes = getattr(dataset, "classes", None)
    return {name: i for i, name in enumerate(classes)} if isinstance(classes, (list, tuple)) else None


def check_same_classes(train_set: Dataset, val_set: Dataset) -> None:
    """ImageFolder numbers classes by the sorted folder names of each split separately: a class
    missing from one side shifts every label after it, silently (val acc reads 0.0)."""
    train, val = class_names(train_set), class_names(val_set)
    if train is None or val is None or train == val:
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    sides = ([f"{', '.join(only_train)} only in data.train"] if only_train else []) + \
            ([f"{', '.join(only_val)} only in data.val"] if only_val else [])
    differs = "; ".join(sides) or "the same names numbered differently"
    raise ConfigError(
        f"data.train and data.val name different classes ({differs}): a label would mean one class in "
        "training and another in validation.",
        "give both splits the same class folders, each with at least one sample (or split one folder with "
        "data=imagefolder_split)",
        group="data",
    )


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
    check_same_classes(train_set, val_set)
    train_set = CheckedSamples(train_set, "train", data_cfg.skip_bad_samples, data_cfg.num_workers)
    val_set = CheckedSamples(val_set, "val", data_cfg.skip_bad_samples, data_cfg.num_workers)
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
