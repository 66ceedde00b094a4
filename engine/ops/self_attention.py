"""Self-attention of image tokens: PyTorch's SDPA with its kernel chosen on purpose, or, for
short sequences, the engine's one-tile Triton kernels.

q, k, v (B, N, H, d) -> (B, N, H, d), softmax(q k^T / sqrt(d)) v over all N tokens, no mask.
At PixArt's 256+ tokens SDPA's fused kernels are hard to beat, but which one SDPA
picks by default is not always the fastest (H200, B64 N256 16 x 72, bf16 fwd+bwd, bench/results/h200_kernels_attention.json:
cuDNN 381 µs, flash 656, efficient 1063). So:

- ``eager``: plain SDPA, whatever kernel PyTorch picks;
- ``cuda``: SDPA with the kernels in SDPA_PRIORITY order (``sdpa_kernel(..., set_priority=True)``):
  cuDNN first, then flash, then memory-efficient, then math, each used only when the ones before
  it refuse the inputs (fp32, say, which cuDNN and flash do not take);
- ``triton``: engine.ops.cross_attention's Triton kernels with every key valid: a sequence
  attending to itself is cross-attention with L = N. They hold all keys in one tile, so N <=
  256 (MAX_KERNEL_KEYS); MicroDiT's masked 256 px step attends over 64 kept tokens, where SDPA's
  fused kernels pay for a separate softmax-statistics pass and a dq conversion pass in the
  backward (cuDNN's ``compute_dot_do_o`` and ``convert_dq_to_16bits``), which the one-tile
  kernel does without.

flash-attn's own ``flash_attn_func`` is not used: it is the same FlashAttention-2 algorithm as
SDPA's flash kernel, which the measurement above puts 1.7x behind cuDNN, and SDPA's flash
already covers the inputs cuDNN refuses.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.ops.backend import requested, resolve, unavailable_reason
from engine.ops.cross_attention import MAX_KERNEL_KEYS, cross_attention

SDPA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
_SDPA_NAMES = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
               SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}


def self_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The definition, with plain matmuls in q's dtype (softmax in fp32 at least)."""
    d = q.shape[-1]
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * d**-0.5  # (B, H, N, N)
    probs = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).to(q.dtype)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v)  # (B, N, H, d)


def _check_inputs(q, k, v) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"self_attention expects q, k, v of one shape (B, N, H, d); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("self_attention: q, k, v must share one floating-point dtype, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"self_attention: {name} is on {t.device} but q is on {q.device}")


# auto on CUDA takes the Triton kernels for bf16 / fp16 up to this many tokens and SDPA (cuDNN
# first) above. H100, bf16, 16 heads of 64, forward + backward through autograd
# (bench/results/h100_attention_sweep_microdit_959771d.jsonl): B256 N64 232.3 us against SDPA's
# 410.5; B64 N256 430.0 against 394.5.
AUTO_TRITON_MAX_TOKENS = 64


def _resolve(backend: str | None, q: torch.Tensor) -> str:
    name = resolve(backend, q.device, "self_attention", prefer=("cuda",))
    if (requested(backend, "self_attention") == "auto" and q.device.type == "cuda"
            and q.shape[1] <= AUTO_TRITON_MAX_TOKENS and q.dtype in (torch.bfloat16, torch.float16)
            and unavailable_reason("triton", q.device) is None):
        return "triton"
    return name


def _check_triton_limits(q: torch.Tensor) -> None:
    N = q.shape[1]
    if N > MAX_KERNEL_KEYS:
        raise ValueError(f"self_attention: the triton backend holds all N keys in one tile, so N <= {MAX_KERNEL_KEYS}; "
                         f"got N = {N}; use backend 'cuda' or 'eager'")


def _kernel_choice(name: str):
    """The context under which SDPA runs for backend ``name``."""
    return sdpa_kernel(list(SDPA_PRIORITY), set_priority=True) if name == "cuda" else contextlib.nullcontext()


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v -> (B, N, H, d).

    q, k, v (B, N, H, d), any strides (views into one fused (B, N, 3, H, d) projection are what
    the model passes). backend: "eager" | "cuda" | "triton" | "auto" | None (see
    engine.ops.backend); auto on CUDA picks "triton" for bf16 / fp16 with N <= 64
    (AUTO_TRITON_MAX_TOKENS), else "cuda". The output is (B, N, H, d) in (B, N, H, d)
    memory order (a view of SDPA's result, or the Triton kernel's own), so reshaping it to
    (B, N, H*d) copies nothing (the math kernel's output does get copied).
    """
    _check_inputs(q, k, v)
    name = _resolve(backend, q)
    if name == "triton":
        _check_triton_limits(q)
        return cross_attention(q, k, v, None, backend="triton")
    with _kernel_choice(name):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, d)
    return out.transpose(1, 2)  # (B, N, H, d)


def active_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> str:
    """Which kernel ``self_attention(q, k, v, backend)`` runs: "triton", or the SDPA kernel
    "cudnn", "flash", "efficient" or "math". For SDPA it asks SDPA's own dispatcher
    (torch._fused_sdp_choice, the function SDPA calls to choose) under the same context, so it
    names the kernel that really runs; for benchmark labels."""
    _check_inputs(q, k, v)
    name = _resolve(backend, q)
    if name == "triton":
        return "triton"
    with _kernel_choice(name):
        choice = SDPBackend(torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
    if choice not in _SDPA_NAMES:
        raise RuntimeError(f"SDPA found no kernel for q {tuple(q.shape)} {q.dtype} on {q.device} (choice {choice})")
    return _SDPA_NAMES[choice]
