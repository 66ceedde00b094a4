"""Shared by the op tests: the Triton interpreter made to convert and multiply bf16 as the GPU does, each
test's fresh seed, and kernel outputs poisoned with NaN."""

import numpy as np
import pytest
import torch
import triton.language as tl

from engine.ops.backend import triton_interpreted


def bf16_bits_as_fp32(data):
    """bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits."""
    return (np.asarray(data).astype(np.uint32) << 16).view(np.float32)


@pytest.fixture
def interpreter_rounds_bf16_like_the_gpu(monkeypatch):
    """Triton 3.9's interpreter converts fp32 -> bf16 by truncation (round toward zero), where the
    GPU rounds to nearest even (cvt.rn.bf16.f32). Truncation is biased, and over a thousand rows
    that bias alone can break the rule of docs/design.md §3 (seen: norm_modulate's d_gate; linear's bf16 d_pre
    shifting dx and dw). Under the interpreter this makes the conversion round as the GPU does
    (bf16 -> fp32, exact either way, takes a faster path); the kernels themselves are unchanged.
    A no-op on the GPU."""
    if not triton_interpreted():
        return
    import triton.runtime.interpreter as interpreter
    truncating = interpreter._convert_float

    def convert(data, src_dtype, dst_dtype, rounding_mode):
        if src_dtype == tl.bfloat16 and dst_dtype == tl.float32:
            return bf16_bits_as_fp32(data)
        if src_dtype != tl.float32 or dst_dtype != tl.bfloat16:
            return truncating(data, src_dtype, dst_dtype, rounding_mode)
        bits = np.ascontiguousarray(data).view(np.uint32).astype(np.uint64)
        nearest_even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return np.where(np.isnan(data), 0x7FC0, nearest_even).astype(np.uint16).reshape(data.shape)

    monkeypatch.setattr(interpreter, "_convert_float", convert)


@pytest.fixture
def interpreter_dots_bf16_like_the_gpu(interpreter_rounds_bf16_like_the_gpu, monkeypatch):
    """Besides rounding fp32 -> bf16 as the GPU does: Triton 3.9's interpreter multiplies bf16
    tl.dot tiles as their raw uint16 bit patterns (garbage); their values go in as fp32 instead,
    so that it computes what the GPU does. A no-op on the GPU."""
    if not triton_interpreted():
        return
    import triton.runtime.interpreter as interpreter

    def as_float(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle(bf16_bits_as_fp32(handle.data), tl.float32)

    bit_pattern_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *args: bit_pattern_dot(self, as_float(a), as_float(b), d, *args))


@pytest.fixture
def interpreter_fuses_fma_like_the_gpu(monkeypatch):
    """Triton 3.8's interpreter computes tl.fma(x, y, z) as x * y + z in NumPy, rounding the
    product and the sum apart, where the GPU's fma rounds once (and torch's lerp, on CUDA and in
    its vectorised CPU kernels, is that one rounding). Under the interpreter this computes an fp32
    fma in fp64: the product is exact there (24 + 24 bits), and the fp64 sum rounded to fp32 is the
    fused result unless that sum's own rounding lands it on an fp32 halfway point, about one
    element in 2^29. Other dtypes keep the interpreter's arithmetic. A no-op on the GPU."""
    if not triton_interpreted():
        return
    import triton.runtime.interpreter as interpreter
    builder = interpreter.InterpreterBuilder
    separate = builder.create_fma

    def fused(self, x, y, z):
        if z.dtype.scalar != tl.float32:
            return separate(self, x, y, z)
        wide = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)
        return interpreter.TensorHandle(wide.astype(np.float32), z.dtype.scalar)

    monkeypatch.setattr(builder, "create_fma", fused)


@pytest.fixture
def seed(_fresh_seed):
    return _fresh_seed


def poison_outputs(monkeypatch, module, name: str = "_new_output") -> list:
    """Make ``module.<name>``, an op's one allocation point for kernel outputs, return tensors
    full of NaN, so an element a kernel fails to write shows; returns the list the (shape, dtype)
    of every allocation is appended to, for the tests that check what a launch allocates."""
    made = []

    def poisoned(shape, dtype, device):
        made.append((tuple(shape), dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, name, poisoned)
    return made
