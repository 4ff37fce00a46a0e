"""finetune-export: the deployable artifacts of a finished run (merged weights, a torch.export program,
ONNX), each run over the validation data beside the trained model before it is written.

The exporters are checked on real architectures built from tiny configs (Hugging Face BERT and GPT-2,
a timm ViT, a torchvision ResNet): the artifact, loaded back as its user loads it, gives the trained
model's outputs on a batch of another size. The command runs for real on two finished tiny runs (one
with lora ops, one without), each test on its own copy of a run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import real_models
from finetune.artifacts import ArtifactError, ExampleInputs, stage_onnx, stage_program

TESTS_CONF = Path(__file__).parent / "conf"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- the exporters on real architectures ---------------------------------------------------------------
def tokens(n: int, with_mask: bool) -> dict:
    ids = torch.randint(1, real_models.VOCAB, (n, 12), generator=torch.Generator().manual_seed(n))
    return {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if with_mask else {})}


def images(n: int) -> tuple:
    return (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n)),)


CASES = {  # model config -> (positional inputs, keyword inputs) of a batch of n
    "hf_bert_classifier": lambda n: ((), tokens(n, with_mask=True)),
    "hf_gpt2": lambda n: ((), tokens(n, with_mask=False)),
    "timm_vit": lambda n: (images(n), {}),
    "tv_resnet18_regression": lambda n: (images(n), {}),
}


def tensors(output) -> list[torch.Tensor]:
    return [x for x in tree_flatten(output)[0] if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize(("stage", "name"), [
    pytest.param(stage_program, "hf_gpt2", id="torch_export-hf_gpt2"),  # traced without its key/value cache
    pytest.param(stage_program, "timm_vit", id="torch_export-timm_vit"),
    pytest.param(stage_program, "tv_resnet18_regression", id="torch_export-tv_resnet18"),
    pytest.param(stage_onnx, "hf_bert_classifier", id="onnx-hf_bert"),  # keyword inputs, an HF output class
])
def test_an_exported_program_gives_the_models_outputs_at_another_batch_size(stage, name, tmp_path):
    torch.manual_seed(0)
    model = real_models.build(real_models.model_config(name).base).eval()
    args, kwargs = CASES[name](3)
    loaded = stage(model, ExampleInputs(args, kwargs), tmp_path / "artifact")
    args, kwargs = CASES[name](2)  # traced with 3: the batch dimension is dynamic
    with torch.no_grad():
        expected, got = model(*args, **kwargs), loaded(*args, **kwargs)
    assert type(got) is type(expected) or isinstance(expected, torch.Tensor)  # HF outputs keep their class
    pairs = list(zip(tensors(expected), tensors(got)))
    assert pairs and all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in pairs)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # control flow on a tensor's value


def test_a_model_torch_export_cannot_trace_is_one_message_naming_it(tmp_path):
    with pytest.raises(ArtifactError, match="torch.export cannot trace DataDependent") as caught:
        stage_program(DataDependent(), ExampleInputs((torch.ones(2, 4),), {}), tmp_path / "model.pt2")
    assert "HYDRA_FULL_ERROR=1" in caught.value.fix and not (tmp_path / "model.pt2").exists()


# ---- the command on finished runs ----------------------------------------------------------------------
LORA = ["model.add=[{op: replace, at: head, module: {_target_: torch.nn.Linear, in_features: 16, out_features: 3}}, "
        "{op: after, at: layer1, name: adapter1, module: {_target_: finetune.modules.Adapter, channels: 16, spatial: false}}, "
        "{op: lora, at: 'layer*', rank: 4, alpha: 8}]", "policy=lora"]
COMMON = ["--config-dir", str(TESTS_CONF), "model=tiny", "data=tiny", "checkpoint=tiny", "trainer.epochs=1",
          "trainer.progress=false", "trainer.tensorboard=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpts, finetune_cache) -> dict[str, Path]:
    """Two finished tiny runs, trained side by side: with lora ops, and without."""
    from command_line import command_env, finetune_side_by_side

    args = {"lora": [*LORA, f"checkpoint.path={tiny_ckpts.safetensors}"], "plain": [f"checkpoint.path={tiny_ckpts.safetensors}"]}
    return finetune_side_by_side(tmp_path_factory.mktemp("runs"), {name: [*COMMON, *extra] for name, extra in args.items()},
                                 command_env(finetune_cache))


@pytest.fixture
def run_copy(runs, tmp_path):
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(runs[name], target)
        return target

    return copy


def artifacts(run_dir: Path) -> dict[str, dict]:
    return {a["file"]: a for a in read_json(run_dir / "export_report.json")["artifacts"]}


@pytest.mark.slow
def test_every_format_of_a_lora_run_is_written_and_verified(run_copy, cli):
    run_dir = run_copy("lora")
    trained = artifacts(run_dir)  # the training run's own: merged.safetensors and adapter/
    done = cli("finetune-export", str(run_dir))
    assert done.returncode == 0, done.stderr
    report = artifacts(run_dir)
    assert set(report) == {"adapter/", "merged.safetensors", "model.pt2", "model.onnx"}
    assert report["adapter/"] == trained["adapter/"]  # the entries of files not exported again are kept
    for name in ("merged.safetensors", "model.pt2", "model.onnx"):
        check = report[name]
        assert check["ok"] and (run_dir / name).is_file() and check["tolerance"] == 1e-4
        assert 0 < check["max_abs_diff"] <= 1e-4 * check["output_scale"]  # merged: float rounding, never exact
        trained_acc, exported_acc = check["metrics"]["val/acc"]
        assert trained_acc == exported_acc
    assert "model.pt2" in done.stdout and "verified" in done.stdout and not list(run_dir.glob(".export*"))
    # what a user does with it: a plain module, no finetune code in the way
    program = torch.export.load(str(run_dir / "model.pt2")).module()
    assert program(torch.rand(5, 8)).shape == (5, 3)


def test_an_artifact_outside_the_tolerance_is_not_written_and_the_command_fails(run_copy, capsys):
    from finetune.commands.export import main

    run_dir = run_copy("lora")
    assert main([str(run_dir), "--format", "torch_export", "--tolerance", "0"]) != 0
    err = capsys.readouterr().err
    assert "finetune-export: error: export verification failed" in err and "model.pt2 differs by" in err
    assert not (run_dir / "model.pt2").exists() and not list(run_dir.glob(".export*"))
    check = artifacts(run_dir)["model.pt2"]
    assert check["ok"] is False and check["max_abs_diff"] > 0 and check["tolerance"] == 0


def test_a_run_without_lora_ops_exports_its_program_and_has_nothing_to_merge(run_copy):
    from finetune.commands.export import main

    run_dir = run_copy("plain")
    assert main([str(run_dir), "--format", "safetensors", "--format", "torch_export"]) == 0
    report = read_json(run_dir / "export_report.json")
    assert [a["file"] for a in report["artifacts"]] == ["model.pt2"] and report["artifacts"][0]["ok"]
    assert report["skipped"] == [{"file": "merged.safetensors", "reason": report["skipped"][0]["reason"]}]
    assert "no lora ops" in report["skipped"][0]["reason"] and not (run_dir / "merged.safetensors").exists()


def test_an_unknown_format_and_a_run_without_weights_are_one_message(run_copy, capsys, tmp_path):
    from finetune.commands.export import main

    assert main([str(tmp_path), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert "--format tflite: not a format finetune-export writes" in err and "safetensors, torch_export, onnx" in err
    run_dir = run_copy("plain")
    (run_dir / "model.safetensors").unlink()
    assert main([str(run_dir), "--format", "torch_export"]) != 0
    assert "has no model.safetensors: the run did not complete" in capsys.readouterr().err
    assert not (run_dir / "export_report.json").exists()
