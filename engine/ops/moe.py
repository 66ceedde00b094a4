"""Expert-choice mixture-of-experts FFN (Zhou et al., arXiv 2202.09368), as MicroDiT routes it.

    x (B, T, D) tokens; gate_weight (E, D) the router (a Linear without bias);
    w1 (E, D, H), w2 (E, H, D) the experts' two Linears, stored input-major: an expert's tokens
    (k, D) @ w1[e] (D, H) is a plain (batched) matmul, one GEMM per expert, and the official
    MicroDiT checkpoints store them so.
    -> (B, T, D)

Routing is within each sample. p = softmax(x @ gate_weightᵀ) over the E experts (B, T, E); each
expert e takes the k = int(capacity * T / E) tokens with the largest p[:, e], among equal scores
the lower token index first; it computes gelu(x_t @ w1[e]) @ w2[e] (exact GELU, no bias) for
them, and each result, times p[t, e], is added to token t's output. A token no expert took gets
0; a token several experts took gets the sum. The router probabilities, the choice and the sum
over experts are computed in fp32 (fp64 for fp64 inputs); the expert GEMMs in x's dtype (the
autocast dtype under autocast), which is also the output's.

Why an op. The published code routes with one-hot matrices, (B, E, k, T) einsums that gather
and scatter by multiplication: 2 x 2T x T x D extra multiply-adds per MoE block on top of the
experts' 2T x 2 x D x H, and a (B, E, k, T) tensor in memory. Gathering the chosen rows, two
batched GEMMs over the experts and an indexed add compute the same with no routing FLOPs.

Backends:

- ``eager``: the gather formulation above in PyTorch (index_select, bmm, index_add_), its
  gradients by autograd. Its memory is the (E, B k, D) and (E, B k, H) expert activations.
- ``triton``: not written yet; the place for its kernels is marked below. Asking for it is an
  error, as for ``cuda`` (no csrc/ kernel).

``auto`` is eager everywhere until a kernel backend is measured against it. The reference
``moe_ref`` is a third formulation, for the tests: every expert on every token, with zero combine
weight for the (token, expert) pairs not chosen; E times the FLOPs, written for clarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.backend import resolve


def tokens_per_expert(tokens: int, experts: int, capacity: float) -> int:
    """k = int(capacity * T / E): how many tokens of a sample each expert takes."""
    return int(capacity * tokens / experts)


def _router_probs(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """softmax over the experts of x @ gate_weightᵀ: (B, T, E) in fp32, or fp64 for fp64 inputs."""
    logits = F.linear(x, gate_weight.to(x.dtype))  # (B, T, E)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def moe_ref(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            capacity: float = 2.0) -> torch.Tensor:
    """The definition, densely: every expert runs on every token and the combine weight of a
    (token, expert) pair is p[t, e] if the expert chose the token, else 0. Expert e chooses token t
    when fewer than k tokens rank before it: those with a larger p[:, e], or an equal one and a
    lower index."""
    B, T, _ = x.shape
    E = gate_weight.shape[0]
    k = tokens_per_expert(T, E, capacity)
    probs = _router_probs(x, gate_weight).transpose(1, 2)  # (B, E, T)
    score_t, score_s = probs[..., :, None], probs[..., None, :]  # (B, E, T, 1), (B, E, 1, T): token t, token s
    index = torch.arange(T, device=x.device)
    earlier = index[None, :] < index[:, None]  # (T, T): [t, s] = s < t
    ranks_before = ((score_s > score_t) | ((score_s == score_t) & earlier)).sum(-1)  # (B, E, T)
    combine = torch.where(ranks_before < k, probs, 0.0)  # (B, E, T)
    hidden = F.gelu(torch.einsum("btd,edh->beth", x, w1.to(x.dtype)))  # (B, E, T, H)
    out = torch.einsum("beth,ehd->betd", hidden, w2.to(x.dtype))  # (B, E, T, D)
    return torch.einsum("bet,betd->btd", combine, out.to(combine.dtype)).to(out.dtype)  # (B, T, D)


def _moe_gather(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                capacity: float) -> torch.Tensor:
    """The eager backend: gather the chosen rows, two batched GEMMs over the experts, indexed add."""
    B, T, D = x.shape
    E = gate_weight.shape[0]
    k = tokens_per_expert(T, E, capacity)
    probs = _router_probs(x, gate_weight).transpose(1, 2)  # (B, E, T)
    # a stable descending sort keeps equal scores in token order: ties go to the lower index
    score, token = torch.sort(probs, dim=-1, descending=True, stable=True)
    score, token = score[..., :k], token[..., :k]  # (B, E, k) each
    rows = token + T * torch.arange(B, device=x.device)[:, None, None]  # (B, E, k): row of x.flatten(0, 1)
    rows = rows.transpose(0, 1).reshape(E * B * k)  # expert-major: expert e's B*k rows are contiguous
    chosen = x.reshape(B * T, D).index_select(0, rows).view(E, B * k, D)  # (E, B k, D)
    hidden = F.gelu(torch.bmm(chosen, w1.to(x.dtype)))  # (E, B k, H)
    out = torch.bmm(hidden, w2.to(x.dtype))  # (E, B k, D)
    weight = score.transpose(0, 1).reshape(E * B * k, 1)  # (E B k, 1) fp32 (fp64)
    combined = out.reshape(E * B * k, D).to(weight.dtype) * weight  # (E B k, D)
    total = combined.new_zeros(B * T, D).index_add_(0, rows, combined)  # (B T, D) the sum over experts
    return total.view(B, T, D).to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels go here (none yet), then their launchers, the torch.autograd.Function and the
# torch.library registration, in the order of docs/design.md §3. The backward a kernel backend
# owes: d_x and d_gate through the router and the chosen rows, d_w1 and d_w2 as per-expert GEMMs
# over the chosen rows, each expert's output row scaled by its score, and d_score = the row's
# dot product with d_out (the scores' gradient reaches the router through the softmax).
# ---------------------------------------------------------------------------------------------

# auto's order on CUDA: no kernel backend yet, so auto runs eager everywhere.
AUTO_PREFERENCE: tuple[str, ...] = ()


def _check_inputs(x, gate_weight, w1, w2, capacity) -> None:
    if x.dim() != 3:
        raise ValueError(f"moe expects x of shape (B, T, D), got {tuple(x.shape)}")
    B, T, D = x.shape
    if gate_weight.dim() != 2 or gate_weight.shape[1] != D or gate_weight.shape[0] < 1:
        raise ValueError(f"moe: gate_weight must have shape (E, D) with D = {D}, got {tuple(gate_weight.shape)}")
    E = gate_weight.shape[0]
    if w1.dim() != 3 or w1.shape[:2] != (E, D):
        raise ValueError(f"moe: w1 must have shape (E, D, H) = ({E}, {D}, H), got {tuple(w1.shape)}")
    H = w1.shape[2]
    if w2.shape != (E, H, D):
        raise ValueError(f"moe: w2 must have shape (E, H, D) = ({E}, {H}, {D}), got {tuple(w2.shape)}")
    for name, t in (("x", x), ("gate_weight", gate_weight), ("w1", w1), ("w2", w2)):
        if not t.is_floating_point():
            raise TypeError(f"moe: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"moe: {name} is on {t.device} but x is on {x.device}")
    if not capacity > 0:
        raise ValueError(f"moe: capacity must be > 0, got {capacity}")
    k = tokens_per_expert(T, E, capacity)
    if k > T:
        raise ValueError(f"moe: capacity {capacity} gives each of {E} experts k = {k} tokens of a sample that has "
                         f"only T = {T}; capacity must be at most E = {E}")


def moe(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, capacity: float = 2.0,
        backend: str | None = None) -> torch.Tensor:
    """Expert-choice MoE FFN (see the module docstring) -> (B, T, D): x (B, T, D), gate_weight
    (E, D), w1 (E, D, H), w2 (E, H, D); each expert takes int(capacity * T / E) tokens of each
    sample. backend: "eager", "auto" or None (engine.ops.backend); "triton" and "cuda" are errors
    until their kernels exist."""
    _check_inputs(x, gate_weight, w1, w2, capacity)
    name = resolve(backend, x.device, "moe", prefer=AUTO_PREFERENCE)
    if name != "eager":
        raise RuntimeError(f"moe: there is no {name!r} backend yet (its kernels are not written); use 'eager'")
    return _moe_gather(x, gate_weight, w1, w2, capacity)
