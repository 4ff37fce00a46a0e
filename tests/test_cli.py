"""End to end: the installed `finetune` / `finetune-inspect` commands in a temp working directory."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.demo import asset

pytestmark = pytest.mark.slow

DEMO_CKPT = asset("demo_shapes_a.safetensors")
CONTRACT_FILES = ["load_report.json", "trainability.json", "metrics.csv", "summary.json", "model.safetensors",
                  "checkpoints/last.pt"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def output(result) -> str:
    return result.stdout + result.stderr


def finetune(cli, run_dir: Path, *overrides: str, **kwargs):
    return cli("finetune", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false", **kwargs)


# ---- (a) the demo ----------------------------------------------------------------------------


def test_demo_completes_and_writes_every_contract_file(cli, tmp_path):
    run_dir = tmp_path / "demo"
    result = finetune(cli, run_dir, "trainer.epochs=2")
    assert result.returncode == 0, output(result)
    for name in CONTRACT_FILES:
        assert (run_dir / name).is_file(), name
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["epochs"] == 2 and summary["steps"] == 8  # 64 images / 16
    assert summary["best"]["metric"] == "val/acc" and summary["throughput"]["train_samples_per_s"] > 0
    report = read_json(run_dir / "load_report.json")
    assert report["counts"]["loaded"] == 42 and report["counts"]["unexpected"] == 0
    assert sorted(report["missing"]) == ["adapter2.down.bias", "adapter2.down.weight", "adapter2.up.bias", "adapter2.up.weight"]
    assert {m["key"]: m["action"] for m in report["mismatched"]} == {"fc.weight": "skipped", "fc.bias": "skipped"}
    trainability = read_json(run_dir / "trainability.json")
    assert trainability["audit"]["grad_flow_ok"] is True and trainability["audit"]["frozen_unchanged"] is True
    weights = load_file(str(run_dir / "model.safetensors"))
    assert weights["fc.weight"].shape == (4, 64) and "adapter2.up.weight" in weights
    with safe_open(str(DEMO_CKPT), "pt") as f:
        ckpt_keys = {k.removeprefix("module.") for k in f.keys()}
    assert ckpt_keys <= set(weights)


# ---- (b) user errors: one message, no traceback, no result files -----------------------------


@pytest.fixture(scope="module")
def unsafe_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unsafe") / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload()}, path)
    return path


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').close()",))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, unsafe_checkpoint) -> dict[str, Path]:
    """Damaged or unusable checkpoints, each made from the demo checkpoint the way they happen."""
    root = tmp_path_factory.mktemp("bad")
    weights = load_file(DEMO_CKPT)
    paths = {"unsafe": unsafe_checkpoint, "garbage": root / "error_page.pt", "empty": root / "empty.safetensors",
             "cut_safetensors": root / "cut.safetensors", "cut_zip": root / "cut.pt", "nested": root / "nested.pt",
             "no_index_dir": root / "downloaded", "index": root / "sharded" / "model.safetensors.index.json"}
    paths["garbage"].write_text("<html><body>403 Forbidden</body></html>")
    paths["empty"].write_bytes(b"")
    data = Path(DEMO_CKPT).read_bytes()
    paths["cut_safetensors"].write_bytes(data[: len(data) // 2])
    torch.save(weights, root / "full.pt")
    data = (root / "full.pt").read_bytes()
    paths["cut_zip"].write_bytes(data[: len(data) // 2])
    torch.save({"model": weights, "epoch": 3}, paths["nested"])
    paths["no_index_dir"].mkdir()
    (paths["no_index_dir"] / "pytorch_model-00001-of-00002.bin").write_bytes(b"x")
    paths["index"].parent.mkdir()
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[:10]}, str(paths["index"].parent / "model-00001-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < 10 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    paths["index"].write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths


# case: (overrides, bad input whose path the message must name, text the message must hold)
ERRORS = {
    "missing-checkpoint": (["checkpoint.path=/nonexistent/model_a.pt"], None, "checkpoint not found: /nonexistent/model_a.pt"),
    "unknown-override": (["trainer.epochz=3"], None, "trainer.epochz"),
    "remap-matches-nothing": (["checkpoint.remap=[{pattern: '^backbone\\.', replace: ''}]"], None, "matches no checkpoint key"),
    "freeze-matches-nothing": (["policy.freeze=[layer9]"], None, "glob 'layer9' matches no parameter"),
    # a 4-class base: fc differs from the checkpoint's 8 classes with no replace op declaring it
    "shape-mismatch-error": (["model=demo_base", "model.base.num_classes=4", "checkpoint.on_shape_mismatch=error"], None,
                             "do not fit the model's shapes"),
    "shape-override-matches-nothing": (["checkpoint.shape_overrides=[{keys: 'head.*', action: skip}]"], None,
                                       "checkpoint.shape_overrides[0].keys: glob 'head.*' matches no model key"),
    "wrong-type": (["trainer.epochs=abc"], None, "trainer.epochs"),
    "unsafe-pickle": ([], "unsafe", "refused"),
    "corrupt-checkpoint": ([], "garbage", "neither a torch file"),
    "empty-checkpoint": ([], "empty", "is empty (0 bytes)"),
    "truncated-safetensors": ([], "cut_safetensors", "truncated safetensors file"),
    "truncated-safetensors-low-memory": (["checkpoint.low_memory=true"], "cut_safetensors", "truncated safetensors file"),
    "truncated-zip-pickle": ([], "cut_zip", "truncated or corrupt torch file"),
    "directory-without-index": ([], "no_index_dir", "no shard index (*.index.json)"),
    "index-names-missing-shard": ([], "index", "model-00002-of-00002.safetensors"),
    "invalid-regex": (["checkpoint.remap=[{pattern: 'layer[0-9', replace: ''}]"], None, "is not a valid regular expression"),
    "unknown-select": (["checkpoint.select=modle"], "nested", "no entry 'modle'"),
    "adapter-does-not-fit": (["dry_run=true", "model.add.1.module.channels=16"], None,
                             "model.add[1] (after layer2): the new module 'adapter2' (Adapter) failed on the output of 'layer2', shape [16, 32, 16, 16]"),
}

# Files of an earlier dry run in the same run directory: a failed run must leave them as they were.
EARLIER = {"summary.json": '{"status": "dry_run"}\n', "load_report.json": '{"earlier": true}\n',
           "trainability.json": '{"earlier": true}\n'}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_error_exits_with_one_message_and_no_traceback(cli, tmp_path, bad_inputs, case):
    overrides, bad, message = ERRORS[case]
    if bad is not None:
        overrides = [f"checkpoint.path={bad_inputs[bad]}", *overrides]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, text in EARLIER.items():
        (run_dir / name).write_text(text)
    result = finetune(cli, run_dir, *overrides)
    text = output(result)
    assert result.returncode != 0, text
    assert "Traceback" not in text, text
    assert message in result.stderr, text
    if case not in ("unknown-override", "wrong-type"):  # Hydra reports its own composition errors
        assert result.stderr.count("finetune: error:") == 1, text
        assert "  fix: " in result.stderr
    if bad is not None:
        assert str(bad_inputs[bad]) in result.stderr, text  # names the file
    for name, earlier in EARLIER.items():
        assert (run_dir / name).read_text() == earlier, name
    assert not (run_dir / "model.safetensors").exists()
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.csv").exists()
    assert not (tmp_path / "PWNED").exists()


def test_declaration_errors_name_where_the_declaration_came_from(cli, tmp_path):
    result = finetune(cli, tmp_path / "run", "dry_run=true", "checkpoint.expect.missing=[adapter9]")
    assert result.returncode == 2, output(result)
    assert "checkpoint.expect.missing: glob 'adapter9' matches no model key" in result.stderr
    origin = next(line for line in result.stderr.splitlines() if line.startswith("  declared in: "))
    assert "checkpoint=demo (" in origin and "checkpoint/demo.yaml)" in origin
    assert origin.endswith("the command line's checkpoint.expect.missing=[adapter9]")
    result = finetune(cli, tmp_path / "run2", "dry_run=true", "policy.freeze=[layer9]")
    assert "  declared in: policy=default (" in result.stderr and "policy.freeze=[layer9]" in result.stderr


def test_the_demo_checkpoint_config_does_not_leak_into_a_users_model(cli, tmp_path, tiny_ckpts):
    """`finetune model=mine checkpoint.path=mine.pth` keeps the default checkpoint group (the demo's):
    nothing of the demo's own model may be declared there."""
    from conftest import TEST_CONF

    run_dir = tmp_path / "run"
    result = finetune(cli, run_dir, "--config-dir", str(TEST_CONF), "model=tiny", "data=tiny",
                      f"checkpoint.path={tiny_ckpts.safetensors_module}", "dry_run=true")
    assert result.returncode == 0, output(result)
    report = read_json(run_dir / "load_report.json")
    assert report["unwrapped"] == ["module."] and report["unexpected"] == [] and report["warnings"] == []
    assert {m["key"]: m["rule"] for m in report["mismatched"]} == {"head.weight": "model.add[0] (replace head)",
                                                                   "head.bias": "model.add[0] (replace head)"}
    assert set(report["declared"].values()) == {"model.add[1] (after layer1)"} and len(report["declared"]) == 4


def test_full_error_shows_the_traceback(cli, cli_env, tmp_path):
    env = {**cli_env, "HYDRA_FULL_ERROR": "1"}
    result = finetune(cli, tmp_path / "run", "checkpoint.path=/nonexistent/model_a.pt", env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


# ---- (c) python -m finetune ------------------------------------------------------------------


def test_python_m_dry_run(cli, tmp_path):
    run_dir = tmp_path / "dry"
    result = cli("python", "-m", "finetune", "dry_run=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, output(result)
    assert read_json(run_dir / "summary.json")["status"] == "dry_run"
    assert read_json(run_dir / "load_report.json")["counts"]["loaded"] == 42
    assert read_json(run_dir / "trainability.json")["totals"]["params"] > 0
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "checkpoints").exists()


# ---- (d) finetune-inspect --------------------------------------------------------------------


def test_inspect_lists_tensors(cli):
    result = cli("finetune-inspect", DEMO_CKPT, "--json")
    assert result.returncode == 0, output(result)
    body = json.loads(result.stdout)
    assert body["format"] == "safetensors"
    tensors = {t["name"]: t for t in body["tensors"]}
    with safe_open(DEMO_CKPT, "pt") as f:
        assert set(tensors) == set(f.keys())
        fc = f.get_tensor("module.fc.weight")
    assert tensors["module.fc.weight"]["shape"] == list(fc.shape) == [8, 64]
    assert tensors["module.fc.weight"]["numel"] == fc.numel() and tensors["module.fc.weight"]["dtype"] == "float32"
    text = cli("finetune-inspect", DEMO_CKPT)
    assert text.returncode == 0 and f"{len(tensors)} tensors" in text.stdout


def test_inspect_shows_the_match_with_a_model(cli):
    result = cli("finetune-inspect", DEMO_CKPT, "model=demo", "--json")
    assert result.returncode == 0, output(result)
    match = json.loads(result.stdout)["match"]
    assert match["counts"]["loaded"] == 42 and match["counts"]["missing"] == 4 and match["counts"]["mismatched"] == 2
    assert all(k.startswith("adapter2.") for k in match["missing"])


def test_inspect_suggests_remap_rule(cli):
    # Without the remap rule and the automatic unwrap nothing matches: inspect suggests the rule.
    result = cli("finetune-inspect", DEMO_CKPT, "model=demo_base", "checkpoint.remap=[]", "checkpoint.auto_unwrap=false", "--json")
    assert result.returncode == 0, output(result)
    match = json.loads(result.stdout)["match"]
    assert match["counts"]["loaded"] == 0
    assert match["suggestions"][0]["pattern"] == "^module\\." and match["suggestions"][0]["replace"] == ""


def test_inspect_bad_override_is_one_message(cli):
    result = cli("finetune-inspect", DEMO_CKPT, "model=demo", "trainer.epochz=1")
    assert result.returncode != 0
    assert "Traceback" not in output(result), output(result)
    assert "trainer.epochz" in result.stderr


# ---- (e) a user's own model and configs ------------------------------------------------------


USER_MODEL = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Encoder(nn.Module):
    def __init__(self, width=12):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, 5)

    def forward(self, x):
        return self.classifier(self.blocks(x))


def toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())
'''

USER_CONFIGS = {
    "model/encoder2.yaml": """
        base: {_target_: usernet.Encoder, width: 12}
        add:
          - {op: replace, at: classifier, module: {_target_: torch.nn.Linear, in_features: 12, out_features: 2}}
          - {op: before, at: classifier, name: extra, module: {_target_: torch.nn.Linear, in_features: 12, out_features: 12}}
        """,
    "data/toy.yaml": """
        train: {_target_: usernet.toy, n: 48, seed: 0}
        val: {_target_: usernet.toy, n: 32, seed: 1}
        batch_size: 16
        """,
    "checkpoint/encoder.yaml": """
        path: ???
        ignore: ['^classifier\\.']
        expect: {missing: ['extra.*', 'classifier.*'], unexpected: []}
        """,
}


def test_user_model_on_pythonpath_with_config_dir(cli, cli_env, tmp_path):
    code, conf = tmp_path / "code", tmp_path / "myconf"
    code.mkdir()
    (code / "usernet.py").write_text(USER_MODEL)
    for rel, text in USER_CONFIGS.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(textwrap.dedent(text))
    env = {**cli_env, "PYTHONPATH": str(code)}  # only the user's code: not the test helpers
    snippet = ("import sys, torch; from usernet import Encoder; from safetensors.torch import save_file; "
               "torch.manual_seed(1); save_file(Encoder().state_dict(), sys.argv[1])")
    ckpt = tmp_path / "encoder_a.safetensors"
    assert cli("python", "-c", snippet, str(ckpt), env=env).returncode == 0
    run_dir = tmp_path / "run"
    result = finetune(cli, run_dir, "--config-dir", str(conf), "model=encoder2", "data=toy", "checkpoint=encoder",
                      f"checkpoint.path={ckpt}", "trainer.epochs=1", env=env)
    assert result.returncode == 0, output(result)
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    report = read_json(run_dir / "load_report.json")
    assert sorted(report["ignored"]) == ["classifier.bias", "classifier.weight"]
    assert sorted(report["missing"]) == ["classifier.bias", "classifier.weight", "extra.bias", "extra.weight"]
    assert sorted(report["loaded"]) == ["blocks.0.bias", "blocks.0.weight", "blocks.2.bias", "blocks.2.weight"]
    params = {p["name"]: p for p in read_json(run_dir / "trainability.json")["params"]}
    assert params["extra.weight"]["source"] == "new" and params["extra.weight"]["trainable"] is True
    original = load_file(str(ckpt))
    trained = load_file(str(run_dir / "model.safetensors"))
    assert not torch.equal(trained["blocks.0.weight"], original["blocks.0.weight"])  # fine-tuned, not frozen


# ---- (f) the point of it all: pretrained beats scratch ---------------------------------------


def test_pretrained_demo_beats_training_from_scratch(cli, tmp_path):
    pretrained, scratch = tmp_path / "pretrained", tmp_path / "scratch"
    for run_dir, extra in [(pretrained, []), (scratch, ["checkpoint.path=null"])]:
        result = finetune(cli, run_dir, *extra)
        assert result.returncode == 0, output(result)
    best_pretrained = read_json(pretrained / "summary.json")["best"]["value"]
    best_scratch = read_json(scratch / "summary.json")["best"]["value"]
    assert not (scratch / "load_report.json").exists()
    assert best_pretrained > best_scratch + 0.15, (best_pretrained, best_scratch)
    assert best_pretrained >= 0.6
