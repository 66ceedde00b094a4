"""Transformer MLP: Linear -> tanh-GELU -> Linear, fused across its two GEMMs.

y = GELU_tanh(x W1^T + b1) W2^T + b2: x (..., K), w1 (H, K), b1 (H,), w2 (N, H), b2 (N,).

Why one op for two Linears. GELU's backward needs the gradient of the hidden activation,
which only the second Linear's input-gradient GEMM produces: as two ``engine.ops.linear``
calls, that GEMM writes dh, then a separate pass reads dh and the pre-activation to write
d_pre = dh * GELU'(pre) and fc1's bias gradient (28 calls of 141 us, 3.9 ms of the 131 ms
PixArt-XL/2 step on the H200 at commit 3c3cbcd), and the forward runs GELU as its own pass after
fc1's GEMM (2.5 ms). With both GEMMs in one op, cuBLASLt's epilogues take both passes in:

    forward   pre, h = GEMM(x, W1) + b1 -> GELU          (GELU_AUX_BIAS: h and pre in one pass)
              y = GEMM(h, W2) + b2                       (BIAS)
    backward  dW2, db2 = GEMM(dy, h)                     (BGRADB: db2 summed from dy as read)
              d_pre, db1 = GEMM(dy, W2) * GELU'(pre)     (DGELU_BGRAD: db1 summed as written)
              dW1 = GEMM(d_pre, x);  dx = GEMM(d_pre, W1)

Backends: ``eager`` (F.linear, F.gelu, F.linear with autograd: the reference); ``triton`` (two
``engine.ops.linear`` calls on their Triton backend); ``cuda`` (the above, engine._C's
gemm_epilogue; on CPU tensors its C++ reference). ``auto``: triton on CUDA tensors, eager on the
CPU and under torch.compile: measured on the H200, the epilogue GEMMs cuBLASLt picks are slower
than the plain GEMMs plus the Triton passes (AUTO_PREFERENCE below), so the fusion above is
correct and tested but not yet a speedup. Weight and bias gradients come back in the
parameters' dtype (fp32 from the GEMMs' accumulators under autocast; cuda's d_b1 is rounded to
bf16 first, see engine.ops.linear._cublaslt_gelu_input_grads), as with ``engine.ops.linear``.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from engine.ops.backend import requested, resolve

# The module (engine.ops re-exports the function under the module's name).
_linear = importlib.import_module("engine.ops.linear")


def mlp_ref(x, w1, b1, w2, b2):
    """The definition: F.linear -> tanh-GELU -> F.linear in x's dtype."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _forward_impl(x, w1, b1, w2, b2):
    """(y, h, pre) on cuBLASLt: h = GELU(pre) is fc2's input (kept for dW2), pre for GELU'."""
    K, N = x.shape[-1], w2.shape[0]
    if x.numel() == 0:  # no tokens: no GEMM to launch
        H = w1.shape[0]
        return x.new_empty((*x.shape[:-1], N)), x.new_empty((0, H)), x.new_empty((0, H))
    h, pre = _linear._cublaslt_forward(_linear._row_major(x.reshape(-1, K)), _linear._row_major(w1), b1, True)
    y, _ = _linear._cublaslt_forward(h, _linear._row_major(w2), b2, False)
    return y.view(*x.shape[:-1], N), h, pre


def _backward_impl(dy, x, w1, w2, h, pre, grad_dtype, need_dx, need_fc1, need_fc2):
    """(dx, dw1, db1, dw2, db2), the parameter gradients in grad_dtype; need_fc1 / need_fc2: that
    Linear's weight and bias are trained (a frozen one gets empty gradients and no GEMM)."""
    K, N = x.shape[-1], w2.shape[0]
    H = w1.shape[0]
    M = dy.numel() // N
    def nothing():  # a fresh empty tensor each time: a custom op's returns may not alias
        return w1.new_empty(0, dtype=grad_dtype)

    dx, dw1, db1, dw2, db2 = x.new_empty(0), nothing(), nothing(), nothing(), nothing()
    if M == 0:  # no tokens: zero gradients, nothing to launch
        zeros = functools.partial(torch.zeros, dtype=grad_dtype, device=dy.device)
        return (torch.zeros_like(x) if need_dx else dx, zeros(w1.shape) if need_fc1 else dw1,
                zeros(H) if need_fc1 or need_dx else db1, zeros(w2.shape) if need_fc2 else dw2,
                zeros(N) if need_fc2 else db2)
    dy2 = _linear._row_major(dy.reshape(-1, N))
    if need_fc2:
        dw2, db2 = _linear._cublaslt_weight_grads(dy2, h, grad_dtype)
    if need_dx or need_fc1:
        dpre, db1 = _linear._cublaslt_gelu_input_grads(dy2, _linear._row_major(w2), pre, grad_dtype)
        if need_fc1:
            dw1, _ = _linear._cublaslt_weight_grads(dpre, _linear._row_major(x.reshape(-1, K)), grad_dtype, False)
        if need_dx:
            dx = _linear._cublaslt_input_grad(dpre, _linear._row_major(w1)).view(x.shape)
    return dx, dw1, db1, dw2, db2


