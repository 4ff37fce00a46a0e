"""The task component: batches → inputs, target, loss, metrics; and every provided task trained for
real through `run` on generated data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from finetune.config import TaskConfig
from finetune.task import Task, TaskError, move_to

TASK_ARGS = ["checkpoint=none", "trainer.epochs=2", "trainer.progress=false", "trainer.log_every=1"]


def task_of(name: str, compose, *overrides: str) -> Task:
    return Task.from_config(compose([f"task={name}", *overrides]).task, name)


# ---- batches ---------------------------------------------------------------------------------
def test_split_tuple_dict_and_tensor_batches(compose):
    task = task_of("classification", compose)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    assert task.split((x, y)) == ((x,), {}, y)
    args, kwargs, target = task.split({"features": x, "mask": x, "labels": y})
    assert args == () and set(kwargs) == {"features", "mask"} and target is y
    assert task.split(x) == ((x,), {}, None)
    own = task_of("model_loss", compose)
    assert set(own.split({"input_ids": x, "labels": y})[1]) == {"input_ids", "labels"}  # the model needs labels


def test_split_named_inputs_and_target(compose):
    task = task_of("segmentation", compose, "task.inputs=image", "task.target=mask")
    image, mask = torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    assert task.split({"image": image, "mask": mask, "name": "a"}) == ((image,), {}, mask)
    with pytest.raises(TaskError, match="no key 'mask'"):
        task.split({"image": image})


def test_move_to_is_recursive_and_keeps_types():
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    batch = {"a": [torch.ones(1), (torch.zeros(2), "text")], "b": Pair(torch.ones(1), 3)}
    moved = move_to(batch, torch.device("cpu"))
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "text"
    assert isinstance(moved["b"], Pair) and moved["b"].y == 3


def test_move_to_takes_hf_batch_encoding():
    from transformers import BatchEncoding

    moved = move_to(BatchEncoding({"input_ids": torch.ones(2, 3, dtype=torch.long)}), torch.device("cpu"))
    assert set(moved) == {"input_ids"}


def test_prediction_from_tensor_dict_dataclass_and_tuple(compose):
    from task_data import LMOutput

    task = task_of("classification", compose)
    logits = torch.randn(2, 3)
    for output in (logits, {"logits": logits}, {"out": logits, "aux": None}, LMOutput(logits), (logits, None)):
        assert task.prediction(output) is logits


# ---- losses ----------------------------------------------------------------------------------
def test_causal_lm_shifts_and_ignores_padding(compose):
    from task_data import TinyLM, TokenDataset

    task = task_of("causal_lm", compose)
    torch.manual_seed(0)
    model = TinyLM()
    batch = torch.utils.data.default_collate([TokenDataset(n=4)[i] for i in range(4)])
    step = task.step(model, batch)
    logits = model(batch["input_ids"]).logits
    expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1))
    assert torch.allclose(step.loss, expected)
    assert int(step.count) == int((batch["labels"][:, 1:] != -100).sum())


def test_regression_squeezes_a_single_output(compose):
    task = task_of("regression", compose)
    step = task.step(nn.Linear(8, 1), (torch.randn(5, 8), torch.randn(5, dtype=torch.float64)))
    assert step.prediction.shape == (5,) and step.count == 5


def test_multilabel_takes_integer_multi_hot_targets(compose):
    task = task_of("multilabel", compose)
    step = task.step(nn.Linear(8, 5), (torch.randn(4, 8), torch.randint(0, 2, (4, 5))))
    assert step.loss.dim() == 0 and step.count == 20


def test_model_loss_sums_a_dict_of_losses(compose):
    from task_data import TwoLossNet

    task = task_of("model_loss", compose)
    step = task.step(TwoLossNet(), {"features": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 0])})
    assert set(step.parts) == {"loss_cls", "loss_reg"}
    assert torch.allclose(step.loss, step.parts["loss_cls"] + step.parts["loss_reg"])


def test_model_without_a_loss_under_model_loss_is_an_error(compose):
    task = task_of("model_loss", compose)
    with pytest.raises(TaskError, match="has none"):
        task.step(nn.Linear(8, 3), {"input": torch.randn(2, 8)})


@pytest.mark.parametrize("task_name, model, target, message", [
    ("classification", nn.Linear(8, 1), torch.randn(4), "for regression use task=regression"),
    ("classification", nn.Linear(8, 3), torch.tensor([0, 1, 5, 2]), "out of range for the head"),
    ("regression", nn.Linear(8, 3), torch.randn(4), "cannot score prediction"),
    ("multilabel", nn.Linear(8, 5), torch.tensor([0, 1, 2, 3]), "class indices need task=classification"),
])
def test_a_loss_that_cannot_be_computed_names_task_shapes_and_fix(compose, task_name, model, target, message):
    task = task_of(task_name, compose)
    with pytest.raises(TaskError) as caught:
        task.step(model, (torch.randn(4, 8), target))
    text = str(caught.value)
    assert f"task {task_name}" in text and message in text
    assert "(4," in text  # shapes are named


def test_monitor_auto_and_errors(compose):
    task = task_of("regression", compose)
    assert task.monitor(OmegaConf.create({"monitor": "auto", "mode": "auto"})) == ("val/mae", "min")
    assert task.monitor(OmegaConf.create({"monitor": "val/mse", "mode": "auto"})) == ("val/mse", "min")
    assert task.monitor(OmegaConf.create({"monitor": "val/loss", "mode": "max"})) == ("val/loss", "max")
    with pytest.raises(TaskError, match="logs val/loss, val/mae, val/mse"):
        task.monitor(OmegaConf.create({"monitor": "val/acc", "mode": "auto"}))


def test_a_custom_torchmetrics_metric_is_used_as_is():
    cfg = OmegaConf.structured(TaskConfig(metrics={"f1": {"_target_": "torchmetrics.classification.MulticlassF1Score", "num_classes": 3}}))
    task = Task.from_config(cfg)
    step = task.step(nn.Linear(8, 3), (torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])))
    task.update_metrics(step)
    assert 0.0 <= task.compute_metrics()["f1"] <= 1.0
    assert task.monitor(OmegaConf.create({"monitor": "auto", "mode": "auto"})) == ("val/f1", "max")


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_match_torchmetrics_references():
    import torchmetrics.functional.classification as F

    from finetune.metrics import Accuracy, MeanIoU, MultilabelAveragePrecision, MultilabelF1, PixelAccuracy

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    acc, top5 = Accuracy(), Accuracy(top_k=5)
    miou, pix = MeanIoU(ignore_index=None), PixelAccuracy(ignore_index=None)
    for batch in (slice(0, 20), slice(20, 50)):  # two updates: accumulation
        for m in (acc, top5, miou, pix):
            m.update(logits[batch], target[batch])
    assert acc.compute() == pytest.approx(float(F.multiclass_accuracy(logits, target, 7, average="micro")))
    assert top5.compute() == pytest.approx(float(F.multiclass_accuracy(logits, target, 7, average="micro", top_k=5)))
    assert miou.compute() == pytest.approx(float(F.multiclass_jaccard_index(logits, target, 7, average="macro")))
    assert pix.compute() == pytest.approx(float(acc.compute()))
    few = Accuracy(top_k=5)
    few.update(logits[:, :5], target.clamp(max=4))
    assert few.compute() is None

    scores, labels = torch.randn(40, 4, generator=g), torch.randint(0, 2, (40, 4), generator=g)
    f1, ap = MultilabelF1(), MultilabelAveragePrecision()
    for m in (f1, ap):
        m.update(scores, labels.float())
    assert f1.compute() == pytest.approx(float(F.multilabel_f1_score(scores.sigmoid(), labels, 4, average="macro")), abs=1e-6)
    assert ap.compute() == pytest.approx(float(F.multilabel_average_precision(scores.sigmoid(), labels, 4, average="macro")), abs=1e-6)


def test_ignore_index_is_ignored_by_metrics():
    from finetune.metrics import Accuracy, MeanIoU, Perplexity

    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    target = torch.tensor([0, -100, 1])
    acc, ppl = Accuracy(ignore_index=-100), Perplexity(ignore_index=-100)
    acc.update(logits, target)
    ppl.update(logits, target)
    assert acc.compute() == 1.0
    expected = math.exp(nn.functional.cross_entropy(logits, target, ignore_index=-100).item())
    assert ppl.compute() == pytest.approx(expected)
    miou = MeanIoU(ignore_index=255)
    miou.update(logits, torch.tensor([0, 255, 1]))
    assert miou.compute() == 1.0


def test_validation_loss_is_a_mean_per_target_token(compose):
    """Batches with different numbers of real tokens: val/loss is the mean over all tokens of the set,
    not the mean of per-batch means."""
    from finetune.loop import evaluate
    from finetune.config import Precision
    from task_data import TinyLM, TokenDataset

    torch.manual_seed(0)
    model, data = TinyLM(), TokenDataset(n=10)
    task = task_of("causal_lm", compose)
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    values = evaluate(model, loader, task, torch.device("cpu"), Precision.fp32)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    logits = model(batch["input_ids"]).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1))
    assert values["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert values["perplexity"] == pytest.approx(math.exp(values["loss"]), rel=1e-5)


# ---- every provided task, trained for real -----------------------------------------------------
@pytest.mark.parametrize("task_name, model, data, metrics", [
    ("classification", "keyword_net", "dict_classification", ["val/acc"]),
    ("multilabel", "mlp_multilabel", "multilabel", ["val/f1", "val/map"]),
    ("regression", "mlp_regression", "regression", ["val/mae", "val/mse"]),
    ("segmentation", "tiny_seg", "segmentation", ["val/miou", "val/pixel_acc"]),
    ("causal_lm", "tiny_lm", "tokens", ["val/perplexity", "val/token_acc"]),
    ("model_loss", "tiny_lm", "tokens", []),
    ("model_loss", "two_loss_net", "dict_classification", ["val/loss_cls", "val/loss_reg"]),
])
def test_each_task_trains_and_logs_its_metrics(compose, tmp_path, task_name, model, data, metrics):
    from finetune.metrics_log import read_metrics
    from finetune.run import run

    cfg = compose([f"task={task_name}", f"model={model}", f"data={data}", *TASK_ARGS])
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert set(summary["final"]) >= {"val/loss", *metrics}
    assert all(math.isfinite(v) for v in summary["final"].values())
    monitor = cfg.task.monitor
    assert summary["best"]["metric"] == monitor and summary["best"]["mode"] == cfg.task.mode.value
    logged = {(r["split"], r["name"]) for r in read_metrics(tmp_path / "metrics.csv")}
    assert {("val", m.removeprefix("val/")) for m in metrics} <= logged
    trainability = json.loads((tmp_path / "trainability.json").read_text())
    assert trainability["audit"]["grad_flow_ok"] is True
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "model.safetensors").is_file()


def test_tied_embeddings_are_saved_and_stay_tied(compose, tmp_path):
    """Tied weights share one tensor, which safetensors refuses to write as is: every name gets its
    own copy in model.safetensors and checkpoints/best.safetensors, and loading it strictly into
    the tied model keeps the tie."""
    from safetensors.torch import load_file
    from task_data import TinyLM

    from finetune.run import run

    summary = run(compose(["task=causal_lm", "model=tiny_lm", "+model.base.tie=true", "data=tokens", *TASK_ARGS]), tmp_path)
    assert summary["status"] == "completed"
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["embed.weight"], weights["lm_head.weight"])
    model = TinyLM(tie=True)
    model.load_state_dict(weights, strict=True)
    assert model.lm_head.weight is model.embed.weight
    assert set(load_file(tmp_path / "checkpoints" / "best.safetensors")) == set(weights)


def test_training_improves_the_regression_metric(compose, tmp_path):
    from finetune.metrics_log import read_metrics
    from finetune.run import run

    cfg = compose(["task=regression", "model=mlp_regression", "data=regression", *TASK_ARGS, "trainer.epochs=10",
                   "optim.optimizer.lr=0.03"])
    run(cfg, tmp_path)
    mae = [r["value"] for r in read_metrics(tmp_path / "metrics.csv") if r["name"] == "mae"]
    assert mae[-1] < 0.7 * mae[0]


def test_an_explicit_monitor_the_task_does_not_log_fails_before_training(compose, tmp_path):
    from finetune.run import run

    cfg = compose(["task=regression", "model=mlp_regression", "data=regression", *TASK_ARGS, "trainer.monitor=val/acc"])
    with pytest.raises(TaskError, match="trainer.monitor=val/acc"):
        run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0
    assert not (tmp_path / "metrics.csv").exists()


def test_a_shape_mismatch_fails_the_run_with_a_summary(compose, tmp_path):
    from finetune.run import run

    cfg = compose(["task=classification", "model=mlp_regression", "data=regression", *TASK_ARGS])
    with pytest.raises(TaskError, match="task=regression"):
        run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "CrossEntropyLoss" in summary["error"]
    assert not (tmp_path / "model.safetensors").exists()
