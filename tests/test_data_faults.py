"""Data that would silently train wrong: train/val class folders that differ, unreadable images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from finetune.data import SampleError, build_loaders
from finetune.errors import ConfigError


def png(path: Path, value: int = 0, cut: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (value, 255 - value, 64)).save(buffer, format="PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2] if cut else data)


def image_folders(root: Path, train: list[str], val: list[str], per_class: int = 3) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            for i in range(per_class):
                png(root / split / name / f"{i}.png", value=40 * c + i)
    return root


def loaders(compose, root: Path, *overrides: str):
    cfg = compose(["data=imagefolder", f"data.root={root}", "data.batch_size=4", "data.num_workers=0",
                   "data.train.transform.transforms.0.size=8", "data.val.transform.transforms.0.size=8",
                   "data.val.transform.transforms.1.size=8", *overrides])
    return build_loaders(cfg.data, cfg.seed, pin_memory=False)


def test_a_class_missing_from_val_is_named_before_labels_shift(compose, tmp_path):
    root = image_folders(tmp_path, train=["cat", "cow", "dog"], val=["cat", "dog"])
    with pytest.raises(ConfigError) as info:
        loaders(compose, root)
    assert "cow only in data.train" in info.value.problem and info.value.group == "data"
    assert "same class folders" in info.value.fix


def test_classes_on_one_side_only_are_named_for_both_sides(compose, tmp_path):
    root = image_folders(tmp_path, train=["a", "b"], val=["a", "c"])
    with pytest.raises(ConfigError, match=r"b only in data.train; c only in data.val"):
        loaders(compose, root)


def test_same_classes_pass(compose, tmp_path):
    train, val, _ = loaders(compose, image_folders(tmp_path, train=["a", "b"], val=["a", "b"]))
    assert train.dataset.classes == val.dataset.classes == ["a", "b"]
    assert sum(len(batch[0]) for batch in train) == 6


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_image_is_named_with_the_fix(compose, tmp_path, workers, damage):
    root = image_folders(tmp_path, train=["a", "b"], val=["a", "b"])
    bad = root / "train" / "b" / "1.png"
    if damage == "truncated":
        png(bad, cut=True)
    else:
        bad.write_bytes(b"<html>404 not found</html>")
    train, _, _ = loaders(compose, root, f"data.num_workers={workers}")
    with pytest.raises(SampleError) as info:
        for _ in train:
            pass
    assert info.value.problem.startswith(f"data.train: {bad} cannot be read")
    assert "Traceback" not in info.value.problem and "data.skip_bad_samples=true" in info.value.fix


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_samples_skips_and_counts(compose, tmp_path, workers):
    root = image_folders(tmp_path, train=["a", "b"], val=["a", "b"])
    png(root / "train" / "a" / "0.png", cut=True)
    train, val, _ = loaders(compose, root, "data.skip_bad_samples=true", f"data.num_workers={workers}")
    assert sum(len(batch[0]) for batch in train) == 6  # the next readable sample stands in
    assert train.dataset.skipped == 1 and val.dataset.skipped == 0


@pytest.mark.slow
def test_the_command_names_the_missing_class(cli, tmp_path):
    root = image_folders(tmp_path / "data", train=["curved", "three_corners", "four_corners"], val=["curved", "four_corners"])
    result = cli("finetune", "data=imagefolder", f"data.root={root}", "data.num_workers=0", "dry_run=true",
                 f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=false", "model.add.0.module.out_features=3")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("finetune: error:") == 1 and "Traceback" not in result.stderr
    assert "three_corners only in data.train" in result.stderr
    assert "declared in: data=imagefolder" in result.stderr


def test_a_run_records_the_samples_it_skipped(compose, tmp_path):
    """summary.json `skipped_samples`: what data.skip_bad_samples skipped, for a real run."""
    import json

    from finetune.run import run

    root = image_folders(tmp_path / "data", train=["a", "b", "c"], val=["a", "b", "c"], per_class=4)
    png(root / "train" / "c" / "2.png", cut=True)
    png(root / "val" / "a" / "0.png", cut=True)
    cfg = compose(["model=demo", "checkpoint.path=null", "data=imagefolder", f"data.root={root}", "data.batch_size=4",
                   "data.num_workers=0", "data.skip_bad_samples=true", "data.train.transform.transforms.0.size=16",
                   "data.val.transform.transforms.0.size=16", "data.val.transform.transforms.1.size=16",
                   "trainer.epochs=1", "trainer.progress=false"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["skipped_samples"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_samples"] == 2
