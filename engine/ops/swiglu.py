"""SwiGLU's gating: silu(a) * b, elementwise.

a, b: the two hidden projections of a SwiGLU FFN (w1 x, w2 x), one shape and dtype (the
autocast dtype under autocast); returns silu(a) * b in that dtype. MicroDiT's dense FFNs are
SwiGLUs (w3(silu(w1 x) * w2 x)), on every token of its patch-mixer and on the kept tokens of
the backbone's dense blocks.

Why an op. Eager runs the forward as silu (read a, write s) and a multiply (read s, b, write h),
and autograd's backward as the multiply's two products (read dh, b and dh, s; write both) and
silu's backward (read its input gradient and a; write da): 5 tensor accesses forward and 9
backward, and it keeps s as well as a and b for the backward. Here the forward reads a, b and
writes h (3), the backward reads dh, a, b and writes da, db (5), with silu and its slope
recomputed in registers, and only a and b are kept. The math is in fp32 with one rounding of
each output (eager bf16 rounds s before the multiply).

    h  = a σ(a) b
    db = dh a σ(a)
    da = dh b σ(a) (1 + a (1 - σ(a)))

Backends: ``eager`` (``F.silu(a) * b`` and autograd: the reference), ``triton``; ``cuda``: no
csrc/ kernel (two streaming passes Triton writes as they are); asking for it is an error.
``auto``: triton on CUDA, eager on the CPU and under torch.compile (Inductor fuses the two
elementwise ops itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops.backend import requested, resolve


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition: silu(a) * b, in the inputs' dtype (the model's eager expression)."""
    return F.silu(a) * b


# ---------------------------------------------------------------------------------------------
# Triton kernels: flat over the elements of contiguous tensors, BLOCK elements a program.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(h_ptr + offsets, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(a)
    silu = a * sigmoid
    tl.store(db_ptr + offsets, (dh * silu).to(db_ptr.dtype.element_ty), mask=ok)
    tl.store(da_ptr + offsets, (dh * b * sigmoid * (1.0 + a * (1.0 - sigmoid))).to(da_ptr.dtype.element_ty), mask=ok)


# (BLOCK, num_warps): 4096 elements a program, 16 B vectors at 8 warps for 2-byte dtypes; a first
# choice for a streaming kernel, not swept for this op yet.
FWD_CONFIG = (4096, 8)
BWD_CONFIG = (4096, 8)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation point of every kernel output (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _forward_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    h = _new_output(a.shape, a.dtype, a.device)
    if h.numel():
        block, num_warps = FWD_CONFIG
        _swiglu_fwd_kernel[(triton.cdiv(h.numel(), block),)](a, b, h, h.numel(), BLOCK=block, num_warps=num_warps)
    return h


def _backward_impl(dh: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dh = dh.contiguous()
    da = _new_output(a.shape, a.dtype, a.device)
    db = _new_output(b.shape, b.dtype, b.device)
    if da.numel():
        block, num_warps = BWD_CONFIG
        _swiglu_bwd_kernel[(triton.cdiv(da.numel(), block),)](dh, a, b, da, db, da.numel(), BLOCK=block,
                                                                num_warps=num_warps)
    return da, db


# ---------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces for an explicit backend="triton"); in
# eager mode the autograd Function calls the implementations directly, skipping the custom-op
# dispatcher's host cost (see engine.ops.linear).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::swiglu_fwd", mutates_args=())
def _fwd_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _forward_impl(a, b)


@_fwd_op.register_fake
def _(a, b):
    return a.new_empty(a.shape)


@torch.library.custom_op("engine::swiglu_bwd", mutates_args=())
def _bwd_op(dh: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(dh, a, b)


@_bwd_op.register_fake
def _(dh, a, b):
    return a.new_empty(a.shape), b.new_empty(b.shape)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a, b = a.contiguous(), b.contiguous()
        h = (_fwd_op if torch.compiler.is_compiling() else _forward_impl)(a, b)
        ctx.save_for_backward(a, b)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, b = ctx.saved_tensors
        return (_bwd_op if torch.compiler.is_compiling() else _backward_impl)(dh, a, b)


# ---------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------

def swiglu(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(a) * b -> a tensor of a's shape and dtype: a, b of one shape, dtype and device, any
    strides. backend: "eager", "triton", "auto" or None (engine.ops.backend): triton on CUDA
    tensors, eager on the CPU and inside torch.compile."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"swiglu expects a and b of one shape, dtype and device; got a {tuple(a.shape)} {a.dtype} "
                         f"on {a.device}, b {tuple(b.shape)} {b.dtype} on {b.device}")
    if not a.is_floating_point():
        raise TypeError(f"swiglu: a and b must be floating-point tensors, got {a.dtype}")
    if torch.compiler.is_compiling() and requested(backend, "swiglu") == "auto":
        name = "eager"
    else:
        name = resolve(backend, a.device, "swiglu", prefer=("triton",))
    if name == "eager":
        return swiglu_ref(a, b)
    if name == "cuda":
        raise RuntimeError("swiglu: there is no 'cuda' backend (no csrc/ kernel: two streaming passes that Triton "
                           "runs as they are); use 'triton' or 'eager'")
    if a.dtype not in KERNEL_DTYPES:
        raise TypeError(f"swiglu: the triton backend computes in fp32 and takes {KERNEL_DTYPES}, got {a.dtype}; "
                        "use backend='eager'")
    return _SwiGLUFunction.apply(a, b)
