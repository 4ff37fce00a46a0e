"""The task: how a batch becomes model inputs, a loss, and metric updates (config group `task`).

The loop knows nothing of any task; it hands each batch to `Task.training_loss` and each
validation batch to `Task.update_metrics`. One class serves every provided task
(conf/task/*.yaml): they differ by their config — the loss object, the metrics, the names of the
inputs, the target and the prediction — not by code.

- batch: a tensor, tuple/list, dict, HF `BatchEncoding`, nested; moved to the device recursively.
- inputs: a tuple batch passes its first element positionally, a dict batch its keys as keywords
  (the target's key only when the model computes its own loss).
- output: a tensor, a dict, a dataclass / HF `ModelOutput`; the prediction is the tensor, else its
  `logits`, else its `out`, else its first element.
- prediction against target: class indices against logits with the class dimension last (tokens:
  (B, T, C) vs (B, T)) or second (segmentation: (B, C, H, W) vs (B, H, W)); a (B, 1) regression
  output against a (B,) target is compared as (B,).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

LOSS_LABELS = {
    "CrossEntropyLoss": "cross-entropy",
    "BCEWithLogitsLoss": "binary cross-entropy",
    "BCELoss": "binary cross-entropy",
    "MSELoss": "mean squared error",
    "L1Loss": "mean absolute error",
    "SmoothL1Loss": "smooth L1",
    "HuberLoss": "Huber loss",
    "NLLLoss": "negative log-likelihood",
}


class TaskError(FinetuneError):
    """A batch, an output or a loss that does not fit the task's config."""

    exit_code = 2


