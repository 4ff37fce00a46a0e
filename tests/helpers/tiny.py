"""Tiny models and data for the tests: importable as `tiny` (conftest puts this folder on sys.path;
subprocess tests put it on PYTHONPATH), so configs can name `_target_: tiny.TinyNet`."""

from __future__ import annotations

import os
import signal

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

IN_FEATURES = 8
HIDDEN = 16
CLASSES_A = 4  # model A's head (the checkpoint)
CLASSES_B = 3  # model B's head and the tiny dataset's labels


class TinyNet(nn.Module):
    """Model A: an MLP with a BatchNorm, module names like a CNN's (`layer1`, `layer2`, `head`)."""

    def __init__(self, in_features: int = IN_FEATURES, hidden: int = HIDDEN, num_classes: int = CLASSES_A):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(x)))


class TinyNetUnused(TinyNet):
    """TinyNet with a module created in __init__ but never called in forward (a wiring bug)."""

    def __init__(self, in_features: int = IN_FEATURES, hidden: int = HIDDEN, num_classes: int = CLASSES_B):
        super().__init__(in_features, hidden, num_classes)
        self.unused = nn.Linear(hidden, hidden)


class LowRank(nn.Module):
    """LoRA-like: base(x) + x @ A^T @ B^T with B zero-initialised (the output is base's at the start),
    so A gets an exactly-zero gradient on step 1, and a non-zero one once B has moved."""

    def __init__(self, in_features: int, out_features: int, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.lora_a = nn.Parameter(torch.randn(rank, in_features) / rank)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


class TinyNetLowRank(TinyNet):
    """TinyNet whose layer2 Linear is a LowRank (zero-initialised B)."""

    def __init__(self, in_features: int = IN_FEATURES, hidden: int = HIDDEN, num_classes: int = CLASSES_B):
        super().__init__(in_features, hidden, num_classes)
        self.layer2[0] = LowRank(hidden, hidden)


class GatedBranch(nn.Module):
    """`x + gate * branch(x)` with `gate` a zero-initialised scalar Parameter (ReZero, LayerScale at 0)."""

    def __init__(self, features: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, features))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.branch(x)


class TinyNetGated(TinyNet):
    """TinyNet with a zero-gated residual branch after layer2."""

    def __init__(self, in_features: int = IN_FEATURES, hidden: int = HIDDEN, num_classes: int = CLASSES_B):
        super().__init__(in_features, hidden, num_classes)
        self.gated = GatedBranch(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gated(self.layer2(self.layer1(x))))


class TinyNetDeadBranch(TinyNet):
    """TinyNet with a branch multiplied by a constant zero buffer: its gradient is present but exactly
    zero on every step (a path that never opens)."""

    def __init__(self, in_features: int = IN_FEATURES, hidden: int = HIDDEN, num_classes: int = CLASSES_B):
        super().__init__(in_features, hidden, num_classes)
        self.dead = nn.Linear(hidden, hidden)
        self.register_buffer("off", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(x))
        return self.head(h + self.off * self.dead(h))


