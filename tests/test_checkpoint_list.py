"""checkpoint.path as a list: the base weights, then files loaded over them -- an adapter of model B's
own names, or a real PEFT `adapter_model.safetensors` (renamed to the lora op's names, its
adapter_config.json checked against the ops) -- each listed in load_report.json's `files`.

On Hugging Face BERT from a tiny config (random init): model A is the bare BertModel saved by
`save_pretrained`, the adapter is saved by PEFT itself from BertForSequenceClassification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import real_models
from finetune.checkpoint.load import check_expectations, load_checkpoint
from finetune.errors import CheckpointError, ConfigError
from finetune.model import build_model

LORA_QV = ("model.add=[{op: lora, at: 'bert.encoder.layer.*.attention.self.query', rank: 4, alpha: 8},"
           "{op: lora, at: 'bert.encoder.layer.*.attention.self.value', rank: 4, alpha: 8}]")


def batch() -> dict:
    ids = torch.randint(1, real_models.VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """(model A's model.safetensors, a PEFT adapter directory, the PeftModel that saved it, in eval mode)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    base_file = real_models.bert_encoder_checkpoint(root / "model_a")
    torch.manual_seed(1)
    model = real_models.build(real_models.model_config("hf_bert_classifier").base)
    model.bert.load_state_dict(load_file(str(base_file)))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))
    with torch.no_grad():  # a trained adapter: B away from zero, the head changed
        g = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(root / "adapter")
    return base_file, root / "adapter", peft_model.eval()


def loaded(compose, *overrides: str):
    cfg = compose(["model=hf_bert_classifier", "checkpoint=hf_bert", "data=marked_tokens", *overrides])
    torch.manual_seed(0)
    model, edits = build_model(cfg.model)
    report = load_checkpoint(model, cfg.checkpoint, edits)
    check_expectations(report, cfg.checkpoint.expect, model, edits)
    return model.eval(), report


def test_a_peft_adapter_over_the_base_gives_the_peft_models_outputs(peft_files, compose):
    base_file, adapter, peft_model = peft_files
    model, report = loaded(compose, LORA_QV, f"checkpoint.path=[{base_file},{adapter / 'adapter_model.safetensors'}]")
    with torch.no_grad():
        expected, got = peft_model(**batch()).logits, model(**batch()).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert report.missing == [] and report.unexpected == []  # the head came with the adapter (modules_to_save)
    base, over = report.to_json()["files"]
    assert base["checkpoint"] == str(base_file) and over["format"] == "safetensors (peft adapter)"
    assert over["counts"]["loaded"] == 4 * 2 + 2 and over["counts"]["unexpected"] == 0
    assert over["remapped"]["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"] == \
        "bert.encoder.layer.0.attention.self.query.lora_a"
    assert set(over["loaded"]) >= {"classifier.weight", "bert.encoder.layer.1.attention.self.value.lora_b"}
    assert "bert.encoder.layer.0.attention.self.query.lora_a" not in base["loaded"]


def test_an_adapter_of_another_scale_is_refused_naming_both(peft_files, compose):
    base_file, adapter, _ = peft_files
    with pytest.raises(CheckpointError, match=r"scale is 2 \(lora_alpha / r\).*alpha 16 / rank 4 = 4") as caught:
        loaded(compose, LORA_QV.replace("alpha: 8", "alpha: 16"),
               f"checkpoint.path=[{base_file},{adapter / 'adapter_model.safetensors'}]")
    assert "r 4, lora_alpha 8" in caught.value.fix


def test_an_adapter_for_modules_no_op_wraps_or_of_another_rank_is_refused(peft_files, compose):
    base_file, adapter, _ = peft_files
    path = f"checkpoint.path=[{base_file},{adapter / 'adapter_model.safetensors'}]"
    only_query = "model.add=[{op: lora, at: 'bert.encoder.layer.*.attention.self.query', rank: 4, alpha: 8}]"
    with pytest.raises(CheckpointError, match=r"checkpoint.path\[1\].*4 tensor\(s\) have no place in the model: "
                                              r"bert.encoder.layer.0.attention.self.value.lora_a"):
        loaded(compose, only_query, path)
    with pytest.raises(CheckpointError, match=r"checkpoint.path\[1\].*do not fit the model's shapes") as caught:
        loaded(compose, LORA_QV.replace("rank: 4", "rank: 8").replace("alpha: 8", "alpha: 16"), path)
    assert "rank to the adapter's" in caught.value.fix


def test_a_file_of_model_bs_own_names_loads_over_the_base_and_a_bad_path_entry_is_named(peft_files, compose, tmp_path):
    base_file, adapter, peft_model = peft_files
    model, _ = loaded(compose, LORA_QV, f"checkpoint.path=[{base_file},{adapter / 'adapter_model.safetensors'}]")
    ours = {k: v.contiguous() for k, v in model.state_dict().items() if ".lora_" in k or k.startswith("classifier.")}
    save_file(ours, str(tmp_path / "ours.safetensors"))
    again, report = loaded(compose, LORA_QV, f"checkpoint.path=[{base_file},{tmp_path / 'ours.safetensors'}]")
    with torch.no_grad():
        assert torch.equal(again(**batch()).logits, model(**batch()).logits)
    assert report.files[1]["format"] == "safetensors" and report.files[1]["remapped"] == {}
    with pytest.raises(ConfigError, match="is not a path or a list of paths"):
        loaded(compose, LORA_QV, "checkpoint.path=[]")


@pytest.mark.slow
def test_a_trained_adapter_applied_to_the_base_trains_further(peft_files, compose, tmp_path):
    """The run with both files: load_report.json lists each, the adapter keys train (policy=lora)."""
    from finetune.run import run

    base_file, adapter, _ = peft_files
    cfg = compose(["model=hf_bert_classifier", "checkpoint=hf_bert", "data=marked_tokens", "task=classification",
                   LORA_QV, "policy=lora", f"checkpoint.path=[{base_file},{adapter / 'adapter_model.safetensors'}]",
                   "trainer.epochs=1", "trainer.max_steps=2", "trainer.progress=false", "trainer.tensorboard=false"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    report = json.loads((tmp_path / "run" / "load_report.json").read_text())
    assert [f["checkpoint"] for f in report["files"]] == [str(base_file), str(adapter / "adapter_model.safetensors")]
    trainable = {p["name"] for p in json.loads((tmp_path / "run" / "trainability.json").read_text())["params"] if p["trainable"]}
    assert "bert.encoder.layer.0.attention.self.query.lora_b" in trainable
