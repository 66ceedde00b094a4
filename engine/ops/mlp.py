"""Transformer MLP: Linear -> tanh-GELU -> Linear.

y = GELU_tanh(x W1^T + b1) W2^T + b2: x (..., K), w1 (H, K), b1 (H,), w2 (N, H), b2 (N,).

One op so that the model names the MLP once and a backend is chosen for the pair.

Backends:
- ``eager``: F.linear -> F.gelu -> F.linear with autograd, the reference;
- ``triton``: two ``engine.ops.linear`` calls (cuBLAS GEMMs; fc1's bias gradient and GELU's
  backward in one Triton pass, see engine.ops.linear);
- ``cuda``: one autograd Function over cuBLASLt GEMMs chosen per shape by timing
  (engine.ops._gemm). Forward: fc1's GEMM adds b1 and writes GELU's output and its input (the
  pre-activation) in its epilogue, fc2's adds b2. Backward: fc2's input-gradient GEMM applies
  GELU's backward in its epilogue (cuBLASLt's DGELU, reading the saved pre-activation), so the
  GEMM writes d_pre directly and the Triton pass that read d_act and the pre-activation to write
  d_pre becomes a read-only column sum for b1's gradient. Measured on an H100 (bf16, CUDA-graph
  timer; bench/results/h100_mlp_dgelu_ab_dbbb8d9.txt): at 16384 x 1152 -> 4608 the plain
  input-gradient GEMM 232 us + the GELU pass 136 us, against the DGELU GEMM 269 us + the column
  sum 52 us; the whole engine+graph step at 256 px / 64, alternating runs in one call: 501.2 /
  503.5 img/s against 494.4 / 494.4 with the two-linear pair. Under torch.compile with
  backend="cuda" the pair runs as two cuda-backend ``linear`` calls (registered custom ops), as
  it does for zero tokens.

``w1_lp``, ``b1_lp``, ``w2_lp``, ``b2_lp``: the parameters already in the compute dtype (an
optimizer's copies), read instead of casting them, as engine.ops.linear's ``weight_lp``.

Tried and measured, not kept: fc1's bias gradient in the same epilogue (cuBLASLt's DGELU_BGRAD)
and fc2's in its weight-gradient GEMM (BGRADB). The fastest of cuBLASLt's 8 DGELU_BGRAD
candidates for PixArt-XL/2's 16384 x 1152 -> 4608 took 861 us against 237 us for the plain GEMM
of that shape, and the block MLP forward + backward took 2166 us against 1891 us as two
Triton-backed linears (H100, bench/kernels.py --ops linear,mlp --timer cudagraph, with its GEMM
tuning report: bench/results/h100_kernels_linear_mlp_140441d.json; on the H200, untuned: 2115
against 1818, bench/results/h200_kernels_mlp_linear_5e7f6c8.json).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops import _gemm
from engine.ops.backend import requested, resolve
from engine.ops.linear import linear


def mlp_ref(x, w1, b1, w2, b2):
    """The definition: F.linear -> tanh-GELU -> F.linear in x's dtype."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


