"""finetune.policy: globs, precedence (train > new > freeze), weight decay, lr groups, frozen norms."""

from __future__ import annotations

import pytest
import torch
from tiny import TinyNet

from finetune.config import NewParams, NormMode, ParamGroupSpec, PolicyConfig, UnfreezeStep
from finetune.errors import PolicyError
from finetune.policy import (
    apply_plan,
    is_no_decay,
    optimizer_defaults,
    param_groups,
    plan_training,
    unfreeze,
    unfreeze_due,
)

LR, WD = 1e-3, 0.05
ALL = ["layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
       "layer2.0.weight", "layer2.0.bias", "head.weight", "head.bias"]
NEW_HEAD = {"head.weight": "new", "head.bias": "new"}


@pytest.fixture
def model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def plan(model, sources=NEW_HEAD, **policy):
    return plan_training(model, sources, PolicyConfig(**policy), LR, WD)


def trainable(p) -> set[str]:
    return set(p.trainable_names)


# ---- precedence ------------------------------------------------------------------------------


def test_default_policy_trains_everything(model):
    p = plan(model)
    assert trainable(p) == set(ALL)
    assert p.frozen_names == []
    assert {x.name: x.source for x in p.params} == {n: NEW_HEAD.get(n, "checkpoint") for n in ALL}


def test_freeze_module_prefix(model):
    p = plan(model, freeze=["layer1"])
    assert trainable(p) == {"layer2.0.weight", "layer2.0.bias", "head.weight", "head.bias"}
    frozen = {x.name: x for x in p.params if not x.trainable}
    assert set(frozen) == {n for n in ALL if n.startswith("layer1.")}
    assert all(x.lr is None and x.group is None for x in frozen.values())


def test_new_train_wins_over_freeze(model):
    p = plan(model, freeze=["*"], new=NewParams.train)
    assert trainable(p) == {"head.weight", "head.bias"}


def test_train_wins_over_freeze(model):
    p = plan(model, freeze=["*"], train=["layer2"])
    assert trainable(p) == {"layer2.0.weight", "layer2.0.bias", "head.weight", "head.bias"}


def test_train_wins_over_new_freeze(model):
    p = plan(model, new=NewParams.freeze, train=["head.bias"])
    assert trainable(p) == set(ALL) - {"head.weight"}


def test_new_freeze_freezes_only_new(model):
    p = plan(model, new=NewParams.freeze)
    assert trainable(p) == set(ALL) - {"head.weight", "head.bias"}


def test_adapted_params_count_as_new(model):
    p = plan(model, {"head.weight": "adapted", "head.bias": "new"}, freeze=["*"])
    assert trainable(p) == {"head.weight", "head.bias"}
    assert {x.name: x.source for x in p.params}["head.weight"] == "adapted"


def test_freeze_glob_matching_only_new_params_is_an_error(model):
    with pytest.raises(PolicyError) as info:
        plan(model, freeze=["layer1", "head"])
    assert "policy.freeze[1]" in info.value.problem and "'head'" in info.value.problem
    assert "policy.new=freeze" in info.value.fix


def test_freeze_glob_matching_only_new_params_is_fine_with_new_freeze(model):
    p = plan(model, freeze=["head"], new=NewParams.freeze)
    assert "head.weight" not in trainable(p)


@pytest.mark.parametrize("field", ["freeze", "train", "allow_no_grad"])
def test_dead_policy_globs_are_errors(model, field):
    with pytest.raises(PolicyError, match=f"policy.{field}"):
        plan(model, **{field: ["nope_nothing"]})


def test_nothing_trainable_is_an_error(model):
    with pytest.raises(PolicyError, match="nothing is trainable"):
        plan(model, {}, freeze=["*"])
    with pytest.raises(PolicyError, match="nothing is trainable"):
        plan(model, {n: "new" for n in ALL}, new=NewParams.freeze)


# ---- weight decay and groups -----------------------------------------------------------------


def test_no_weight_decay_on_biases_and_1d(model):
    p = {x.name: x for x in plan(model).params}
    for name in ["layer1.0.weight", "layer2.0.weight", "head.weight"]:
        assert p[name].weight_decay == WD and p[name].group == "default" and p[name].lr == LR
    for name in ["layer1.0.bias", "layer1.1.weight", "layer1.1.bias", "layer2.0.bias", "head.bias"]:
        assert p[name].weight_decay == 0.0 and p[name].group == "default/no_decay"


def test_is_no_decay():
    assert is_no_decay("bn.weight", torch.zeros(3))
    assert is_no_decay("x.bias", torch.zeros(3, 3))
    assert not is_no_decay("conv.weight", torch.zeros(3, 3))


def test_decay_norm_and_bias_true_decays_everything(model):
    p = plan(model, decay_norm_and_bias=True)
    assert {x.weight_decay for x in p.params} == {WD}
    assert [g.name for g in p.groups] == ["default"]


