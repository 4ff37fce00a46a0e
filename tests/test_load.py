"""finetune.checkpoint.load: match, load non-strictly, account for every key, check expectations."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from finetune.checkpoint.load import check_expectations, load_checkpoint
from finetune.errors import CheckpointError, ConfigError
from finetune.model import build_model

ADAPTER = ["adapter1.down.weight", "adapter1.down.bias", "adapter1.up.weight", "adapter1.up.bias"]
HEAD = ["head.weight", "head.bias"]


def fresh_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model)


def load(compose, ckpt, *overrides, check=True, model="tiny"):
    """Build model B (tiny) and load `ckpt` as a run does; returns (cfg, model, report).
    `model=tiny_classes`: the head's shape differs with no replace op declaring it (the shape policy decides)."""
    cfg = compose([f"model={model}", "checkpoint=tiny", f"checkpoint.path={ckpt}", *overrides])
    model, edits = fresh_model(cfg)
    report = load_checkpoint(model, cfg.checkpoint, edits)
    if check:
        check_expectations(report, cfg.checkpoint.expect, model, edits)
    return cfg, model, report


def load_classes(compose, ckpt, *overrides, check=True):
    """As `load`, into model=tiny_classes: a head of another size with no replace op declaring it."""
    return load(compose, ckpt, *overrides, check=check, model="tiny_classes")


