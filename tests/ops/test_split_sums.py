"""engine.ops.split_sums: partial sums of many programs, finished by the last one to arrive.

A test kernel stores random partial rows from every program of a (column block, split) grid and
lets the last arrival of each column block sum them; checked against an fp64 sum, bit-equal over
repeated launches (a fixed order, whichever program is last), and with every counter back at zero
after each launch (the next launch relies on it). On CPU under the Triton interpreter.
"""

import pytest
import torch
import triton
import triton.language as tl

from engine.ops.split_sums import arrival_counters, last_to_arrive, sum_splits

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@triton.jit
def _store_and_finish(values_ptr, partial_ptr, out_ptr, counter_ptr, N, splits,
                      BLOCK: tl.constexpr, SPLIT_TILE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    tl.store(partial_ptr + pid_s * N + cols, tl.load(values_ptr + pid_s * N + cols, mask=ok), mask=ok)
    if last_to_arrive(counter_ptr, pid_n, splits):
        sum_splits(partial_ptr, out_ptr, cols, ok, splits, N, BLOCK, SPLIT_TILE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits,N,split_tile", [(1, 5, 4), (37, 300, 8), (200, 64, 32)])
def test_last_program_sums_every_split(device, splits, N, split_tile, _fresh_seed):
    values = torch.randn(splits, N, device=device)
    block = 64
    counters = arrival_counters(triton.cdiv(N, block), torch.device(device))
    results = []
    for _ in range(3):
        partial = torch.full((splits, N), float("nan"), device=device)
        out = torch.full((N,), float("nan"), device=device)
        _store_and_finish[(triton.cdiv(N, block), splits)](values, partial, out, counters, N, splits,
                                                            BLOCK=block, SPLIT_TILE=split_tile)
        assert not counters.any(), "a counter was left non-zero"
        results.append(out)
    torch.testing.assert_close(results[0].double(), values.double().sum(0), rtol=1e-6, atol=1e-5,
                               msg=f"seed {_fresh_seed}")
    assert all(torch.equal(results[0], r) for r in results[1:]), "the sum depends on the launch"


def test_counters_grow_and_are_shared():
    small = arrival_counters(3, torch.device("cpu"))
    assert small.numel() >= 3 and small.dtype == torch.int32 and not small.any()
    assert arrival_counters(2, torch.device("cpu")) is small
    large = arrival_counters(small.numel() + 1, torch.device("cpu"))
    assert large.numel() > small.numel() and not large.any()
