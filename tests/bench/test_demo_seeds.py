"""bench/demo_seeds.py: its --runs list."""

from __future__ import annotations

import pytest

import demo_seeds


def test_runs_are_seed_precision_pairs():
    assert demo_seeds.parse_runs("1:fp32,12:bf16") == [(1, "fp32"), (12, "bf16")]
    for bad in ("1:fp16", "1", "x:fp32"):
        with pytest.raises(ValueError):
            demo_seeds.parse_runs(bad)