# ---- batches -----------------------------------------------------------------------------------
def move_to(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """`batch` with every tensor on `device` (non_blocking: overlaps with pinned host memory).
    Mappings (HF's BatchEncoding included) become dicts; tuples and lists keep their type."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {key: move_to(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to(v, device, channels_last) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, channels_last) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 0


def describe(value: Any) -> str:
    """shape and dtype of a tensor, or the structure of a batch, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


@dataclasses.dataclass
class Step:
    """One batch through the model: what the loss and the metrics read."""

    prediction: torch.Tensor | None
    target: Any
    loss: torch.Tensor  # the scalar that is back-propagated
    parts: dict[str, torch.Tensor]  # the terms of a dict of losses (empty otherwise)
    count: torch.Tensor | int  # what the loss is a mean over (target tokens, pixels, samples)


class Task:
    def __init__(self, name: str, cfg, loss: nn.Module | None, metrics: dict[str, Any]):
        self.name = name
        self.cfg = cfg
        self.loss_fn = loss
        self.metrics = metrics  # name -> torchmetrics-style object
        self._checked_targets = False

    @classmethod
    def from_config(cls, cfg, name: str | None = None) -> "Task":
        """Instantiate task.loss and task.metrics (`_target_`s) from the `task` config."""
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        name = name or guess_name(cfg)
        try:
            loss = instantiate(cfg.loss, _convert_="all") if cfg.loss is not None else None
            metrics = {key: instantiate(spec, _convert_="all") for key, spec in (cfg.metrics or {}).items()}
        except InstantiationException as exc:
            cause = exc.__cause__ or exc
            raise TaskError(f"task {name}: could not build its loss or metrics: {type(cause).__name__}: {cause}",
                            "check task.loss and task.metrics (each a {_target_: ...} that can be imported)") from exc
        if loss is not None and not callable(loss):
            raise TaskError(f"task {name}: task.loss built a {type(loss).__name__}, which is not callable.",
                            "give task.loss a loss module, e.g. {_target_: torch.nn.CrossEntropyLoss}, or null for the model's own")
        for key, metric in metrics.items():
            if not all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset")):
                raise TaskError(f"task {name}: task.metrics.{key} ({type(metric).__name__}) has no update/compute/reset.",
                                "give a torchmetrics metric or an object with update(pred, target), compute(), reset()")
        return cls(name, cfg, loss, metrics)

    # ---- names ---------------------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        """What validation logs: val/loss and val/<metric> (dict-of-loss parts are found at run time)."""
        return ["val/loss"] + [f"val/{key}" for key in self.metrics]

    def monitor(self, trainer) -> tuple[str, str]:
        """(metric, "max" | "min") for trainer.monitor / trainer.mode, `auto` resolved from the task.
        Under trainer.ema, val/ema/<name> (the average's value of val/<name>) may be monitored too."""
        monitor = trainer.monitor
        if monitor == "auto":
            monitor = self.cfg.monitor or (f"val/{next(iter(self.metrics))}" if self.metrics else "val/loss")
        averaged = monitor.startswith("val/ema/")
        metric = "val/" + monitor.removeprefix("val/ema/") if averaged else monitor
        if averaged and trainer.get("ema") is None:
            raise TaskError(f"trainer.monitor={monitor} is a metric of the weights' average, and trainer.ema is null.",
                            f"set trainer.ema (e.g. trainer.ema={{decay: 0.999}}), or monitor {metric}")
        if metric not in self.metric_names():
            with_ema = [f"val/ema/{n.removeprefix('val/')}" for n in self.metric_names()] if trainer.get("ema") is not None else []
            raise TaskError(
                f"trainer.monitor={monitor}, but task {self.name} logs {', '.join(self.metric_names() + with_ema)}.",
                "set trainer.monitor to one of those (or auto), or add the metric under task.metrics",
            )
        mode = _value(trainer.mode)
        if mode == "auto" and metric == (self.cfg.monitor or metric):
            mode = _value(self.cfg.mode)
        if mode == "auto":
            if metric == "val/loss":
                mode = "min"
            else:
                higher = getattr(self.metrics[metric.removeprefix("val/")], "higher_is_better", None)
                if higher is None:
                    raise TaskError(f"trainer.mode=auto, but {monitor} does not say whether higher is better.",
                                    "set trainer.mode=max or trainer.mode=min")
                mode = "max" if higher else "min"
        return monitor, mode

    def metric_ranges(self) -> dict[str, tuple[float | None, float | None]]:
        """name -> (lower, upper) bounds of its values (torchmetrics' plot bounds), for plots."""
        return {key: (getattr(m, "plot_lower_bound", None), getattr(m, "plot_upper_bound", None))
                for key, m in self.metrics.items()}

    def loss_label(self) -> str:
        if self.loss_fn is None:
            return "the model's loss"
        return LOSS_LABELS.get(type(self.loss_fn).__name__, type(self.loss_fn).__name__)

    # ---- batch -> model -> output ------------------------------------------------------------
    def split(self, batch: Any) -> tuple[tuple, dict, Any]:
        """(positional inputs, keyword inputs, target) of a batch."""
        target_spec, inputs_spec = self.cfg.target, self.cfg.inputs
        if isinstance(batch, Mapping):
            target_key = "labels" if target_spec == "auto" else target_spec
            if target_key is not None and not isinstance(target_key, str):
                raise TaskError(f"task {self.name}: task.target={target_key!r}, but batches are dicts ({describe(batch)}).",
                                "name the target's key, e.g. task.target=labels")
            if target_key is not None and target_key not in batch:
                if target_spec != "auto":
                    raise TaskError(f"task {self.name}: the batch has no key {target_key!r} (task.target); it has {describe(batch)}.",
                                    "set task.target to the key that holds the labels")
                target_key = None
            target = batch[target_key] if target_key is not None else None
            if inputs_spec == "auto":
                own_loss = self.loss_fn is None
                return (), {k: v for k, v in batch.items() if own_loss or k != target_key}, target
            if isinstance(inputs_spec, str):
                return (self._take(batch, inputs_spec, "inputs"),), {}, target
            return (), {key: self._take(batch, key, "inputs") for key in inputs_spec}, target
        if isinstance(batch, (list, tuple)):
            index = (1 if len(batch) > 1 else None) if target_spec == "auto" else target_spec
            target = self._take(batch, index, "target") if index is not None else None
            if inputs_spec == "auto":
                return (batch[0],), {}, target
            if isinstance(inputs_spec, int):
                return (self._take(batch, inputs_spec, "inputs"),), {}, target
            return tuple(self._take(batch, i, "inputs") for i in inputs_spec), {}, target
        return (batch,), {}, None  # a bare tensor: inputs only

    def _take(self, batch, key, what: str):
        try:
            return batch[key]
        except (KeyError, IndexError, TypeError):
            raise TaskError(f"task {self.name}: task.{what}={key!r} is not in the batch {describe(batch)}.",
                            f"set task.{what} to a key (dict batches) or an index (tuple batches) the batch has") from None

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        """(output, target) of one batch."""
        args, kwargs, target = self.split(batch)
        try:
            output = model(*args, **kwargs)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            passed = ", ".join([f"<{len(args)} positional>"] * bool(args) + list(kwargs))
            raise TaskError(f"task {self.name}: the model does not take the inputs it was given ({passed}): {exc}",
                            "set task.inputs to what the model's forward takes (a key, an index, or a list of keys)") from exc
        return output, target

    def prediction(self, output: Any) -> torch.Tensor | None:
        spec = self.cfg.prediction
        if spec != "auto":
            if isinstance(output, (Mapping, list, tuple)):
                try:
                    return output[spec]
                except (KeyError, IndexError, TypeError):
                    pass
            if isinstance(spec, str) and hasattr(output, spec):
                return getattr(output, spec)
            raise TaskError(f"task {self.name}: task.prediction={spec!r} is not in the model's output {describe(output)}.",
                            "name the output's key or attribute that holds the predictions (e.g. logits)")
        if isinstance(output, torch.Tensor):
            return output
        for name in ("logits", "out"):
            value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
        if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
            return output[0]
        return None

    # ---- the loss ------------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: Any) -> Step:
        output, target = self.forward(model, batch)
        if self.loss_fn is None:
            loss, parts = self.own_loss(output)
            return Step(self.prediction(output), target, loss, parts, batch_size(batch))
        prediction = self.prediction(output)
        if prediction is None:
            raise TaskError(f"task {self.name}: cannot find the prediction in the model's output {describe(output)}.",
                            "set task.prediction to the key or attribute that holds it (e.g. logits)")
        if target is None:
            raise TaskError(f"task {self.name}: the batch {describe(batch)} has no target for task.loss.",
                            "set task.target (an index or a key), or task=model_loss when the model computes its own loss")
        prediction, target = self.align(prediction, target)
        self.check_cross_entropy(prediction, target)
        self.check_elementwise(prediction, target)
        if not self._checked_targets:
            self.check_target_range(prediction, target)
        try:
            loss = self.loss_fn(prediction, self.loss_target(prediction, target))
        except (RuntimeError, ValueError, IndexError) as exc:
            raise self.mismatch(prediction, target, exc) from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TaskError(f"task {self.name}: task.loss returned {describe(loss)}, not a scalar tensor.",
                            "use a loss with reduction='mean' (the default)")
        return Step(prediction, target, loss, {}, self.count(prediction, target))

    def own_loss(self, output: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """loss: null: output.loss / output["loss"], or the sum of a dict of losses (each part logged)."""
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss, {}
        if isinstance(output, Mapping):
            parts = {k: v for k, v in output.items() if isinstance(v, torch.Tensor) and v.dim() == 0 and "loss" in k}
            if parts:
                return sum(parts.values()), parts
        raise TaskError(
            f"task {self.name} (task.loss=null) expects the model to compute its loss, but its output {describe(output)} has none.",
            "pass the targets the model needs (Hugging Face models: a `labels` key), or set task.loss (e.g. task=classification)",
        )

    def align(self, prediction: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        if not isinstance(target, torch.Tensor):
            return prediction, target
        if self.cfg.shift_labels:  # causal LM: the prediction at t is scored against the token at t + 1
            prediction, target = prediction[:, :-1], target[:, 1:]
        if class_indices(target):
            if prediction.dim() >= 2 and prediction.shape[:-1] == target.shape and prediction.dim() > 2:
                return prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1)  # tokens: class last
        elif prediction.shape != target.shape and prediction.dim() == target.dim() + 1 and prediction.shape[-1] == 1 \
                and not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return prediction.squeeze(-1), target  # a (B, 1) output against a (B,) target
        return prediction, target

    def loss_target(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Integer multi-hot targets (same shape as the logits) become floats for BCE-style losses."""
        if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.shape == prediction.shape \
                and prediction.is_floating_point() and not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return target.to(prediction.dtype)
        if isinstance(target, torch.Tensor) and target.is_floating_point() and prediction.is_floating_point() \
                and target.dtype != prediction.dtype and not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return target.to(prediction.dtype)  # float64 targets against float32 (or autocast) outputs
        return target

    def count(self, prediction: torch.Tensor, target: Any) -> torch.Tensor | int:
        """What the loss averages over, so validation weighs batches exactly: target tokens / pixels
        (ignore_index excluded) for class indices, elements for regression and multi-label."""
        if not isinstance(target, torch.Tensor):
            return prediction.shape[0]
        if class_indices(target):
            ignore = getattr(self.loss_fn, "ignore_index", None)
            return (target != ignore).sum() if ignore is not None else target.numel()
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):  # soft labels: a mean over rows
            return target.numel() // max(target.shape[1] if target.dim() > 1 else 1, 1)
        return target.numel()

    def check_cross_entropy(self, prediction: torch.Tensor, target: Any) -> None:
        """Cross-entropy needs 2+ classes and, for float targets, class probabilities shaped like the
        logits: anything else would train on a loss that is silently meaningless (over one output
        it is identically 0)."""
        if not isinstance(self.loss_fn, nn.CrossEntropyLoss) or not isinstance(target, torch.Tensor):
            return
        classes = prediction.shape[1] if prediction.dim() > 1 else 0
        soft_ok = not target.is_floating_point() or target.shape == prediction.shape
        needs = ([f"logits over 2 or more classes (here {classes or 'none'})"] if classes < 2 else []) \
            + ([] if soft_ok else ["float targets (class probabilities) shaped like the logits"])
        if needs:
            raise self.mismatch(prediction, target, ValueError("cross-entropy needs " + " and ".join(needs)))

    def check_elementwise(self, prediction: torch.Tensor, target: Any) -> None:
        """PyTorch's elementwise losses (MSE, L1, BCE, ...) broadcast mismatched shapes with only a
        warning and train on the wrong pairs: a different shape is an error here."""
        if isinstance(self.loss_fn, ELEMENTWISE_LOSSES) and isinstance(target, torch.Tensor) \
                and target.shape != prediction.shape:
            raise self.mismatch(prediction, target, ValueError(
                f"{type(self.loss_fn).__name__} needs the prediction and the target to have the same shape"))

    def check_target_range(self, prediction: torch.Tensor, target: Any) -> None:
        """Once, on the first batch: class indices must fit the head (a host sync, once)."""
        self._checked_targets = True
        if not (isinstance(target, torch.Tensor) and class_indices(target) and isinstance(self.loss_fn, nn.CrossEntropyLoss)):
            return
        classes = prediction.shape[1] if prediction.dim() > 1 else 1
        ignore = self.loss_fn.ignore_index
        valid = target[target != ignore]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
            raise TaskError(
                f"task {self.name}: a target class index is out of range for the head: targets span "
                f"{int(valid.min())}..{int(valid.max())}, the prediction {describe(prediction)} has {classes} classes "
                f"(ignore_index {ignore}).",
                f"give the head as many outputs as there are classes ({int(valid.max()) + 1} or more), "
                "or set the loss's ignore_index to the label that marks ignored targets (segmentation: 255)",
            )

    def mismatch(self, prediction: torch.Tensor, target: Any, exc: Exception) -> TaskError:
        loss_name = type(self.loss_fn).__name__
        if isinstance(target, torch.Tensor) and target.is_floating_point() and isinstance(self.loss_fn, nn.CrossEntropyLoss):
            fix = "float targets: for regression use task=regression, for multi-hot labels task=multilabel"
        elif isinstance(target, torch.Tensor) and class_indices(target) and not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            fix = f"{loss_name} expects targets shaped like the prediction; class indices need task=classification (cross-entropy)"
        else:
            fix = "make the model's output match the target (e.g. the head's out_features), or set task.prediction / task.target"
        return TaskError(
            f"task {self.name}: {loss_name} cannot score prediction {describe(prediction)} against target {describe(target)}: "
            f"{str(exc).splitlines()[0]}",
            fix,
        )

    # ---- metrics ------------------------------------------------------------------------------
    def to(self, device: torch.device) -> "Task":
        for metric in self.metrics.values():
            if hasattr(metric, "to"):
                metric.to(device)
        return self

    def reset_metrics(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def update_metrics(self, step: Step) -> None:
        if not self.metrics:
            return
        prediction, target = step.prediction, step.target
        if prediction is None or target is None:
            raise TaskError(f"task {self.name}: its metrics need a prediction and a target; this batch gives "
                            f"{describe(prediction)} and {describe(target)}.",
                            "set task.prediction and task.target, or remove task.metrics")
        prediction = prediction.detach().float()
        if isinstance(target, torch.Tensor) and class_indices(target) and prediction.dim() > 2 \
                and prediction.shape[2:] == target.shape[1:]:
            prediction = prediction.movedim(1, -1).reshape(-1, prediction.shape[1])  # (B, C, H, W) -> (BHW, C)
            target = target.reshape(-1)
        for metric in self.metrics.values():
            metric.update(prediction, target)

    def compute_metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for key, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, Mapping):
                values.update({f"{key}_{k}": float(v) for k, v in value.items()})
            elif value is not None:
                values[key] = float(value)
        return values


ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss, nn.BCELoss)


def class_indices(target: torch.Tensor) -> bool:
    return not target.is_floating_point() and target.dtype != torch.bool


def guess_name(cfg) -> str:
    """A name for messages: the provided task whose settings these are, else "custom"."""
    if cfg.loss is None:
        return "model_loss"
    target = str((cfg.loss or {}).get("_target_", ""))
    metrics = set(cfg.metrics or {})
    for name, keys in (("causal_lm", {"perplexity"}), ("segmentation", {"miou"}), ("multilabel", {"map"}),
                       ("regression", {"mae"}), ("classification", {"acc"})):
        if keys <= metrics:
            return name
    return target.rsplit(".", 1)[-1] or "custom"


def _value(mode) -> str:
    return str(getattr(mode, "value", mode))
