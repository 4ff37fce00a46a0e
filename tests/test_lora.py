"""model.add's lora op (finetune/adapters.py): the wrapped modules on real architectures built from tiny
configs (timm ViT, Hugging Face BERT and GPT-2; random init, nothing downloaded), the load report's and
the policy's view of the adapters, low_memory, and what a LoRA run exports -- merged.safetensors and a
PEFT adapter, each verified -- in-process runs on the tiny model, and the real command on the text demo."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

import real_models
from finetune.adapters import LoRALayer, add_lora, merged_state_dict, peft_state_dict
from finetune.config import ModelConfig
from finetune.errors import ConfigError
from finetune.model import base_param_names, build_model
from finetune.run import run

# ---- helpers ---------------------------------------------------------------------------------------


def model_cfg(name_or_base, *add: dict):
    """A ModelConfig with tests/conf/model/<name>.yaml's base (or a `_target_` spec) and `add`."""
    base = real_models.model_config(name_or_base).base if isinstance(name_or_base, str) else name_or_base
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"base": base, "add": list(add)})


def lora(at: str, **settings) -> dict:
    return {"op": "lora", "at": at, **settings}


def built(cfg, seed: int = 0, lora: bool = True):
    torch.manual_seed(seed)
    return build_model(cfg, lora=lora)


def perturb(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move every adapter tensor off its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def vit_input() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def tokens(vocab: int = real_models.VOCAB) -> dict:
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(4))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


