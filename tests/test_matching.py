"""finetune.matching: one meaning of a glob everywhere, and one answer when it matches nothing."""

from __future__ import annotations

import pytest

from finetune.errors import CheckpointError, PolicyError
from finetune.matching import closest_names, glob_matches, matching, require_matches

ALL = ["layer1.0.weight", "layer1.0.bias", "layer1.1.weight", "layer1.1.bias",
       "layer2.0.weight", "layer2.0.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize(
    "glob, name, expected",
    [
        ("layer1", "layer1.0.weight", True),  # a module prefix matches everything under it
        ("layer1", "layer10.weight", False),  # ... but not a sibling that shares the spelling
        ("layer1.*", "layer1.0.weight", True),
        ("layer1.0", "layer1.0.bias", True),
        ("*.bias", "layer1.0.bias", True),
        ("*.bias", "layer1.0.weight", False),
        ("head.weight", "head.weight", True),
        ("head", "header.weight", False),
        ("layer?.0.weight", "layer2.0.weight", True),
        ("Layer1", "layer1.0.weight", False),  # case-sensitive
    ],
)
def test_glob_matches(glob, name, expected):
    assert glob_matches(glob, name) is expected


def test_require_matches_unions_globs():
    assert require_matches(["layer1.0", "head"], ALL, "policy.freeze", error=PolicyError) == {
        "layer1.0.weight", "layer1.0.bias", "head.weight", "head.bias"}


def test_require_matches_dead_glob_names_closest():
    with pytest.raises(PolicyError) as info:
        require_matches(["head", "layr2"], ALL, "policy.freeze", error=PolicyError)
    assert "policy.freeze" in info.value.problem and "'layr2'" in info.value.problem
    assert "layer2" in info.value.fix


def test_require_matches_dead_glob_without_close_names_shows_examples():
    with pytest.raises(PolicyError) as info:
        require_matches(["zzzzzzzz"], ALL, "policy.train", error=PolicyError)
    assert "layer1.0.weight" in info.value.fix




def test_matching_keeps_the_order_of_names():
    assert matching(["head", "layer2"], ALL) == ["layer2.0.weight", "layer2.0.bias", "head.weight", "head.bias"]


def test_closest_names_include_module_prefixes():
    assert closest_names("layr1", ALL)[0] == "layer1"
    assert "layer1.0" in closest_names("layer1.0.wieght", ALL) or "layer1.0.weight" in closest_names("layer1.0.wieght", ALL)


def test_the_error_class_is_the_callers():
    with pytest.raises(CheckpointError) as info:
        require_matches(["adapter9"], ALL, "checkpoint.expect.missing", what="model key", error=CheckpointError)
    assert "matches no model key" in info.value.problem


def test_a_bare_module_name_means_the_same_in_policy_and_in_expect():
    """`adapter2` in policy.freeze and in checkpoint.expect.missing: one meaning (the module and all under it)."""
    from finetune.checkpoint.load import _undeclared

    keys = ["adapter2.down.weight", "adapter2.up.weight"]
    assert _undeclared(keys, ["adapter2"], declared={}) == []
    assert require_matches(["adapter2"], keys, "policy.freeze") == set(keys)
