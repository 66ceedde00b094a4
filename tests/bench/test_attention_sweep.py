"""bench/attention_sweep.py: its shape strings and the layouts it times."""

from __future__ import annotations

import pytest
import torch

import attention_sweep


def test_shapes_parse_and_bad_ones_name_the_format():
    assert attention_sweep.parse_shape("self:256x64x16x64") == ("self", (256, 64, 16, 64))
    assert attention_sweep.parse_shape("cross:64x256x16x64x77") == ("cross", (64, 256, 16, 64, 77))
    for bad in ("self:256x64x16", "cross:1x2x3x4", "other:1x2x3x4"):
        with pytest.raises(ValueError, match="self:BxNxHxd or cross:BxNxHxdxL"):
            attention_sweep.parse_shape(bad)
    for text in attention_sweep.SHAPES:
        attention_sweep.parse_shape(text)


def test_inputs_are_views_into_the_models_projections():
    """Self-attention's q, k, v share one (B, N, 3, H, d) leaf, keys = the N tokens; cross-attention's
    k, v share one (B, L, 2, H, d) leaf; every key valid."""
    q, k, v, kv_lens, leaves = attention_sweep.make_inputs("self", (2, 5, 3, 16), torch.device("cpu"))
    (qkv,) = leaves
    assert qkv.shape == (2, 5, 3, 3, 16) and q.dtype == torch.bfloat16
    assert all(t._base is qkv for t in (q, k, v)) and kv_lens.tolist() == [5, 5]
    q, k, v, kv_lens, leaves = attention_sweep.make_inputs("cross", (2, 5, 3, 16, 7), torch.device("cpu"))
    assert leaves[0] is q and leaves[1].shape == (2, 7, 2, 3, 16)
    assert k._base is leaves[1] and v._base is leaves[1] and kv_lens.tolist() == [7, 7]
