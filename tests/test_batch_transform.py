"""data.batch_transform: applied to training batches only (training steps and the dry run's pass,
never validation), MixUp / CutMix from YAML through the real classification task and its soft-target
loss, label smoothing, and the errors of a transform a task cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.batch_transform import BatchTransform, BatchTransformError, build_batch_transform
from finetune.run import run
from finetune.task import Task

pytest.importorskip("torchvision")


def recording(path) -> str:
    return f"+data.batch_transform={{_target_: tiny.RecordingTransform, log: '{path}'}}"


def logged(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_training_batches_only_and_validation_untouched(tiny_cfg, tmp_path):
    log = tmp_path / "batches.txt"
    summary = run(tiny_cfg(recording(log), "trainer.epochs=1"), tmp_path / "run")
    assert summary["status"] == "completed"
    # 64 training samples in batches of 16: 4 training batches; the 3 validation batches never pass
    assert logged(log) == ["16 int64 cpu"] * 4


def test_dry_run_applies_it_to_its_batches(tiny_cfg, tmp_path):
    log = tmp_path / "batches.txt"
    run(tiny_cfg(recording(log), "dry_run=true", "dry_run_batches=2"), tmp_path / "dry")
    assert logged(log) == ["16 int64 cpu"] * 2


def test_mixup_cutmix_from_yaml_trains_the_demo_on_soft_targets(compose, tmp_path):
    """The shipped data/batch_transform=mixup_cutmix (RandomChoice of MixUp and CutMix, num_classes
    interpolated from data.num_classes) through the classification task's cross-entropy."""
    cfg = compose(["+data/batch_transform=mixup_cutmix", "trainer.epochs=1", "trainer.max_steps=2",
                   "trainer.progress=false", "task.loss.label_smoothing=0.1"])
    assert cfg.data.batch_transform.transforms[0].num_classes == 4
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert 0.0 <= summary["final"]["val/acc"] <= 1.0  # metrics on the untouched validation batches


def images_and_labels(n: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(n, 3, 8, 8), torch.randint(0, classes, (n,))


def classifier(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))


def test_classification_task_takes_mixups_soft_labels_as_class_probabilities(compose):
    transform = build_batch_transform({"_target_": "torchvision.transforms.v2.MixUp", "num_classes": 4})
    task = Task.from_config(compose([]).task)
    model = classifier()
    images, soft = transform(images_and_labels())
    assert soft.shape == (6, 4) and soft.is_floating_point()
    step = task.step(model, (images, soft))
    expected = -(soft * F.log_softmax(model(images), dim=1)).sum(dim=1).mean()
    assert torch.allclose(step.loss, expected) and int(step.count) == 6


def test_label_smoothing_is_the_losss_own_argument(compose):
    task = Task.from_config(compose(["task.loss.label_smoothing=0.1"]).task)
    assert task.loss_fn.label_smoothing == 0.1
    model = classifier()
    images, labels = images_and_labels()
    step = task.step(model, (images, labels))
    assert torch.allclose(step.loss, F.cross_entropy(model(images), labels, label_smoothing=0.1))
    assert not torch.allclose(step.loss, F.cross_entropy(model(images), labels))


def test_a_task_that_cannot_take_the_soft_labels_fails_naming_the_transform(compose):
    """MixUp for 5 classes in front of a 4-class head: the cross-entropy refuses, and the message says
    the batch transform made the target."""
    transform = build_batch_transform({"_target_": "torchvision.transforms.v2.MixUp", "num_classes": 5})
    task = Task.from_config(compose([]).task)
    batch = transform(images_and_labels(classes=5))
    with pytest.raises(BatchTransformError) as err, transform.explains():
        task.step(classifier(4), batch)
    assert "data.batch_transform (MixUp)" in err.value.problem and "(6, 5) float32" in err.value.problem
    assert "num_classes must be the model's number of outputs" in err.value.fix


def test_a_transform_that_fails_on_the_batch_names_itself_and_the_batch():
    """MixUp on a segmentation batch (masks [N, H, W]): torchvision refuses; one message, not a traceback."""
    transform = build_batch_transform({"_target_": "torchvision.transforms.v2.MixUp", "num_classes": 4})
    with pytest.raises(BatchTransformError) as err:
        transform((torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2, 8, 8))))
    assert "data.batch_transform (MixUp) failed on a training batch tuple((2, 3, 8, 8) float32, (2, 8, 8) int64)" \
        in err.value.problem
    assert "task=classification" in err.value.fix


def test_a_transform_that_changes_the_batch_structure_is_refused():
    assert BatchTransform(list)((torch.zeros(1), torch.zeros(1))) is not None  # a tuple back as a list: accepted
    inputs_only = BatchTransform(lambda batch: batch[0])
    with pytest.raises(BatchTransformError, match="must return a batch of the same kind"):
        inputs_only((torch.zeros(1), torch.zeros(1)))


def test_missing_num_classes_fails_at_build_or_on_the_first_batch_with_the_fix(compose, tmp_path):
    cfg = compose(["+data/batch_transform=mixup", "data.num_classes=null", "dry_run=true"])
    with pytest.raises(BatchTransformError) as err:
        run(cfg, tmp_path / "dry")
    assert "num_classes" in str(err.value)
    assert not (tmp_path / "dry" / "trainability.json").exists()
