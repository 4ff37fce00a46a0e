"""Real architectures through the real `finetune` command: Hugging Face BERT and GPT-2, torchvision
DeepLabV3 and ResNet-18, a timm ViT. Each is built from a tiny config with random init (nothing is
downloaded), loaded from a model-A checkpoint the test writes, and trained for a few steps; the
tests read the run directory's files and recompute the logged validation metrics here, from the
saved model.safetensors, with the libraries' own losses or torchmetrics' functions.

The model, data and checkpoint configs are in tests/conf (hf_*, timm_*, tv_*); the factories of
model A and of the generated data in tests/helpers/real_models.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import real_models
from conftest import HELPERS, TEST_CONF, compose_config
from finetune.metrics_log import read_metrics

pytestmark = pytest.mark.slow

# On the CPU wherever the tests run: the logged metrics are recomputed here, on the CPU, to 1e-4.
QUIET = ["trainer.device=cpu", "trainer.progress=false", "trainer.log_every=1", "trainer.tensorboard=false"]
TRAIN = ["trainer.epochs=2", *QUIET]  # 2 optimizer steps per epoch on every data set here
ONE_EPOCH = ["trainer.epochs=1", *QUIET]  # the 11M-parameter models: each epoch writes about 180 MB of checkpoints


# ---- running the command -----------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    returncode: int
    stdout: str
    stderr: str

    def json(self, name: str) -> dict:
        return json.loads((self.dir / name).read_text())

    @property
    def summary(self) -> dict:
        return self.json("summary.json")

    @property
    def report(self) -> dict:
        return self.json("load_report.json")

    @property
    def trainability(self) -> dict:
        return self.json("trainability.json")

    def val_rows(self) -> dict[str, list[float]]:
        """metrics.csv's validation values by name, in logged order."""
        rows: dict[str, list[float]] = {}
        for row in read_metrics(self.dir / "metrics.csv"):
            if row["split"] == "val":
                rows.setdefault(row["name"], []).append(row["value"])
        return rows

    def weights(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / "model.safetensors"))

    def params(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.trainability["params"]}

    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture(scope="module")
def env(finetune_cache) -> dict:
    environ = dict(os.environ)
    environ.pop("HYDRA_FULL_ERROR", None)
    environ.update(FINETUNE_CACHE=str(finetune_cache), MPLBACKEND="Agg",
                   # One thread: these models are too small to gain from two, and on shared cores the
                   # second thread's spin-waits make a step many times slower.
                   OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(HELPERS), *filter(None, [environ.get("PYTHONPATH")])]))
    return environ


def finetune(env: dict, run_dir: Path, *overrides: str) -> Run:
    result = subprocess.run([sys.executable, "-m", "finetune", "--config-dir", str(TEST_CONF), *overrides,
                             f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=env, capture_output=True,
                            text=True, timeout=300)
    return Run(run_dir, result.returncode, result.stdout, result.stderr)


def completed(run: Run) -> Run:
    assert run.returncode == 0, run.output()[-4000:]
    assert run.summary["status"] == "completed"
    return run


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def collate(dataset) -> object:
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


def trained(name: str, run: Run, **changes) -> torch.nn.Module:
    """Model B of tests/conf/model/<name>.yaml with the run's model.safetensors, loaded strictly."""
    model = real_models.build(real_models.model_config(name).base, **changes)
    model.load_state_dict(run.weights(), strict=True)
    return model.eval()


# ---- (a) Hugging Face BERT: a bare encoder's checkpoint into BertForSequenceClassification ------
@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory) -> Path:
    return real_models.bert_encoder_checkpoint(tmp_path_factory.mktemp("bert") / "model_a")


BERT = ["model=hf_bert_classifier", "data=marked_tokens", "checkpoint=hf_bert"]


@pytest.fixture(scope="module")
def bert_run(env, bert_checkpoint, tmp_path_factory) -> Run:
    run_dir = tmp_path_factory.mktemp("bert-run") / "run"
    return completed(finetune(env, run_dir, *BERT, f"checkpoint.path={bert_checkpoint}", "task=classification",
                              "policy.freeze=[bert.embeddings.*]", *TRAIN))