class TinyNetRaising(TinyNet):
    """TinyNet whose forward raises in training mode: a bug in a user's model, not a config error."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise IndexError("adapter mask index 16 is out of bounds for dimension 0 with size 16")
        return super().forward(x)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic model-A state dict with non-default BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():
        bn = model.layer1[1]
        bn.running_mean.copy_(torch.randn(HIDDEN) * 0.1)
        bn.running_var.copy_(torch.rand(HIDDEN) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


class _InterruptOnce(Dataset):
    """Sends SIGINT to this process when the `after`-th sample is fetched, once per marker file: a user's
    Ctrl-C in the middle of an epoch. Rerunning the same config (marker present) runs uninterrupted."""

    def __init__(self, inner: Dataset, after: int, marker: str):
        self.inner, self.after, self.marker, self.fetched = inner, after, marker, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        self.fetched += 1
        if self.fetched == self.after and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                raise RuntimeError("finetune installed no SIGINT handler during training")
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner[index]


class _Slow(Dataset):
    """Sleeps `delay` seconds per sample: a run slow enough to be killed in the middle, for real."""

    def __init__(self, inner: Dataset, delay: float):
        self.inner, self.delay = inner, delay

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        import time

        time.sleep(self.delay)
        return self.inner[index]


def make_dataset(n: int = 64, seed: int = 0, in_features: int = IN_FEATURES, num_classes: int = CLASSES_B,
                 interrupt_after: int | None = None, interrupt_marker: str | None = None, delay: float = 0.0,
                 nan_at: int | None = None) -> Dataset:
    """A learnable in-memory classification set: label = argmax of a fixed linear map of x."""
    rule = torch.Generator().manual_seed(1234)
    weights = torch.randn(in_features, num_classes, generator=rule)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    y = (x @ weights).argmax(dim=1)
    if nan_at is not None:
        x[nan_at] = float("nan")  # one corrupt sample: its batch's loss is NaN
    dataset: Dataset = TensorDataset(x, y)
    if interrupt_after is not None:
        dataset = _InterruptOnce(dataset, interrupt_after, interrupt_marker)
    if delay:
        dataset = _Slow(dataset, delay)
    return dataset


class RawScale(nn.Module):
    """A module with a parameter but no reset_parameters(): the meta-device path cannot initialise it."""

    def __init__(self, channels: int = HIDDEN):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


# ---- for the DDP tests (tests/test_distributed.py) ---------------------------------------------


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class DriftOnRank1(TinyNet):
    """Moves a parameter on rank 1 only, outside autograd: what a broken gradient sync looks like."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _rank() == 1:
            with torch.no_grad():
                self.head.bias.add_(1e-3)
        return super().forward(x)


class _FailOnRank1(Dataset):
    """Raises while rank 1 (only) fetches its `after`-th sample: a failure in one worker process."""

    def __init__(self, inner: Dataset, after: int):
        self.inner, self.after, self.fetched = inner, after, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        self.fetched += 1
        if _rank() == 1 and self.fetched == self.after:
            raise OSError("simulated read error on rank 1")
        return self.inner[index]


def failing_on_rank1(after: int, n: int = 64, seed: int = 0) -> Dataset:
    return _FailOnRank1(make_dataset(n, seed), after)


def ddp_collectives(world) -> list[dict]:
    """Run on every rank through finetune.distributed.spawn; rank 0 returns every rank's findings."""
    from finetune.distributed import StopVote

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    found = {"in_sync": world.in_sync(model)}
    if world.rank == 1:
        with torch.no_grad():
            model.bias[0] = torch.nextafter(model.bias[0], torch.tensor(2.0))  # one bit of one element
    found["drifted_in_sync"] = world.in_sync(model)
    vote, found["stopped_at"] = StopVote(world), None
    for step in range(1, 10):  # rank 1 is asked to stop in step 3
        if vote.poll(world.rank == 1 and step >= 3):
            found["stopped_at"] = step
            break
    vote.close()
    found["any"] = world.any(world.rank == 1)
    found["sum"] = world.sum_(torch.tensor([float(world.rank + 1)])).item()
    return world.gather(found)


class CountCalls(nn.Module):
    """An identity with a learnable scale that counts its forward calls (tests of model.add wiring)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.scale


def abort_process(**_kwargs):
    """A model factory that kills its own process the hard way (SIGABRT): a job that dies as on a
    segfault or an out-of-memory kill, leaving no Python exception and no summary.json behind."""
    import os

    os.abort()


class RecordingTransform:
    """A data.batch_transform that appends one line per batch it gets to the file `log` (the batch
    size and the target's dtype) and returns the batch unchanged: which batches were transformed."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, batch):
        inputs, target = batch
        with open(self.log, "a") as f:
            f.write(f"{inputs.shape[0]} {str(target.dtype).removeprefix('torch.')} {inputs.device.type}\n")
        return batch
