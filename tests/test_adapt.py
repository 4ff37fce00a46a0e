"""finetune.checkpoint.adapt: fitting a checkpoint tensor into a differently shaped model slot."""

from __future__ import annotations

import pytest
import torch

from finetune.checkpoint.adapt import adapt_tensor
from finetune.errors import CheckpointError


def test_head_with_fewer_classes_copies_overlap():
    fresh, ckpt = torch.randn(4, 6), torch.randn(8, 6)
    out, detail = adapt_tensor("fc.weight", fresh, ckpt)
    assert out.shape == fresh.shape
    assert torch.equal(out, ckpt[:4])
    assert "4x6" in detail


def test_head_with_more_classes_keeps_fresh_rows():
    fresh, ckpt = torch.randn(10, 6), torch.randn(8, 6)
    out, _ = adapt_tensor("fc.weight", fresh, ckpt)
    assert torch.equal(out[:8], ckpt)
    assert torch.equal(out[8:], fresh[8:])
    assert out.data_ptr() != fresh.data_ptr()  # the model's tensor is not modified in place


def test_bias_overlap_and_dtype_follows_model():
    fresh, ckpt = torch.zeros(5), torch.arange(3, dtype=torch.float16)
    out, _ = adapt_tensor("fc.bias", fresh, ckpt)
    assert out.dtype == torch.float32
    assert out.tolist() == [0.0, 1.0, 2.0, 0.0, 0.0]


def test_conv_to_one_input_channel_sums():
    fresh, ckpt = torch.zeros(8, 1, 3, 3), torch.randn(8, 3, 3, 3)
    out, detail = adapt_tensor("stem.weight", fresh, ckpt)
    assert out.shape == (8, 1, 3, 3)
    torch.testing.assert_close(out, ckpt.sum(dim=1, keepdim=True))
    assert "summed" in detail


@pytest.mark.parametrize("in_new", [2, 4, 6])
def test_conv_more_input_channels_repeats_and_scales(in_new):
    fresh, ckpt = torch.zeros(8, in_new, 3, 3), torch.randn(8, 3, 3, 3)
    out, _ = adapt_tensor("stem.weight", fresh, ckpt)
    assert out.shape == fresh.shape
    for c in range(in_new):
        torch.testing.assert_close(out[:, c], ckpt[:, c % 3] * (3 / in_new))


def test_position_embedding_square_grid_with_cls_token():
    ckpt = torch.randn(1, 1 + 4 * 4, 8)
    ckpt[:, 1:] = 0.5  # a constant grid stays constant when resized
    fresh = torch.zeros(1, 1 + 6 * 6, 8)
    out, detail = adapt_tensor("pos_embed", fresh, ckpt)
    assert out.shape == fresh.shape
    assert torch.equal(out[:, :1], ckpt[:, :1])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 36, 8), 0.5))
    assert "1 prefix" in detail and "4x4" in detail and "6x6" in detail


def test_position_embedding_sequence_interpolates():
    ckpt = torch.ones(1, 10, 4)
    out, detail = adapt_tensor("pos", torch.zeros(1, 20, 4), ckpt)
    assert out.shape == (1, 20, 4)
    torch.testing.assert_close(out, torch.ones(1, 20, 4))
    assert "length-10" in detail


@pytest.mark.parametrize(
    "fresh, ckpt",
    [
        (torch.zeros(16, 3, 3, 3), torch.zeros(8, 3, 3, 3)),  # conv output channels differ
        (torch.zeros(8, 3, 5, 5), torch.zeros(8, 3, 3, 3)),  # kernel size differs
        (torch.zeros(4, 4), torch.zeros(16)),  # rank differs
        (torch.zeros(2, 4, 4), torch.zeros(2, 8, 4)),  # 3-D but not a [1, N, C] embedding
    ],
)
def test_unadaptable_shapes_raise(fresh, ckpt):
    with pytest.raises(CheckpointError) as info:
        adapt_tensor("some.key", fresh, ckpt)
    assert "some.key" in info.value.problem
    assert "skip" in info.value.fix
