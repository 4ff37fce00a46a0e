"""finetune.checkpoint.remap: pure key surgery (ignore → rules → automatic unwrap → collisions)."""

from __future__ import annotations

import pytest

from finetune.checkpoint.remap import (apply_rules, auto_unwrap, check_collisions, dominant_prefix, drop_ignored, map_keys,
                                       suggest_rules)
from finetune.config import RemapRule
from finetune.errors import CheckpointError

MODEL_KEYS = {"stem.weight", "layer1.0.weight", "layer1.0.bias", "fc.weight", "fc.bias"}


def rules(*pairs: tuple[str, str]) -> list[RemapRule]:
    return [RemapRule(pattern=p, replace=r) for p, r in pairs]


# ---- drop_ignored ----------------------------------------------------------------------------


def test_drop_ignored_splits_kept_and_ignored_in_order():
    keys = ["backbone.a", "head.w", "backbone.b", "aux.head.w"]
    kept, ignored = drop_ignored(keys, [r"^head\.", r"^aux\."])
    assert kept == ["backbone.a", "backbone.b"]
    assert ignored == ["head.w", "aux.head.w"]


def test_drop_ignored_without_patterns_keeps_everything():
    assert drop_ignored(["a", "b"], []) == (["a", "b"], [])


def test_drop_ignored_pattern_matching_nothing_is_an_error():
    with pytest.raises(CheckpointError) as info:
        drop_ignored(["a.weight", "b.weight"], [r"^a\.", r"^nothing\."])
    assert "nothing" in info.value.problem
    assert "^a" not in info.value.problem  # only the dead pattern is named
    assert info.value.fix and "a.weight" in info.value.fix  # shows what keys look like


def test_drop_ignored_invalid_regex():
    with pytest.raises(CheckpointError, match="not a valid regular expression"):
        drop_ignored(["a"], ["(unclosed"])


# ---- apply_rules -----------------------------------------------------------------------------


def test_apply_rules_in_order_each_rule_sees_previous_result():
    names = {k: k for k in ["backbone.body.conv.weight", "backbone.body.fc.weight"]}
    out = apply_rules(names, rules((r"^backbone\.", ""), (r"^body\.", "")))
    assert out == {"backbone.body.conv.weight": "conv.weight", "backbone.body.fc.weight": "fc.weight"}


def test_apply_rules_regex_groups_numbered_and_named():
    names = {k: k for k in ["blocks.0.attn.w", "blocks.11.attn.w", "norm.w"]}
    out = apply_rules(names, rules((r"^blocks\.(\d+)\.", r"layer\1."), (r"^(?P<mod>norm)\.", r"final_\g<mod>.")))
    assert out == {"blocks.0.attn.w": "layer0.attn.w", "blocks.11.attn.w": "layer11.attn.w", "norm.w": "final_norm.w"}


def test_apply_rules_keeps_original_keys_as_dict_keys():
    out = apply_rules({"module.a": "module.a"}, rules((r"^module\.", "")))
    assert list(out) == ["module.a"] and out["module.a"] == "a"


def test_apply_rules_rule_matching_nothing_is_an_error_naming_the_rule():
    with pytest.raises(CheckpointError) as info:
        apply_rules({"a.w": "a.w"}, rules((r"^a\.", "b."), (r"^backbone\.", "")))
    assert "checkpoint.remap[1]" in info.value.problem
    assert "backbone" in info.value.problem
    assert "b.w" in info.value.fix  # keys as they look after rule 0


def test_apply_rules_invalid_regex():
    with pytest.raises(CheckpointError, match=r"remap\[0\].*not a valid regular expression"):
        apply_rules({"a": "a"}, rules(("[a-", "")))


def test_apply_rules_replacement_referring_to_missing_group():
    with pytest.raises(CheckpointError, match="replacement"):
        apply_rules({"a.w": "a.w"}, rules((r"^a\.", r"\2.")))


# ---- auto_unwrap -----------------------------------------------------------------------------


def test_auto_unwrap_strips_ddp_prefix_when_it_increases_matches():
    names = {f"module.{k}": f"module.{k}" for k in MODEL_KEYS}
    out, removed = auto_unwrap(names, MODEL_KEYS)
    assert removed == ["module."]
    assert set(out.values()) == MODEL_KEYS


@pytest.mark.parametrize("prefix", ["_orig_mod.module.", "module._orig_mod."])
def test_auto_unwrap_strips_stacked_wrappers(prefix):
    names = {f"{prefix}{k}": f"{prefix}{k}" for k in MODEL_KEYS}
    out, removed = auto_unwrap(names, MODEL_KEYS)
    assert "".join(removed) == prefix
    assert set(out.values()) == MODEL_KEYS


def test_auto_unwrap_leaves_keys_when_strip_does_not_increase_matches():
    # The model itself has a submodule called `model`: its keys already match; stripping would break them.
    model_keys = {"model.weight", "model.bias", "head.weight"}
    names = {k: k for k in model_keys}
    out, removed = auto_unwrap(names, model_keys)
    assert removed == [] and out == names


def test_auto_unwrap_prefix_that_matches_nothing_more_is_kept():
    names = {"module.unknown.w": "module.unknown.w"}
    out, removed = auto_unwrap(names, MODEL_KEYS)
    assert removed == [] and out == names


def test_auto_unwrap_extra_prefix_from_lightning():
    names = {f"net.{k}": f"net.{k}" for k in MODEL_KEYS}
    assert auto_unwrap(names, MODEL_KEYS)[1] == []
    out, removed = auto_unwrap(names, MODEL_KEYS, ["net."])
    assert removed == ["net."] and set(out.values()) == MODEL_KEYS


