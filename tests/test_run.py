"""finetune.run.run in-process on the tiny model/data: the run-directory contract, the policy's effect
on the weights, the gradient audit, refusing to overwrite, and resume."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune.run as run_module
from finetune.errors import AuditError, RunDirError
from finetune.model import build_model
from finetune.run import run

ADAPTER = ["adapter1.down.weight", "adapter1.down.bias", "adapter1.up.weight", "adapter1.up.bias"]
STEPS_PER_EPOCH = 4  # 64 samples / batch 16
CONTRACT_FILES = ["load_report.json", "trainability.json", "metrics.csv", "summary.json", "model.safetensors",
                  "checkpoints/last.pt"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def fresh_weights(cfg) -> dict[str, torch.Tensor]:
    """What a normal build of the model gives (run() seeds with cfg.seed before building)."""
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg.model)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def capture_model(monkeypatch) -> dict:
    """Record the model that run() hands to training, to look at requires_grad afterwards."""
    seen: dict = {}
    original = run_module.train

    def spy(cfg, run_dir, model, *args, **kwargs):
        seen["model"] = model
        return original(cfg, run_dir, model, *args, **kwargs)

    monkeypatch.setattr(run_module, "train", spy)
    return seen


# ---- a completed run: every contract file ----------------------------------------------------


@pytest.fixture(scope="module")
def completed(tmp_path_factory, tiny_ckpts):
    """One 2-epoch run shared by the contract tests (they only read it)."""
    from conftest import TINY_TRAIN, compose_config

    cfg = compose_config([*TINY_TRAIN, f"checkpoint.path={tiny_ckpts.safetensors_module}"])
    run_dir = tmp_path_factory.mktemp("completed") / "run"
    summary = run(cfg, run_dir)
    return cfg, run_dir, summary


def test_run_dir_files(completed):
    _, run_dir, _ = completed
    for name in CONTRACT_FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp"))  # atomic writes leave no temp files


def test_summary_json(completed):
    cfg, run_dir, returned = completed
    summary = read_json(run_dir / "summary.json")
    assert summary == json.loads(json.dumps(returned))
    assert summary["status"] == "completed"
    assert summary["epochs"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["world_size"] == 1 and summary["ranks_in_sync"] is None and summary["resumed_from"] is None
    assert summary["wall_s"] > 0
    best = summary["best"]
    assert best["metric"] == "val/acc" and best["epoch"] in (1, 2) and 0.0 <= best["value"] <= 1.0
    assert set(summary["final"]) >= {"val/acc", "val/loss"}
    assert best["value"] >= summary["final"]["val/acc"]
    assert summary["throughput"]["train_samples_per_s"] > 0


def test_load_report_json(completed, tiny_ckpts):
    cfg, run_dir, _ = completed
    report = read_json(run_dir / "load_report.json")
    assert report["checkpoint"] == str(tiny_ckpts.safetensors_module) and report["format"] == "safetensors"
    model_keys = list(fresh_weights(cfg))
    accounted = report["loaded"] + report["missing"] + [m["key"] for m in report["mismatched"]]
    assert sorted(accounted) == sorted(model_keys) and len(accounted) == len(set(accounted))
    assert sorted(report["missing"]) == sorted(ADAPTER)
    assert [(m["key"], m["action"]) for m in report["mismatched"]] == [("head.weight", "skipped"), ("head.bias", "skipped")]
    assert report["unexpected"] == []
    assert report["remapped"] == {f"module.{k}": k for k in tiny_ckpts.state_dict}
    assert report["counts"] == {**report["counts"], "loaded": len(report["loaded"]), "missing": 4, "unexpected": 0,
                                "mismatched": 2, "remapped": len(tiny_ckpts.state_dict)}


def test_trainability_json(completed):
    cfg, run_dir, _ = completed
    body = read_json(run_dir / "trainability.json")
    params = {p["name"]: p for p in body["params"]}
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    for name, p in params.items():
        assert set(p) >= {"name", "shape", "numel", "source", "trainable", "lr", "weight_decay", "group"}
        assert p["trainable"] is True and p["lr"] == pytest.approx(3e-3)
        assert p["numel"] == model.get_parameter(name).numel() and p["shape"] == list(model.get_parameter(name).shape)
    assert {n for n, p in params.items() if p["source"] == "new"} == set(ADAPTER) | {"head.weight", "head.bias"}
    assert body["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert body["audit"]["grad_flow_ok"] is True and body["audit"]["no_grad"] == []
    assert body["audit"]["frozen_unchanged"] is True


def test_metrics_csv(completed):
    _, run_dir, _ = completed
    rows = metrics_rows(run_dir)
    assert list(rows[0]) == ["epoch", "step", "split", "name", "value"]
    train_loss = [(int(r["epoch"]), int(r["step"])) for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert train_loss == [(1 + (s - 1) // STEPS_PER_EPOCH, s) for s in range(1, 9)]  # log_every=1
    val_acc = [(int(r["epoch"]), int(r["step"]), float(r["value"])) for r in rows if r["split"] == "val" and r["name"] == "acc"]
    assert [(e, s) for e, s, _ in val_acc] == [(1, 4), (2, 8)]
    assert val_acc[-1][2] == pytest.approx(read_json(run_dir / "summary.json")["final"]["val/acc"], abs=1e-5)


def test_model_safetensors_loads_strictly_into_rebuilt_model(completed):
    cfg, run_dir, _ = completed
    weights = load_file(str(run_dir / "model.safetensors"))
    model, _ = build_model(cfg.model)
    model.load_state_dict(weights, strict=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in last["model"].items())
    start = fresh_weights(cfg)
    assert not torch.equal(weights["adapter1.down.weight"], start["adapter1.down.weight"])  # new params trained
    assert not torch.equal(weights["head.weight"], start["head.weight"])


def test_last_pt_holds_full_training_state(completed):
    _, run_dir, _ = completed
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "progress", "config", "audit"} <= set(state)
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert state["progress"]["step"] == 8 and state["progress"]["epoch"] == 3  # the next epoch to run
    assert len(state["optimizer"]["state"]) == sum(len(g["params"]) for g in state["optimizer"]["param_groups"])


def test_run_files_respect_the_umask(completed):
    _, run_dir, _ = completed
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: oct((run_dir / name).stat().st_mode & 0o777) for name in CONTRACT_FILES}
    assert modes == {name: oct(0o666 & ~umask) for name in CONTRACT_FILES}


# ---- dry run ---------------------------------------------------------------------------------


def test_dry_run_writes_reports_only(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("dry_run=true"), run_dir)
    assert summary["status"] == "dry_run" == read_json(run_dir / "summary.json")["status"]
    assert summary["steps"] == 0
    assert read_json(run_dir / "load_report.json")["counts"]["missing"] == 4
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["checked"] is True and audit["grad_flow_ok"] is True  # one batch forward and backward
    for name in ["model.safetensors", "checkpoints", "metrics.csv"]:
        assert not (run_dir / name).exists(), name


def test_dry_run_batches_0_loads_only_and_reads_no_data(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("dry_run=true", "dry_run_batches=0", "data.train._target_=no.such.dataset")
    assert run(cfg, run_dir)["status"] == "dry_run"
    assert read_json(run_dir / "trainability.json")["audit"]["checked"] is False


def test_dry_run_finds_a_module_that_forward_never_calls(tiny_cfg, tmp_path):
    from finetune.errors import AuditError

    run_dir = tmp_path / "run"
    with pytest.raises(AuditError, match="unused"):
        run(tiny_cfg("dry_run=true", "model=tiny_unused", ckpt=None), run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing written that could pass for a result


def test_from_scratch_has_no_load_report(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("trainer.epochs=1", ckpt=None), run_dir)
    assert summary["status"] == "completed"
    assert not (run_dir / "load_report.json").exists()
    assert {p["source"] for p in read_json(run_dir / "trainability.json")["params"]} == {"new"}


# ---- policy effects on the weights -----------------------------------------------------------


def test_frozen_params_unchanged_and_new_params_trained(tiny_cfg, tiny_ckpts, tmp_path, capture_model):
    cfg = tiny_cfg("policy.freeze=[layer1,layer2]")
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    model = capture_model["model"]
    frozen = [n for n, _ in model.named_parameters() if n.startswith(("layer1.", "layer2."))]
    assert frozen and all(not model.get_parameter(n).requires_grad for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in frozen)
    weights = load_file(str(run_dir / "model.safetensors"))
    for name in frozen:
        assert torch.equal(weights[name], tiny_ckpts.state_dict[name]), name
    start = fresh_weights(cfg)
    for name in ADAPTER + ["head.weight", "head.bias"]:
        assert not torch.equal(weights[name], start[name]), name
    body = read_json(run_dir / "trainability.json")
    assert {p["name"] for p in body["params"] if not p["trainable"]} == set(frozen)
    assert body["audit"]["frozen_unchanged"] is True and body["audit"]["changed_frozen"] == []
    last = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    in_optimizer = sum(len(g["params"]) for g in last["optimizer"]["param_groups"])
    assert in_optimizer == len(body["params"]) - len(frozen)  # frozen tensors are not in the optimizer


BN_STATS = ["layer1.1.running_mean", "layer1.1.running_var", "layer1.1.num_batches_tracked"]


def test_bn_freeze_stats_keeps_running_stats_bit_identical(tiny_cfg, tiny_ckpts, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("policy=linear_probe"), run_dir)  # freeze '*', new train, bn freeze_stats
    weights = load_file(str(run_dir / "model.safetensors"))
    for name in BN_STATS:
        assert torch.equal(weights[name], tiny_ckpts.state_dict[name]), name
    body = read_json(run_dir / "trainability.json")
    assert body["frozen_norms"] == ["layer1.1"]
    assert body["audit"]["frozen_unchanged"] is True
    assert {p["name"] for p in body["params"] if p["trainable"]} == set(ADAPTER) | {"head.weight", "head.bias"}


def test_bn_follow_updates_running_stats_of_frozen_layers(tiny_cfg, tiny_ckpts, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("policy.freeze=['*']", "policy.bn=follow"), run_dir)
    weights = load_file(str(run_dir / "model.safetensors"))
    assert not torch.equal(weights["layer1.1.running_mean"], tiny_ckpts.state_dict["layer1.1.running_mean"])
    assert torch.equal(weights["layer1.1.weight"], tiny_ckpts.state_dict["layer1.1.weight"])


def test_probe_then_finetune_unfreezes_without_a_false_frozen_alarm(tiny_cfg, tiny_ckpts, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("policy=probe_then_finetune", "policy.unfreeze.0.at_epoch=2", "optim=adamw"), run_dir)
    assert summary["status"] == "completed"
    body = read_json(run_dir / "trainability.json")
    assert body["audit"]["frozen_unchanged"] is True and body["audit"]["changed_frozen"] == []
    assert {p["name"] for p in body["params"] if p["trainable"]} == set(ADAPTER) | {"head.weight", "head.bias"}
    weights = load_file(str(run_dir / "model.safetensors"))
    # Unfrozen in epoch 2: the pretrained weights and the BatchNorm statistics move from then on.
    assert not torch.equal(weights["layer1.0.weight"], tiny_ckpts.state_dict["layer1.0.weight"])
    assert not torch.equal(weights["layer1.1.running_mean"], tiny_ckpts.state_dict["layer1.1.running_mean"])
    last = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    groups = {g["name"]: g for g in last["optimizer"]["param_groups"]}
    assert groups["unfreeze[0]"]["lr"] == pytest.approx(0.1 * 3e-3)
    assert sum(len(g["params"]) for g in groups.values()) == len(body["params"])  # everything trains at the end


def test_unfreeze_with_the_default_warmup_cosine_schedule(tiny_cfg, tmp_path):
    summary = run(tiny_cfg("policy=probe_then_finetune", "policy.unfreeze.0.at_epoch=2", "optim=adamw_cosine"), tmp_path / "run")
    assert summary["status"] == "completed"


# ---- gradient audit --------------------------------------------------------------------------


def test_module_never_used_in_forward_fails_the_audit(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(AuditError) as info:
        run(tiny_cfg("model=tiny_unused", ckpt=None), run_dir)
    assert "unused.weight" in info.value.problem and "unused.bias" in info.value.problem
    assert "layer1" not in info.value.problem
    assert "allow_no_grad" in info.value.fix
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is False and sorted(audit["no_grad"]) == ["unused.bias", "unused.weight"]
    assert read_json(run_dir / "summary.json")["status"] == "failed"
    assert not (run_dir / "model.safetensors").exists()


def test_allow_no_grad_lets_it_pass(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("model=tiny_unused", "policy.allow_no_grad=[unused]", "trainer.epochs=1", ckpt=None), run_dir)
    assert summary["status"] == "completed"
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is True and audit["no_grad"] == []
    assert sorted(audit["allowed_no_grad"]) == ["unused.bias", "unused.weight"]


# ---- the run directory: no overwrite, resume -------------------------------------------------


def test_completed_run_dir_is_not_overwritten(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("trainer.epochs=1"), run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="completed run"):
        run(tiny_cfg("trainer.epochs=1"), run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_dry_run_does_not_overwrite_a_completed_run(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("trainer.epochs=1"), run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    try:
        run(tiny_cfg("dry_run=true"), run_dir)
    except RunDirError:
        pass
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_resume_never_refuses_existing_checkpoint(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("trainer.epochs=1"), run_dir)
    (run_dir / "summary.json").unlink()
    with pytest.raises(RunDirError, match="resume=never"):
        run(tiny_cfg("trainer.epochs=1", "trainer.resume=never"), run_dir)


def interrupting(marker: Path) -> list[str]:
    # SIGINT while the 20th training sample is fetched: during the second batch of epoch 1.
    return ["+data.train.interrupt_after=20", f"+data.train.interrupt_marker={marker}"]


def test_interrupt_then_resume_continues(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    marker = tmp_path / "sigint-sent"
    first = run(tiny_cfg(*interrupting(marker)), run_dir)
    assert marker.exists()
    assert first["status"] == "interrupted" and first["exit_code"] == 130
    assert first["steps"] == 2 and first["epochs"] == 0
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "model.safetensors").exists()

    second = run(tiny_cfg(*interrupting(marker)), run_dir)  # the same command again
    assert second["status"] == "completed"
    # Resumed from where the interrupted run stopped, in the summary's own units (epochs completed, steps).
    assert second["resumed_from"] == {"epoch": first["epochs"], "step": first["steps"]}
    assert second["steps"] == 8 and second["epochs"] == 2
    assert read_json(run_dir / "summary.json")["resumed_from"] == second["resumed_from"]
    steps = [int(r["step"]) for r in metrics_rows(run_dir) if r["split"] == "train" and r["name"] == "loss"]
    assert steps == list(range(1, 9))  # no step logged twice, none lost

    # Resuming reproduces the uninterrupted run exactly (order and RNG are restored).
    straight_dir = tmp_path / "straight"
    run(tiny_cfg(*interrupting(marker)), straight_dir)  # marker exists: no interruption
    resumed, straight = load_file(str(run_dir / "model.safetensors")), load_file(str(straight_dir / "model.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_resume_mid_epoch_with_grad_accum_is_exact(tiny_cfg, tmp_path):
    """The resumed epoch counts only the batches left, so accumulation closes steps where the
    uninterrupted run did (2 batches per step; interrupted after step 1, in the middle of epoch 1)."""
    marker = tmp_path / "sigint-sent"
    accum = [*interrupting(marker), "trainer.grad_accum=2"]
    first = run(tiny_cfg(*accum), tmp_path / "run")
    assert first["status"] == "interrupted" and first["steps"] == 1
    assert run(tiny_cfg(*accum), tmp_path / "run")["steps"] == 4
    run(tiny_cfg(*accum), tmp_path / "straight")
    resumed, straight = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_resume_from_explicit_path(tiny_cfg, tmp_path):
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    run(tiny_cfg("trainer.epochs=1"), first_dir)
    summary = run(tiny_cfg(f"trainer.resume={first_dir / 'checkpoints' / 'last.pt'}"), second_dir)
    assert summary["resumed_from"] == {"epoch": 1, "step": 4}
    assert summary["status"] == "completed" and summary["steps"] == 8


def test_resume_with_a_different_model_is_refused(tiny_cfg, tmp_path):
    first_dir = tmp_path / "a"
    run(tiny_cfg("trainer.epochs=1"), first_dir)
    last = first_dir / "checkpoints" / "last.pt"
    with pytest.raises(RunDirError, match="different model"):
        run(tiny_cfg(f"trainer.resume={last}", "+model.add.1.module.reduction=2"), tmp_path / "b")


# ---- unfreeze: optimizer state and resume ------------------------------------------------------


def test_unfreeze_keeps_the_earlier_groups_optimizer_state(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("policy=probe_then_finetune", "policy.unfreeze.0.at_epoch=2", "optim=adamw", "trainer.epochs=3"), run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    optimizer = last["optimizer"]
    steps_of = {}
    for group in optimizer["param_groups"]:
        steps_of[group["name"]] = {float(optimizer["state"][i]["step"]) for i in group["params"]}
    # The groups built at the start trained all 3 epochs: their Adam state was never reset by the unfreeze.
    assert steps_of["default"] == {3.0 * STEPS_PER_EPOCH}
    # The unfrozen groups joined at the start of epoch 2.
    assert steps_of["unfreeze[0]"] == {2.0 * STEPS_PER_EPOCH}
    assert [g["name"] for g in optimizer["param_groups"]][:2] == ["default", "default/no_decay"]


def test_resume_after_unfreeze_rebuilds_the_same_groups(tiny_cfg, tmp_path):
    marker = tmp_path / "sigint-sent"
    # 64 samples per epoch: the 150th sample fetched is in epoch 3, after the unfreeze at epoch 2.
    overrides = ["policy=probe_then_finetune", "policy.unfreeze.0.at_epoch=2", "optim=adamw_cosine", "trainer.epochs=3",
                 "+data.train.interrupt_after=150", f"+data.train.interrupt_marker={marker}"]
    run_dir = tmp_path / "run"
    first = run(tiny_cfg(*overrides), run_dir)
    assert first["status"] == "interrupted" and first["epochs"] == 2
    before = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    second = run(tiny_cfg(*overrides), run_dir)
    assert second["status"] == "completed" and second["resumed_from"]["epoch"] == 2
    after = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    names = lambda state: [(g["name"], len(g["params"])) for g in state["optimizer"]["param_groups"]]
    assert names(after) == names(before) and any(n.startswith("unfreeze[0]") for n, _ in names(after))
    assert after["progress"]["unfrozen"] == [0]

    straight_dir = tmp_path / "straight"
    run(tiny_cfg(*overrides), straight_dir)  # marker exists: uninterrupted
    resumed, straight = load_file(str(run_dir / "model.safetensors")), load_file(str(straight_dir / "model.safetensors"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


# ---- non-finite loss ---------------------------------------------------------------------------


def test_nan_loss_stops_with_status_failed(tiny_cfg, tmp_path):
    from finetune.errors import TrainingError

    run_dir = tmp_path / "run"
    # Sample order is a permutation: whichever batch holds sample 5 has a NaN loss, in epoch 1.
    with pytest.raises(TrainingError) as info:
        run(tiny_cfg("+data.train.nan_at=5"), run_dir)
    assert "training loss is nan" in str(info.value) and "step" in str(info.value)
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "failed" and "nan" in summary["error"]
    assert not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # no checkpoint was written from NaN weights


def test_skip_nonfinite_skips_the_bad_batch_and_completes(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("+data.train.nan_at=5", "trainer.skip_nonfinite=true"), run_dir)
    assert summary["status"] == "completed"
    assert summary["skipped_nonfinite"] == 2  # the bad batch, once per epoch
    assert summary["steps"] == 2 * (STEPS_PER_EPOCH - 1)
    weights = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


# ---- trainer options ---------------------------------------------------------------------------


def test_bf16_autocast_trains(tiny_cfg, tmp_path):
    summary = run(tiny_cfg("trainer.precision=bf16"), tmp_path / "run")
    import math

    assert summary["status"] == "completed" and math.isfinite(summary["final"]["val/loss"])


def test_save_best_puts_the_best_epochs_weights_in_model_safetensors(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run(tiny_cfg("trainer.save=best", "trainer.epochs=3"), run_dir)
    best = load_file(str(run_dir / "checkpoints" / "best.safetensors"))
    final = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert summary["best"]["epoch"] in (1, 2, 3)


def test_imagefolder_split_is_seeded_disjoint_and_complete(tmp_path):
    from PIL import Image

    from finetune.datasets import imagefolder_split

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(tmp_path / cls / f"{i}.png")
    train = imagefolder_split(str(tmp_path), "train", val_fraction=0.3, seed=3)
    val = imagefolder_split(str(tmp_path), "val", val_fraction=0.3, seed=3)
    assert len(val) == 6 and len(train) == 14
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(20))
    assert imagefolder_split(str(tmp_path), "val", val_fraction=0.3, seed=3).indices == val.indices
    assert imagefolder_split(str(tmp_path), "val", val_fraction=0.3, seed=4).indices != val.indices
    assert train.classes == ["a", "b"]