def test_bert_remap_rule_loads_every_encoder_key_and_the_classifier_is_new(bert_run, bert_checkpoint):
    encoder_keys = list(load_file(str(bert_checkpoint)))
    report = bert_run.report
    assert report["counts"] == {"loaded": 39, "missing": 2, "unexpected": 0, "mismatched": 0, "remapped": 39, "ignored": 0}
    assert sorted(report["loaded"]) == sorted(f"bert.{k}" for k in encoder_keys)
    assert sorted(report["missing"]) == ["classifier.bias", "classifier.weight"]
    assert report["remapped"] == {k: f"bert.{k}" for k in encoder_keys}
    params = bert_run.params()
    assert {params["classifier.weight"]["source"], params["classifier.bias"]["source"]} == {"new"}
    assert params["bert.encoder.layer.0.attention.self.query.weight"]["source"] == "checkpoint"
    audit = bert_run.trainability["audit"]
    assert audit["grad_flow_ok"] is True and audit["frozen_unchanged"] is True


def test_bert_frozen_embeddings_hold_the_checkpoint_values(bert_run, bert_checkpoint):
    """The values really came from the checkpoint: the frozen embeddings end exactly as model A's."""
    encoder = load_file(str(bert_checkpoint))
    weights = bert_run.weights()
    embeddings = [k for k in encoder if k.startswith("embeddings.")]
    assert len(embeddings) == 5
    for key in embeddings:
        assert torch.equal(weights[f"bert.{key}"], encoder[key]), key
    assert not torch.equal(weights["bert.encoder.layer.0.attention.self.query.weight"],
                           encoder["encoder.layer.0.attention.self.query.weight"])  # the encoder trained


def test_bert_classification_logs_val_acc_that_the_saved_weights_reproduce(bert_run):
    final = bert_run.summary["final"]
    assert set(final) == {"val/loss", "val/acc"}  # 3 classes: no top5
    assert bert_run.summary["best"]["metric"] == "val/acc" and bert_run.summary["steps"] == 4
    assert set(bert_run.val_rows()) == {"loss", "acc"} and len(bert_run.val_rows()["acc"]) == 2
    batch = collate(real_models.MarkedTokens(n=16, seed=1))
    with torch.no_grad():
        out = trained("hf_bert_classifier", bert_run)(**batch)  # Hugging Face's own loss, with labels
    assert rel(final["val/loss"], out.loss.item()) < 1e-4
    assert final["val/acc"] == pytest.approx((out.logits.argmax(-1) == batch["labels"]).double().mean().item())


@pytest.fixture(scope="module")
def bert_no_rule_run(env, bert_checkpoint, tmp_path_factory) -> Run:
    """A dry run without the remap rule, nothing declared and the min_loaded check off (so it reports
    instead of stopping)."""
    run = finetune(env, tmp_path_factory.mktemp("bert-no-rule") / "run", *BERT, f"checkpoint.path={bert_checkpoint}",
                   "checkpoint.remap=[]", "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null",
                   "checkpoint.expect.min_loaded=null", "dry_run=true", "task=classification", "trainer.progress=false")
    assert run.returncode == 0, run.output()[-4000:]
    return run


def test_bert_without_the_remap_rule_loads_nothing_and_says_so(bert_no_rule_run, bert_checkpoint):
    run = bert_no_rule_run
    report = run.report
    assert report["counts"] == {"loaded": 0, "missing": 41, "unexpected": 39, "mismatched": 0, "remapped": 0, "ignored": 0}
    assert sorted(report["unexpected"]) == sorted(load_file(str(bert_checkpoint)))
    assert "41 model key(s) missing" in report["warnings"][0] and "39 checkpoint key(s) unused" in report["warnings"][0]
    assert {p["source"] for p in run.trainability["params"]} == {"new"}
    assert run.summary["status"] == "dry_run"
    assert "0 loaded, 41 missing (new), 0 mismatched, 39 unexpected" in run.output()


def test_bert_suggested_remap_rules_map_each_key_to_its_own_module(bert_no_rule_run, bert_checkpoint):
    rules = [(re.compile(s["pattern"]), s["replace"]) for s in bert_no_rule_run.report["suggestions"]]
    assert [(s["pattern"], s["replace"], s["keys"]) for s in bert_no_rule_run.report["suggestions"]] == [("^", "bert.", 39)]
    for key in load_file(str(bert_checkpoint)):
        mapped = next((rx.sub(replace, key, count=1) for rx, replace in rules if rx.search(key)), key)
        assert mapped == f"bert.{key}", (key, mapped)


