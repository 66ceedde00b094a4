"""Reductions split over programs, finished by the last program to arrive (shared by the ops).

Backward kernels that split a sum over tokens across programs to fill the GPU (gated_add's
d_gate, norm_modulate's d_shift / d_scale / d_gate) store partial sums, which must then be added
up; a torch reduction launch for that cost ~5 us each, 85 a step in the graphed PixArt-XL/2 step
(H100; bench/results/h100_profile_256_b64_engine_graph_b119fd7.md). Here each program counts its
arrival with an atomic once its partials are stored; the program that arrives last reads all of
them, in a fixed order (so the result does not depend on which program that is: deterministic),
writes the sum and resets the counter.

Not used for linear's bias gradients, measured: there it made the step slower. Their kernel runs
~500 short programs a call, each of which then pays a gpu-scope release for its count: the
bias-gradient kernels took 7.86 ms a step against 6.80 + 0.61 ms for the kernels plus the second
launches (H100; bench/results/h100_profile_256_b64_engine_graph_{56442c4,b119fd7}.md).
norm_modulate (B x 4 programs at 256 px) and gated_add (2 token ranges a sample) have few, long
programs.

Counters: int32, zero between launches (each launch leaves the ones it used at zero), shared by
every launch on a device. The engine issues its kernels on one stream, so launches never
overlap; the buffer is allocated on the first eager call, before any CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(count: int, device: torch.device) -> torch.Tensor:
    """At least ``count`` zeroed int32 counters on ``device`` (module docstring)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        counters = _COUNTERS[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return counters


@triton.jit
def last_to_arrive(counter_ptr, index, splits):
    """True in the one program, of the ``splits`` that share counter ``index``, that arrives last;
    that program also resets the counter. Call after the program's partial stores: the barrier
    orders every thread's stores before the count, and the count's acquire-release ordering makes
    the other programs' partials visible to the last one."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + index, 1, sem="acq_rel", scope="gpu")
    last = arrived == splits - 1
    if last:
        tl.atomic_xchg(counter_ptr + index, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_splits(partial_ptr, out_ptr, cols, col_ok, splits, stride_split,
               BLOCK: tl.constexpr, SPLIT_TILE: tl.constexpr):
    """out[cols] = sum over s < splits of partial[s * stride_split + cols] in fp32, SPLIT_TILE rows
    at a time (their loads in flight together), in a fixed order; stored in out's dtype. The loads
    bypass L1 (.cg), where this SM could hold stale lines of the other programs' partials."""
    acc = tl.zeros((SPLIT_TILE, BLOCK), dtype=tl.float32)
    for s0 in range(0, splits, SPLIT_TILE):
        rows = s0 + tl.arange(0, SPLIT_TILE)
        acc += tl.load(partial_ptr + rows[:, None] * stride_split + cols[None, :],
                       mask=(rows < splits)[:, None] & col_ok[None, :], other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)