def test_groups_lr_mult_and_weight_decay(model):
    p = plan(model, groups=[ParamGroupSpec(params=["head"], lr_mult=10, weight_decay=0.5),
                            ParamGroupSpec(params=["layer2"], lr_mult=0.1)])
    by = {x.name: x for x in p.params}
    assert by["head.weight"].lr == pytest.approx(10 * LR) and by["head.weight"].weight_decay == 0.5
    assert by["head.weight"].group == "groups[0]"  # a group beats policy.new on a tie (head is new)
    assert by["head.bias"].lr == pytest.approx(10 * LR) and by["head.bias"].weight_decay == 0.0
    assert by["head.bias"].group == "groups[0]/no_decay"
    assert by["layer2.0.weight"].lr == pytest.approx(0.1 * LR) and by["layer2.0.weight"].weight_decay == WD
    assert by["layer1.0.weight"].lr == LR and by["layer1.0.weight"].group == "default"
    groups = {g.name: g for g in p.groups}
    assert set(groups) == {"groups[0]", "groups[0]/no_decay", "groups[1]", "groups[1]/no_decay", "default", "default/no_decay"}
    assert groups["groups[0]"].params == ["head.weight"] and groups["groups[0]"].lr == pytest.approx(10 * LR)
    assert p.overlaps == []


def test_overlapping_groups_the_narrowest_glob_wins_and_is_reported(model):
    p = plan(model, groups=[ParamGroupSpec(params=["layer1"], lr_mult=0.1), ParamGroupSpec(params=["layer1.1"], lr_mult=2)])
    by = {x.name: x for x in p.params}
    assert by["layer1.0.weight"].lr == pytest.approx(0.1 * LR)
    assert by["layer1.1.weight"].lr == pytest.approx(2 * LR) and by["layer1.1.weight"].group.startswith("groups[1]")
    assert [(o.winner, o.loser, o.params) for o in p.overlaps] == [("groups[1]", "groups[0]", ["layer1.1.weight", "layer1.1.bias"])]


def test_overlapping_groups_of_the_same_reach_are_refused_naming_both(model):
    with pytest.raises(PolicyError) as info:
        plan(model, groups=[ParamGroupSpec(params=["head"], lr_mult=10), ParamGroupSpec(params=["head", "layer2"], lr_mult=0.1)])
    assert "policy.groups[0] and policy.groups[1] both claim 'head.weight'" in info.value.problem


def test_a_new_module_inside_a_group_keeps_new_lr_mult(model):
    """The adapter-inside-`blocks` case: `layer1.1` is new, the group covers all of layer1."""
    sources = {"layer1.1.weight": "new", "layer1.1.bias": "new"}
    p = plan(model, sources, new_lr_mult=10, groups=[ParamGroupSpec(params=["layer1"], lr_mult=0.1)])
    by = {x.name: x for x in p.params}
    assert by["layer1.0.weight"].lr == pytest.approx(0.1 * LR)
    assert by["layer1.1.weight"].lr == pytest.approx(10 * LR) and by["layer1.1.weight"].group.startswith("new")
    assert [(o.winner, o.loser) for o in p.overlaps] == [("new", "groups[0]")]


def test_parameters_the_model_froze_stay_frozen_unless_policy_train_names_them(model):
    model.layer1[0].weight.requires_grad_(False)
    p = plan(model)
    by = {x.name: x for x in p.params}
    assert not by["layer1.0.weight"].trainable and by["layer1.0.weight"].frozen_by == "model"
    assert by["layer1.0.bias"].trainable and by["layer1.0.bias"].frozen_by is None
    p = plan(model, train=["layer1.0.weight"])
    assert next(x for x in p.params if x.name == "layer1.0.weight").trainable


def test_a_model_that_froze_everything_says_so(model):
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(PolicyError, match="frozen by the model itself"):
        plan(model)


def test_the_models_no_weight_decay_names_get_no_decay(model):
    model.no_weight_decay = lambda: {"layer2.0.weight"}  # timm's convention, as an instance attribute here
    by = {x.name: x for x in plan(model).params}
    assert by["layer2.0.weight"].weight_decay == 0.0 and by["layer2.0.weight"].group == "default/no_decay"
    assert by["layer1.0.weight"].weight_decay == WD


def test_new_lr_mult_puts_new_params_in_their_own_group(model):
    p = plan(model, new_lr_mult=10)
    by = {x.name: x for x in p.params}
    assert by["head.weight"].lr == pytest.approx(10 * LR) and by["head.weight"].group == "new"
    assert by["head.bias"].group == "new/no_decay" and by["head.bias"].weight_decay == 0.0
    assert by["layer1.0.weight"].lr == LR and by["layer1.0.weight"].group == "default"
    # An explicit group wins over new_lr_mult; with the default 1.0 there is no "new" group.
    p = plan(model, new_lr_mult=10, groups=[ParamGroupSpec(params=["head.weight"], lr_mult=3)])
    assert {x.name: x.lr for x in p.params}["head.weight"] == pytest.approx(3 * LR)
    assert "new" not in {g.name for g in plan(model).groups}