def save(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def assert_partition(model, report):
    keys = list(model.state_dict())
    accounted = report.loaded + report.missing + [m.key for m in report.mismatched]
    assert sorted(accounted) == sorted(keys)
    assert len(accounted) == len(set(accounted))


# ---- the partition and the loaded values -----------------------------------------------------


@pytest.mark.parametrize("which", ["safetensors", "torch", "safetensors_module", "torch_module", "nested_model"])
def test_every_model_key_in_exactly_one_list(compose, tiny_ckpts, which):
    cfg, model, report = load(compose, getattr(tiny_ckpts, which))
    assert_partition(model, report)
    assert sorted(report.missing) == sorted(ADAPTER)
    assert [(m.key, m.model_shape, m.checkpoint_shape, m.action) for m in report.mismatched] == [
        ("head.weight", [3, 16], [4, 16], "skipped"), ("head.bias", [3], [4], "skipped")]
    assert report.unexpected == []
    sd = model.state_dict()
    for key in report.loaded:
        assert torch.equal(sd[key], tiny_ckpts.state_dict[key]), key
    assert "layer1.1.running_mean" in report.loaded and "layer1.1.num_batches_tracked" in report.loaded
    counts = report.to_json()["counts"]
    assert counts["loaded"] == len(report.loaded) == len(tiny_ckpts.state_dict) - 2
    assert counts["missing"] == 4 and counts["mismatched"] == 2 and counts["unexpected"] == 0


def test_module_prefix_unwrapped_automatically(compose, tiny_ckpts):
    _, _, report = load(compose, tiny_ckpts.safetensors_module)
    assert report.unwrapped == ["module."]
    assert report.remapped == {f"module.{k}": k for k in tiny_ckpts.state_dict}
    _, _, plain = load(compose, tiny_ckpts.safetensors)
    assert plain.remapped == {} and plain.unwrapped == []


def test_module_prefix_with_remap_rule_instead_of_unwrap(compose, tiny_ckpts):
    _, _, report = load(compose, tiny_ckpts.torch_module, "checkpoint.auto_unwrap=false",
                        "checkpoint.remap=[{pattern: '^module\\.', replace: ''}]")
    assert report.unwrapped == []
    assert len(report.remapped) == len(tiny_ckpts.state_dict)
    assert sorted(report.missing) == sorted(ADAPTER)


def test_module_prefix_without_unwrap_loads_nothing_and_suggests_the_rule(compose, tiny_ckpts):
    cfg, model, report = load(compose, tiny_ckpts.safetensors_module, "checkpoint.auto_unwrap=false",
                              "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null",
                              "checkpoint.expect.min_loaded=null")
    assert report.loaded == [] and report.mismatched == []
    assert sorted(report.missing) == sorted(model.state_dict())
    assert sorted(report.unexpected) == sorted(f"module.{k}" for k in tiny_ckpts.state_dict)
    assert [(s.pattern, s.replace) for s in report.suggestions] == [(r"^module\.", "")]
    assert report.suggestions[0].keys == len(tiny_ckpts.state_dict) - 2  # not the head: its shapes differ
    assert report.warnings  # undeclared differences are reported


def test_loading_almost_nothing_is_an_error_carrying_the_verified_rule(compose, tiny_ckpts):
    with pytest.raises(CheckpointError) as info:
        load(compose, tiny_ckpts.safetensors_module, "checkpoint.auto_unwrap=false")
    assert "only 0.0% of the base model's parameters loaded" in info.value.problem
    assert "min_loaded=0.1" in info.value.problem  # the default
    assert "checkpoint.remap=[{pattern: '^module\\.', replace: ''}]" in info.value.fix
    assert info.value.group == "checkpoint"
    # the same rule, applied, loads the base
    _, _, report = load(compose, tiny_ckpts.safetensors_module, "checkpoint.auto_unwrap=false",
                        "checkpoint.remap=[{pattern: '^module\\.', replace: ''}]")
    assert len(report.loaded) == len(tiny_ckpts.state_dict) - 2
    # declared off: it loads nothing, and says so
    _, _, report = load(compose, tiny_ckpts.safetensors_module, "checkpoint.auto_unwrap=false",
                        "checkpoint.expect.min_loaded=0", "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null")
    assert report.loaded == []


def test_same_failure_under_declared_expectations_raises(compose, tiny_ckpts):
    with pytest.raises(CheckpointError) as info:
        load(compose, tiny_ckpts.safetensors_module, "checkpoint.auto_unwrap=false", "checkpoint.expect.min_loaded=null")
    assert "not declared in checkpoint.expect.missing" in info.value.problem
    assert "layer1.0.weight" in info.value.problem
    assert "{pattern: '^module\\.', replace: ''}" in info.value.fix  # the verified rule


# ---- declared by construction: what model.add puts in is declared by its op -----------------


def test_a_replace_op_declares_its_mismatched_keys_under_the_error_policy(compose, tiny_ckpts):
    _, model, report = load(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=error")
    assert_partition(model, report)
    assert {m.key: (m.action, m.rule) for m in report.mismatched} == {
        "head.weight": ("skipped", "model.add[0] (replace head)"), "head.bias": ("skipped", "model.add[0] (replace head)")}
    assert report.to_json()["mismatched"][0]["rule"] == "model.add[0] (replace head)"


def test_a_shape_override_naming_the_replaced_keys_wins_over_the_op(compose, tiny_ckpts):
    _, model, report = load(compose, tiny_ckpts.safetensors, "checkpoint.shape_overrides=[{keys: 'head.*', action: adapt}]")
    assert {m.key: (m.action, m.rule) for m in report.mismatched} == {
        "head.weight": ("adapted", "checkpoint.shape_overrides[0]"), "head.bias": ("adapted", "checkpoint.shape_overrides[0]")}
    assert torch.equal(model.head.weight, tiny_ckpts.state_dict["head.weight"][:3])


def test_keys_of_a_module_an_op_created_need_no_expect_entry(compose, tiny_ckpts):
    _, _, report = load(compose, tiny_ckpts.safetensors, "checkpoint.expect.missing=[]", "checkpoint.on_shape_mismatch=error")
    assert sorted(report.missing) == sorted(ADAPTER)
    assert report.declared == {k: "model.add[1] (after layer1)" for k in ADAPTER}
    assert report.to_json()["declared"] == report.declared
    # nothing declared in expect and nothing else differs: no warning either
    _, _, report = load(compose, tiny_ckpts.safetensors, "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null")
    assert report.warnings == []


def test_other_missing_keys_still_need_a_declaration(compose, tiny_ckpts):
    with pytest.raises(CheckpointError) as info:
        load(compose, tiny_ckpts.safetensors, "checkpoint.ignore=['^layer2\\.']", "checkpoint.expect.missing=[]")
    assert "2 missing key(s) not declared" in info.value.problem and "adapter1" not in info.value.problem
    _, _, report = load(compose, tiny_ckpts.safetensors, "checkpoint.ignore=['^layer2\\.']",
                        "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null")
    assert len(report.warnings) == 1 and "2 model key(s) missing" in report.warnings[0]


def test_a_replaced_module_of_another_structure_declares_new_and_unused_keys(compose, tiny_ckpts):
    head = ("{op: replace, at: head, module: {_target_: torch.nn.Sequential, _args_: ["
            "{_target_: torch.nn.Dropout, p: 0.1}, {_target_: torch.nn.Linear, in_features: 16, out_features: 3}]}}")
    adapter = "{op: after, at: layer1, name: adapter1, module: {_target_: finetune.modules.Adapter, channels: 16, spatial: false}}"
    _, model, report = load(compose, tiny_ckpts.safetensors, f"model.add=[{head},{adapter}]", "checkpoint.expect.missing=[]",
                            "checkpoint.expect.unexpected=[]", "checkpoint.on_shape_mismatch=error")
    assert_partition(model, report)
    assert sorted(report.unexpected) == sorted(HEAD) and sorted(report.missing) == sorted(ADAPTER + ["head.1.weight", "head.1.bias"])
    assert {report.declared[k] for k in ["head.weight", "head.bias", "head.1.weight"]} == {"model.add[0] (replace head)"}


def test_suggestions_never_fill_a_module_an_op_created(compose, tiny_ckpts, tmp_path):
    # adapter1.down is Linear(16, 4): a checkpoint key of that shape under another name is not its source
    renamed = {**tiny_ckpts.state_dict, "proj.weight": torch.zeros(4, 16), "proj.bias": torch.zeros(4)}
    _, _, report = load(compose, save(tmp_path, "extra.safetensors", renamed), "checkpoint.expect.unexpected=null")
    assert sorted(report.unexpected) == ["proj.bias", "proj.weight"] and report.suggestions == []


# ---- shape policy ----------------------------------------------------------------------------


def test_shape_mismatch_under_error_raises(compose, tiny_ckpts):
    with pytest.raises(CheckpointError) as info:
        load_classes(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=error")
    assert "head.weight: checkpoint [4, 16] vs model [3, 16]" in info.value.problem
    assert "head.bias" in info.value.problem
    assert "on_shape_mismatch=skip" in info.value.fix


def test_skip_keeps_constructor_init_and_is_not_missing(compose, tiny_ckpts):
    cfg, model, report = load_classes(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=skip")
    reference, _ = fresh_model(cfg)
    for key in HEAD + ADAPTER:  # new parameters: the values a normal build gives
        assert torch.equal(model.state_dict()[key], reference.state_dict()[key]), key
    assert not set(HEAD) & set(report.missing)
    assert report.sources() == {**{k: "new" for k in ADAPTER}, **{k: "new" for k in HEAD}}
    assert set(report.new_keys) == set(ADAPTER + HEAD)


def test_adapt_copies_overlap_and_reports_adapted(compose, tiny_ckpts):
    cfg, model, report = load_classes(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=adapt")
    assert_partition(model, report)
    assert {m.key: m.action for m in report.mismatched} == {"head.weight": "adapted", "head.bias": "adapted"}
    assert torch.equal(model.head.weight, tiny_ckpts.state_dict["head.weight"][:3])
    assert torch.equal(model.head.bias, tiny_ckpts.state_dict["head.bias"][:3])
    assert report.sources()["head.weight"] == "adapted"
    assert report.to_json()["mismatched"][0]["action"] == "adapted"


# ---- per-key shape policy (checkpoint.shape_overrides) ---------------------------------------


def test_override_wins_over_the_default(compose, tiny_ckpts):
    _, model, report = load_classes(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=error",
                            "checkpoint.shape_overrides=[{keys: 'head.*', action: adapt}]")
    assert_partition(model, report)
    assert {m.key: (m.action, m.rule) for m in report.mismatched} == {
        "head.weight": ("adapted", "checkpoint.shape_overrides[0]"), "head.bias": ("adapted", "checkpoint.shape_overrides[0]")}
    assert torch.equal(model.head.weight, tiny_ckpts.state_dict["head.weight"][:3])
    body = report.to_json()["mismatched"]
    assert {m["key"]: m["action"] for m in body} == {"head.weight": "adapted", "head.bias": "adapted"}
    assert {m["rule"] for m in body} == {"checkpoint.shape_overrides[0]"}


def test_first_matching_override_wins(compose, tiny_ckpts):
    # head.weight matches both entries: the first decides. head.bias matches only the second.
    _, model, report = load_classes(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=error",
                            "checkpoint.shape_overrides=[{keys: [head.weight], action: adapt}, {keys: 'head.*', action: skip}]")
    assert {m.key: (m.action, m.rule) for m in report.mismatched} == {
        "head.weight": ("adapted", "checkpoint.shape_overrides[0]"), "head.bias": ("skipped", "checkpoint.shape_overrides[1]")}
    assert torch.equal(model.head.weight, tiny_ckpts.state_dict["head.weight"][:3])
    assert report.sources() == {**{k: "new" for k in ADAPTER}, "head.weight": "adapted", "head.bias": "new"}


def test_override_error_names_the_key_and_the_rule(compose, tiny_ckpts):
    with pytest.raises(CheckpointError) as info:
        load_classes(compose, tiny_ckpts.safetensors, "checkpoint.on_shape_mismatch=adapt",
             "checkpoint.shape_overrides=[{keys: head.bias, action: error}]")
    assert "head.bias: checkpoint [4] vs model [3] (checkpoint.shape_overrides[0]: error)" in info.value.problem
    assert "head.weight" not in info.value.problem  # adapted by the default
    assert "shape_overrides" in info.value.fix


def test_override_glob_matching_no_model_key_is_an_error(compose, tiny_ckpts):
    with pytest.raises(ConfigError) as info:
        load(compose, tiny_ckpts.safetensors, "checkpoint.shape_overrides=[{keys: 'head.*', action: skip}, {keys: 'haed.*', action: adapt}]")
    assert "checkpoint.shape_overrides[1]" in info.value.problem and "'haed.*'" in info.value.problem
    assert "head" in info.value.fix


def test_override_matching_keys_without_a_mismatch_is_fine(compose, tiny_ckpts):
    _, _, report = load_classes(compose, tiny_ckpts.safetensors, "checkpoint.shape_overrides=[{keys: 'layer1.*', action: error}]")
    assert {m.key: m.rule for m in report.mismatched} == {"head.weight": "checkpoint.on_shape_mismatch",
                                                         "head.bias": "checkpoint.on_shape_mismatch"}


def test_dry_run_report_says_which_rule_decided(tiny_cfg, tmp_path):
    import json

    from finetune.run import run

    cfg = tiny_cfg("dry_run=true", "checkpoint.on_shape_mismatch=error",
                   "checkpoint.shape_overrides=[{keys: head.weight, action: adapt}, {keys: 'head.*', action: skip}]")
    assert run(cfg, tmp_path)["status"] == "dry_run"
    body = json.loads((tmp_path / "load_report.json").read_text())
    assert {m["key"]: (m["action"], m["rule"]) for m in body["mismatched"]} == {
        "head.weight": ("adapted", "checkpoint.shape_overrides[0]"), "head.bias": ("skipped", "checkpoint.shape_overrides[1]")}
    assert body["counts"]["mismatched"] == 2 and "head.bias" not in body["missing"]
    sources = {p["name"]: p["source"] for p in json.loads((tmp_path / "trainability.json").read_text())["params"]}
    assert sources["head.weight"] == "adapted" and sources["head.bias"] == "new"


@pytest.mark.parametrize("keys", ["[]", "3", "{a: 1}"])
def test_override_keys_must_be_globs(compose, tiny_ckpts, keys):
    with pytest.raises(ConfigError, match=r"shape_overrides\[0\]\.keys"):
        load(compose, tiny_ckpts.safetensors, f"checkpoint.shape_overrides=[{{keys: {keys}, action: skip}}]")


def test_override_without_action_is_an_error(compose, tiny_ckpts):
    with pytest.raises(ConfigError, match="needs both `keys` and `action`"):
        load(compose, tiny_ckpts.safetensors, "checkpoint.shape_overrides=[{keys: 'head.*'}]")


# ---- expectations ----------------------------------------------------------------------------


def test_declared_missing_passes(compose, tiny_ckpts):
    _, _, report = load(compose, tiny_ckpts.safetensors)
    assert report.warnings == []


def test_undeclared_missing_raises(compose, tiny_ckpts):
    with pytest.raises(CheckpointError) as info:
        load(compose, tiny_ckpts.safetensors, "checkpoint.ignore=['^layer2\\.0\\.']", "checkpoint.expect.missing=[layer2.0.weight]")
    assert "1 missing key(s)" in info.value.problem
    assert "layer2.0.bias" in info.value.problem and "layer2.0.weight" not in info.value.problem


def test_missing_glob_matching_no_model_key_raises(compose, tiny_ckpts):
    with pytest.raises(CheckpointError, match="matches no model key"):
        load(compose, tiny_ckpts.safetensors, "checkpoint.expect.missing=[adapter1.*,adaptr9.*]")


def test_expect_null_is_a_warning_only(compose, tiny_ckpts):
    _, _, report = load(compose, tiny_ckpts.safetensors, "checkpoint.ignore=['^layer2\\.']",
                        "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null")
    assert len(report.warnings) == 1 and "2 model key(s) missing" in report.warnings[0]


def test_unexpected_keys_declared_or_not(compose, tiny_ckpts, tmp_path):
    path = save(tmp_path, "extra.safetensors", {**tiny_ckpts.state_dict, "aux.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="1 unexpected key"):
        load(compose, path)  # checkpoint=tiny declares unexpected: []
    _, _, report = load(compose, path, "checkpoint.expect.unexpected=[aux.*]")
    assert report.unexpected == ["aux.weight"]


def test_ignored_keys_are_neither_unexpected_nor_loaded(compose, tiny_ckpts, tmp_path):
    path = save(tmp_path, "extra.safetensors", {**tiny_ckpts.state_dict, "aux.weight": torch.zeros(2)})
    _, model, report = load(compose, path, "checkpoint.ignore=['^aux\\.']")
    assert report.ignored == ["aux.weight"] and report.unexpected == []
    assert_partition(model, report)


def test_ignore_then_missing_must_be_declared(compose, tiny_ckpts):
    with pytest.raises(CheckpointError, match="not declared"):
        load(compose, tiny_ckpts.safetensors, "checkpoint.ignore=['^layer2\\.']")
    _, _, report = load(compose, tiny_ckpts.safetensors, "checkpoint.ignore=['^layer2\\.']",
                        "checkpoint.expect.missing=[adapter1.*,layer2.*]")
    assert sorted(report.missing) == sorted(ADAPTER + ["layer2.0.weight", "layer2.0.bias"])


def test_min_loaded(compose, tiny_ckpts):
    # base params (the replaced head and the adapter are not base): layer1 176 + layer2 272; 39% load without layer2
    ignore = ["checkpoint.ignore=['^layer2\\.']", "checkpoint.expect.missing=null", "checkpoint.expect.unexpected=null"]
    _, _, report = load(compose, tiny_ckpts.safetensors, *ignore, "checkpoint.expect.min_loaded=0.3")
    assert "layer2.0.weight" in report.missing
    with pytest.raises(CheckpointError, match="min_loaded=0.9"):
        load(compose, tiny_ckpts.safetensors, *ignore, "checkpoint.expect.min_loaded=0.9")
    load(compose, tiny_ckpts.safetensors, "checkpoint.expect.min_loaded=1.0")  # everything of the base loads


def test_undeclared_unexpected_warns_when_only_missing_is_declared(compose, tiny_ckpts, tmp_path):
    path = save(tmp_path, "extra.safetensors", {**tiny_ckpts.state_dict, "aux.weight": torch.zeros(2)})
    _, _, report = load(compose, path, "checkpoint.expect.unexpected=null")
    assert report.unexpected == ["aux.weight"]
    assert any("unused" in w or "unexpected" in w for w in report.warnings)


# ---- dtypes and remap rules from the config --------------------------------------------------


def test_half_precision_checkpoint_is_cast(compose, tiny_ckpts, tmp_path):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_ckpts.state_dict.items()}
    _, model, report = load(compose, save(tmp_path, "half.safetensors", half))
    assert report.casts["layer1.0.weight"] == "float16->float32"
    assert model.layer1[0].weight.dtype == torch.float32
    assert torch.equal(model.layer1[0].weight, half["layer1.0.weight"].float())


def test_remap_rules_from_config_with_groups(compose, tiny_ckpts, tmp_path):
    renamed = {k.replace("layer", "backbone.block_"): v for k, v in tiny_ckpts.state_dict.items()}
    path = save(tmp_path, "renamed.safetensors", renamed)
    _, model, report = load(compose, path, "checkpoint.remap=[{pattern: '^backbone\\.block_(\\d)', replace: 'layer\\1'}]")
    assert report.remapped["backbone.block_1.0.weight"] == "layer1.0.weight"
    assert len(report.remapped) == len(renamed) - 2
    assert torch.equal(model.layer2[0].weight, tiny_ckpts.state_dict["layer2.0.weight"])


def test_remap_rule_matching_nothing_raises(compose, tiny_ckpts):
    with pytest.raises(CheckpointError, match=r"remap\[0\].*matches no checkpoint key"):
        load(compose, tiny_ckpts.safetensors, "checkpoint.remap=[{pattern: '^backbone\\.', replace: ''}]")


def test_report_json_has_the_contract_fields(compose, tiny_ckpts):
    _, _, report = load(compose, tiny_ckpts.safetensors_module)
    body = report.to_json()
    for key in ["checkpoint", "format", "counts", "loaded", "missing", "unexpected", "mismatched", "remapped"]:
        assert key in body
    assert set(body["counts"]) >= {"loaded", "missing", "unexpected", "mismatched", "remapped"}
    assert body["format"] == "safetensors" and body["checkpoint"] == str(tiny_ckpts.safetensors_module)
    assert set(body["mismatched"][0]) >= {"key", "model_shape", "checkpoint_shape", "action"}
    assert body["counts"]["remapped"] == len(body["remapped"]) == len(tiny_ckpts.state_dict)