def test_bert_encoder_loaded_into_a_classifier_without_a_rule_stops_with_the_rule(env, bert_checkpoint, tmp_path):
    """The default checkpoint.expect.min_loaded: a save_pretrained BertModel directory into
    BertForSequenceClassification loads 0 of 39 keys; that is an error whose fix is the verified rule."""
    run = finetune(env, tmp_path / "run", *BERT, f"checkpoint.path={bert_checkpoint.parent}", "checkpoint.remap=[]",
                   "task=classification", "trainer.progress=false")
    assert run.returncode == 2, run.output()[-3000:]
    assert run.stderr.count("finetune: error:") == 1 and "Traceback" not in run.output()
    assert "only 0.0% of the base model's parameters loaded" in run.stderr
    assert "checkpoint.remap=[{pattern: '^', replace: 'bert.'}] (verified: 39 more checkpoint keys then load)" in run.stderr
    assert "declared in: checkpoint=hf_bert" in run.stderr and "checkpoint.remap=[]" in run.stderr
    assert not (run.dir / "load_report.json").exists() and not (run.dir / "model.safetensors").exists()
    # the rule it suggests, applied as printed, loads the encoder
    fixed = finetune(env, tmp_path / "fixed", *BERT, f"checkpoint.path={bert_checkpoint.parent}",
                     "checkpoint.remap=[{pattern: '^', replace: 'bert.'}]", "dry_run=true", "task=classification",
                     "trainer.progress=false")
    assert fixed.returncode == 0, fixed.output()[-3000:]
    assert fixed.report["counts"]["loaded"] == 39


README_BERT_MODEL = """
base:
  _target_: transformers.AutoModelForSequenceClassification.from_config
  config:
    _target_: transformers.AutoConfig.from_pretrained
    pretrained_model_name_or_path: {encoder}
    num_labels: 3
"""


def test_the_readme_bert_config_builds_the_classifier_from_the_checkpoints_config_json(bert_checkpoint, tmp_path):
    """README's worked example: the architecture from the saved encoder's own config.json."""
    from finetune.run import run

    conf = tmp_path / "myconf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "bert_cls.yaml").write_text(README_BERT_MODEL.format(encoder=bert_checkpoint.parent))
    cfg = compose_config(["model=bert_cls", "checkpoint=hf_bert", f"checkpoint.path={bert_checkpoint}", "data=marked_tokens",
                          "task=classification", "dry_run=true", "trainer.progress=false"], search=(conf, TEST_CONF))
    assert run(cfg, tmp_path / "run")["status"] == "dry_run"
    report = json.loads((tmp_path / "run" / "load_report.json").read_text())
    assert report["counts"]["loaded"] == 39 and sorted(report["missing"]) == ["classifier.bias", "classifier.weight"]


def test_bert_model_loss_passes_the_labels_and_logs_the_models_own_loss(env, bert_checkpoint, tmp_path):
    run = completed(finetune(env, tmp_path / "run", *BERT, f"checkpoint.path={bert_checkpoint}", "task=model_loss", *ONE_EPOCH))
    summary = run.summary
    assert set(summary["final"]) == {"val/loss"} and set(run.val_rows()) == {"loss"}
    assert summary["best"]["metric"] == "val/loss" and summary["best"]["mode"] == "min"
    assert run.report["counts"]["loaded"] == 39 and run.trainability["audit"]["grad_flow_ok"] is True
    batch = collate(real_models.MarkedTokens(n=16, seed=1))
    with torch.no_grad():
        loss = trained("hf_bert_classifier", run)(**batch).loss.item()
    assert rel(summary["final"]["val/loss"], loss) < 1e-4


# ---- (b) Hugging Face GPT-2 as a causal LM -----------------------------------------------------
GPT2 = ["model=hf_gpt2", "data=lm_tokens", "checkpoint=hf_gpt2", "task=causal_lm"]
UNTIED = "model.base.config.tie_word_embeddings=false"