class Layers(nn.Module):
    """One of each kind LoRA wraps, in one forward: Embedding -> Conv1d -> Conv2d -> Linear -> Conv1D."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 5)
        self.gpt = Conv1D(4, 5)  # transformers' Conv1D(nf=out, nx=in): weight [in, out]

    def forward(self, ids):
        x = self.conv1(self.emb(ids).transpose(1, 2))  # [N, 8, L]
        x = self.conv2(x.unflatten(2, (4, -1)))  # [N, 6, 2, L/8]
        return self.gpt(self.fc(x.mean((2, 3))))


LAYERS = {"_target_": "test_lora.Layers"}
IDS = torch.randint(0, 20, (3, 16), generator=torch.Generator().manual_seed(5))


# ---- the op on real architectures ----------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_vit_lora_keeps_every_base_name_and_the_output_bit_for_bit(dora):
    cfg = model_cfg("timm_vit", lora("blocks.*.attn.qkv", rank=4, alpha=8, dora=dora))
    model, edits = built(cfg)
    plain, _ = built(cfg, lora=False)
    names = set(model.state_dict())
    assert set(plain.state_dict()) <= names  # no base key renamed
    created = {f"blocks.{i}.attn.qkv.{p}" for i in (0, 1) for p in ("lora_a", "lora_b") + (("lora_magnitude",) if dora else ())}
    assert names - set(plain.state_dict()) == created == set(edits[0].keys)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, nn.Linear) and isinstance(qkv, LoRALayer) and type(qkv).__name__ == "LoRALinear"
    assert qkv.lora_a.shape == (4, 32) and qkv.lora_b.shape == (96, 4) and torch.all(qkv.lora_b == 0)
    assert edits[0].targets == ("blocks.0.attn.qkv", "blocks.1.attn.qkv")
    x = vit_input()
    for mode in (True, False):
        model.train(mode), plain.train(mode)
        assert torch.equal(model(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), plain(x))
    # base_param_names (min_loaded's base) keeps the base weights, not the adapters.
    base = base_param_names(model, edits)
    assert "blocks.0.attn.qkv.weight" in base and not any(".lora_" in n for n in base)


def test_bert_globs_over_real_module_names_and_a_container_glob_wraps_what_is_under_it():
    cfg = model_cfg("hf_bert_classifier", lora("bert.encoder.layer.*.attention.self.query"),
                    lora("bert.encoder.layer.1.output"), lora("bert.embeddings.word_embeddings", rank=2))
    model, edits = built(cfg)
    assert edits[0].targets == ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query")
    assert edits[1].targets == ("bert.encoder.layer.1.output.dense",)  # the Linear under it; its LayerNorm is left alone
    assert edits[2].module_type == "LoRA on 1 Embedding"
    plain, _ = built(cfg, lora=False)
    batch = tokens()
    assert torch.equal(logits(model, batch), logits(plain, batch))


@pytest.mark.parametrize("dora", [False, True])
def test_every_kind_is_unchanged_at_init_and_merges_into_its_own_weight(dora):
    cfg = model_cfg(LAYERS, lora("*", rank=3, alpha=6, dropout=0.1, dora=dora))
    model, edits = built(cfg)
    assert sorted(edits[0].targets) == ["conv1", "conv2", "emb", "fc", "gpt"]
    plain, _ = built(cfg, lora=False)
    model.train(), plain.train()
    assert torch.equal(model(IDS), plain(IDS))  # dropout on the adapter's path changes nothing while B is 0
    perturb(model)
    model.eval()
    merged = merged_state_dict(model)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged, strict=True)
    plain.eval()
    expected = model(IDS)
    assert torch.allclose(plain(IDS), expected, atol=1e-5 * expected.abs().max().item())


def test_merged_weight_is_base_plus_scaled_delta():
    layer = nn.Linear(6, 4)
    weight = layer.weight.detach().clone()
    add_lora(layer, rank=2, alpha=8)
    perturb(layer)
    expected = weight + (8 / 2) * layer.lora_b.detach() @ layer.lora_a.detach()
    assert torch.allclose(layer.merged_weight(), expected, atol=1e-6)
    assert layer.weight is layer._parameters["weight"] and torch.equal(layer.weight, weight)


# ---- the op's errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("add, message, hint", [
    (lora("blocks.*.atn.qkv"), "matches no module", "blocks.0.attn.qkv (Linear)"),
    (lora("blocks.*.norm1"), "none of a type LoRA can wrap", "norm1 (LayerNorm)"),
    (lora("blocks.*.attn.qkv", rank=0), "rank=0", "rank: 8"),
    (lora("blocks.*.attn.qkv", module={"_target_": "torch.nn.Identity"}), "takes no `module`", "remove"),
    ({"op": "replace", "at": "head", "rank": 4, "module": {"_target_": "torch.nn.Identity"}}, "only apply to op: lora", "remove rank"),
])
def test_config_errors_name_the_problem_and_the_closest_modules(add, message, hint):
    with pytest.raises(ConfigError) as err:
        built(model_cfg("timm_vit", add))
    assert message in err.value.problem and hint in str(err.value) and err.value.group == "model"


def test_a_tied_weight_is_refused_and_so_is_wrapping_twice():
    with pytest.raises(ConfigError, match="tied to transformer.wte.weight"):
        built(model_cfg("hf_gpt2", lora("lm_head")))
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        built(model_cfg("timm_vit", lora("blocks.0.attn.qkv"), lora("blocks.0.attn.qkv")))


class Separable(nn.Module):
    """A depthwise (grouped) conv, which LoRA leaves alone, then a pointwise conv."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pointwise = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_multihead_attention_out_proj_is_refused_it_is_never_called():
    with pytest.raises(ConfigError, match="out_proj.*never calls it"):
        built(model_cfg({"_target_": "test_lora.WithMHA"}, lora("attn")))


def test_grouped_convolutions_are_left_alone_and_named_when_nothing_else_matches():
    _, edits = built(model_cfg({"_target_": "test_lora.Separable"}, lora("*")))
    assert edits[0].targets == ("pointwise",)
    with pytest.raises(ConfigError, match=r"depthwise \(Conv2d: a grouped convolution \(groups=4\)\)"):
        built(model_cfg({"_target_": "test_lora.Separable"}, lora("depthwise")))


