"""NaN and Inf: named when a checkpoint brings them in, and never written as a run's weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import CheckpointError, TrainingError
from finetune.finite import all_finite, nonfinite_keys


def test_all_finite_is_exact_without_overflowing():
    assert all_finite(torch.ones(1000))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([1.0, float("inf"), float("-inf")]))  # inf - inf would be nan: still caught
    assert all_finite(torch.full((100_000,), 65504.0, dtype=torch.float16))  # the sum overflows: checked one by one
    assert all_finite(torch.full((4,), 1e308, dtype=torch.float64))
    assert not all_finite(torch.tensor([1e308, float("nan")], dtype=torch.float64))
    assert all_finite(torch.tensor([1, 2], dtype=torch.int64)) and all_finite(torch.empty(0))
    assert nonfinite_keys({"a": torch.ones(2), "b": torch.tensor([float("nan")]), "c": torch.zeros(1)}) == ["b"]


@pytest.fixture
def nan_stats_ckpt(tiny_ckpts, tmp_path):
    """Model A's checkpoint with a NaN BatchNorm running_var: training loss stays finite (batch
    statistics in train mode) while the buffer stays NaN."""
    state = dict(tiny_ckpts.state_dict)
    var = state["layer1.1.running_var"].clone()
    var[:3] = float("nan")
    state["layer1.1.running_var"] = var
    path = tmp_path / "nan_stats.safetensors"
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("low_memory", ["false", "true"])
def test_nan_in_a_checkpoint_buffer_stops_the_load_naming_the_key(tiny_cfg, nan_stats_ckpt, tmp_path, low_memory):
    from finetune.run import run

    with pytest.raises(CheckpointError) as info:
        run(tiny_cfg("dry_run=true", f"checkpoint.low_memory={low_memory}", ckpt=nan_stats_ckpt), tmp_path)
    assert "1 checkpoint tensor(s) hold NaN or Inf: layer1.1.running_var (3 values)" in info.value.problem
    assert "checkpoint.expect.nonfinite" in info.value.fix and info.value.group == "checkpoint"
    assert not (tmp_path / "load_report.json").exists()


def test_declared_nonfinite_loads_but_is_never_saved_as_trained_weights(tiny_cfg, nan_stats_ckpt, tmp_path):
    from finetune.run import run

    cfg = tiny_cfg("checkpoint.expect.nonfinite=[layer1.1.running_var]", ckpt=nan_stats_ckpt)
    with pytest.raises(TrainingError) as info:
        run(cfg, tmp_path)
    assert "NaN or Inf at step" in info.value.problem and "layer1.1.running_var" in info.value.problem
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "layer1.1.running_var" in summary["error"]
    assert not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and not (tmp_path / "checkpoints" / "best.safetensors").exists()
    report = json.loads((tmp_path / "load_report.json").read_text())
    assert report["nonfinite"] == {"layer1.1.running_var": 3}


def test_a_nonfinite_glob_matching_no_key_is_an_error(tiny_cfg, tiny_ckpts, tmp_path):
    from finetune.run import run

    with pytest.raises(CheckpointError, match="checkpoint.expect.nonfinite: glob 'mask' matches no model key"):
        run(tiny_cfg("dry_run=true", "checkpoint.expect.nonfinite=[mask]"), tmp_path)


@pytest.mark.slow
def test_the_command_refuses_a_nan_checkpoint_with_one_message(cli, tmp_path, nan_stats_ckpt):
    from conftest import TEST_CONF

    run_dir = tmp_path / "run"
    result = cli("finetune", "--config-dir", str(TEST_CONF), "model=tiny", "data=tiny", "checkpoint=tiny",
                 f"checkpoint.path={nan_stats_ckpt}", f"hydra.run.dir={run_dir}", "trainer.progress=false")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("finetune: error:") == 1 and "  fix: " in result.stderr and "Traceback" not in result.stderr
    assert "layer1.1.running_var (3 values)" in result.stderr
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "summary.json").exists()


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checking_a_memory_mapped_checkpoint_gives_its_pages_back(tmp_path, fmt):
    """Reading 256 MiB of a memory-mapped checkpoint to check it must not leave 256 MiB resident,
    and must not change a value (the pages are read again from the file)."""
    from finetune.checkpoint.read import read_checkpoint

    big = torch.randn(64 * 2**20)  # 256 MiB of float32
    bad = torch.ones(1000)
    bad[500] = float("nan")
    path = tmp_path / f"big.{fmt}"
    if fmt == "pt":
        torch.save({"big": big, "bad": bad}, path)
    else:
        save_file({"big": big, "bad": bad}, str(path))
    expected_sum = big.double().sum().item()
    del big
    contents = read_checkpoint(str(path), zero_copy=True)
    assert contents.mapped
    before = _rss_mb()
    assert nonfinite_keys(contents.state_dict, mapped=True) == ["bad"]
    assert _rss_mb() - before < 100, (before, _rss_mb())
    assert contents.state_dict["big"].double().sum().item() == expected_sum  # read back from the file, unchanged
    assert torch.isnan(contents.state_dict["bad"][500]) and contents.state_dict["bad"][499] == 1