@pytest.fixture(scope="module")
def gpt2_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Model A's tied embedding saved under either name, and an untied model A (both keys)."""
    root = tmp_path_factory.mktemp("gpt2")
    saved = real_models.gpt2_checkpoint(root / "tied")
    weights = load_file(str(saved))
    assert "transformer.wte.weight" in weights and "lm_head.weight" not in weights  # save_pretrained stores it once
    weights["lm_head.weight"] = weights.pop("transformer.wte.weight")
    save_file(weights, str(root / "lm_head_only.safetensors"))
    torch.manual_seed(1)
    untied = real_models.build(real_models.model_config("hf_gpt2").base, **{"config.tie_word_embeddings": False})
    untied.save_pretrained(root / "untied")
    return {"transformer.wte.weight": saved, "lm_head.weight": root / "lm_head_only.safetensors",
            "untied": root / "untied" / "model.safetensors"}


def lm_reference(model, dataset) -> tuple[float, float]:
    """(Hugging Face's own shifted loss over every target token of the set, next-token accuracy)."""
    batch = collate(dataset)
    with torch.no_grad():
        out = model(**batch)
    predicted, targets = out.logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    counted = targets != -100
    return out.loss.item(), (predicted[counted] == targets[counted]).double().mean().item()


def check_lm_metrics(run: Run, model) -> None:
    final = run.summary["final"]
    assert set(final) == {"val/loss", "val/perplexity", "val/token_acc"}
    assert run.summary["best"]["metric"] == "val/perplexity" and run.summary["best"]["mode"] == "min"
    assert rel(final["val/perplexity"], math.exp(final["val/loss"])) < 1e-4
    rows = run.val_rows()
    assert len(rows["loss"]) == len(rows["perplexity"]) == 2
    for loss, perplexity in zip(rows["loss"], rows["perplexity"]):
        assert rel(perplexity, math.exp(loss)) < 1e-4
    assert all(0.0 <= acc <= 1.0 for acc in rows["token_acc"])
    from task_data import TokenDataset

    loss, token_acc = lm_reference(model, TokenDataset(n=16, seed=1, vocab=30, length=16))
    assert rel(final["val/loss"], loss) < 1e-4
    assert final["val/token_acc"] == pytest.approx(token_acc)


def test_gpt2_causal_lm_logs_perplexity_as_exp_of_the_loss(env, gpt2_checkpoints, tmp_path):
    """Untied embeddings (both keys in the checkpoint): the causal-LM path on its own."""
    run = completed(finetune(env, tmp_path / "run", *GPT2, UNTIED, f"checkpoint.path={gpt2_checkpoints['untied']}", *TRAIN))
    assert run.report["counts"]["loaded"] == 29 and run.report["missing"] == []
    assert run.trainability["audit"]["grad_flow_ok"] is True
    check_lm_metrics(run, trained("hf_gpt2", run, **{"config.tie_word_embeddings": False}))


def test_gpt2_tied_embeddings_survive_the_run(env, gpt2_checkpoints, tmp_path):
    run = completed(finetune(env, tmp_path / "run", *GPT2, f"checkpoint.path={gpt2_checkpoints['transformer.wte.weight']}", *TRAIN))
    weights = run.weights()
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    model = trained("hf_gpt2", run)  # strict: both names are in the file
    assert model.lm_head.weight is model.transformer.wte.weight
    check_lm_metrics(run, model)


@pytest.mark.parametrize("saved_as", ["transformer.wte.weight", "lm_head.weight"])
def test_a_tied_key_saved_under_either_name_loads_into_both(gpt2_checkpoints, saved_as):
    from finetune.checkpoint.load import load_checkpoint
    from finetune.model import build_model

    cfg = compose_config([*GPT2, f"checkpoint.path={gpt2_checkpoints[saved_as]}"])
    model, edits = build_model(cfg.model)
    load_checkpoint(model, cfg.checkpoint, edits)
    expected = load_file(str(gpt2_checkpoints[saved_as]))[saved_as]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight.detach(), expected)


@pytest.mark.parametrize("saved_as", ["transformer.wte.weight", "lm_head.weight"])
def test_the_load_report_counts_a_tied_key_as_loaded(gpt2_checkpoints, saved_as, tmp_path):
    from finetune.run import run

    run(compose_config([*GPT2, f"checkpoint.path={gpt2_checkpoints[saved_as]}", "dry_run=true", "trainer.progress=false"]), tmp_path)
    report = json.loads((tmp_path / "load_report.json").read_text())
    assert report["missing"] == [] and report["counts"]["loaded"] == 29
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(report["loaded"])
    params = {p["name"]: p for p in json.loads((tmp_path / "trainability.json").read_text())["params"]}
    assert params["transformer.wte.weight"]["source"] == "checkpoint"