# ---- the checkpoint's view: declared keys, low_memory, DoRA after loading -------------------------
@pytest.fixture(scope="module")
def vit_a(tmp_path_factory) -> Path:
    """Model A: the tests' ViT as is (same sizes, 3 classes), saved as safetensors."""
    torch.manual_seed(7)
    model = real_models.build(real_models.model_config("timm_vit").base)
    path = tmp_path_factory.mktemp("vit-a") / "vit.safetensors"
    save_file(real_models.state_dict_of(model), str(path))
    return path


def ckpt_cfg(path: Path, **changes):
    from finetune.config import CheckpointConfig

    return OmegaConf.merge(OmegaConf.structured(CheckpointConfig), {"path": str(path), **changes})


def test_lora_keys_are_declared_new_and_a_missing_base_weight_is_not(vit_a, tmp_path):
    from finetune.checkpoint.load import load_checkpoint

    sd = load_file(str(vit_a))
    del sd["blocks.0.attn.qkv.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    model, edits = built(model_cfg("timm_vit", lora("blocks.*.attn.qkv")))
    report = load_checkpoint(model, ckpt_cfg(path), edits)
    lora_keys = sorted(edits[0].keys)
    assert sorted(k for k in report.missing if ".lora_" in k) == lora_keys
    assert {k: report.declared[k] for k in lora_keys} == dict.fromkeys(lora_keys, "model.add[0] (lora blocks.*.attn.qkv)")
    assert "blocks.0.attn.qkv.weight" in report.missing and "blocks.0.attn.qkv.weight" not in report.declared


@pytest.mark.parametrize("dora", [False, True])
def test_low_memory_assigns_loaded_weights_and_initialises_only_the_adapters(vit_a, dora):
    from finetune.checkpoint.load import load_checkpoint

    cfg = model_cfg("timm_vit", lora("blocks.*.attn.qkv", dora=dora))
    with torch.device("meta"):
        model, edits = build_model(cfg)
    report = load_checkpoint(model, ckpt_cfg(vit_a), edits, low_memory=True)
    assert report.init == "reset_parameters"
    sd = load_file(str(vit_a))
    qkv = model.blocks[1].attn.qkv
    assert torch.equal(qkv.weight, sd["blocks.1.attn.qkv.weight"]) and torch.equal(qkv.bias, sd["blocks.1.attn.qkv.bias"])
    assert torch.all(qkv.lora_b == 0) and qkv.lora_a.abs().sum() > 0 and torch.isfinite(qkv.lora_a).all()
    # At init the model is model A's: the same output as the plain model loaded normally (DoRA's
    # magnitude is the norm of the *loaded* weight).
    plain = real_models.build(real_models.model_config("timm_vit").base)
    plain.load_state_dict(sd)
    model.eval(), plain.eval()
    assert torch.equal(model(vit_input()), plain(vit_input()))


def test_dora_magnitude_follows_the_checkpoint_in_a_normal_build_too(vit_a):
    from finetune.checkpoint.load import load_checkpoint

    model, edits = built(model_cfg("timm_vit", lora("blocks.*.attn.qkv", dora=True)))
    load_checkpoint(model, ckpt_cfg(vit_a), edits)
    qkv = model.blocks[0].attn.qkv
    assert torch.equal(qkv.lora_magnitude, torch.linalg.norm(load_file(str(vit_a))["blocks.0.attn.qkv.weight"], dim=1))


def test_partly_new_modules_keep_their_loaded_tensors_on_meta_until_assigned():
    from finetune.checkpoint.load import materialize_new

    with torch.device("meta"):
        model, edits = build_model(model_cfg("timm_vit", lora("blocks.0.attn.qkv")))
    materialize_new(model, set(edits[0].keys))
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.is_meta and qkv.bias.is_meta  # never materialised, never reset: assigned next
    assert not qkv.lora_a.is_meta and torch.all(qkv.lora_b == 0)


# ---- PEFT's format, loaded by peft itself ---------------------------------------------------------
@pytest.mark.parametrize("name, add, inputs", [
    ("hf_gpt2", [lora("transformer.h.*.attn.c_attn", rank=4, alpha=8), lora("transformer.h.*.mlp.c_fc", rank=2, alpha=4)], tokens),
    ("hf_gpt2", [lora("transformer.h.*.attn.c_attn", rank=4, alpha=8, dora=True)], tokens),
    ("hf_bert_classifier", [lora("bert.encoder.layer.*.attention.self.*", dora=True),
                            lora("bert.embeddings.word_embeddings", dora=True)], tokens),
    ("timm_vit", [lora("blocks.*.attn.qkv"), lora("patch_embed.proj", rank=2)], vit_input),
])
def test_peft_loads_the_adapter_onto_the_base_model_with_the_same_outputs(name, add, inputs, tmp_path):
    from peft import PeftModel

    from finetune.artifacts import write_peft_adapter

    cfg = model_cfg(name, *add)
    model, _ = built(cfg)
    base, _ = built(cfg, lora=False)  # the same base weights (same seed), no adapters
    perturb(model)
    config = write_peft_adapter(model, tmp_path / "adapter")
    assert config["fan_in_fan_out"] is (name == "hf_gpt2")
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert keys == set(peft_state_dict(model)) and all(k.startswith("base_model.model.") for k in keys)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    model.eval()
    expected = logits(model, inputs())
    assert torch.allclose(logits(peft_model, inputs()), expected, atol=1e-5 * expected.abs().max().item())


def test_peft_state_dict_keys_load_without_leftovers_by_set_peft_model_state_dict():
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from finetune.adapters import peft_config

    cfg = model_cfg("hf_bert_classifier", lora("bert.encoder.layer.*.attention.self.query", rank=4, alpha=8),
                    lora("bert.encoder.layer.*.attention.self.value", rank=2, alpha=8))
    model, _ = built(cfg)
    perturb(model)
    config = peft_config(model, [])
    assert config["rank_pattern"] == {f"bert.encoder.layer.{i}.attention.self.value": 2 for i in (0, 1)}
    keep = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
    base, _ = built(cfg, lora=False)
    peft_model = get_peft_model(base, LoraConfig(**keep))
    result = set_peft_model_state_dict(peft_model, peft_state_dict(model))
    assert not result.unexpected_keys
    batch = tokens()
    model.eval(), peft_model.eval()
    assert torch.allclose(logits(peft_model, batch), logits(model, batch), atol=1e-5)


# ---- runs (in-process, the tiny model) ------------------------------------------------------------
HEAD = "{op: replace, at: head, module: {_target_: torch.nn.Linear, in_features: 16, out_features: 3}}"
ADAPTER1 = "{op: after, at: layer1, name: adapter1, module: {_target_: finetune.modules.Adapter, channels: 16, spatial: false}}"


def with_lora(*settings: str, at: str = "layer*") -> list[str]:
    extra = "".join(f", {s}" for s in settings)
    return [f"model.add=[{HEAD}, {ADAPTER1}, {{op: lora, at: '{at}', rank: 4, alpha: 8{extra}}}]", "policy=lora",
            "trainer.tensorboard=false"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def plain_model(cfg) -> nn.Module:
    model, _ = build_model(cfg.model, lora=False)
    return model.eval()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_ckpts):
    from conftest import TINY_TRAIN, compose_config

    run_dir = tmp_path_factory.mktemp("lora-run") / "run"
    cfg = compose_config([*TINY_TRAIN, f"checkpoint.path={tiny_ckpts.safetensors}", *with_lora()])
    summary = run(cfg, run_dir)
    return cfg, run_dir, summary


def test_lora_run_trains_the_adapters_and_new_modules_only(lora_run):
    cfg, run_dir, summary = lora_run
    assert summary["status"] == "completed"
    params = {p["name"]: p for p in read_json(run_dir / "trainability.json")["params"]}
    trainable = sorted(n for n, p in params.items() if p["trainable"])
    assert trainable == sorted(["layer1.0.lora_a", "layer1.0.lora_b", "layer2.0.lora_a", "layer2.0.lora_b",
                                "head.weight", "head.bias", *(f"adapter1.{m}.{t}" for m in ("down", "up") for t in ("weight", "bias"))])
    assert params["layer1.0.lora_a"]["added_by"] == "model.add[2] (lora layer*)" and params["head.weight"]["added_by"] is None
    audit = read_json(run_dir / "trainability.json")["audit"]
    assert audit["grad_flow_ok"] is True and set(audit["zero_grad_cleared_at"]) == {"layer1.0.lora_a", "layer2.0.lora_a"}
    assert audit["frozen_unchanged"] is True
    weights = load_file(str(run_dir / "model.safetensors"))
    assert torch.equal(weights["layer1.0.weight"], load_file(str(cfg.checkpoint.path))["layer1.0.weight"])  # frozen base
    assert weights["layer1.0.lora_b"].abs().sum() > 0


def test_merged_safetensors_loads_strictly_without_the_lora_ops_and_was_verified(lora_run):
    cfg, run_dir, _ = lora_run
    merged = load_file(str(run_dir / "merged.safetensors"))
    model = plain_model(cfg)
    model.load_state_dict(merged, strict=True)
    assert not any(".lora_" in k for k in merged)
    report = read_json(run_dir / "export_report.json")
    assert report["tolerance"] == 1e-4 and report["skipped"] == [] and report["batches"] == 3  # 48 samples / 16
    files = {a["file"]: a for a in report["artifacts"]}
    assert set(files) == {"merged.safetensors", "adapter/"}
    for artifact in files.values():
        assert artifact["ok"] is True and artifact["max_abs_diff"] <= 1e-4 * artifact["output_scale"]
        assert set(artifact["metrics"]) == {"val/loss", "val/acc"}  # top5 needs 5 classes
        for trained, exported in artifact["metrics"].values():
            assert abs(trained - exported) < 1e-5
    # The trained model (model.safetensors, adapters unmerged) and the merged one agree here too.
    trained, _ = build_model(cfg.model)
    trained.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=True)
    x = torch.randn(5, 8)
    assert torch.allclose(trained.eval()(x), model(x), atol=1e-5)


