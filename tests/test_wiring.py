"""model.add's after/before modules run exactly once, where the op says, on real architectures
(timm ViT, torchvision ResNet-18, Hugging Face BERT, a bare nn.Sequential), and a module that does
not fit where it is inserted is found on the first forward pass, naming the op, the module and
the shapes. Every model is built from a tiny config with random init."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from finetune.model import WiringError, build_model, watch_edits

COUNT = {"_target_": "tiny.CountCalls"}


def model_cfg(base: dict, *add: dict):
    return OmegaConf.create({"base": base, "add": list(add)})


VIT = {"_target_": "timm.create_model", "model_name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32,
       "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "num_classes": 3}
RESNET = {"_target_": "torchvision.models.resnet18", "weights": None, "num_classes": 3}


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_vit_adapter_after_a_block_runs_once_and_the_blocks_stay_as_they_were():
    plain, _ = build_model(model_cfg(VIT))
    model, edits = build_model(model_cfg(VIT, {"op": "after", "at": "blocks.1", "name": "adapter1", "module": COUNT}))
    assert edits[0].name == "adapter1"  # on the ViT itself: `blocks` (an nn.Sequential) would also run it
    assert len(model.blocks) == 3 and all(type(b).__name__ == "Block" for b in model.blocks)
    assert names(model) == names(plain) + ["adapter1.scale"]
    with watch_edits(model):
        model(torch.randn(2, 3, 32, 32))
    assert model.adapter1.calls == 1


def test_vit_adapter_before_a_block_changes_what_the_block_receives():
    model, _ = build_model(model_cfg(VIT, {"op": "before", "at": "blocks.2", "name": "pre2", "module": COUNT}))
    seen = []
    model.blocks[2].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.pre2.scale.fill_(0.0)
        model(x)
    assert model.pre2.calls == 1 and torch.count_nonzero(seen[0]) == 0


def test_resnet_adapter_after_a_block_inside_layer4_runs_once():
    from finetune.modules import Adapter

    model, edits = build_model(model_cfg(RESNET, {"op": "after", "at": "layer4.0", "name": "adapter",
                                                  "module": {"_target_": "finetune.modules.Adapter", "channels": 512}}))
    assert edits[0].name == "adapter" and len(model.layer4) == 2
    calls = []
    model.adapter.register_forward_hook(lambda *_: calls.append(1))
    with watch_edits(model):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and len(calls) == 1 and isinstance(model.adapter, Adapter)


def test_resnet_adapter_with_the_wrong_channels_names_the_op_the_module_and_the_shape():
    model, _ = build_model(model_cfg(RESNET, {"op": "after", "at": "layer4.0", "name": "adapter",
                                              "module": {"_target_": "finetune.modules.Adapter", "channels": 256}}))
    with pytest.raises(WiringError) as info:
        model(torch.randn(2, 3, 32, 32))
    problem = info.value.problem
    assert "model.add[0] (after layer4.0)" in problem and "'adapter' (Adapter)" in problem
    assert "[2, 512, 1, 1]" in problem


def test_a_module_that_changes_the_shape_is_named_when_the_next_module_fails():
    conv = {"_target_": "torch.nn.Conv2d", "in_channels": 256, "out_channels": 128, "kernel_size": 1}
    model, _ = build_model(model_cfg(RESNET, {"op": "after", "at": "layer3", "name": "squeeze", "module": conv}))
    with pytest.raises(WiringError) as info, watch_edits(model):
        model(torch.randn(2, 3, 32, 32))
    problem = info.value.problem
    assert "model.add[0] (after layer3)" in problem and "[2, 256, 2, 2] to [2, 128, 2, 2]" in problem


def test_bert_adapter_after_an_encoder_layer_lives_on_the_encoder_and_runs_once():
    cfg = OmegaConf.load(__import__("real_models").CONF / "model" / "hf_bert_classifier.yaml")
    base = OmegaConf.to_container(cfg.base)
    model, edits = build_model(model_cfg(base, {"op": "after", "at": "bert.encoder.layer.0", "name": "adapter0", "module": COUNT}))
    assert edits[0].name == "bert.encoder.adapter0"  # encoder.layer is an nn.ModuleList
    assert len(model.bert.encoder.layer) == len(list(model.bert.encoder.layer))
    ids = torch.randint(1, 50, (2, 6))
    with watch_edits(model):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert model.bert.encoder.adapter0.calls == 1


def test_a_bare_sequential_model_gets_the_module_on_the_target():
    base = {"_target_": "torch.nn.Sequential", "_args_": [
        {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 4},
        {"_target_": "torch.nn.ReLU"},
        {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2}]}
    model, edits = build_model(model_cfg(base, {"op": "after", "at": "0", "name": "extra", "module": COUNT}))
    assert edits[0].name == "0.extra" and len(model) == 3
    with watch_edits(model):
        model(torch.randn(3, 4))
    assert model[0].extra.calls == 1


def test_a_module_run_twice_per_forward_is_refused():
    """A parent that runs its children itself (a module registered by hand into a Sequential) is caught."""
    model, edits = build_model(model_cfg(RESNET, {"op": "after", "at": "layer4.0", "name": "adapter", "module": COUNT}))
    model.layer4.add_module("again", model.adapter)  # what registering beside layer4.0 used to do
    with pytest.raises(WiringError, match="ran 2 times in one forward pass"), watch_edits(model):
        model(torch.randn(2, 3, 32, 32))
