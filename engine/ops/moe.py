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
  gradient back through the softmax to the router and x. The expert GEMMs are cuBLAS batched
  matmuls over the chosen rows, expert-major (expert e's B k rows contiguous); kernels do the
  moves between the token and the expert layouts, where eager spends its element-wise passes:
  forward  pre = x[rows] @ w1[e], y = gelu(pre) @ w2[e], and out = per token, the sum over the
           experts that took it of score * y (one kernel: gather, scale and sum in fp32, one
           rounding; eager casts y to fp32, multiplies, index-adds with atomics and casts back);
  backward one kernel gathers g = d_out[rows] and writes dy = score g and d_score = Σ y g (fp32);
           d_w2 = gelu(pre)ᵀ dy, d_pre = gelu'(pre) (dy @ w2[e]ᵀ), d_w1 = x[rows]ᵀ d_pre, and
           d_x = per token, the sum of its experts' d_pre @ w1[e]ᵀ (the combine kernel again).
  Kept for the backward: the pre-activation and its GELU (E, B k, H) each, and the expert
  outputs (E, B k, D) (for d_score). Keeping GELU(pre) rather than recomputing it for d_w2 costs
  (E, B k, H) more memory per MoE block and saves a pass over it. The scatter back to the
  tokens is deterministic, since training runs are promised bitwise reproducible: a token's rows are summed in expert order
  through a (B T, E) table of where they are (-1 where an expert passed the token over), with no
  atomics anywhere, and no (B, E, k, T) tensor. fp32, bf16 and fp16; the GEMMs' outputs and the
  gradients in the compute dtype, the weight gradients then cast to the weights' dtype (as
  eager's are). The GEMMs are cuBLAS's because Triton GEMMs with the gather in their row loads
  and GELU in their tiles took 2.0x eager's time forward + backward at MicroDiT-XL/2's shape on
  the H100 (bench/results/h100_kernels_moe_270e398.json).
- ``cuda``: none (no csrc/ kernel); asking for it is an error.

Weights. w1 and w2 are the fp32 master weights; the experts compute in the autocast dtype.
``w1_lp`` / ``w2_lp`` are the optimizer's copies of them in that dtype (engine.optim.AdamW's
ParameterCopy, as engine.ops.linear reads): given, the op reads them instead of casting the
weights every step. Both backends' bmm give d_w1 / d_w2 in the compute dtype, cast to the
weights' dtype, as for a cast weight.