def test_groups_glob_matching_nothing_is_an_error(model):
    with pytest.raises(PolicyError, match=r"policy.groups\[0\]"):
        plan(model, groups=[ParamGroupSpec(params=["nothing_here"])])


def test_frozen_params_are_in_no_group(model):
    p = plan(model, freeze=["layer1"], groups=[ParamGroupSpec(params=["layer1", "head"], lr_mult=2)])
    grouped = [n for g in p.groups for n in g.params]
    assert sorted(grouped) == sorted(p.trainable_names)
    assert len(grouped) == len(set(grouped))


def test_totals(model):
    p = plan(model, freeze=["layer1"])
    t = p.totals()
    numel = {n: q.numel() for n, q in model.named_parameters()}
    assert t["params"] == sum(numel.values())
    assert t["frozen"] == sum(v for n, v in numel.items() if n.startswith("layer1."))
    assert t["trainable"] + t["frozen"] == t["params"]
    assert t["by_source"]["new"] == {"trainable": numel["head.weight"] + numel["head.bias"], "frozen": 0}


# ---- applying the plan -----------------------------------------------------------------------


def test_apply_plan_and_param_groups(model):
    p = plan(model, freeze=["layer1"], groups=[ParamGroupSpec(params=["head"], lr_mult=10)])
    apply_plan(model, p)
    assert {n for n, q in model.named_parameters() if q.requires_grad} == set(p.trainable_names)
    groups = param_groups(model, p)
    ids = [id(q) for g in groups for q in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(q) for q in model.parameters() if q.requires_grad}
    head = next(g for g in groups if g["name"] == "groups[0]")
    assert head["lr"] == pytest.approx(10 * LR) and head["params"] == [model.head.weight]
    opt = torch.optim.SGD(groups, lr=LR)  # the groups are what an optimizer accepts
    assert len(opt.param_groups) == len(groups)


def test_freeze_stats_keeps_frozen_bn_in_eval_mode(model):
    p = plan(model, freeze=["layer1"], bn=NormMode.freeze_stats)
    assert p.frozen_norms == ["layer1.1"]
    apply_plan(model, p)
    bn = model.layer1[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    model.train()
    model(torch.randn(16, 8) * 3 + 1)
    assert not bn.training
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


def test_bn_follow_updates_stats(model):
    p = plan(model, freeze=["layer1"], bn=NormMode.follow)
    assert p.frozen_norms == []
    apply_plan(model, p)
    before = model.layer1[1].running_mean.clone()
    model.train()
    model(torch.randn(16, 8) * 3 + 1)
    assert not torch.equal(before, model.layer1[1].running_mean)


def test_freeze_stats_leaves_trainable_bn_alone(model):
    assert plan(model, freeze=["layer2"], bn=NormMode.freeze_stats).frozen_norms == []


# ---- optimizer defaults and unfreezing -------------------------------------------------------


def test_optimizer_defaults_from_config_and_signature():
    assert optimizer_defaults({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.02, "weight_decay": 0.1}) == (0.02, 0.1)
    lr, wd = optimizer_defaults({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.02})
    assert (lr, wd) == (0.02, 0.01)  # AdamW's own default weight decay
    assert optimizer_defaults({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}) == (0.1, 0.0)


def test_unfreeze_due_and_unfreeze(model):
    policy = PolicyConfig(freeze=["layer1"], unfreeze=[UnfreezeStep(at_epoch=2, params=["layer1.0"], lr_mult=0.1),
                                                       UnfreezeStep(at_step=5, params=["layer1.1"])])
    p = plan_training(model, NEW_HEAD, policy, LR, WD)
    apply_plan(model, p)
    assert unfreeze_due(policy, epoch=1, step=0) == []
    assert [i for i, _ in unfreeze_due(policy, epoch=2, step=0)] == [0]
    assert [i for i, _ in unfreeze_due(policy, epoch=1, step=5)] == [1]
    groups = {g["name"]: g for g in unfreeze(model, policy.unfreeze[0], 0, LR, WD, False)}
    assert set(groups) == {"unfreeze[0]", "unfreeze[0]/no_decay"}
    assert groups["unfreeze[0]"]["params"] == [model.layer1[0].weight]
    assert groups["unfreeze[0]"]["lr"] == pytest.approx(0.1 * LR) and groups["unfreeze[0]"]["weight_decay"] == WD
    assert groups["unfreeze[0]/no_decay"]["params"] == [model.layer1[0].bias]
    assert groups["unfreeze[0]/no_decay"]["weight_decay"] == 0.0
    assert model.layer1[0].weight.requires_grad and not model.layer1[1].weight.requires_grad
    assert unfreeze(model, policy.unfreeze[0], 0, LR, WD, False) == []  # already trainable