@torch.library.custom_op("engine::mlp_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(x, w1, b1, w2, b2)


@_fwd_op.register_fake
def _(x, w1, b1, w2, b2):
    M, H = x.numel() // x.shape[-1], w1.shape[0]
    return x.new_empty((*x.shape[:-1], w2.shape[0])), x.new_empty((M, H)), x.new_empty((M, H))


@torch.library.custom_op("engine::mlp_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
            pre: torch.Tensor, grad_dtype: torch.dtype, need_dx: bool, need_fc1: bool,
            need_fc2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dy, x, w1, w2, h, pre, grad_dtype, need_dx, need_fc1, need_fc2)


@_bwd_op.register_fake
def _(dy, x, w1, w2, h, pre, grad_dtype, need_dx, need_fc1, need_fc2):
    H, N = w1.shape[0], w2.shape[0]
    def shaped(t, shape, needed):
        return t.new_empty(shape if needed else (0,), dtype=grad_dtype)

    return (x.new_empty(x.shape) if need_dx else x.new_empty(0), shaped(w1, w1.shape, need_fc1),
            shaped(w1, (H,), need_fc1 or need_dx), shaped(w2, w2.shape, need_fc2), shaped(w2, (N,), need_fc2))


class _MlpFunction(torch.autograd.Function):
    """Casts to the compute dtype inside (as engine.ops.linear does) and calls the
    implementations directly in eager mode, the custom ops under torch.compile."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
        low = [t.to(dtype) for t in (x, w1, b1, w2, b2)]
        y, h, pre = (_fwd_op if torch.compiler.is_compiling() else _forward_impl)(*low)
        ctx.save_for_backward(low[0], low[1], low[3], h, pre)
        ctx.grad_dtype = w1.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h, pre = ctx.saved_tensors
        need_dx, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        run = _bwd_op if torch.compiler.is_compiling() else _backward_impl
        grads = run(dy.contiguous(), x, w1, w2, h, pre, ctx.grad_dtype, need_dx, need_w1 or need_b1, need_w2 or need_b2)
        return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad[:5])), None)


def _check_inputs(x, w1, b1, w2, b2) -> None:
    if w1.dim() != 2 or w2.dim() != 2 or x.dim() < 1 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp expects x (..., K), w1 (H, K), w2 (N, H); got x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if b1 is None or b2 is None or b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],):
        raise ValueError(f"mlp: b1 must have shape ({w1.shape[0]},) and b2 ({w2.shape[0]},), got "
                         f"{None if b1 is None else tuple(b1.shape)} and {None if b2 is None else tuple(b2.shape)}")


# auto's order on CUDA (outside torch.compile, which gets eager). Triton: PixArt-XL/2's block MLP
# (16384 tokens, 1152 -> 4608 -> 1152, bf16, fwd + bwd) took 2115 us on cuda against 1818 on
# triton and 1840 eager (H200, commit 5e7f6c8, bench/kernels.py --timer cudagraph): the GEMMs
# with the GELU_AUX_BIAS / DGELU_BGRAD / BGRADB epilogues that cuBLASLt's heuristic returns are
# slower than the plain GEMMs plus the Triton passes they replace.
AUTO_PREFERENCE: tuple[str, ...] = ("triton",)


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        backend: str | None = None) -> torch.Tensor:
    """GELU_tanh(x W1^T + b1) W2^T + b2 -> (..., N). backend: "eager", "triton", "cuda", "auto" or
    None (see engine.ops.backend and the module docstring)."""
    _check_inputs(x, w1, b1, w2, b2)
    if torch.compiler.is_compiling() and requested(backend, "mlp") == "auto":
        name = "eager"
    else:
        name = resolve(backend, x.device, "mlp", prefer=AUTO_PREFERENCE)
    if name == "eager":
        return mlp_ref(x, w1, b1, w2, b2)
    if name == "triton":
        h = _linear.linear(x, w1, b1, "gelu_tanh", backend="triton")
        return _linear.linear(h, w2, b2, backend="triton")
    if _linear.cublaslt_missing(x.device.type):
        raise RuntimeError("mlp: the cuda backend runs cuBLASLt epilogues, and engine._C was built without "
                           "cuBLASLt; use 'triton', or rebuild with it found (ENGINE_CUBLAS_ROOT, see setup.py)")
    if any(t.dtype != w1.dtype for t in (b1, w2, b2)) or (not torch.is_autocast_enabled(x.device.type)
                                                          and x.dtype != w1.dtype):
        raise TypeError(f"mlp: x, weights and biases must share a dtype outside autocast, got x {x.dtype}, "
                        f"w1 {w1.dtype}, b1 {b1.dtype}, w2 {w2.dtype}, b2 {b2.dtype}")
    return _MlpFunction.apply(x, w1, b1, w2, b2, _linear._compute_dtype(x, w1, b1))
