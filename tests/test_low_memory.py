"""checkpoint.low_memory: meta-device build + memory-mapped checkpoint + assign, and new modules
initialised with their own reset_parameters(). Loaded values equal the textbook recipe's."""

from __future__ import annotations

import pytest
import torch

from finetune.checkpoint.load import load_checkpoint, wants_low_memory
from finetune.model import build_model
from finetune.run import build_and_load_low_memory


def textbook(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model, edits = build_model(cfg.model)
    load_checkpoint(model, cfg.checkpoint, edits)
    return model.state_dict()


@pytest.mark.parametrize("ckpt", ["safetensors", "torch", "safetensors_module"])
def test_loaded_values_equal_the_textbook_recipe(tiny_cfg, tiny_ckpts, ckpt):
    cfg = tiny_cfg("checkpoint.low_memory=true", ckpt=getattr(tiny_ckpts, ckpt))
    model, _, report = build_and_load_low_memory(cfg)
    assert report is not None and report.init == "reset_parameters"
    expected = textbook(cfg)
    state = model.state_dict()
    assert not any(t.is_meta for t in state.values())
    for key in report.loaded:
        assert torch.equal(state[key], expected[key]), key
    # New modules got real values from their own reset_parameters(): the adapter's small init included.
    assert set(report.missing) >= {"adapter1.down.weight", "adapter1.up.weight"}
    assert torch.isfinite(state["adapter1.down.weight"]).all() and state["adapter1.down.weight"].abs().sum() > 0
    assert state["adapter1.up.weight"].abs().max() < 0.05  # Adapter.reset_parameters scaled it (init_scale)
    assert torch.equal(state["adapter1.up.bias"], torch.zeros_like(state["adapter1.up.bias"]))


def test_skipped_head_is_initialised_and_adapt_works_on_meta(tiny_cfg, tiny_ckpts):
    # shape_overrides names the replaced head: it wins over the replace op's own declaration (skip)
    cfg = tiny_cfg("checkpoint.low_memory=true", "checkpoint.shape_overrides=[{keys: 'head.*', action: adapt}]")
    model, _, report = build_and_load_low_memory(cfg)
    adapted = {m.key: m for m in report.mismatched}
    assert adapted["head.weight"].action == "adapted"
    weight = model.state_dict()["head.weight"]
    assert torch.equal(weight[:3], tiny_ckpts.state_dict["head.weight"][:3])  # overlapping rows copied


def test_shape_overrides_on_meta(tiny_cfg, tiny_ckpts):
    cfg = tiny_cfg("checkpoint.low_memory=true", "checkpoint.on_shape_mismatch=error",
                   "checkpoint.shape_overrides=[{keys: head.weight, action: adapt}, {keys: 'head.*', action: skip}]")
    model, _, report = build_and_load_low_memory(cfg)
    assert {m.key: (m.action, m.rule) for m in report.mismatched} == {
        "head.weight": ("adapted", "checkpoint.shape_overrides[0]"), "head.bias": ("skipped", "checkpoint.shape_overrides[1]")}
    state = model.state_dict()
    assert not any(t.is_meta for t in state.values())
    assert torch.equal(state["head.weight"][:3], tiny_ckpts.state_dict["head.weight"][:3])
    assert torch.isfinite(state["head.bias"]).all()  # skipped: the head's own reset_parameters()
    expected = textbook(cfg)
    for key in report.loaded:
        assert torch.equal(state[key], expected[key]), key


def test_module_without_reset_parameters_falls_back_to_a_normal_build(tiny_cfg, caplog):
    cfg = tiny_cfg("checkpoint.low_memory=true",
                   "model.add=[{op: replace, at: head, module: {_target_: torch.nn.Linear, in_features: 16, out_features: 3}},"
                   "{op: after, at: layer2, name: scale2, module: {_target_: tiny.RawScale}}]",
                   "checkpoint.expect.missing=null")
    model, _, report = build_and_load_low_memory(cfg)
    assert report is None  # the caller loads normally
    assert "building normally" in caplog.text and "no reset_parameters" in caplog.text
    assert not any(t.is_meta for t in model.state_dict().values())


def test_run_with_low_memory_trains(tiny_cfg, tmp_path):
    import json

    from finetune.run import run

    summary = run(tiny_cfg("checkpoint.low_memory=true"), tmp_path / "run")
    assert summary["status"] == "completed"
    assert json.loads((tmp_path / "run" / "load_report.json").read_text())["init"] == "reset_parameters"


def test_wants_low_memory(tiny_cfg, tiny_ckpts):
    assert wants_low_memory(tiny_cfg().checkpoint) is False  # auto: a tiny file
    assert wants_low_memory(tiny_cfg("checkpoint.low_memory=true").checkpoint) is True
    assert wants_low_memory(tiny_cfg("checkpoint.low_memory=false").checkpoint) is False


DRY_RUN_SCRIPT = """
import json, sys
from pathlib import Path
from hydra import compose, initialize_config_dir
import finetune.config, finetune.paths
from finetune.run import run

conf, ckpt, run_dir = sys.argv[1:4]
with initialize_config_dir(config_dir=finetune.paths.config_dir(), version_base="1.3"):
    cfg = compose("config", overrides=[f"hydra.searchpath=[file://{conf}]", "model=tiny", "data=tiny", "checkpoint=tiny",
                                       f"checkpoint.path={ckpt}", "checkpoint.low_memory=true", "dry_run=true", "dry_run_batches=0"])
run(cfg, Path(run_dir))
print(json.dumps({name: name in sys.modules for name in ("torch._dynamo", "sympy")}))
"""


def test_low_memory_dry_run_stays_light(tiny_ckpts, tmp_path, cli_env):
    """What makes a load-only dry run (dry_run_batches=0) on a large checkpoint cheap: no optimizer (building one imports torch._dynamo)
    and no torch.empty_like on meta tensors (its reference implementation imports sympy)."""
    import json
    import subprocess
    import sys

    from conftest import TEST_CONF

    result = subprocess.run([sys.executable, "-c", DRY_RUN_SCRIPT, str(TEST_CONF), str(tiny_ckpts.safetensors), str(tmp_path / "run")],
                            env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"torch._dynamo": False, "sympy": False}
    assert json.loads((tmp_path / "run" / "load_report.json").read_text())["init"] == "reset_parameters"


def test_checkpoint_tensors_sharing_storage_become_independent_parameters(tiny_cfg, tiny_ckpts, tmp_path):
    """A torch file can make two tensors views of one storage (torch.save keeps sharing). Assigned as
    they are, two untied parameters would alias: a step on one would move the other."""
    shared = torch.randn(2, 16, 16)  # layer2's weight and bias: views of one storage
    path = tmp_path / "aliasing.pt"
    torch.save({**tiny_ckpts.state_dict, "layer2.0.weight": shared[0], "layer2.0.bias": shared[1, 0]}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["layer2.0.weight"].untyped_storage().data_ptr() == loaded["layer2.0.bias"].untyped_storage().data_ptr()
    model, _, report = build_and_load_low_memory(tiny_cfg("checkpoint.low_memory=true", ckpt=path))
    assert report is not None and "layer2.0.bias" in report.loaded
    weight, bias = model.layer2[0].weight, model.layer2[0].bias
    assert weight.untyped_storage().data_ptr() != bias.untyped_storage().data_ptr()
    with torch.no_grad():
        weight.zero_()
    assert torch.equal(bias, shared[1, 0])