def test_the_adapter_carries_the_new_modules_and_peft_rebuilds_the_trained_model(lora_run):
    from peft import PeftModel

    from finetune.checkpoint.load import load_checkpoint

    cfg, run_dir, _ = lora_run
    config = read_json(run_dir / "adapter" / "adapter_config.json")
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8 and config["use_dora"] is False
    assert config["target_modules"] == ["layer1.0", "layer2.0"] and sorted(config["modules_to_save"]) == ["adapter1", "head"]
    base, edits = build_model(cfg.model, lora=False)
    load_checkpoint(base, cfg.checkpoint, edits)  # what a PEFT user has: model B from model A's checkpoint
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    x = torch.randn(5, 8)
    merged = plain_model(cfg)
    merged.load_state_dict(load_file(str(run_dir / "merged.safetensors")))
    assert torch.allclose(peft_model(x), merged(x), atol=1e-5)


def test_trainability_table_groups_the_adapters_by_their_op(lora_run, caplog):
    from finetune.console.tables import format_trainability
    from finetune.policy import ParamPlan, TrainPlan

    _, run_dir, _ = lora_run
    params = [ParamPlan(**{k: v for k, v in p.items()}) for p in read_json(run_dir / "trainability.json")["params"]]
    text = format_trainability(TrainPlan(params, []))
    assert "layer{1..2}.0.lora_* (model.add[2] lora)" in text
    adapters = sum(p.numel for p in params if p.added_by)
    assert f"adapters: model.add[2] (lora layer*): {adapters} on 2 modules" in text
    assert "layer1.0.weight" not in text  # the base is one group, not split by the adapters beside it