def test_low_memory_loading_keeps_tied_embeddings_tied(gpt2_checkpoints):
    from finetune.run import build_and_load_low_memory

    cfg = compose_config([*GPT2, f"checkpoint.path={gpt2_checkpoints['transformer.wte.weight']}", "checkpoint.low_memory=true"])
    model, _, report = build_and_load_low_memory(cfg)
    assert report is not None  # the meta-device path ran
    expected = load_file(str(gpt2_checkpoints["transformer.wte.weight"]))["transformer.wte.weight"]
    assert torch.equal(model.lm_head.weight.detach(), expected)
    assert model.lm_head.weight is model.transformer.wte.weight


# ---- (c) torchvision DeepLabV3: segmentation, a 5-class checkpoint into a 3-class head -----------
SEG = ["model=tv_deeplabv3", "checkpoint=tv_deeplabv3", "task=segmentation"]


@pytest.fixture(scope="module")
def deeplab_checkpoint(tmp_path_factory) -> Path:
    return real_models.torch_checkpoint(tmp_path_factory.mktemp("deeplab") / "model_a.pt", "tv_deeplabv3", num_classes=5)


@pytest.fixture(scope="module")
def deeplab_run(env, deeplab_checkpoint, tmp_path_factory) -> Run:
    run_dir = tmp_path_factory.mktemp("deeplab-run") / "run"
    return completed(finetune(env, run_dir, *SEG, "data=seg64", f"checkpoint.path={deeplab_checkpoint}",
                              "policy.freeze=[backbone.*]", "policy.bn=freeze_stats", *ONE_EPOCH))


def test_deeplab_head_of_another_class_count_is_skipped_and_reported(deeplab_run, deeplab_checkpoint):
    checkpoint = torch.load(deeplab_checkpoint, weights_only=True)
    report = deeplab_run.report
    assert {m["key"]: (m["action"], m["checkpoint_shape"], m["model_shape"]) for m in report["mismatched"]} == {
        "classifier.4.weight": ("skipped", [5, 256, 1, 1], [3, 256, 1, 1]),
        "classifier.4.bias": ("skipped", [5], [3]),
    }
    assert report["missing"] == [] and report["unexpected"] == []
    assert sorted(report["loaded"]) == sorted(set(checkpoint) - {"classifier.4.weight", "classifier.4.bias"})
    params = deeplab_run.params()
    assert params["classifier.4.weight"]["source"] == "new" and params["classifier.4.weight"]["trainable"] is True
    assert params["backbone.0.0.weight"]["trainable"] is False
    audit = deeplab_run.trainability["audit"]
    assert audit["grad_flow_ok"] is True and audit["frozen_unchanged"] is True


def test_deeplab_frozen_backbone_ends_as_the_checkpoint_running_stats_included(deeplab_run, deeplab_checkpoint):
    checkpoint = torch.load(deeplab_checkpoint, weights_only=True)
    weights = deeplab_run.weights()
    backbone = [k for k in checkpoint if k.startswith("backbone.")]
    assert any(k.endswith("running_mean") for k in backbone)
    for key in backbone:  # policy.bn=freeze_stats: the frozen BatchNorms' statistics did not move either
        assert torch.equal(weights[key], checkpoint[key]), key


def test_deeplab_miou_and_pixel_acc_are_what_the_saved_weights_give(deeplab_run):
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

    final = deeplab_run.summary["final"]
    assert set(final) == {"val/loss", "val/miou", "val/pixel_acc"}
    for name in ("miou", "pixel_acc"):
        assert all(0.0 <= v <= 1.0 for v in deeplab_run.val_rows()[name])
    images, masks = collate(real_models.segmentation(n=8, seed=1, size=64, classes=3))
    with torch.no_grad():
        logits = trained("tv_deeplabv3", deeplab_run)(images)["out"]
    assert logits.shape == (8, 3, 64, 64)
    assert final["val/pixel_acc"] == pytest.approx(
        multiclass_accuracy(logits, masks, 3, average="micro", ignore_index=255).item(), abs=1e-6)
    assert final["val/miou"] == pytest.approx(
        multiclass_jaccard_index(logits, masks, 3, average="macro", ignore_index=255).item(), abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255).item()
    assert rel(final["val/loss"], loss) < 1e-4


