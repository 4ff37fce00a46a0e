"""trainer.ema (against timm's ModelEmaV3, then in runs: val/ema metrics, monitor on the EMA, exact
resume, LoRA, DDP) and trainer.early_stop (the stop, its summary, its counters across a resume)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.distributed import parameter_digest
from finetune.ema import WeightEma, warmup_gamma
from finetune.errors import ConfigError, RunDirError
from finetune.run import run
from finetune.task import TaskError

EMA = "trainer.ema={decay: 0.9}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def val_names_by_epoch(run_dir: Path) -> dict[int, list[str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    return {int(e): [r["name"] for r in rows if int(r["epoch"]) == int(e)] for e in dict.fromkeys(r["epoch"] for r in rows)}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train_steps(model: nn.Module, steps: int, after_step) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step(step)


# ---- the update, against timm --------------------------------------------------------------------

@pytest.mark.parametrize("warmup_steps, every_n_steps", [(None, 1), (5, 1), (5, 3)])
def test_update_and_warmup_match_timm_model_ema_v3_bit_for_bit(warmup_steps, every_n_steps):
    from timm.utils.model_ema import ModelEmaV3

    model = small_model()
    ours = WeightEma(model, decay=0.8, warmup_steps=warmup_steps, every_n_steps=every_n_steps)
    gamma = warmup_gamma(0.8, warmup_steps)
    theirs = ModelEmaV3(model, decay=0.8, use_warmup=gamma is not None, warmup_gamma=gamma or 1.0,
                                 exclude_buffers=True)

    def both(step):
        assert ours.get_decay(step) == theirs.get_decay(step)
        if ours.due(step):  # timm's train.py updates after every step: here after every every_n_steps
            ours.update(step)
            theirs.update(model, step=step)

    train_steps(model, 9, both)
    averaged = dict(theirs.module.named_parameters())
    for name, average in ours.shadow.items():
        assert torch.equal(average, averaged[name]), name
    assert not torch.equal(ours.shadow["0.weight"], model[0].weight)  # an average, not a copy
    assert ours.get_decay(1) == 0.0  # the first update copies the weights (timm)
    if warmup_steps:  # timm's curve, scaled to reach the decay after warmup_steps updates
        decays = [ours.get_decay(step) for step in range(2, 10)]
        assert decays == sorted(decays) and decays[0] < 0.8 and ours.get_decay(warmup_steps + 1) == pytest.approx(0.8)
        assert decays[-1] == 0.8


def test_only_trainable_parameters_are_averaged_and_evaluation_swaps_exactly():
    model = small_model()
    model[0].requires_grad_(False)  # frozen: no copy
    ema = WeightEma(model, decay=0.5)
    assert sorted(ema.shadow) == ["1.bias", "1.weight", "3.bias", "3.weight"]
    train_steps(model, 3, ema.update)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in ema.averaged_state_dict(model).items()}
    assert torch.equal(averaged["0.weight"], weights["0.weight"]) and torch.equal(averaged["1.running_var"], weights["1.running_var"])
    assert not torch.equal(averaged["3.weight"], weights["3.weight"])
    with ema.swapped_in():
        assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the weights are back, bit for bit

    model[0].requires_grad_(True)  # an unfreeze: joins from its value now
    assert ema.follow(model) == ["0.weight", "0.bias"] and torch.equal(ema.shadow["0.weight"], weights["0.weight"])


def test_the_ranks_checksum_covers_the_ema():
    model = small_model()
    ema = WeightEma(model, decay=0.9)
    before = parameter_digest(model, ema.shadow)
    with torch.no_grad():
        ema.shadow["3.bias"][0] += 1e-6
    assert parameter_digest(model, ema.shadow) != before and parameter_digest(model) == parameter_digest(model)


def test_curves_draw_the_ema_beside_each_validation_curve(tmp_path, monkeypatch):
    from finetune.console import plots

    rows = [(1, 4, "train", "loss", 1.2), *[(e, 4 * e, "val", name, v) for e in (1, 2) for name, v in
            (("loss", 1.0 / e), ("acc", 0.4 * e), ("mae", 2.0 / e), ("ema/loss", 1.1 / e), ("ema/acc", 0.3 * e), ("ema/mae", 2.5 / e))]]
    (tmp_path / "metrics.csv").write_text("epoch,step,split,name,value\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    drawn = []
    monkeypatch.setattr(plots.plt, "close", lambda fig: drawn.append(fig))
    plots.plot_metrics(tmp_path / "metrics.csv", tmp_path / "curves.png", "cross-entropy",
                       [plots.MetricAxis("acc", 0.0, 1.0), plots.MetricAxis("mae", 0.0, None)])
    labels = [[line.get_label() for line in ax.lines] for ax in drawn[0].axes]
    assert labels == [["train loss", "val loss", "val loss (EMA)"], ["val acc", "val acc (EMA)"], ["val mae", "val mae (EMA)"]]
    assert drawn[0].axes[1].lines[1].get_color() == drawn[0].axes[1].lines[0].get_color()  # the raw curve's colour
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("override, error, message", [
    ("trainer.ema={decy: 0.9}", ConfigError, r"trainer.ema: .*decy.* \(its keys: decay, warmup_steps, every_n_steps, device\)"),
    ("trainer.ema=1.5", ConfigError, r"trainer.ema.decay=1.5 is outside \[0, 1\)"),
    ("trainer.early_stop={patience: 0}", ConfigError, r"patience=0"),
    ("trainer.monitor=val/ema/acc", TaskError, r"trainer.monitor=val/ema/acc is a metric of the weights' average, and trainer.ema is null"),
])
def test_settings_are_checked_before_anything_runs(tiny_cfg, tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        run(tiny_cfg(override, "trainer.tensorboard=false"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.csv").exists()


# ---- runs ------------------------------------------------------------------------------------------

def test_ema_run_logs_val_ema_monitors_it_and_resumes_bit_identically(tiny_cfg, tmp_path):
    settings = [EMA, "trainer.monitor=val/ema/acc", "optim=adamw", "trainer.tensorboard=false"]  # no schedule over the epochs
    first = run(tiny_cfg(*settings, "trainer.epochs=1"), tmp_path / "run")
    assert first["best"]["metric"] == "val/ema/acc" and first["best"]["value"] == first["final"]["val/ema/acc"]
    assert sorted(first["final"]) == ["val/acc", "val/ema/acc", "val/ema/loss", "val/loss"]
    # The best epoch (the only one) is judged on the EMA: best.safetensors holds the EMA's weights.
    best, ema = load_file(str(tmp_path / "run" / "checkpoints" / "best.safetensors")), load_file(str(tmp_path / "run" / "model_ema.safetensors"))
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(best[k], ema[k]) for k in ema) and not all(torch.equal(final[k], ema[k]) for k in ema)

    (tmp_path / "run" / "summary.json").unlink()  # the completed 1-epoch run, extended to 2 epochs
    with pytest.raises(RunDirError, match=r"trainer.ema.decay: 0.9 in the checkpoint, 0.99 now"):
        run(tiny_cfg(*settings, "trainer.ema={decay: 0.99}", "trainer.epochs=2"), tmp_path / "run")  # would mix two runs
    # The average's device may change, as trainer.device may (recorded in resume_changes).
    resumed = run(tiny_cfg(*settings[1:], "trainer.ema={decay: 0.9, device: cpu}", "trainer.epochs=2"), tmp_path / "run")
    assert resumed["resume_changes"]["trainer.ema.device"] == ["(absent)", "cpu"]
    straight = run(tiny_cfg(*settings, "trainer.epochs=2"), tmp_path / "straight")
    assert resumed["resumed_from"] == {"epoch": 1, "step": 4} and resumed["final"] == straight["final"]
    assert val_names_by_epoch(tmp_path / "run") == {e: ["loss", "acc", "ema/loss", "ema/acc"] for e in (1, 2)}
    for name in ("model_ema.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "straight" / name))
        assert all(torch.equal(a[k], b[k]) for k in b), name
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(saved["ema"]["shadow"][k], ema) for k, ema in load_file(str(tmp_path / "straight" / "model_ema.safetensors")).items()
               if k in saved["ema"]["shadow"])


def test_lora_ema_averages_the_trainable_tensors_only(tiny_cfg, tmp_path):
    from test_lora import with_lora

    summary = run(tiny_cfg(*with_lora(), EMA, "trainer.epochs=1"), tmp_path / "run")
    assert summary["status"] == "completed" and "val/ema/acc" in summary["final"]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    trainable = [p["name"] for p in read_json(tmp_path / "run" / "trainability.json")["params"] if p["trainable"]]
    assert sorted(saved["ema"]["shadow"]) == sorted(trainable) and any(".lora_" in n for n in trainable)
    ema, final = load_file(str(tmp_path / "run" / "model_ema.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert ema.keys() == final.keys()
    assert all(torch.equal(ema[k], final[k]) for k in final if k not in trainable)  # frozen base and buffers: the model's
    assert not all(torch.equal(ema[k], final[k]) for k in trainable)


def test_early_stop_ends_completed_and_its_counters_survive_a_resume(tiny_cfg, tmp_path, caplog):
    # Nothing improves val/loss by more than 10: epoch 1 sets the reference, epoch 2 is the patience.
    stop = ["trainer.early_stop={patience: 1, min_delta: 10}", "trainer.monitor=val/loss", "trainer.tensorboard=false"]
    first = run(tiny_cfg(*stop, "trainer.epochs=1"), tmp_path / "run")
    assert first["stopped_early"] is None
    (tmp_path / "run" / "summary.json").unlink()
    with caplog.at_level(logging.INFO, logger="finetune.loop"):
        summary = run(tiny_cfg(*stop, "trainer.epochs=5"), tmp_path / "run")
    # Stopped at epoch 2, not 3: the resumed run kept epoch 1's reference value.
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["steps"] == 8
    assert summary["stopped_early"] == {"epoch": 2, "best_epoch": summary["best"]["epoch"]}
    assert read_json(tmp_path / "run" / "summary.json")["stopped_early"] == summary["stopped_early"]
    stops = [r.getMessage() for r in caplog.records if "early stop" in r.getMessage()]
    assert len(stops) == 1 and "after epoch 2 of 5: val/loss has not improved by more than min_delta=10 for 1 epoch (" in stops[0]
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_ema_and_stop_at_the_same_step(tiny_cfg, tmp_path):
    from test_distributed import NO_BN

    summary = run(tiny_cfg(*NO_BN, EMA, "trainer.early_stop={patience: 1, min_delta: 10}", "trainer.monitor=val/ema/loss",
                           "trainer.epochs=4", "trainer.nproc=2", "data.batch_size=8"), tmp_path / "run")
    # ranks_in_sync compares every rank's parameters and EMA averages; a rank that did not stop would hang the other.
    assert summary["status"] == "completed" and summary["ranks_in_sync"] is True
    assert summary["stopped_early"] == {"epoch": 2, "best_epoch": summary["best"]["epoch"]} and summary["steps"] == 8
    assert "val/ema/loss" in summary["final"] and (tmp_path / "run" / "model_ema.safetensors").is_file()