def test_dora_with_bf16_and_grad_accum_exports_verified(tiny_cfg, tmp_path):
    summary = run(tiny_cfg(*with_lora("dora: true", "dropout: 0.1"), "trainer.precision=bf16", "trainer.grad_accum=2"),
                  tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 4
    report = read_json(tmp_path / "run" / "export_report.json")
    assert [a["ok"] for a in report["artifacts"]] == [True, True]
    assert read_json(tmp_path / "run" / "adapter" / "adapter_config.json")["use_dora"] is True
    assert "layer2.0.lora_magnitude" in load_file(str(tmp_path / "run" / "model.safetensors"))


def test_low_memory_run_exports_verified(tiny_cfg, tmp_path):
    summary = run(tiny_cfg(*with_lora("dora: true"), "checkpoint.low_memory=true"), tmp_path / "run")
    assert summary["status"] == "completed"
    assert read_json(tmp_path / "run" / "load_report.json")["init"] == "reset_parameters"
    assert all(a["ok"] for a in read_json(tmp_path / "run" / "export_report.json")["artifacts"])


def test_unfreezing_the_base_late_merges_it_and_skips_the_adapter_with_the_reason(tiny_cfg, tmp_path):
    summary = run(tiny_cfg(*with_lora(), "policy.unfreeze=[{at_epoch: 2, params: [layer2], lr_mult: 0.1}]"), tmp_path / "run")
    assert summary["status"] == "completed"
    report = read_json(tmp_path / "run" / "export_report.json")
    assert [a["file"] for a in report["artifacts"]] == ["merged.safetensors"] and report["artifacts"][0]["ok"]
    assert report["skipped"][0]["file"] == "adapter/" and "layer2.0" in report["skipped"][0]["reason"]
    assert not (tmp_path / "run" / "adapter").exists() and not list((tmp_path / "run").glob(".*staged"))


def test_a_merge_outside_the_tolerance_fails_the_run_and_writes_no_merged_file(tiny_cfg, tmp_path, monkeypatch):
    from finetune.export import ExportError

    real = LoRALayer.merged_weight
    monkeypatch.setattr(LoRALayer, "merged_weight", lambda self: real(self) + 0.05)
    with pytest.raises(ExportError, match="merged.safetensors differs by"):
        run(tiny_cfg(*with_lora()), tmp_path / "run")
    run_dir = tmp_path / "run"
    assert read_json(run_dir / "summary.json")["status"] == "failed"
    assert "export verification failed" in read_json(run_dir / "summary.json")["error"]
    assert not (run_dir / "merged.safetensors").exists() and (run_dir / "adapter").is_dir()
    assert {a["file"]: a["ok"] for a in read_json(run_dir / "export_report.json")["artifacts"]} == {
        "merged.safetensors": False, "adapter/": True}
    monkeypatch.undo()  # the same command again: resumes after the last epoch and exports again
    again = run(tiny_cfg(*with_lora()), run_dir)
    assert again["status"] == "completed" and again["resumed_from"] == {"epoch": 2, "step": 8}
    assert (run_dir / "merged.safetensors").is_file()
    assert all(a["ok"] for a in read_json(run_dir / "export_report.json")["artifacts"])


def test_interrupted_lora_run_resumes_bit_identically(tiny_cfg, tmp_path):
    marker = tmp_path / "sigint-sent"
    interrupting = ["+data.train.interrupt_after=20", f"+data.train.interrupt_marker={marker}"]
    cfg = lambda: tiny_cfg(*with_lora("dropout: 0.2"), *interrupting)  # noqa: E731  dropout: the RNG is restored too
    assert run(cfg(), tmp_path / "run")["status"] == "interrupted"
    assert run(cfg(), tmp_path / "run")["status"] == "completed"
    run(cfg(), tmp_path / "straight")
    for name in ("model.safetensors", "merged.safetensors", "adapter/adapter_model.safetensors"):
        resumed, straight = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "straight" / name))
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name


