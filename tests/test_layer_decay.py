"""policy.layer_decay: each parameter's depth (the model's group_matcher, policy.layer_groups, module
order), the lr it gets (exactly), new parameters, weight-decay twins, unfreeze, and the reports."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import TinyNet

from finetune.config import ParamGroupSpec, PolicyConfig, UnfreezeStep
from finetune.console.tables import format_trainability
from finetune.errors import PolicyError
from finetune.layer_decay import FROM_GROUP_MATCHER, FROM_LAYER_GROUPS, FROM_MODULE_ORDER
from finetune.model import build_model
from finetune.policy import apply_plan, param_groups, plan_training, unfreeze
from finetune.run import run

LR, WD = 1e-3, 0.05
NEW_HEAD = {"head.weight": "new", "head.bias": "new"}


def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=3)


def plan(model, sources=NEW_HEAD, inserted=(), **policy):
    return plan_training(model, sources, PolicyConfig(**policy), LR, WD, inserted=inserted)


def by_name(p) -> dict:
    return {x.name: x for x in p.params}


# ---- depth from the model's group_matcher (timm) -----------------------------------------------


def test_timm_vit_depths_are_timms_own_grouping_and_lrs_are_exact():
    from timm.models import group_parameters

    model = tiny_vit()
    p = plan(model, layer_decay=0.5, new_lr_mult=10)
    timm_layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    params = by_name(p)
    assert p.layer_decay.depth_from == FROM_GROUP_MATCHER
    assert p.layer_decay.max_depth == max(timm_layers.values()) == 4  # embed, 3 blocks (+ norm), head
    for name, plan_row in params.items():
        if name.startswith("head."):
            assert plan_row.depth is None and plan_row.lr == LR * 10  # new: new_lr_mult, no depth
        else:
            assert plan_row.depth == timm_layers[name]
            assert plan_row.lr == LR * 0.5 ** (4 - timm_layers[name])
    assert params["cls_token"].depth == params["patch_embed.proj.weight"].depth == 0
    assert params["blocks.2.mlp.fc2.weight"].lr == LR * 0.5 and params["norm.weight"].depth == 3
    # weight decay twins keep working: same lr, no decay for biases / norms / the model's no_weight_decay()
    assert params["blocks.0.attn.qkv.bias"].lr == params["blocks.0.attn.qkv.weight"].lr
    assert (params["blocks.0.attn.qkv.bias"].weight_decay, params["blocks.0.attn.qkv.weight"].weight_decay) == (0.0, WD)
    assert params["pos_embed"].weight_decay == 0.0
    assert params["blocks.0.attn.qkv.weight"].group == "default/depth1"
    assert params["blocks.0.attn.qkv.bias"].group == "default/depth1/no_decay"


def test_timm_resnet_block_level_depths():
    pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], channels=[8, 16, 16, 16], stem_width=8, num_classes=3)
    p = plan(model, {}, layer_decay=0.75)
    depths = {x.name: x.depth for x in p.params}
    assert depths["conv1.weight"] == depths["bn1.weight"] == 0
    assert [depths[f"layer{i}.0.conv1.weight"] for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert depths["fc.weight"] == p.layer_decay.max_depth == 5  # the checkpoint's head: the top, lr × 1
    assert by_name(p)["fc.weight"].lr == LR and by_name(p)["conv1.weight"].lr == LR * 0.75 ** 5


def test_lora_adapters_inside_blocks_are_new_without_depth():
    model = tiny_vit()
    from finetune.adapters import add_lora

    add_lora(model.blocks[1].attn.qkv, 2, 4.0, 0.0, False)
    sources = {**NEW_HEAD, "blocks.1.attn.qkv.lora_a": "new", "blocks.1.attn.qkv.lora_b": "new"}
    params = by_name(plan(model, sources, layer_decay=0.5))
    assert params["blocks.1.attn.qkv.lora_a"].depth is None and params["blocks.1.attn.qkv.lora_a"].lr == LR
    assert params["blocks.1.attn.qkv.weight"].depth == 2 and params["blocks.1.attn.qkv.weight"].lr == LR * 0.25


# ---- depth from policy.layer_groups ----------------------------------------------------------


def test_layer_groups_index_of_the_first_regex_that_matches():
    p = plan(TinyNet(), layer_decay=0.5, layer_groups=[r"^layer1\.", r"^layer", r"^head\."])
    params = by_name(p)
    assert p.layer_decay.depth_from == FROM_LAYER_GROUPS and p.layer_decay.max_depth == 2
    assert {params[n].depth for n in params if n.startswith("layer1.")} == {0}  # the first match wins
    assert params["layer2.0.weight"].depth == 1 and params["layer2.0.weight"].lr == LR * 0.5
    assert params["layer1.0.weight"].lr == LR * 0.25
    assert params["head.weight"].depth is None and params["head.weight"].lr == LR


def test_layer_groups_capture_numbers_span_one_depth_each():
    params = by_name(plan(TinyNet(), layer_decay=0.5, layer_groups=[r"^layer(\d+)\.", r"^head"]))
    assert params["layer1.0.weight"].depth == 0 and params["layer2.0.weight"].depth == 1
    assert params["layer1.0.weight"].lr == LR * 0.25


def test_layer_groups_win_over_the_models_group_matcher():
    p = plan(tiny_vit(), layer_decay=0.5, layer_groups=[r"^(cls_token|pos_embed|patch_embed)", r"^blocks", r"^norm"])
    assert p.layer_decay.depth_from == FROM_LAYER_GROUPS and p.layer_decay.max_depth == 2


def test_layer_groups_regex_matching_nothing_names_it_and_the_closest_names():
    with pytest.raises(PolicyError) as err:
        plan(TinyNet(), layer_decay=0.5, layer_groups=[r"^layer1\.", r"^layr2\.", "."])
    assert "policy.layer_groups[1] '^layr2\\\\.' matches no parameter" in err.value.problem
    assert "layer2" in err.value.fix


def test_checkpoint_parameter_matching_no_regex_is_an_error_a_new_one_is_not():
    with pytest.raises(PolicyError) as err:
        plan(TinyNet(), layer_decay=0.5, layer_groups=[r"^layer1\."])
    assert "layer2.0.weight" in err.value.problem and "head" not in err.value.problem  # head is new
    p = plan(TinyNet(), layer_decay=0.5, layer_groups=[r"^layer1\.", r"^layer2\."])
    assert by_name(p)["head.weight"].depth is None


def test_layer_groups_without_layer_decay_and_a_decay_out_of_range_are_errors():
    with pytest.raises(PolicyError, match="layer_decay is null"):
        plan(TinyNet(), layer_groups=[r"^layer"])
    with pytest.raises(PolicyError, match=r"not in \(0, 1\]"):
        plan(TinyNet(), layer_decay=1.5)


# ---- depth from module order -----------------------------------------------------------------


def test_module_order_splits_containers_of_blocks_and_skips_inserted_modules(compose):
    """The demo's model B: DemoNet's stem, layer{1..3} (containers of conv blocks), a new head that
    keeps its place, and an inserted adapter2 that takes none."""
    model, edits = build_model(compose(["model=demo"]).model)
    sources = {n: "new" for n, _ in model.named_parameters() if n.startswith(("fc.", "adapter2."))}
    p = plan(model, sources, inserted=["adapter2"], layer_decay=0.75)
    params = by_name(p)
    assert p.layer_decay.depth_from == FROM_MODULE_ORDER and p.layer_decay.max_depth == 7
    assert params["stem.0.weight"].depth == params["stem.1.bias"].depth == 0
    assert [params[f"layer{i}.{j}.0.weight"].depth for i in (1, 2, 3) for j in (0, 1)] == [1, 2, 3, 4, 5, 6]
    assert params["stem.0.weight"].lr == LR * 0.75 ** 7 and params["layer3.1.0.weight"].lr == LR * 0.75
    assert all(params[n].depth is None and params[n].lr == LR for n in sources)


def test_module_order_keeps_a_container_of_layers_as_one_depth():
    p = plan(TinyNet(), layer_decay=0.5)
    params = by_name(p)
    assert {params[n].depth for n in params if n.startswith("layer1.")} == {0}  # Linear + BatchNorm: one layer
    assert params["layer2.0.weight"].depth == 1 and p.layer_decay.max_depth == 2


# ---- policy.groups, frozen parameters, unfreeze ------------------------------------------------


def test_group_lr_mult_multiplies_the_decay_and_frozen_parameters_keep_their_depth():
    p = plan(TinyNet(), layer_decay=0.5, freeze=["layer1"], groups=[ParamGroupSpec(params=["layer2"], lr_mult=3.0)])
    params = by_name(p)
    assert params["layer2.0.weight"].lr == LR * 3.0 * 0.5 and params["layer2.0.weight"].group == "groups[0]/depth1"
    assert params["layer1.0.weight"].depth == 0 and params["layer1.0.weight"].lr is None
    assert p.groups[0].name in ("default", "default/no_decay")  # the top groups first: `lr` logs the base schedule


def test_unfreeze_gives_each_depth_its_decayed_lr():
    model = TinyNet()
    policy = PolicyConfig(layer_decay=0.5, freeze=["*"], unfreeze=[UnfreezeStep(at_epoch=2, params=["*"], lr_mult=0.1)])
    p = plan_training(model, NEW_HEAD, policy, LR, WD)
    apply_plan(model, p)
    groups = {g["name"]: g for g in unfreeze(model, policy.unfreeze[0], 0, LR, WD, False, p)}
    assert list(groups) == ["unfreeze[0]/depth1", "unfreeze[0]/depth1/no_decay", "unfreeze[0]/depth0",
                            "unfreeze[0]/depth0/no_decay"]
    assert groups["unfreeze[0]/depth0"]["lr"] == pytest.approx(LR * 0.1 * 0.25)
    assert groups["unfreeze[0]/depth1/no_decay"]["lr"] == pytest.approx(LR * 0.1 * 0.5)
    assert groups["unfreeze[0]/depth1/no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == 6  # everything but the (trainable) new head


def test_optimizer_groups_hold_the_planned_lrs():
    model = TinyNet()
    p = plan(model, layer_decay=0.5)
    apply_plan(model, p)
    names = {id(t): n for n, t in model.named_parameters()}
    planned = by_name(p)
    for group in param_groups(model, p):
        assert all(planned[names[id(t)]].lr == group["lr"] for t in group["params"])


def test_trainability_table_shows_depths_and_lr_factors():
    text = format_trainability(plan(TinyNet(), layer_decay=0.5))
    assert "depth" in text.splitlines()[1] and "lr ×" in text.splitlines()[1]
    assert "layer decay 0.5: depths 0..2 from module order" in text
    row = next(line for line in text.splitlines() if "layer1.*" in line)
    assert row.split()[0] == "0" and row.split()[-1] == "0.25"


# ---- through a run: trainability.json --------------------------------------------------------


def test_trainability_json_records_each_depth(tiny_cfg, tmp_path):
    run_dir = tmp_path / "dry"
    run(tiny_cfg("dry_run=true", "policy.layer_decay=0.5", "policy.new_lr_mult=2"), run_dir)
    report = json.loads((run_dir / "trainability.json").read_text())
    assert report["layer_decay"] == {"decay": 0.5, "max_depth": 2, "depth_from": "module order"}
    rows = {p["name"]: p for p in report["params"]}
    assert rows["layer1.0.weight"]["depth"] == 0 and rows["layer2.0.weight"]["depth"] == 1
    lr = rows["layer2.0.weight"]["lr"] / 0.5
    assert rows["layer1.0.weight"]["lr"] == pytest.approx(lr * 0.25)
    for name in ("head.weight", "adapter1.down.weight"):  # new: no depth, new_lr_mult
        assert rows[name]["depth"] is None and rows[name]["lr"] == pytest.approx(lr * 2)


def test_probe_then_finetune_with_layer_decay_trains_and_resumes_its_groups(tiny_cfg, tmp_path):
    cfg = tiny_cfg("policy=probe_then_finetune", "policy.unfreeze.0.at_epoch=2", "optim=adamw", "policy.layer_decay=0.5")
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed"
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["unfreeze[0]/depth0"] == pytest.approx(lrs["unfreeze[0]/depth1"] / 2)
