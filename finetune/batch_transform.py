"""`data.batch_transform`: a callable applied to each training batch on the device (MixUp, CutMix).

It receives the batch as the loader gives it, moved to the device -- for a tuple batch
`(images, labels)`, which torchvision.transforms.v2's `MixUp` / `CutMix` / `RandomChoice` of them take
as one argument and return as `(images, soft labels [N, num_classes])` -- and returns a batch of the
same structure. Training batches only (the training step and the dry run's pass): validation, and
finetune-eval, always see the data as it is, so metrics are computed on hard targets.

A transform that fails names itself and the batch it got; a task whose loss cannot take what it
returns (soft labels for a segmentation loss, say) fails on the first batch with a message that says
the transform changed the target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from finetune.errors import ConfigError
from finetune.task import TaskError, describe


class BatchTransformError(ConfigError):
    """data.batch_transform failed on a batch, or returned something that is not a batch of the same kind."""

    def __init__(self, problem: str, fix: str | None = None, group: str | None = "data"):
        super().__init__(problem, fix, group)


def _name(fn: Callable) -> str:
    return type(fn).__name__ if not hasattr(fn, "__name__") else fn.__name__


def _structure(batch: Any) -> Any:
    """What must not change: a mapping's keys, a sequence's length (a tuple may come back a list)."""
    if isinstance(batch, Mapping):
        return ("mapping", tuple(batch))
    if isinstance(batch, (list, tuple)):
        return ("sequence", len(batch))
    return type(batch).__name__


class BatchTransform:
    """data.batch_transform, built once: checks what it returns and explains a task's refusal."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn
        self.name = _name(fn)
        self.change: str | None = None  # the first batch's target, before -> after (for messages)

    def __call__(self, batch: Any) -> Any:
        try:
            out = self.fn(batch)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BatchTransformError(
                f"data.batch_transform ({self.name}) failed on a training batch {describe(batch)}: "
                f"{type(exc).__name__}: {first}",
                "MixUp / CutMix take (images [N, C, H, W] float, class indices [N]) and need num_classes "
                "(e.g. num_classes: ${data.num_classes}, with data.num_classes set); use them with "
                "task=classification, or set data.batch_transform=null",
            ) from exc
        if _structure(out) != _structure(batch):
            raise BatchTransformError(
                f"data.batch_transform ({self.name}) turned the batch {describe(batch)} into {describe(out)}: "
                "a batch transform must return a batch of the same kind (the task reads it as the loader's).",
                "return the same structure (a tuple (inputs, target) for a tuple batch, the same keys for a dict)",
            )
        if self.change is None:
            self.change = f"{describe(batch)} -> {describe(out)}"
        return out

    @contextlib.contextmanager
    def explains(self):
        """Around the task's step on a transformed batch: a TaskError says the transform made the batch."""
        try:
            yield
        except TaskError as exc:
            raise BatchTransformError(
                f"the task cannot take what data.batch_transform ({self.name}) makes of a training batch "
                f"({self.change}): {exc.problem}",
                "MixUp / CutMix give soft labels [N, num_classes], which task=classification's cross-entropy takes; "
                "their num_classes must be the model's number of outputs. For another task set data.batch_transform=null",
            ) from exc


def build_batch_transform(spec) -> BatchTransform | None:
    """data.batch_transform (`_target_`, nested ones too: RandomChoice of MixUp and CutMix); null: none."""
    if spec is None:
        return None
    if "_target_" not in spec:
        raise BatchTransformError("data.batch_transform has no `_target_`.",
                                  "e.g. data.batch_transform={_target_: torchvision.transforms.v2.MixUp, num_classes: 10}")
    try:
        fn = instantiate(spec, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        raise BatchTransformError(f"could not build data.batch_transform ({spec['_target_']}): {type(cause).__name__}: {cause}",
                                  "check its `_target_` (importable) and arguments (MixUp / CutMix need num_classes)") from exc
    if not callable(fn):
        raise BatchTransformError(f"data.batch_transform built a {type(fn).__name__}, which is not callable.",
                                  "point `_target_` at a transform (a callable taking the batch)")
    return BatchTransform(fn)


def explained(transform: BatchTransform | None):
    """transform.explains() where there is a transform."""
    return transform.explains() if transform is not None else contextlib.nullcontext()
