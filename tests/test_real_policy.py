"""The policy respects the model's own decisions, on real architectures built from tiny configs
(random init, nothing downloaded): parameters PEFT froze stay frozen ("frozen by the model"), timm's
`no_weight_decay()` is honoured, and overlapping policy.groups resolve by the narrowest glob, with a
new adapter inside a group keeping policy.new_lr_mult."""

from __future__ import annotations

import json

import pytest
import real_models
from conftest import compose_config

from finetune.config import ParamGroupSpec, PolicyConfig
from finetune.model import build_model
from finetune.policy import plan_training

pytestmark = pytest.mark.slow

QUIET = ["trainer.progress=false", "trainer.tensorboard=false"]


def test_peft_lora_bert_keeps_what_peft_froze_frozen_and_says_so(tmp_path):
    from finetune.run import run

    run_dir = tmp_path / "run"
    cfg = compose_config(["model=hf_bert_peft", "data=marked_tokens", "checkpoint=none", "task=classification",
                          "trainer.epochs=1", *QUIET])
    summary = run(cfg, run_dir)
    assert summary["status"] == "completed"
    trainability = json.loads((run_dir / "trainability.json").read_text())
    params = {p["name"]: p for p in trainability["params"]}
    lora = [n for n in params if "lora_" in n]
    base = [n for n in params if "lora_" not in n and "classifier" not in n]
    assert lora and all(params[n]["trainable"] for n in lora)
    assert base and all(not params[n]["trainable"] and params[n]["frozen_by"] == "model" for n in base)
    assert trainability["audit"]["frozen_unchanged"] is True  # and they did not move
    assert trainability["totals"]["trainable"] < 0.2 * trainability["totals"]["params"]


def test_peft_frozen_parameters_train_when_policy_train_names_them():
    model, _ = build_model(model_cfg("hf_bert_peft"))
    embeddings = [n for n, _ in model.named_parameters() if ".embeddings." in n]
    plan = plan_training(model, {}, PolicyConfig(train=["*.embeddings"]), 1e-3, 0.01)
    by = {p.name: p for p in plan.params}
    assert embeddings and all(by[n].trainable for n in embeddings)
    assert not by[next(n for n in by if "encoder.layer.0.attention.self.query.base_layer.weight" in n)].trainable


def model_cfg(name: str):
    from omegaconf import OmegaConf

    return OmegaConf.merge({"add": []}, real_models.model_config(name))


def _vit_cfg():
    from omegaconf import OmegaConf

    cfg = model_cfg("timm_vit")
    cfg.add = [OmegaConf.create({"op": "after", "at": "blocks.0", "name": "adapter0",
                                 "module": {"_target_": "torch.nn.Linear", "in_features": 32, "out_features": 32}})]
    return cfg


def test_timm_vit_no_weight_decay_names_get_no_decay():
    model, _ = build_model(model_cfg("timm_vit"))
    assert {"pos_embed", "cls_token"} <= set(model.no_weight_decay())
    by = {p.name: p for p in plan_training(model, {}, PolicyConfig(), 1e-3, 0.05).params}
    assert by["pos_embed"].weight_decay == 0.0 and by["cls_token"].weight_decay == 0.0
    assert by["blocks.0.attn.qkv.weight"].weight_decay == 0.05


def test_vit_adapter_inside_a_block_group_keeps_new_lr_mult_and_a_narrower_group_wins():
    model, edits = build_model(_vit_cfg())
    sources = {n: "new" for n, _ in model.named_parameters() if edits[0].covers(n)}
    policy = PolicyConfig(new_lr_mult=10, groups=[ParamGroupSpec(params=["blocks"], lr_mult=0.1),
                                                  ParamGroupSpec(params=["blocks.1"], lr_mult=0.5)])
    plan = plan_training(model, sources, policy, 1.0, 0.05)
    by = {p.name: p for p in plan.params}
    assert by["adapter0.weight"].lr == pytest.approx(10)  # registered beside `blocks`, new: policy.new_lr_mult
    assert by["blocks.0.attn.qkv.weight"].lr == pytest.approx(0.1)
    assert by["blocks.1.attn.qkv.weight"].lr == pytest.approx(0.5)
    assert any(o.loser == "groups[0]" and o.winner == "groups[1]" for o in plan.overlaps)
