"""Transformer MLP: Linear -> tanh-GELU -> Linear.

y = GELU_tanh(x W1^T + b1) W2^T + b2: x (..., K), w1 (H, K), b1 (H,), w2 (N, H), b2 (N,).

One op so that the model names the MLP once and a backend is chosen for the pair. Both kernel
backends are two ``engine.ops.linear`` calls on that backend: ``triton`` (cuBLAS GEMMs, the bias
gradient and GELU's backward in one Triton pass) and ``cuda`` (the same Triton passes around
cuBLASLt GEMMs chosen per shape by timing, with the bias, and for fc1 GELU and its saved input,
in the forward GEMMs' epilogues; see engine.ops.linear). ``eager``: F.linear -> F.gelu ->
F.linear with autograd, the reference.

Tried and measured, not kept: one autograd Function for the pair whose backward ran GELU's
backward and fc1's bias gradient in the epilogue of fc2's input-gradient GEMM (cuBLASLt's
DGELU_BGRAD) and fc2's bias gradient in its weight-gradient GEMM (BGRADB). The fastest of
cuBLASLt's 8 DGELU_BGRAD candidates for PixArt-XL/2's 16384 x 1152 -> 4608 took 861 us against
237 us for the plain GEMM of that shape, and the block MLP forward + backward took 2166 us
against 1891 us as two Triton-backed linears (H100, bench/kernels.py --ops linear,mlp --timer
cudagraph at commit 140441d, with its GEMM tuning report; on the H200 at 5e7f6c8, untuned: 2115
against 1818).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from engine.ops.backend import requested, resolve

# The module (engine.ops re-exports the function under the module's name).
_linear = importlib.import_module("engine.ops.linear")


def mlp_ref(x, w1, b1, w2, b2):
    """The definition: F.linear -> tanh-GELU -> F.linear in x's dtype."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _check_inputs(x, w1, b1, w2, b2) -> None:
    if w1.dim() != 2 or w2.dim() != 2 or x.dim() < 1 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp expects x (..., K), w1 (H, K), w2 (N, H); got x {tuple(x.shape)}, "
                         f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if b1 is None or b2 is None or b1.shape != (w1.shape[0],) or b2.shape != (w2.shape[0],):
        raise ValueError(f"mlp: b1 must have shape ({w1.shape[0]},) and b2 ({w2.shape[0]},), got "
                         f"{None if b1 is None else tuple(b1.shape)} and {None if b2 is None else tuple(b2.shape)}")


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        backend: str | None = None) -> torch.Tensor:
    """GELU_tanh(x W1^T + b1) W2^T + b2 -> (..., N). backend: "eager", "triton", "cuda", "auto" or
    None (see engine.ops.backend): auto is linear's choice (engine.ops.linear.AUTO_PREFERENCE) on
    CUDA tensors, eager on the CPU and under torch.compile."""
    _check_inputs(x, w1, b1, w2, b2)
    if torch.compiler.is_compiling() and requested(backend, "mlp") == "auto":
        name = "eager"
    else:
        name = resolve(backend, x.device, "mlp", prefer=_linear.auto_preference(x.device.type))
    if name == "eager":
        return mlp_ref(x, w1, b1, w2, b2)
    h = _linear.linear(x, w1, b1, "gelu_tanh", backend=name)
    return _linear.linear(h, w2, b2, backend=name)
