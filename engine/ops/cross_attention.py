"""Cross-attention of image tokens to variable-length caption tokens.

q (B, N, H, d) image queries; k, v (B, L, H, d) caption keys/values padded to L; kv_lens (B,)
valid lengths. Keys at positions >= kv_lens[b] take no part; a sample with kv_lens 0 (an empty
caption) gets a zero output, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.backend import resolve


def cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """The definition: softmax over the valid keys only, computed in q's dtype with plain matmuls."""
    B, N, H, d = q.shape
    L = k.shape[1]
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) * d**-0.5  # (B, H, N, L)
    valid = torch.arange(L, device=q.device)[None, :] < kv_lens[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # empty caption: all -inf -> 0
    return torch.einsum("bhnl,blhd->bnhd", probs, v)


def _cross_attention_sdpa(q, k, v, kv_lens):
    # SDPA with a boolean key mask, as diffusers' PixArt runs it. A fully masked row would give
    # NaN, so lengths are clamped to 1 for the mask and empty-caption samples zeroed afterwards.
    L = k.shape[1]
    valid = torch.arange(L, device=q.device)[None, :] < kv_lens.clamp(min=1)[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :]
    )  # (B, H, N, d)
    out = out.transpose(1, 2)  # (B, N, H, d)
    return out * (kv_lens > 0).to(out.dtype)[:, None, None, None]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor,
                    backend: str | None = None) -> torch.Tensor:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"cross_attention expects q (B, N, H, d) and k, v (B, L, H, d); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if kv_lens.shape != (q.shape[0],):
        raise ValueError(f"cross_attention: kv_lens must have shape ({q.shape[0]},), got {tuple(kv_lens.shape)}")
    # Only the eager (SDPA) path exists so far, so ENGINE_BACKEND does not apply here; a backend
    # named explicitly must be one that runs.
    if backend is not None and resolve(backend, q.device) != "eager":
        raise RuntimeError(f"cross_attention has only the eager backend so far; {backend!r} was asked for")
    return _cross_attention_sdpa(q, k, v, kv_lens)