def test_bert_lora_run_with_a_new_classifier_exports_it_as_modules_to_save(tmp_path, compose):
    """The README's example: a bare BERT encoder's checkpoint, LoRA on query and value, a new classifier."""
    ckpt = real_models.bert_encoder_checkpoint(tmp_path / "encoder")
    add = ("model.add=[{op: lora, at: 'bert.encoder.layer.*.attention.self.query', rank: 4, alpha: 8}, "
           "{op: lora, at: 'bert.encoder.layer.*.attention.self.value', rank: 4, alpha: 8}]")
    cfg = compose(["model=hf_bert_classifier", "data=marked_tokens", "checkpoint=hf_bert", f"checkpoint.path={ckpt}",
                   "task=classification", add, "policy=lora", "trainer.epochs=1", "trainer.progress=false",
                   "trainer.tensorboard=false", "trainer.device=cpu"])
    assert run(cfg, tmp_path / "run")["status"] == "completed"
    report = read_json(tmp_path / "run" / "export_report.json")
    assert [(a["file"], a["ok"]) for a in report["artifacts"]] == [("merged.safetensors", True), ("adapter/", True)]
    config = read_json(tmp_path / "run" / "adapter" / "adapter_config.json")
    assert config["modules_to_save"] == ["classifier"] and len(config["target_modules"]) == 4
    trainable = {p["name"] for p in read_json(tmp_path / "run" / "trainability.json")["params"] if p["trainable"]}
    assert trainable == {"classifier.weight", "classifier.bias"} | {
        f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}" for i in (0, 1) for m in ("query", "value") for ab in "ab"}


