"""finetune.console.tables.group_keys: module-prefix groups with compressed indices."""

from __future__ import annotations

import pytest
import torch
from tiny import TinyNet

from finetune.console.tables import group_keys


def resnet_like_keys() -> list[str]:
    keys = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean"]
    for layer in range(1, 5):
        for block in range(2):
            keys += [f"layer{layer}.{block}.conv{c}.weight" for c in (1, 2)]
    return keys + ["fc.weight", "fc.bias"]


def assert_partition(groups, keys):
    flat = [k for members in groups.values() for k in members]
    assert sorted(flat) == sorted(keys)  # every key exactly once
    assert len(flat) == len(set(flat))


def test_layers_compressed_into_one_row():
    keys = resnet_like_keys()
    groups = group_keys(keys)
    assert list(groups) == ["conv1.*", "bn1.*", "layer{1..4}.*", "fc.*"]
    assert len(groups["layer{1..4}.*"]) == 16
    assert_partition(groups, keys)


def test_non_contiguous_indices():
    groups = group_keys(["block1.w", "block3.w", "block4.w", "head.w", "stem.w"])
    assert "block{1,3,4}.*" in groups


def test_single_index_is_plain():
    groups = group_keys(["layer1.0.w", "layer1.1.w", "fc.w", "stem.w"])
    assert "layer1.*" in groups


def test_categories_split_groups():
    keys = resnet_like_keys()
    status = {k: ("missing" if k.startswith(("layer4", "fc")) else "loaded") for k in keys}
    groups = group_keys(keys, status.get)
    assert "layer{1..3}.*" in groups and "layer4.*" in groups
    for members in groups.values():
        assert len({status[k] for k in members}) == 1
    assert_partition(groups, keys)


def test_grows_depth_when_few_rows():
    keys = [f"encoder.layer{i}.w" for i in range(3)] + ["encoder.norm.w"]
    groups = group_keys(keys)
    assert list(groups) == ["encoder.layer{0..2}.*", "encoder.norm.*"]


def test_leaf_keys_without_dots():
    assert list(group_keys(["weight", "bias"])) == ["weight", "bias"]
    assert group_keys([]) == {}


def test_real_model_keys_are_partitioned():
    keys = list(TinyNet().state_dict())
    assert_partition(group_keys(keys), keys)


def test_categories_never_share_a_group_even_within_one_module():
    status = {"stem.conv.weight": "loaded", "stem.conv.bias": "missing", "layer1.0.w": "loaded", "fc.weight": "loaded"}
    groups = group_keys(status, status.get)
    assert_partition(groups, list(status))
    for members in groups.values():
        assert len({status[k] for k in members}) == 1, members


def test_model_keys_from_torch_module_order_kept():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    keys = list(model.state_dict())
    groups = group_keys(keys)
    assert [k for members in groups.values() for k in members] == keys
