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
- ``triton``: the routing (softmax, the stable sort that picks each expert's k tokens) stays in
  torch ops, as in eager: it is (B, E, T) small, and autograd carries the chosen scores'
  gradient back through the softmax to the router and x. The experts are batched GEMM kernels
  over the chosen rows, expert-major (expert e's B k rows contiguous):
  forward  pre = x[rows] @ w1[e], gathered inside the GEMM's row load (no gathered copy of x);
           y = gelu(pre) @ w2[e], GELU applied to the loaded tile; out = per token, the sum over
           the experts that took it of score * y;
  backward g = d_out[rows] @ w2[e]ᵀ (gathered again), whose epilogue gives d_score = Σ gelu(pre) g
           (the same as Σ y d_out, with no y kept) and d_pre = score g gelu'(pre);
           d_w2 = gelu(pre)ᵀ (score d_out[rows]), d_w1 = x[rows]ᵀ d_pre, and d_x = per token, the
           sum of its experts' d_pre @ w1[e]ᵀ.
  Only the pre-activation (E, B k, H) is kept for the backward; GELU and its slope are
  recomputed from it in the tiles that read it, elementwise work hidden under the GEMMs, where
  keeping gelu(pre) as well would double the largest saved tensor. The scatter back to the
  tokens is deterministic, since training runs are promised bitwise reproducible: the kernels
  write one row per (expert, chosen token), and a combine kernel sums each token's rows in
  expert order through a (B T, E) table of where they are (-1 where an expert passed the token
  over); the weight gradients are single-program sums over each expert's rows, and d_score's
  per-column-block partials are added by one torch sum. No atomics anywhere, and no (B, E, k, T)
  tensor. The kernels take fp32, bf16 and fp16 (fp32 accumulation; fp32 products are true fp32,
  not tf32), outputs and gradients in the compute dtype.
- ``cuda``: none (no csrc/ kernel); asking for it is an error.

Weights. w1 and w2 are the fp32 master weights; the experts compute in the autocast dtype.
``w1_lp`` / ``w2_lp`` are the optimizer's copies of them in that dtype (engine.optim.AdamW's
ParameterCopy, as engine.ops.linear reads): given, the op reads them instead of casting the
weights every step. The triton backend's weight-gradient GEMMs write d_w1 / d_w2 in the weights'
own dtype from their fp32 accumulators, so no low-precision gradient is made and cast back; the
eager backend's bmm gives them in the compute dtype and autograd casts them, as for a cast weight.

``auto`` is eager everywhere until the triton backend is measured against it. The reference
``moe_ref`` is a third formulation, for the tests: every expert on every token, with zero combine
weight for the (token, expert) pairs not chosen; E times the FLOPs, written for clarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


def _choose(x: torch.Tensor, gate_weight: torch.Tensor, capacity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's choice: (score (E, B k) the chosen p, differentiable to the router; rows (E B k,)
    int64 the chosen rows of x.flatten(0, 1)), expert-major (expert e's B k entries are contiguous,
    sample by sample, best score first)."""
    B, T, _ = x.shape
    E = gate_weight.shape[0]
    k = tokens_per_expert(T, E, capacity)
    probs = _router_probs(x, gate_weight).transpose(1, 2)  # (B, E, T)
    # a stable descending sort keeps equal scores in token order: ties go to the lower index
    score, token = torch.sort(probs, dim=-1, descending=True, stable=True)
    score, token = score[..., :k], token[..., :k]  # (B, E, k) each
    rows = token + T * torch.arange(B, device=x.device)[:, None, None]  # (B, E, k): row of x.flatten(0, 1)
    return score.transpose(0, 1).reshape(E, B * k), rows.transpose(0, 1).reshape(E * B * k)


class _ReadCopy(torch.autograd.Function):
    """``copy`` (the weight already in the compute dtype: _low_precision's) in the weight's place
    for autograd: the backward hands the gradient to the weight in its own dtype, as a cast's
    backward would."""

    @staticmethod
    def forward(ctx, weight, copy):
        ctx.dtype = weight.dtype
        return copy.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None




def _low_precision(weight: torch.Tensor, copy: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``, contiguous, outside autograd: its copy when there is one of that dtype."""
    if copy is not None and copy.dtype == dtype:
        return copy.detach().contiguous()
    return weight.detach().to(dtype).contiguous()


def _moe_gather(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                capacity: float, w1_lp: torch.Tensor | None = None, w2_lp: torch.Tensor | None = None) -> torch.Tensor:
    """The eager backend: gather the chosen rows, two batched GEMMs over the experts, indexed add."""
    B, T, D = x.shape
    E = gate_weight.shape[0]
    score, rows = _choose(x, gate_weight, capacity)
    chosen = x.reshape(B * T, D).index_select(0, rows).view(E, -1, D)  # (E, B k, D)
    hidden = F.gelu(torch.bmm(chosen, _ReadCopy.apply(w1, _low_precision(w1, w1_lp, x.dtype))))  # (E, B k, H)
    out = torch.bmm(hidden, _ReadCopy.apply(w2, _low_precision(w2, w2_lp, x.dtype)))  # (E, B k, D)
    weight = score.reshape(-1, 1)  # (E B k, 1) fp32 (fp64)
    combined = out.reshape(-1, D).to(weight.dtype) * weight  # (E B k, D)
    total = combined.new_zeros(B * T, D).index_add_(0, rows, combined)  # (B T, D) the sum over experts
    return total.view(B, T, D).to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels. The experts' rows are laid out expert-major: entry j = e * (B k) + b k + i of
# the flat (E B k) index ``rows`` is the row of x.flatten(0, 1) that expert e took i-th in
# sample b, so expert e's M = B k rows form one contiguous slab, and every GEMM below is a batch
# of E GEMMs (grid axis 2 is the expert) whose row operand is either gathered through ``rows``
# or an (E, M, .) tensor indexed directly.
# ---------------------------------------------------------------------------------------------

# constexpr: a compiled kernel may read no other globals (the interpreter lets floats through)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _normal_cdf(pre):
    """Φ(x) of an fp32 tile: exact GELU is x Φ(x), its slope Φ(x) + x φ(x)."""
    return 0.5 * (1.0 + tl.math.erf(pre * _INV_SQRT2))


@triton.jit
def _moe_rows_kernel(a_ptr, rows_ptr, b_ptr, c_ptr, pre_ptr, score_ptr, partial_ptr, M, N, K,
                     stride_ae, stride_am, stride_be, stride_bk, stride_bn, stride_ce, stride_cm, stride_ps,
                     GATHER_A: tl.constexpr, GELU_A: tl.constexpr, DSCORE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n, m, e): C[e][rows m, cols n] = A_e (M, K) @ B[e] (K, N), fp32 accumulation.

    A_e's row i is a[rows[e M + i]] (GATHER_A: tokens picked out of x or d_out inside the load)
    or a[e, i]; with GELU_A the loaded tile goes through GELU first (the forward's second GEMM
    reads the saved pre-activation). B is any strided (E, K, N) view, so w2ᵀ and w1ᵀ need no copy.
    DSCORE is the backward's first GEMM, g = d_out[rows] @ w2[e]ᵀ, with the epilogue
    partial[n, e M + i] = Σ_cols gelu(pre) g (this column block's share of d_score) and
    C = score g gelu'(pre) (d_pre)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if GATHER_A:
        a_rows = a_ptr + tl.load(rows_ptr + e * M + m, mask=m_ok, other=0).to(tl.int64) * stride_am
    else:
        a_rows = a_ptr + e * stride_ae + m.to(tl.int64) * stride_am
    b_expert = b_ptr + e * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        a = tl.load(a_rows[:, None] + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if GELU_A:
            a = a.to(tl.float32)
            a = (a * _normal_cdf(a)).to(b_ptr.dtype.element_ty)
        b = tl.load(b_expert + kk[:, None] * stride_bk + n[None, :] * stride_bn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    ok = m_ok[:, None] & n_ok[None, :]
    c_offsets = e * stride_ce + m[:, None].to(tl.int64) * stride_cm + n[None, :]
    if DSCORE:
        pre = tl.load(pre_ptr + c_offsets, mask=ok, other=0.0).to(tl.float32)
        cdf = _normal_cdf(pre)
        hidden = pre * cdf
        slope = cdf + pre * _INV_SQRT_2PI * tl.exp(-0.5 * pre * pre)
        tl.store(partial_ptr + pid_n * stride_ps + e * M + m, tl.sum(hidden * acc, axis=1), mask=m_ok)
        score = tl.load(score_ptr + e * M + m, mask=m_ok, other=0.0)
        acc = acc * score[:, None] * slope
    tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_weight_grad_kernel(a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, score_ptr, c_ptr, M, P, Q,
                            stride_ae, stride_am, stride_be, stride_bm, stride_ce, stride_cp,
                            GATHER_A: tl.constexpr, GELU_A: tl.constexpr, GATHER_B: tl.constexpr,
                            SCALE_B: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (q, p, e): C[e][p, q] = Σ_i A_e[i, p] B_e[i, q] over expert e's M rows, in one
    program and in row order (no split of the sum, so no atomics: the result is bitwise
    reproducible). A_e and B_e are read as _moe_rows_kernel's A (gathered through rows or
    indexed per expert); GELU_A applies GELU to A, SCALE_B multiplies B's row i by score[e M + i]
    in fp32 before rounding it to the GEMM dtype. d_w2 = gelu(pre)ᵀ (score d_out[rows]),
    d_w1 = x[rows]ᵀ d_pre."""
    pid_q = tl.program_id(0)
    pid_p = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < M
        if GATHER_A:
            a_rows = a_ptr + tl.load(a_rows_ptr + e * M + m, mask=m_ok, other=0).to(tl.int64) * stride_am
        else:
            a_rows = a_ptr + e * stride_ae + m.to(tl.int64) * stride_am
        if GATHER_B:
            b_rows = b_ptr + tl.load(b_rows_ptr + e * M + m, mask=m_ok, other=0).to(tl.int64) * stride_bm
        else:
            b_rows = b_ptr + e * stride_be + m.to(tl.int64) * stride_bm
        a_t = tl.load(a_rows[None, :] + p[:, None], mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # (BLOCK_P, BLOCK_M)
        if GELU_A:
            a_t = a_t.to(tl.float32)
            a_t = (a_t * _normal_cdf(a_t)).to(b_ptr.dtype.element_ty)
        b = tl.load(b_rows[:, None] + q[None, :], mask=m_ok[:, None] & q_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_Q)
        if SCALE_B:
            score = tl.load(score_ptr + e * M + m, mask=m_ok, other=0.0)
            b = (b.to(tl.float32) * score[:, None]).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
    tl.store(c_ptr + e * stride_ce + p[:, None].to(tl.int64) * stride_cp + q[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _moe_combine_kernel(src_ptr, slots_ptr, score_ptr, out_ptr, D, E, stride_s, stride_o,
                        SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (t, d): out[t, cols] = Σ_e src[slots[t, e], cols] (times score[slots[t, e]] with
    SCALE) over the experts that took token t (slot >= 0), summed in fp32 in expert order: the
    deterministic scatter-add. A token no expert took gets 0. The token is grid axis 0, the only
    axis with room for B T programs (CUDA caps axes 1 and 2 at 65,535; MicroDiT's mixer at 256 px
    and batch 256 has 65,536 tokens)."""
    t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e in range(E):
        # the slot, read as a (BLOCK_D,) vector of one value: masks stay tensors of the tile's shape
        slot = tl.load(slots_ptr + t * E + e + cols * 0)
        ok = col_ok & (slot >= 0)
        slot = tl.maximum(slot, 0).to(tl.int64)
        row = tl.load(src_ptr + slot * stride_s + cols, mask=ok, other=0.0).to(tl.float32)
        if SCALE:
            row = row * tl.load(score_ptr + slot, mask=ok, other=0.0)
        acc += row
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the row GEMMs, (BLOCK_P, BLOCK_Q,
# BLOCK_M, num_warps, num_stages) of the weight-gradient GEMMs, (BLOCK_D, num_warps) of the
# combine. Common Triton GEMM tiles, not swept for this op yet. ROWS_CONFIG's BLOCK_N also sets
# how many column-block partials of d_score the backward sums.
ROWS_CONFIG = (64, 128, 32, 4, 3)
# The backward's d_pre GEMM (DSCORE) holds four fp32 tiles (the product, pre-activation, Φ and the
# slope): ptxas for sm_90a (Triton 3.9, an offline compile) gave it 255 registers and 384 bytes
# spilled a thread at 4 warps, 185 and none at 8 (bench/results/cpu_moe_ptxas_sm90_37009f4.txt).
# Same BLOCK_N, so the partials' count is the same.
ROWS_DSCORE_WARPS = 8
WEIGHT_GRAD_CONFIG = (64, 128, 32, 4, 3)
COMBINE_CONFIG = (256, 4)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation point of every kernel output (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 inputs: true fp32 products, since on the GPU tl.dot would otherwise round to tf32
    # (the setting is ignored for bf16 / fp16).
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _rows_gemm(a, rows, b, c, pre=None, score=None, partial=None, gelu_a=False):
    """c (E, M, N) = A_e @ b[e] for every expert (see _moe_rows_kernel): a is x-like (rows
    gathered through ``rows``) when ``rows`` is given, else (E, M, K); b a strided (E, K, N) view.
    With ``partial`` it is the backward's d_pre GEMM, reading ``pre`` and ``score``."""
    E, M, N = c.shape
    K = b.shape[1]
    if c.numel() == 0:
        return
    block_m, block_n, block_k, num_warps, num_stages = ROWS_CONFIG
    dscore = partial is not None
    num_warps = ROWS_DSCORE_WARPS if dscore else num_warps
    _moe_rows_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m), E)](
        a, rows if rows is not None else a, b, c, pre if dscore else c, score if dscore else c,
        partial if dscore else c, M, N, K, 0 if rows is not None else a.stride(0), a.stride(-2),
        b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), partial.stride(0) if dscore else 0,
        GATHER_A=rows is not None, GELU_A=gelu_a, DSCORE=dscore, PRECISION=_dot_precision(b),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def _weight_grad_gemm(a, a_rows, b, b_rows, c, M, score=None, gelu_a=False):
    """c (E, P, Q) = A_eᵀ @ B_e over each expert's M rows (see _moe_weight_grad_kernel)."""
    E, P, Q = c.shape
    if c.numel() == 0:
        return
    block_p, block_q, block_m, num_warps, num_stages = WEIGHT_GRAD_CONFIG
    _moe_weight_grad_kernel[(triton.cdiv(Q, block_q), triton.cdiv(P, block_p), E)](
        a, a_rows if a_rows is not None else a, b, b_rows if b_rows is not None else b,
        score if score is not None else c, c, M, P, Q,
        0 if a_rows is not None else a.stride(0), a.stride(-2), 0 if b_rows is not None else b.stride(0),
        b.stride(-2), c.stride(0), c.stride(1),
        GATHER_A=a_rows is not None, GELU_A=gelu_a, GATHER_B=b_rows is not None, SCALE_B=score is not None,
        PRECISION=_dot_precision(b), BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_M=block_m, num_warps=num_warps,
        num_stages=num_stages)


def _combine(src, slots, score, out):
    """out (N, D) = each token's sum of its experts' rows of src (E M, D) (see _moe_combine_kernel)."""
    N, D = out.shape
    if out.numel() == 0:
        return
    block_d, num_warps = COMBINE_CONFIG
    _moe_combine_kernel[(N, triton.cdiv(D, block_d))](
        src, slots, score if score is not None else src, out, D, slots.shape[1], src.stride(0), out.stride(0),
        SCALE=score is not None, BLOCK_D=block_d, num_warps=num_warps)


def _forward_impl(x2d, w1, w2, score, rows, slots):
    """(out (B T, D), pre (E, M, H)): x2d (B T, D), w1 (E, D, H), w2 (E, H, D) in one dtype;
    score (E, M) fp32, rows (E M,) int32 from _choose, slots (B T, E) int32 from _slots."""
    E, D, H = w1.shape
    M = score.shape[1]
    pre = _new_output((E, M, H), x2d.dtype, x2d.device)
    _rows_gemm(x2d, rows, w1, pre)
    y = _new_output((E, M, D), x2d.dtype, x2d.device)
    _rows_gemm(pre, None, w2, y, gelu_a=True)
    out = _new_output((x2d.shape[0], D), x2d.dtype, x2d.device)
    _combine(y.view(E * M, D), slots, score, out)
    return out, pre


def _backward_impl(dout, x2d, w1, w2, score, rows, slots, pre, grad_dtype):
    """(d_x2d, d_w1, d_w2, d_score) of the expert path for d_out (B T, D); the weight gradients in
    ``grad_dtype`` (the master weights'), written from the fp32 accumulators."""
    E, D, H = w1.shape
    M = score.shape[1]
    dout = dout.to(x2d.dtype).contiguous()
    dpre = _new_output((E, M, H), x2d.dtype, x2d.device)
    partial = _new_output((triton.cdiv(H, ROWS_CONFIG[1]), E * M), torch.float32, x2d.device)
    _rows_gemm(dout, rows, w2.transpose(1, 2), dpre, pre=pre, score=score, partial=partial)
    dscore = partial.sum(0).view(E, M)  # the column blocks' shares, summed in a fixed order
    dw2 = _new_output((E, H, D), grad_dtype, x2d.device)
    _weight_grad_gemm(pre, None, dout, rows, dw2, M, score=score, gelu_a=True)
    dw1 = _new_output((E, D, H), grad_dtype, x2d.device)
    _weight_grad_gemm(x2d, rows, dpre, None, dw1, M)
    dx_rows = _new_output((E, M, D), x2d.dtype, x2d.device)
    _rows_gemm(dpre, None, w1.transpose(1, 2), dx_rows)
    dx = _new_output(x2d.shape, x2d.dtype, x2d.device)
    _combine(dx_rows.view(E * M, D), slots, None, dx)
    return dx, dw1, dw2, dscore


# ---------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces for backend="triton"); in eager mode
# the autograd Function calls the implementations directly, skipping the custom-op
# dispatcher's host cost (see engine.ops.linear).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::moe_fwd", mutates_args=())
def _fwd_op(x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, score: torch.Tensor, rows: torch.Tensor,
            slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x2d, w1, w2, score, rows, slots)


@_fwd_op.register_fake
def _(x2d, w1, w2, score, rows, slots):
    E, D, H = w1.shape
    return x2d.new_empty((x2d.shape[0], D)), x2d.new_empty((E, score.shape[1], H))


@torch.library.custom_op("engine::moe_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, score: torch.Tensor,
            rows: torch.Tensor, slots: torch.Tensor, pre: torch.Tensor, grad_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, x2d, w1, w2, score, rows, slots, pre, grad_dtype)


@_bwd_op.register_fake
def _(dout, x2d, w1, w2, score, rows, slots, pre, grad_dtype):
    return (x2d.new_empty(x2d.shape), w1.new_empty(w1.shape, dtype=grad_dtype), w2.new_empty(w2.shape, dtype=grad_dtype),
            score.new_empty(score.shape))


class _MoEExpertsFunction(torch.autograd.Function):
    """The expert path of the triton backend: x2d, the master weights w1, w2 (for their
    gradients' dtype), the weights in the compute dtype (their copies, or casts made here
    outside autograd) and the chosen scores in, the combined output out. The scores' gradient
    goes back to the router through autograd (sort, softmax, gate Linear), which also adds the
    router's share of d_x."""

    @staticmethod
    def forward(ctx, x2d, w1, w2, w1c, w2c, score, rows, slots):
        out, pre = (_fwd_op if torch.compiler.is_compiling() else _forward_impl)(x2d, w1c, w2c, score, rows, slots)
        ctx.save_for_backward(x2d, w1c, w2c, score, rows, slots, pre)
        ctx.grad_dtype = w1.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        backward = _bwd_op if torch.compiler.is_compiling() else _backward_impl
        dx, dw1, dw2, dscore = backward(dout, *ctx.saved_tensors, ctx.grad_dtype)
        return dx, dw1, dw2, None, None, dscore, None, None


def _slots(rows: torch.Tensor, tokens: int, experts: int) -> torch.Tensor:
    """(B T, E) int32: slots[r, e] = the position j in ``rows`` (expert-major) where expert e
    holds row r of x.flatten(0, 1), or -1 where e did not take it. An expert takes a row at most
    once, so the scatter writes each entry once and is deterministic."""
    slots = torch.full((tokens, experts), -1, dtype=torch.int32, device=rows.device)
    per_expert = rows.numel() // experts if experts else 0
    positions = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device).view(experts, per_expert)
    slots[rows.view(experts, per_expert).long(), torch.arange(experts, device=rows.device)[:, None]] = positions
    return slots


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _moe_triton(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                capacity: float, w1_lp: torch.Tensor | None = None, w2_lp: torch.Tensor | None = None) -> torch.Tensor:
    """The triton backend: routing by torch ops (as eager), the experts and the combine by kernels."""
    B, T, D = x.shape
    E = gate_weight.shape[0]
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"moe: the triton backend computes the experts in {KERNEL_DTYPES}, got x {dtype}; "
                        "use backend='eager'")
    score, rows = _choose(x, gate_weight, capacity)
    rows = rows.to(torch.int32)
    out = _MoEExpertsFunction.apply(x.reshape(B * T, D).to(dtype).contiguous(), w1, w2,
                                    _low_precision(w1, w1_lp, dtype), _low_precision(w2, w2_lp, dtype),
                                    score.float().contiguous(), rows, _slots(rows, B * T, E))
    return out.view(B, T, D)

# auto's order on CUDA: empty until the triton backend is measured against eager, so auto runs eager.
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
        backend: str | None = None, w1_lp: torch.Tensor | None = None,
        w2_lp: torch.Tensor | None = None) -> torch.Tensor:
    """Expert-choice MoE FFN (see the module docstring) -> (B, T, D): x (B, T, D), gate_weight
    (E, D), w1 (E, D, H), w2 (E, H, D); each expert takes int(capacity * T / E) tokens of each
    sample. ``w1_lp`` / ``w2_lp``: copies of w1 / w2 in the compute dtype, read instead of casting
    (a copy of another dtype is ignored). backend: "eager", "triton", "auto" or None
    (engine.ops.backend); "cuda" is an error (no csrc/ kernel)."""
    _check_inputs(x, gate_weight, w1, w2, capacity)
    for name, copy, weight in (("w1_lp", w1_lp, w1), ("w2_lp", w2_lp, w2)):
        if copy is not None and (copy.shape != weight.shape or copy.device != weight.device):
            raise ValueError(f"moe: {name} {tuple(copy.shape)} on {copy.device} must have its weight's shape "
                             f"{tuple(weight.shape)} and device {weight.device}")
    name = resolve(backend, x.device, "moe", prefer=AUTO_PREFERENCE)
    if name == "eager":
        return _moe_gather(x, gate_weight, w1, w2, capacity, w1_lp, w2_lp)
    if name == "cuda":
        raise RuntimeError("moe: there is no 'cuda' backend (no csrc/ kernel); use 'triton' or 'eager'")
    return _moe_triton(x, gate_weight, w1, w2, capacity, w1_lp, w2_lp)