class _MlpFunction(torch.autograd.Function):
    """The cuda backend's pair (module docstring). Casts to the compute dtype itself, as
    linear's Functions do, so fp32 parameters get fp32 gradients from the GEMMs and column sums."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w1_lp, b1_lp, w2_lp, b2_lp, dtype):
        x_low, w1_low, b1_low = _gemm.cast_operands(x, w1, b1, dtype, w1_lp, b1_lp)
        _, w2_low, b2_low = _gemm.cast_operands(x_low, w2, b2, dtype, w2_lp, b2_lp)
        x2 = _gemm.row_major(x_low.reshape(-1, w1.shape[1]))              # (M, K)
        w1_low, w2_low = _gemm.row_major(w1_low), _gemm.row_major(w2_low)
        act, pre = _gemm.cublaslt_forward(x2, w1_low, b1_low, gelu=True)  # (M, H) each
        y, _ = _gemm.cublaslt_forward(act, w2_low, b2_low, gelu=False)   # (M, N)
        ctx.save_for_backward(x2, w1_low, act, pre, w2_low)
        ctx.grad_dtypes, ctx.x_shape = (w1.dtype, w2.dtype), x.shape
        return y.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w1, act, pre, w2 = ctx.saved_tensors
        need_dx, need_dw1, need_db1, need_dw2, need_db2 = ctx.needs_input_grad[:5]
        grad1, grad2 = ctx.grad_dtypes
        dy2 = dy.contiguous().view(-1, w2.shape[0])  # (M, N); autograd may hand a broadcast (stride 0) view
        db2 = _gemm.bias_grad(dy2, None, grad2)[1] if need_db2 else None
        dw2 = _gemm.cublaslt_weight_grad(dy2, act, grad2) if need_dw2 else None
        unused = (None,) * 5  # the copies and the dtype
        if not (need_dx or need_dw1 or need_db1):
            return None, None, None, dw2, db2, *unused
        dpre = _gemm.cublaslt_input_grad(dy2, w2, dgelu_of=pre)  # (M, H) = (dy W2) * GELU'(pre)
        db1 = _gemm.bias_grad(dpre, None, grad1)[1] if need_db1 else None
        dx, dw1 = _gemm.gemm_grads(dpre, x2, w1, need_dx, need_dw1, grad1, cublaslt=True)
        dx = dx.view(ctx.x_shape) if need_dx else None
        return (dx, dw1 if need_dw1 else None, db1, dw2, db2, *unused)


def _check_inputs(x, w1, b1, w2, b2, copies) -> None:
    if w1.dim() != 2 or w2.dim() != 2 or x.dim() < 1 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp expects x (..., K), w1 (H, K), w2 (N, H); got x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if b1 is None or b2 is None or b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],):
        raise ValueError(f"mlp: b1 must have shape ({w1.shape[0]},) and b2 ({w2.shape[0]},), got "
                         f"{None if b1 is None else tuple(b1.shape)} and {None if b2 is None else tuple(b2.shape)}")
    for name, param, copy in zip(("w1", "b1", "w2", "b2"), (w1, b1, w2, b2), copies):
        _gemm.check_copy("mlp", name, param, copy)


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        backend: str | None = None, *, w1_lp: torch.Tensor | None = None,
        b1_lp: torch.Tensor | None = None, w2_lp: torch.Tensor | None = None,
        b2_lp: torch.Tensor | None = None) -> torch.Tensor:
    """GELU_tanh(x W1^T + b1) W2^T + b2 -> (..., N). backend: "eager", "triton", "cuda", "auto" or
    None (see engine.ops.backend): auto is linear's choice (engine.ops._gemm.auto_preference) on
    CUDA tensors, eager on the CPU and under torch.compile. ``*_lp``: the parameters' low-precision
    copies, read in place of casting them (module docstring)."""
    _check_inputs(x, w1, b1, w2, b2, (w1_lp, b1_lp, w2_lp, b2_lp))
    if torch.compiler.is_compiling() and requested(backend, "mlp") == "auto":
        name = "eager"
    else:
        name = resolve(backend, x.device, "mlp", prefer=_gemm.auto_preference(x.device.type))
    if name == "eager":
        return mlp_ref(x, w1, b1, w2, b2)
    if name == "cuda" and x.numel() > 0 and not torch.compiler.is_compiling():
        _gemm.require_cublaslt(x.device.type, "mlp")
        _gemm.compute_dtype(x, w2, b2, "mlp")  # fc2's operands must share x's dtype too (outside autocast)
        dtype = _gemm.compute_dtype(x, w1, b1, "mlp")
        return _MlpFunction.apply(x, w1, b1, w2, b2, w1_lp, b1_lp, w2_lp, b2_lp, dtype)
    h = linear(x, w1, b1, "gelu_tanh", backend=name, weight_lp=w1_lp, bias_lp=b1_lp)
    return linear(h, w2, b2, backend=name, weight_lp=w2_lp, bias_lp=b2_lp)