def test_a_replace_op_declares_the_replaced_heads_keys(deeplab_checkpoint, tmp_path):
    from finetune.run import run

    head = "{op: replace, at: classifier.4, module: {_target_: torch.nn.Conv2d, in_channels: 256, out_channels: 3, kernel_size: 1}}"
    cfg = compose_config([*SEG, "data=seg64", "model.base.num_classes=5", f"model.add=[{head}]",
                          "checkpoint.on_shape_mismatch=error", f"checkpoint.path={deeplab_checkpoint}", "dry_run=true",
                          "trainer.progress=false"])
    run(cfg, tmp_path)
    report = json.loads((tmp_path / "load_report.json").read_text())
    declared = {m["key"] for m in report["mismatched"]} | set(report["missing"])
    assert declared == {"classifier.4.weight", "classifier.4.bias"}
    params = {p["name"]: p for p in json.loads((tmp_path / "trainability.json").read_text())["params"]}
    assert params["classifier.4.weight"]["source"] == "new"


def test_a_mask_class_outside_the_head_fails_with_one_message(env, deeplab_checkpoint, tmp_path):
    run = finetune(env, tmp_path / "run", *SEG, "data=seg64_bad_class", f"checkpoint.path={deeplab_checkpoint}", *ONE_EPOCH)
    assert run.returncode != 0
    assert run.stderr.count("finetune: error:") == 1 and run.stderr.count("  fix: ") == 1
    assert "Traceback" not in run.output()
    error_line = next(line for line in run.stderr.splitlines() if line.startswith("finetune: error:"))
    assert "task segmentation" in error_line and "0..7" in error_line and "3 classes" in error_line
    fix = run.stderr.split("  fix: ", 1)[1]
    assert "ignore_index" in fix and "255" in fix
    summary = run.summary
    assert summary["status"] == "failed" and summary["steps"] == 0 and "task segmentation" in summary["error"]
    assert not (run.dir / "model.safetensors").exists() and not (run.dir / "checkpoints" / "last.pt").exists()


# ---- (d) timm ViT at a new image size: the position embedding adapted, a new head ----------------
@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory) -> Path:
    return real_models.torch_checkpoint(tmp_path_factory.mktemp("vit") / "model_a.pt", "timm_vit", img_size=48, num_classes=10)


@pytest.fixture(scope="module")
def vit_run(env, vit_checkpoint, tmp_path_factory) -> Run:
    """policy.new=freeze keeps the adapted pos_embed as loaded (so its values can be checked);
    policy.train makes the new head train anyway."""
    run_dir = tmp_path_factory.mktemp("vit-run") / "run"
    return completed(finetune(env, run_dir, "model=timm_vit", "data=images32_classes", "checkpoint=timm_vit",
                              f"checkpoint.path={vit_checkpoint}", "task=classification", "policy.new=freeze",
                              "policy.train=[head.*]", *TRAIN))


def test_vit_position_embedding_is_adapted_and_the_head_is_new(vit_run):
    report = vit_run.report
    mismatched = {m["key"]: m for m in report["mismatched"]}
    assert set(mismatched) == {"pos_embed", "head.weight", "head.bias"}
    pos = mismatched["pos_embed"]
    assert (pos["action"], pos["checkpoint_shape"], pos["model_shape"]) == ("adapted", [1, 37, 32], [1, 17, 32])
    assert "1 prefix token" in pos["detail"] and "6x6 grid to 4x4" in pos["detail"]
    for key, shapes in (("head.weight", ([10, 32], [3, 32])), ("head.bias", ([10], [3]))):
        assert (mismatched[key]["action"], mismatched[key]["checkpoint_shape"], mismatched[key]["model_shape"]) == ("skipped", *shapes)
        assert mismatched[key]["rule"] == "checkpoint.shape_overrides[0]"
    assert report["counts"]["loaded"] == 29 and report["missing"] == [] and report["unexpected"] == []
    params = vit_run.params()
    assert (params["pos_embed"]["source"], params["pos_embed"]["trainable"]) == ("adapted", False)
    assert (params["head.weight"]["source"], params["head.weight"]["trainable"]) == ("new", True)
    assert params["blocks.0.attn.qkv.weight"]["source"] == "checkpoint"
    audit = vit_run.trainability["audit"]
    assert audit["grad_flow_ok"] is True and audit["frozen_unchanged"] is True