``auto`` is triton on CUDA (the measurement at AUTO_PREFERENCE) and eager elsewhere. The reference
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
# sample b, so expert e's M = B k rows form one contiguous slab of every (E, M, .) tensor, and the
# expert GEMMs are batched matmuls (cuBLAS) over it. The kernels move rows between the token
# layout (B T, D) and the expert layout (E M, D): the combine back to the tokens, and the
# backward's gather of d_out with the score's two products. One program per row, the row index
# on grid axis 0 (CUDA caps axes 1 and 2 at 65,535; MicroDiT's mixer at 256 px and batch 256 has
# 65,536 tokens).
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moe_combine_kernel(src_ptr, slots_ptr, score_ptr, out_ptr, D, E, stride_s, stride_o,
                        SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program t: out[t] = Σ_e src[slots[t, e]] (times score[slots[t, e]] with SCALE) over the
    experts that took token t (slot >= 0), summed in fp32 in expert order: the deterministic
    scatter-add. A token no expert took gets 0."""
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
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


@triton.jit
def _moe_expert_grad_kernel(dout_ptr, rows_ptr, y_ptr, score_ptr, dy_ptr, dscore_ptr, D, stride_d, stride_y,
                            stride_dy, BLOCK_D: tl.constexpr):
    """Program j (an expert row): with g = d_out[rows[j]] gathered, dy[j] = score[j] g (the
    gradient of expert row j's output, rounded once from fp32 to dy's dtype) and d_score[j] =
    Σ_cols y[j] g in fp32 (the gradient of the row's combine weight)."""
    j = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_D)
    token = tl.load(rows_ptr + j + cols0 * 0).to(tl.int64)  # (BLOCK_D,) of one value, as in the combine
    score = tl.load(score_ptr + j + cols0 * 0)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        ok = cols < D
        g = tl.load(dout_ptr + token * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + j * stride_y + cols, mask=ok, other=0.0).to(tl.float32)
        acc += g * y
        tl.store(dy_ptr + j * stride_dy + cols, (g * score).to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(dscore_ptr + j, tl.sum(acc, axis=0))


# (BLOCK_D, num_warps) of both row kernels: a row of MicroDiT's width 1024 in four tiles of 256,
# two elements a thread at 4 warps; not swept on a GPU.
ROW_CONFIG = (256, 4)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation point of every kernel output (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _combine(src, slots, score, out):
    """out (N, D) = each token's sum of its experts' rows of src (E M, D) (see _moe_combine_kernel)."""
    N, D = out.shape
    if out.numel() == 0:
        return
    block_d, num_warps = ROW_CONFIG
    _moe_combine_kernel[(N,)](
        src, slots, score if score is not None else src, out, D, slots.shape[1], src.stride(0), out.stride(0),
        SCALE=score is not None, BLOCK_D=block_d, num_warps=num_warps)


def _expert_grad(dout, rows, y, score, dy, dscore):
    """dy (E M, D) and d_score (E M,) fp32 from d_out (B T, D) (see _moe_expert_grad_kernel)."""
    R, D = dy.shape
    if R == 0:
        return
    block_d, num_warps = ROW_CONFIG
    _moe_expert_grad_kernel[(R,)](dout, rows, y, score, dy, dscore, D, dout.stride(0), y.stride(0), dy.stride(0),
                                  BLOCK_D=block_d, num_warps=num_warps)


def _forward_impl(x2d, w1, w2, score, rows, slots):
    """(out (B T, D), pre (E, M, H), hidden = GELU(pre) (E, M, H), y (E, M, D)): x2d (B T, D), w1
    (E, D, H), w2 (E, H, D) in one dtype; score (E, M) fp32, rows (E M,) int32 from _choose, slots
    (B T, E) int32 from _slots."""
    E, D, H = w1.shape
    M = score.shape[1]
    chosen = x2d.index_select(0, rows).view(E, M, D)
    pre = torch.bmm(chosen, w1)  # (E, M, H)
    hidden = F.gelu(pre)
    y = torch.bmm(hidden, w2)  # (E, M, D)
    out = _new_output((x2d.shape[0], D), x2d.dtype, x2d.device)
    _combine(y.view(E * M, D), slots, score, out)
    return out, pre, hidden, y


def _backward_impl(dout, x2d, w1, w2, score, rows, slots, pre, hidden, y, grad_dtype):
    """(d_x2d, d_w1, d_w2, d_score) of the expert path for d_out (B T, D); the weight gradients in
    ``grad_dtype`` (the master weights'); ``hidden`` is GELU(pre) as the forward kept it."""
    E, D, H = w1.shape
    M = score.shape[1]
    dout = dout.to(x2d.dtype).contiguous()
    dy = _new_output((E, M, D), x2d.dtype, x2d.device)
    dscore = _new_output((E, M), torch.float32, x2d.device)
    _expert_grad(dout, rows, y.view(E * M, D), score, dy.view(E * M, D), dscore.view(E * M))
    dw2 = torch.bmm(hidden.transpose(1, 2), dy)  # (E, H, D)
    dpre = torch.ops.aten.gelu_backward(torch.bmm(dy, w2.transpose(1, 2)), pre)  # (E, M, H)
    dw1 = torch.bmm(x2d.index_select(0, rows).view(E, M, D).transpose(1, 2), dpre)  # (E, D, H)
    dx_rows = torch.bmm(dpre, w1.transpose(1, 2))  # (E, M, D)
    dx = _new_output(x2d.shape, x2d.dtype, x2d.device)
    _combine(dx_rows.view(E * M, D), slots, None, dx)
    return dx, dw1.to(grad_dtype), dw2.to(grad_dtype), dscore


# ---------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces for backend="triton"); in eager mode
# the autograd Function calls the implementations directly, skipping the custom-op
# dispatcher's host cost (see engine.ops.linear).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::moe_fwd", mutates_args=())
def _fwd_op(x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, score: torch.Tensor, rows: torch.Tensor,
            slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(x2d, w1, w2, score, rows, slots)


@_fwd_op.register_fake
def _(x2d, w1, w2, score, rows, slots):
    E, D, H = w1.shape
    M = score.shape[1]
    return x2d.new_empty((x2d.shape[0], D)), x2d.new_empty((E, M, H)), x2d.new_empty((E, M, H)), x2d.new_empty((E, M, D))


@torch.library.custom_op("engine::moe_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, x2d: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, score: torch.Tensor,
            rows: torch.Tensor, slots: torch.Tensor, pre: torch.Tensor, hidden: torch.Tensor, y: torch.Tensor,
            grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, x2d, w1, w2, score, rows, slots, pre, hidden, y, grad_dtype)


@_bwd_op.register_fake
def _(dout, x2d, w1, w2, score, rows, slots, pre, hidden, y, grad_dtype):
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
        out, pre, hidden, y = (_fwd_op if torch.compiler.is_compiling() else _forward_impl)(
            x2d, w1c, w2c, score, rows, slots)
        ctx.save_for_backward(x2d, w1c, w2c, score, rows, slots, pre, hidden, y)
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

# auto's order on CUDA: the MicroDiT-XL/2 step (256 px, mask 0.75, batch 256, engine+graph) ran at
# 1,334-1,341 img/s with triton against 1,249-1,250 with eager on an H200, two runs of each
# (bench/results/h200_ab_moe_*_e1fa075.json).
AUTO_PREFERENCE: tuple[str, ...] = ("triton",)


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