def test_dominant_prefix():
    assert dominant_prefix(["net.a", "net.b", "x.c"]) == "net."
    assert dominant_prefix(["net.a", "x.b"]) is None
    assert dominant_prefix(["a", "b"]) is None


# ---- collisions and the whole pipeline -------------------------------------------------------


def test_check_collisions_names_both_keys():
    with pytest.raises(CheckpointError) as info:
        check_collisions({"module.fc.weight": "fc.weight", "fc.weight": "fc.weight"})
    assert "module.fc.weight" in info.value.problem and "'fc.weight'" in info.value.problem


def test_map_keys_rule_creating_collision_is_an_error():
    with pytest.raises(CheckpointError, match="both map to"):
        map_keys(["enc.fc.weight", "dec.fc.weight"], MODEL_KEYS, [], rules((r"^(enc|dec)\.", "")), auto=False)


def test_map_keys_order_ignore_then_rules_then_unwrap():
    keys = ["module.backbone.stem.weight", "module.backbone.fc.weight", "module.aux.w"]
    mapping = map_keys(keys, MODEL_KEYS, [r"\.aux\."], rules((r"backbone\.", "")), auto=True)
    assert mapping.ignored == ["module.aux.w"]
    assert mapping.unwrapped == ["module."]
    assert mapping.names == {"module.backbone.stem.weight": "stem.weight", "module.backbone.fc.weight": "fc.weight"}
    assert mapping.remapped == mapping.names


def test_map_keys_remapped_lists_only_changed_keys():
    mapping = map_keys(["fc.weight", "old.bias"], MODEL_KEYS, [], rules((r"^old\.", "fc.")), auto=True)
    assert mapping.remapped == {"old.bias": "fc.bias"}
    assert mapping.unwrapped == []


def test_map_keys_auto_unwrap_disabled():
    mapping = map_keys(["module.fc.weight"], MODEL_KEYS, [], [], auto=False)
    assert mapping.names == {"module.fc.weight": "module.fc.weight"} and mapping.unwrapped == []


# ---- suggest_rules: verified before shown ------------------------------------------------------

BERT_LIKE = {  # a bare encoder's checkpoint: no `bert.` prefix; the pooler shares shapes with encoder layers
    "embeddings.word.weight": (100, 8), "encoder.layer.0.attention.output.dense.weight": (8, 8),
    "encoder.layer.0.attention.output.dense.bias": (8,), "pooler.dense.weight": (8, 8), "pooler.dense.bias": (8,),
}


def shapes_with_prefix(prefix: str, shapes: dict) -> dict:
    return {prefix + k: v for k, v in shapes.items()}


def suggested(ckpt: dict, model: dict, remap=(), auto=True, ignore=()) -> list[tuple[str, str, int]]:
    return [(s.pattern, s.replace, s.keys) for s in suggest_rules(ckpt, model, list(ignore), rules(*remap), auto)]


def test_suggests_adding_a_prefix_and_maps_each_key_to_its_own_module():
    model = {**shapes_with_prefix("bert.", BERT_LIKE), "classifier.weight": (3, 8), "classifier.bias": (3,)}
    assert suggested(BERT_LIKE, model) == [("^", "bert.", 5)]  # never pooler -> encoder.layer.0.attention.output


def test_suggests_stripping_a_prefix_that_auto_unwrap_does_not_know():
    ckpt = shapes_with_prefix("backbone.", BERT_LIKE)
    assert suggested(ckpt, BERT_LIKE) == [(r"^backbone\.", "", 5)]


def test_suggests_swapping_prefixes_one_rule_per_renamed_module():
    ckpt = {"features.0.weight": (4, 3), "features.0.bias": (4,), "classifier.weight": (2, 4), "classifier.bias": (2,)}
    model = {"stem.0.weight": (4, 3), "stem.0.bias": (4,), "head.weight": (2, 4), "head.bias": (2,)}
    got = suggested(ckpt, model)
    assert sorted(got) == sorted([(r"^features\.", "stem.", 2), (r"^classifier\.", "head.", 2)])


def test_suggestions_sit_on_top_of_the_configured_rules_and_the_unwrap():
    ckpt = shapes_with_prefix("module.", shapes_with_prefix("enc.", BERT_LIKE))
    model = shapes_with_prefix("bert.", BERT_LIKE)
    # the unwrap strips module. (after the rules): the suggested rule runs before it, so it must see module.enc.
    got = suggested(ckpt, model)
    assert got == [(r"^module\.enc\.", "bert.", 5)]
    assert suggested(ckpt, model, remap=[(r"^module\.", "")]) == [(r"^enc\.", "bert.", 5)]


def test_nothing_is_suggested_when_nothing_would_load_more():
    assert suggested(BERT_LIKE, BERT_LIKE) == []
    # one key that happens to share a shape is no evidence
    assert suggested({"fc.bias": (8,), "fc.weight": (8, 64)}, {"adapter.down.bias": (8,), "adapter.down.weight": (8, 32)}) == []


def test_a_rule_that_would_collide_is_not_suggested():
    # both a.x and b.x would become x: the only candidate that fills x collides with the key already there
    ckpt = {"a.w": (2,), "a.v": (3,), "w": (2,), "v": (3,)}
    model = {"w": (2,), "v": (3,)}
    assert suggested(ckpt, model) == []