def test_policy_lora_without_a_lora_op_says_what_is_missing(compose):
    from finetune.errors import PolicyError
    from finetune.policy import plan_training

    cfg = compose(["policy=lora"], search=())
    model, _ = built(model_cfg("timm_vit"))
    with pytest.raises(PolicyError, match="no LoRA adapters") as err:
        plan_training(model, {}, cfg.policy, 1e-3, 0.0)
    assert "add a lora op to model.add" in err.value.fix


def test_a_sweep_override_reaches_the_rank(compose):
    cfg = compose(["experiment=text_demo_lora", "model.add.1.rank=4"], search=())
    assert [e.op.value for e in cfg.model.add] == ["before", "lora", "lora"]
    assert cfg.model.add[1].rank == 4 and cfg.model.add[2].rank == 8 and cfg.policy.train == ["*.lora_*"]


# ---- the real command ------------------------------------------------------------------------------
@pytest.mark.slow
def test_text_demo_lora_sweep_over_the_rank(tmp_path, cli_env):
    env = {**cli_env, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "finetune", "--multirun", "experiment=text_demo_lora",
                             "model.add.1.rank=2,4", "trainer.max_steps=3", "trainer.progress=false",
                             "trainer.tensorboard=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    output = result.stdout + result.stderr
    assert "blocks.{0..1}.attn.qkv.lora_* (model.add[1] lora)" in output
    assert "export: merged.safetensors verified" in output and "export: adapter/ verified" in output
    for job, rank in (("0", 2), ("1", 4)):
        job_dir = tmp_path / "sweep" / job
        assert read_json(job_dir / "summary.json")["status"] == "completed"
        config = read_json(job_dir / "adapter" / "adapter_config.json")  # model.add[2] (the MLP's) keeps rank 8
        assert config["r"] == rank and config["rank_pattern"] == {n: 8 for n in config["target_modules"] if ".mlp." in n}
        assert all(a["ok"] for a in read_json(job_dir / "export_report.json")["artifacts"])
        assert json.loads((job_dir / "export_report.json").read_text())["skipped"] == []


@pytest.mark.slow
def test_ddp_lora_run_exports_from_rank_0_over_the_whole_validation_set(tiny_cfg, tmp_path):
    summary = run(tiny_cfg(*with_lora(), "data.batch_size=8", "trainer.nproc=2"), tmp_path / "run")
    assert summary["status"] == "completed" and summary["ranks_in_sync"] is True
    report = read_json(tmp_path / "run" / "export_report.json")
    assert report["batches"] == 6  # 48 samples / 8, not a rank's shard of them
    assert [a["ok"] for a in report["artifacts"]] == [True, True]