def test_vit_adapted_position_embedding_is_timms_own_resampling(vit_run, vit_checkpoint):
    from timm.layers import resample_abs_pos_embed

    old = torch.load(vit_checkpoint, weights_only=True)["pos_embed"]
    expected = resample_abs_pos_embed(old, [4, 4], num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    assert torch.allclose(vit_run.weights()["pos_embed"], expected, atol=1e-6)


def test_vit_classification_metrics_are_what_the_saved_weights_give(vit_run):
    final = vit_run.summary["final"]
    assert set(final) == {"val/loss", "val/acc"}
    images, labels = collate(real_models.image_classes(n=16, seed=1, size=32, classes=3))
    with torch.no_grad():
        logits = trained("timm_vit", vit_run)(images)
    assert logits.shape == (16, 3)
    assert rel(final["val/loss"], torch.nn.functional.cross_entropy(logits, labels).item()) < 1e-4
    assert final["val/acc"] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())


# ---- (e) multi-label and regression on a torchvision ResNet-18 ----------------------------------
@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> Path:
    return real_models.torch_checkpoint(tmp_path_factory.mktemp("resnet") / "model_a.pt", "tv_resnet18_multilabel", num_classes=10)


def resnet_run(env, checkpoint: Path, run_dir: Path, task: str) -> Run:
    run = completed(finetune(env, run_dir, f"model=tv_resnet18_{task}", f"data=images32_{task}", "checkpoint=tv_resnet18",
                             f"checkpoint.path={checkpoint}", f"task={task}", *ONE_EPOCH))
    assert {m["key"]: m["action"] for m in run.report["mismatched"]} == {"fc.weight": "skipped", "fc.bias": "skipped"}
    assert run.report["counts"]["loaded"] == 120 and run.report["missing"] == []  # 122 keys: all but fc
    assert run.trainability["audit"]["grad_flow_ok"] is True
    return run


def test_multilabel_f1_and_map_match_torchmetrics_on_the_saved_weights(env, resnet_checkpoint, tmp_path):
    from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

    run = resnet_run(env, resnet_checkpoint, tmp_path / "run", "multilabel")
    final = run.summary["final"]
    assert set(final) == {"val/loss", "val/f1", "val/map"} and run.summary["best"]["metric"] == "val/map"
    images, labels = collate(real_models.image_multilabel(n=16, seed=1, size=32, labels=5))
    assert labels.sum(0).min() > 0  # every label occurs: macro averages agree on which labels count
    with torch.no_grad():
        logits = trained("tv_resnet18_multilabel", run)(images)
    target = labels.long()
    assert final["val/f1"] == pytest.approx(multilabel_f1_score(logits.sigmoid(), target, 5, average="macro").item(), abs=1e-6)
    assert final["val/map"] == pytest.approx(multilabel_average_precision(logits.sigmoid(), target, 5, average="macro").item(), abs=1e-6)
    assert rel(final["val/loss"], torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()) < 1e-4


def test_regression_mae_and_mse_match_the_saved_weights(env, resnet_checkpoint, tmp_path):
    run = resnet_run(env, resnet_checkpoint, tmp_path / "run", "regression")
    final = run.summary["final"]
    assert set(final) == {"val/loss", "val/mae", "val/mse"} and run.summary["best"]["metric"] == "val/mae"
    assert rel(final["val/loss"], final["val/mse"]) < 1e-6  # MSE loss, averaged over every target
    images, targets = collate(real_models.image_regression(n=16, seed=1, size=32))
    with torch.no_grad():
        predictions = trained("tv_resnet18_regression", run)(images).squeeze(-1)
    assert predictions.shape == targets.shape == (16,)
    errors = (predictions.double() - targets.double())
    assert rel(final["val/mae"], errors.abs().mean().item()) < 1e-4
    assert rel(final["val/mse"], errors.square().mean().item()) < 1e-4
