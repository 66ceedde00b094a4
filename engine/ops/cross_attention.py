"""Cross-attention of image tokens to variable-length caption tokens.

q (B, N, H, d) image queries; k, v (B, L, H, d) caption keys/values padded to L; kv_lens (B,)
valid lengths (an int tensor on q's device; values above L count as L). Keys at positions
>= kv_lens[b] take no part; a sample with kv_lens 0 (an empty caption) gets a zero output, not
NaN, and zero gradients.

Backends:
- ``eager``: SDPA with a boolean key mask (what diffusers' PixArt runs);
- ``triton``: the kernels below, built for a short key axis (T5 captions: L <= 120);
- ``cuda``: flash-attn's ``flash_attn_varlen_func`` when the flash_attn package is importable
  (no csrc/ kernel: it would have to beat the Triton one first).

Triton design. A head's keys and values are few (L <= 256 padded to BLOCK_L), so one program
holds all of them in one tile: the forward is a single softmax over that tile per query block
(no online-softmax rescaling), and the backward is ONE kernel per (sample, head): it keeps
dk, dv for all L keys in fp32 registers while looping over the query blocks, and writes dq for
each query block as it goes (each query block's dq depends only on the keys it holds). Since a
query row's keys all sit in the tile, the softmax backward's row statistic rowsum(dO * O) is
computed as sum_l P dP from the tiles at hand, so O is never read (the backward went from 284 to
220 us at B64 N256 on the H200 when it stopped reading O). One kernel rather than
flash-attention's dq pass + dk/dv pass saves recomputing QK^T and dO V^T a second time (5 matmuls per query block instead of 7) and needs no atomics; its parallelism
is B*H programs, enough at PixArt's training batches (B*H = 512 - 1024 against 132 SMs). For
small batches the query blocks of a head are split over several programs that write fp32
dk/dv partials, summed afterwards (``splits``). The backward works on key-major (transposed)
scores, so the probabilities feed the dk / dv products without a transpose; with query-major
scores, ptxas (sm_90, Triton 3.9) spilled 728 bytes a thread, key-major 96.

Padded keys: masked loads read nothing past kv_len, and a sample with kv_len <= BLOCK_L / 2
runs a half-width key tile (a second copy of the tile code chosen per program at run time),
so short captions also skip half the matmul work. Head dim d = 72 (PixArt) is not a power of
two: a tile of 128 columns would waste 44% of the matmul work and, in the backward, of the
dk/dv registers (2 x 128 x 128 fp32 per program); instead every d-wide tile is split into a
64-column main part and a 16-column tail (8 used), 80 columns: 10% waste, nothing padded in
memory. ptxas for sm_90 (Triton 3.9, bf16, d = 72, L = 120, default tiles and stages): split
64 + 16, forward 188 registers and no spill, backward 255 registers and 96 bytes spilled a
thread; one masked 128-column tile, forward 64 bytes spilled, backward 664.

Each forward program loops over several query blocks of one (sample, head) and loads its K
and V once: with one query block per program the forward took 186 us at B64 N256 on an H100
(tiny programs, nothing to hide load latency behind), with the loop 78 us. Launch configs and
their measured times: FWD_CONFIG below.

Memory accesses are 16-byte vectors only because the kernels say so: a head's rows start at
h * d elements, and with d = 72 Triton cannot prove that offset 16-byte aligned from the
arguments, so it emitted one 2-byte load or store per element (ptxas for sm_90: 200 scalar
ld.global.b16 and 200 st.global.b16 in the backward). ``_offset_alignment`` computes the common
alignment of the strides on the host and the kernels declare their offsets multiples of it
(``tl.multiple_of``), with d a compile-time constant so the tail tile's column mask is known to
cover whole vectors. On an H100 that took the forward from 79.7 to 63.6 us and the backward from
216.6 to 159.1 us at B64 N256 (FWD_CONFIG's comment has the sweep).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops.backend import multiprocessors, resolve

try:
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:
    _flash_attn_varlen_func = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_KERNEL_KEYS = 256  # one key tile of BLOCK_L rows per program; beyond this, registers run out
MAX_KERNEL_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Reference: the definition of correct.
# ---------------------------------------------------------------------------------------------

def cross_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """The definition: softmax over the valid keys only; matmuls in q's dtype, softmax in fp32
    (fp64 for fp64 inputs, so the fp64 reference is fp64 throughout)."""
    B, N, H, d = q.shape
    L = k.shape[1]
    scores = torch.einsum("bnhd,blhd->bhnl", q, k) * d**-0.5  # (B, H, N, L)
    valid = torch.arange(L, device=q.device)[None, :] < kv_lens[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    compute = torch.promote_types(q.dtype, torch.float32)
    probs = torch.softmax(scores.to(compute), dim=-1).nan_to_num(0.0).to(q.dtype)  # empty caption: all -inf -> 0
    return torch.einsum("bhnl,blhd->bnhd", probs, v)


def _cross_attention_sdpa(q, k, v, kv_lens):
    # SDPA with a boolean key mask, as diffusers' PixArt runs it. A fully masked row would give
    # NaN, so lengths are clamped to 1 for the mask and empty-caption samples zeroed afterwards.
    # Without lengths (every key valid), SDPA without a mask.
    if kv_lens is None:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    L = k.shape[1]
    valid = torch.arange(L, device=q.device)[None, :] < kv_lens.clamp(min=1)[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :]
    )  # (B, H, N, d)
    out = out.transpose(1, 2)  # (B, N, H, d)
    return out * (kv_lens > 0).to(out.dtype)[:, None, None, None]


# ---------------------------------------------------------------------------------------------
# flash-attn path. flash_attn_varlen_func wants keys packed by cumulative lengths. Packing the
# padded (B, L) keys would cost a gather and a host sync (the packed length is data); instead
# the padded buffer is described as 2B sequences: sequence 2b holds sample b's N queries and its
# kv_lens[b] valid keys, sequence 2b+1 its L - kv_lens[b] padded keys and no queries. Nothing is
# copied, and flash-attn writes zeros for queries with no keys (empty caption) and for keys with
# no queries (the padding's gradients).
# ---------------------------------------------------------------------------------------------

def _cross_attention_flash(q, k, v, kv_lens):
    B, N, H, d = q.shape
    L = k.shape[1]
    lens = kv_lens.clamp(0, L).to(torch.int32)                                              # (B,)
    starts = torch.arange(B, device=q.device, dtype=torch.int32) * L                         # (B,)
    key_bounds = torch.stack([starts, starts + lens], dim=1).flatten()                       # (2B,)
    cu_seqlens_k = torch.cat([key_bounds, key_bounds.new_full((1,), B * L)])                 # (2B + 1,)
    cu_seqlens_q = (torch.arange(2 * B + 1, device=q.device, dtype=torch.int32) + 1) // 2 * N  # 0, N, N, 2N, 2N, ...
    out = _flash_attn_varlen_func(q.reshape(B * N, H, d), k.reshape(B * L, H, d), v.reshape(B * L, H, d),
                                  cu_seqlens_q, cu_seqlens_k, N, L)                       # (B*N, H, d)
    return out.view(B, N, H, d)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Every d-wide tile is a main part of D0 columns plus, when d > D0, a tail of D1
# columns starting at column D0 (see the module docstring); D1 == 0 means no tail.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, rows, row_stride, n_rows, D, FIRST_COL: tl.constexpr, COLS: tl.constexpr):
    """(len(rows), COLS) tile of columns FIRST_COL.. of a row-major matrix; zeros where a row is
    >= n_rows or a column >= D (nothing is read there)."""
    cols = FIRST_COL + tl.arange(0, COLS)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    return tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, row_stride, n_rows, D, values, FIRST_COL: tl.constexpr, COLS: tl.constexpr):
    cols = FIRST_COL + tl.arange(0, COLS)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    tl.store(base + rows[:, None] * row_stride + cols[None, :], values.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_tile(q_base, k_base, v_base, o_base, lse_base, m_begin, m_end, kv_len, N, D,
              stride_qn, stride_kl, stride_vl, stride_on, qk_scale,
              BLOCK_M: tl.constexpr, TILE_L: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              PRECISION: tl.constexpr):
    """Query blocks [m_begin, m_end) of one (sample, head) against its first TILE_L keys
    (TILE_L >= kv_len). K and V are loaded once; the loop over query blocks lets the compiler
    prefetch the next block's q while this one computes."""
    keys = tl.arange(0, TILE_L)
    key_ok = keys < kv_len
    k0 = _load_tile(k_base, keys, stride_kl, kv_len, D, 0, D0)                              # (TILE_L, D0)
    v0 = _load_tile(v_base, keys, stride_vl, kv_len, D, 0, D0)
    if D1 > 0:
        k1 = _load_tile(k_base, keys, stride_kl, kv_len, D, D0, D1)                         # (TILE_L, D1)
        v1 = _load_tile(v_base, keys, stride_vl, kv_len, D, D0, D1)
    for m_block in range(m_begin, m_end):
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)                                    # (BLOCK_M,)
        q0 = _load_tile(q_base, rows, stride_qn, N, D, 0, D0)                               # (BLOCK_M, D0)
        scores = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)                       # (BLOCK_M, TILE_L)
        if D1 > 0:
            q1 = _load_tile(q_base, rows, stride_qn, N, D, D0, D1)                          # (BLOCK_M, D1)
            scores = tl.dot(q1, tl.trans(k1), scores, input_precision=PRECISION)
        # Scores in base-2 units (qk_scale = log2(e) / sqrt(d)), so exp2 replaces exp.
        scores = tl.where(key_ok[None, :], scores * qk_scale, float("-inf"))
        row_max = tl.max(scores, axis=1)                                                    # (BLOCK_M,)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # no valid key: exp2 gives 0, not NaN
        p = tl.exp2(scores - row_max[:, None])                                              # (BLOCK_M, TILE_L)
        row_sum = tl.sum(p, axis=1)
        has_keys = row_sum > 0
        denom = tl.where(has_keys, row_sum, 1.0)  # an empty caption's p is all zero: output 0
        inv_denom = (1.0 / denom)[:, None]
        p_low = p.to(v_base.dtype.element_ty)
        out0 = tl.dot(p_low, v0, input_precision=PRECISION) * inv_denom                     # (BLOCK_M, D0)
        _store_tile(o_base, rows, stride_on, N, D, out0, 0, D0)
        if D1 > 0:
            out1 = tl.dot(p_low, v1, input_precision=PRECISION) * inv_denom                 # (BLOCK_M, D1)
            _store_tile(o_base, rows, stride_on, N, D, out1, D0, D1)
        lse = tl.where(has_keys, row_max + tl.log2(denom), float("-inf"))
        tl.store(lse_base + rows, lse, mask=rows < N)


@triton.jit
def _cross_attention_fwd_kernel(
        Q, K, V, KV_LENS, O, LSE,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh, stride_ob, stride_on, stride_oh,
        N, L, H, blocks_per_split, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        ALIGN: tl.constexpr, HALF_TILE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (splits, H, B): program (s, h, b) takes query blocks [s * blocks_per_split, ...) of
    (b, h). O: (B, N, H, d); LSE: (B, H, N) fp32, base 2."""
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64 offsets: B * N * H * d may pass 2^31
    kv_len = tl.minimum(tl.maximum(tl.load(KV_LENS + b).to(tl.int32), 0), L)
    m_begin = split * blocks_per_split
    m_end = tl.minimum(m_begin + blocks_per_split, tl.cdiv(N, BLOCK_M))
    q_base = Q + tl.multiple_of(b * stride_qb + h * stride_qh, ALIGN)
    k_base = K + tl.multiple_of(b * stride_kb + h * stride_kh, ALIGN)
    v_base = V + tl.multiple_of(b * stride_vb + h * stride_vh, ALIGN)
    o_base = O + tl.multiple_of(b * stride_ob + h * stride_oh, ALIGN)
    stride_qn, stride_kl = tl.multiple_of(stride_qn, ALIGN), tl.multiple_of(stride_kl, ALIGN)
    stride_vl, stride_on = tl.multiple_of(stride_vl, ALIGN), tl.multiple_of(stride_on, ALIGN)
    lse_base = LSE + (b * H + h) * N
    if HALF_TILE and kv_len <= BLOCK_L // 2:
        _fwd_tile(q_base, k_base, v_base, o_base, lse_base, m_begin, m_end, kv_len, N, D,
                  stride_qn, stride_kl, stride_vl, stride_on, qk_scale, BLOCK_M, BLOCK_L // 2, D0, D1, PRECISION)
    else:
        _fwd_tile(q_base, k_base, v_base, o_base, lse_base, m_begin, m_end, kv_len, N, D,
                  stride_qn, stride_kl, stride_vl, stride_on, qk_scale, BLOCK_M, BLOCK_L, D0, D1, PRECISION)


@triton.jit
def _bwd_tile(q_base, k_base, v_base, do_base, lse_base, dq_base, dk_base, dv_base,
              m_begin, m_end, kv_len, N, L, D,
              stride_qn, stride_kl, stride_vl, stride_don, stride_dqn, stride_dkl, stride_dvl,
              sm_scale, qk_scale,
              BLOCK_M: tl.constexpr, TILE_L: tl.constexpr, BLOCK_L: tl.constexpr,
              D0: tl.constexpr, D1: tl.constexpr, PRECISION: tl.constexpr):
    """Query blocks [m_begin, m_end) of one (sample, head) against its first TILE_L keys: writes
    their dq, and dk, dv (summed over those blocks) for all L key rows, zeros past the tile."""
    keys = tl.arange(0, TILE_L)
    key_ok = keys < kv_len
    k0 = _load_tile(k_base, keys, stride_kl, kv_len, D, 0, D0)                              # (TILE_L, D0)
    v0 = _load_tile(v_base, keys, stride_vl, kv_len, D, 0, D0)
    dk0 = tl.zeros((TILE_L, D0), dtype=tl.float32)
    dv0 = tl.zeros((TILE_L, D0), dtype=tl.float32)
    if D1 > 0:
        k1 = _load_tile(k_base, keys, stride_kl, kv_len, D, D0, D1)                         # (TILE_L, D1)
        v1 = _load_tile(v_base, keys, stride_vl, kv_len, D, D0, D1)
        dk1 = tl.zeros((TILE_L, D1), dtype=tl.float32)
        dv1 = tl.zeros((TILE_L, D1), dtype=tl.float32)
    for m_block in range(m_begin, m_end):
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)                                    # (BLOCK_M,)
        q0 = _load_tile(q_base, rows, stride_qn, N, D, 0, D0)                               # (BLOCK_M, D0)
        do0 = _load_tile(do_base, rows, stride_don, N, D, 0, D0)
        # Key-major (transposed) scores: the (TILE_L, BLOCK_M) probabilities are then the left
        # operand of the dv and dk products as they stand, and only dq needs a transpose.
        scores_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)                     # (TILE_L, BLOCK_M)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)                        # (dO V^T)^T
        if D1 > 0:
            q1 = _load_tile(q_base, rows, stride_qn, N, D, D0, D1)                          # (BLOCK_M, D1)
            do1 = _load_tile(do_base, rows, stride_don, N, D, D0, D1)
            scores_t = tl.dot(k1, tl.trans(q1), scores_t, input_precision=PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
        lse = tl.load(lse_base + rows, mask=rows < N, other=0.0)                            # (BLOCK_M,)
        valid = key_ok[:, None] & (rows < N)[None, :]
        # P recomputed from the saved log-sum-exp: no max or sum pass.
        p_t = tl.where(valid, tl.exp2(scores_t * qk_scale - lse[None, :]), 0.0)            # (TILE_L, BLOCK_M)
        # delta_m = sum_l P dP = rowsum(dO * O): the tile holds every key of the row, so it comes
        # from the tiles at hand, in fp32, and O is never read.
        delta = tl.sum(p_t * dp_t, axis=0)                                                  # (BLOCK_M,)
        ds_t = p_t * (dp_t - delta[None, :])  # gradient of the scaled scores
        p_low = p_t.to(do0.dtype)
        ds_low = ds_t.to(q0.dtype)
        dv0 = tl.dot(p_low, do0, dv0, input_precision=PRECISION)                           # (TILE_L, D0)
        dk0 = tl.dot(ds_low, q0, dk0, input_precision=PRECISION)
        dq0 = tl.dot(tl.trans(ds_low), k0, input_precision=PRECISION) * sm_scale           # (BLOCK_M, D0)
        _store_tile(dq_base, rows, stride_dqn, N, D, dq0, 0, D0)
        if D1 > 0:
            dv1 = tl.dot(p_low, do1, dv1, input_precision=PRECISION)                       # (TILE_L, D1)
            dk1 = tl.dot(ds_low, q1, dk1, input_precision=PRECISION)
            dq1 = tl.dot(tl.trans(ds_low), k1, input_precision=PRECISION) * sm_scale       # (BLOCK_M, D1)
            _store_tile(dq_base, rows, stride_dqn, N, D, dq1, D0, D1)
    # Rows past kv_len hold exact zeros (p is 0 there), so every one of the L rows is written.
    _store_tile(dk_base, keys, stride_dkl, L, D, dk0 * sm_scale, 0, D0)
    _store_tile(dv_base, keys, stride_dvl, L, D, dv0, 0, D0)
    if D1 > 0:
        _store_tile(dk_base, keys, stride_dkl, L, D, dk1 * sm_scale, D0, D1)
        _store_tile(dv_base, keys, stride_dvl, L, D, dv1, D0, D1)
    if TILE_L < BLOCK_L:
        # The half tile: the key rows it does not cover get zero gradients.
        rest = TILE_L + tl.arange(0, BLOCK_L - TILE_L)
        zeros0 = tl.zeros((BLOCK_L - TILE_L, D0), dtype=tl.float32)
        _store_tile(dk_base, rest, stride_dkl, L, D, zeros0, 0, D0)
        _store_tile(dv_base, rest, stride_dvl, L, D, zeros0, 0, D0)
        if D1 > 0:
            zeros1 = tl.zeros((BLOCK_L - TILE_L, D1), dtype=tl.float32)
            _store_tile(dk_base, rest, stride_dkl, L, D, zeros1, D0, D1)
            _store_tile(dv_base, rest, stride_dvl, L, D, zeros1, D0, D1)


@triton.jit
def _cross_attention_bwd_kernel(
        Q, K, V, DO, LSE, KV_LENS, DQ, DK, DV,
        stride_qb, stride_qn, stride_qh, stride_kb, stride_kl, stride_kh,
        stride_vb, stride_vl, stride_vh,
        stride_dob, stride_don, stride_doh, stride_dqb, stride_dqn, stride_dqh,
        stride_dks, stride_dkb, stride_dkl, stride_dkh, stride_dvs, stride_dvb, stride_dvl, stride_dvh,
        N, L, H, blocks_per_split, sm_scale, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
        ALIGN: tl.constexpr, HALF_TILE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (splits, H, B): program (s, h, b) takes query blocks [s * blocks_per_split, ...) of
    (b, h). DK, DV: (splits, B, L, H, d) partial sums (split stride 0 when splits == 1)."""
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kv_len = tl.minimum(tl.maximum(tl.load(KV_LENS + b).to(tl.int32), 0), L)
    m_begin = split * blocks_per_split
    m_end = tl.minimum(m_begin + blocks_per_split, tl.cdiv(N, BLOCK_M))
    q_base = Q + tl.multiple_of(b * stride_qb + h * stride_qh, ALIGN)
    k_base = K + tl.multiple_of(b * stride_kb + h * stride_kh, ALIGN)
    v_base = V + tl.multiple_of(b * stride_vb + h * stride_vh, ALIGN)
    do_base = DO + tl.multiple_of(b * stride_dob + h * stride_doh, ALIGN)
    lse_base = LSE + (b * H + h) * N
    dq_base = DQ + tl.multiple_of(b * stride_dqb + h * stride_dqh, ALIGN)
    dk_base = DK + tl.multiple_of(split * stride_dks + b * stride_dkb + h * stride_dkh, ALIGN)
    dv_base = DV + tl.multiple_of(split * stride_dvs + b * stride_dvb + h * stride_dvh, ALIGN)
    stride_qn, stride_kl = tl.multiple_of(stride_qn, ALIGN), tl.multiple_of(stride_kl, ALIGN)
    stride_vl, stride_don = tl.multiple_of(stride_vl, ALIGN), tl.multiple_of(stride_don, ALIGN)
    stride_dqn, stride_dkl = tl.multiple_of(stride_dqn, ALIGN), tl.multiple_of(stride_dkl, ALIGN)
    stride_dvl = tl.multiple_of(stride_dvl, ALIGN)
    if HALF_TILE and kv_len <= BLOCK_L // 2:
        _bwd_tile(q_base, k_base, v_base, do_base, lse_base, dq_base, dk_base, dv_base,
                  m_begin, m_end, kv_len, N, L, D,
                  stride_qn, stride_kl, stride_vl, stride_don, stride_dqn, stride_dkl, stride_dvl,
                  sm_scale, qk_scale, BLOCK_M, BLOCK_L // 2, BLOCK_L, D0, D1, PRECISION)
    else:
        _bwd_tile(q_base, k_base, v_base, do_base, lse_base, dq_base, dk_base, dv_base,
                  m_begin, m_end, kv_len, N, L, D,
                  stride_qn, stride_kl, stride_vl, stride_don, stride_dqn, stride_dkl, stride_dvl,
                  sm_scale, qk_scale, BLOCK_M, BLOCK_L, BLOCK_L, D0, D1, PRECISION)


# ---------------------------------------------------------------------------------------------
# Launchers. Every output is allocated through _new_output, so tests can poison them with NaN.
# ---------------------------------------------------------------------------------------------

def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


# (BLOCK_M, num_warps) on the GPU, bf16, measured on an H100 (torch 2.11, Triton 3.6, d = 72,
# L = 120, CUDA-graph timing, 2026-11-21). Forward at B64 N256 / B32 N1024: (64, 4) 78 / 132 us,
# (128, 8) 102 / 171, (64, 8) 128 / 223, (32, 4) 146 / 267; (128, 4) faulted (an illegal shared
# memory read inside Triton's code for the first tl.dot). Backward: (64, 8) 284 / 487 us,
# (32, 8) 345 / 609, (64, 4) 612 / 1126 (spills), (128, 8) 1835. A backward split in two passes
# (dq over query blocks, then dk/dv over 64-key blocks, flash-attention 2's layout) was slower
# at every tiling tried: 444 us at best for B64 N256.
# The backward without reading O (delta from P and dP; H200, B64 N256 / B32 N1024, full 120-key
# captions; bench/results/h200_cross_attention_bwd_sweep_919055b.txt): (64, 8) 220 / 367 us
# against 284 / 489 reading O; with 2 software-pipeline stages 215 / 360 (1 stage 251 / 435, 4
# stages 222 / 370, Triton's default 3 is the 220); (128, 8) 278 / 439, (32, 8) 307 / 537, (64, 4)
# 350 / 601, (32, 4) 453 / 831.
# With 16-byte vector loads and stores (_offset_alignment; H100, same shapes;
# bench/results/h100_cross_attention_vectorised_sweep_9522df4.txt; in brackets the same config
# with scalar accesses, ALIGN forced to 1): forward (64, 4) 63.6 / 91.2 us [79.7 / 137.3], 2
# stages 64.3 / 114.8, (128, 8) 78.4 / 105.2, (64, 8) 98.9 / 148.7, (32, 4) 117.7 / 197.6;
# backward (64, 8) with 3 stages 152.2 / 229.1, 2 stages 159.1 / 261.1 [216.6 / 363.7], 1 stage
# 224.8 / 391.5, (128, 8) 167.1 / 260.8, (32, 4) 229.0 / 390.8, (64, 4) 248.8 / 418.0, (32, 8)
# 252.2 / 443.7. The eager backend (mask built per call) on cuDNN, forward + backward, in the
# same run: 498.1 / 883.0 us.
FWD_CONFIG = (64, 4)
FWD_STAGES = 3  # Triton's default
BWD_CONFIG = (64, 8)
BWD_STAGES = 3
# Where a head's queries fit one 64-row block (MicroDiT's 64 kept tokens at 256 px), a program
# has one block to work on and 4 warps do better. H100, bf16, d = 64, backward us by (BLOCK_M,
# num_warps), bench/results/h100_attention_sweep_microdit_959771d.jsonl: B256 N64 L77 (64, 4)
# 132.0, (64, 8) 190.6, (32, 4) 149.8; B256 N64 keys = the 64 queries (self-attention) 97.1,
# 111.3, 90.6. At N = 256 (B64, L77) (64, 8) stays: 108.1 against (64, 4) 158.1.
BWD_CONFIG_ONE_BLOCK = (64, 4)
# fp32 inputs (a testing dtype) take true fp32 products, which Triton runs on CUDA cores with
# fp32 copies of the tiles in shared memory: smaller query blocks keep the backward under the
# 227 KB a block may have (ptxas for sm_90: 135 KB at 32 rows, 225 KB at 64).
FWD_CONFIG_FP32 = (64, 4)
BWD_CONFIG_FP32 = (32, 4)


def _config(q: torch.Tensor, gpu_config: tuple[int, int], gpu_fp32_config: tuple[int, int]) -> tuple[int, int]:
    if q.device.type == "cuda":
        return gpu_fp32_config if q.dtype == torch.float32 else gpu_config
    # Under the CPU interpreter every tile op is one numpy call whose fixed cost dominates:
    # fewer, taller query blocks run faster.
    return min(256, max(16, triton.next_power_of_2(q.shape[1]))), 4


def _head_split(d: int) -> tuple[int, int]:
    """(D0, D1): main tile width, the largest power of two <= d (tl.dot needs >= 16), and the
    tail's width (0 when the main part covers d): d = 72 -> (64, 16), 64 -> (64, 0). A 32-wide
    tail was slower on the H100 (forward 87 vs 78 us, backward 414 vs 284 at B64 N256)."""
    main = max(16, 1 << (d.bit_length() - 1))
    tail = 0 if d <= main else max(16, triton.next_power_of_2(d - main))
    return main, tail


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 inputs: true fp32 products, since on the GPU tl.dot would otherwise round to tf32
    # (the setting is ignored for bf16 / fp16).
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Any layout whose last dimension is dense: views into a fused projection pass as they are.
    return t if t.stride(-1) == 1 else t.contiguous()


def _offset_alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two, up to 16 bytes' worth of elements, dividing every stride but the
    last of every tensor: the kernels declare their per-(sample, head) offsets and row strides
    multiples of it. Without that Triton sees the head stride (d = 72 is not a multiple of 16)
    and emits one 2-byte load per element: ptxas for sm_90 showed 200 scalar ld.global.b16 and
    200 st.global.b16 in the backward."""
    align = 16 // tensors[0].element_size()
    while align > 1 and any(s % align for t in tensors for s in t.stride()[:-1]):
        align //= 2
    return align


def _default_splits(q: torch.Tensor, block_m: int, programs_per_head: int = 1) -> int:
    """Query splits per (sample, head): one unless B*H*programs_per_head programs would leave
    the GPU short of two per multiprocessor (small batches, long sequences)."""
    if q.device.type != "cuda":
        return 1
    B, N, H, _ = q.shape
    wanted = 2 * multiprocessors(q.device)
    return max(1, min(triton.cdiv(N, block_m), triton.cdiv(wanted, B * H * programs_per_head)))


def _cross_attention_fwd_triton(q, k, v, kv_lens, block_m=None, num_warps=None, splits=None, half_tile=True,
                                num_stages=FWD_STAGES):
    """q (B, N, H, d), k, v (B, L, H, d) with unit last stride. Returns (o (B, N, H, d) contiguous,
    lse (B, H, N) fp32: base-2 log-sum-exp of the scaled scores, -inf where a row has no keys)."""
    B, N, H, d = q.shape
    L = k.shape[1]
    default_block_m, default_warps = _config(q, FWD_CONFIG, FWD_CONFIG_FP32)
    block_m, num_warps = block_m or default_block_m, num_warps or default_warps
    splits = splits or _default_splits(q, block_m)
    d0, d1 = _head_split(d)
    block_l = max(32, triton.next_power_of_2(L))  # >= 32: the half tile still meets tl.dot's 16
    o = _new_output((B, N, H, d), q.dtype, q.device)
    lse = _new_output((B, H, N), torch.float32, q.device)
    _cross_attention_fwd_kernel[(splits, H, B)](
        q, k, v, kv_lens, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        N, L, H, triton.cdiv(triton.cdiv(N, block_m), splits), math.log2(math.e) / math.sqrt(d),
        D=d, BLOCK_M=block_m, BLOCK_L=block_l, D0=d0, D1=d1, ALIGN=_offset_alignment(q, k, v, o),
        HALF_TILE=half_tile,
        PRECISION=_dot_precision(q), num_warps=num_warps, num_stages=num_stages)
    return o, lse


def _cross_attention_bwd_triton(do, q, k, v, lse, kv_lens, block_m=None, num_warps=None, splits=None,
                                half_tile=True, num_stages=BWD_STAGES):
    """Returns (dq (B, N, H, d), dk, dv (B, L, H, d)), contiguous, in the inputs' dtype."""
    B, N, H, d = q.shape
    L = k.shape[1]
    one_block = N <= BWD_CONFIG_ONE_BLOCK[0]
    default_block_m, default_warps = _config(q, BWD_CONFIG_ONE_BLOCK if one_block else BWD_CONFIG, BWD_CONFIG_FP32)
    block_m, num_warps = block_m or default_block_m, num_warps or default_warps
    splits = splits or _default_splits(q, block_m)
    d0, d1 = _head_split(d)
    block_l = max(32, triton.next_power_of_2(L))
    dq = _new_output((B, N, H, d), q.dtype, q.device)
    # One split writes dk, dv directly; several write fp32 partials for a sum below.
    part_shape, part_dtype = ((B, L, H, d), k.dtype) if splits == 1 else ((splits, B, L, H, d), torch.float32)
    dk = _new_output(part_shape, part_dtype, q.device)
    dv = _new_output(part_shape, part_dtype, q.device)
    split_stride = 0 if splits == 1 else dk.stride(0)
    dk_strides = (split_stride,) + dk.stride()[-4:-1]
    dv_strides = (split_stride,) + dv.stride()[-4:-1]
    _cross_attention_bwd_kernel[(splits, H, B)](
        q, k, v, do, lse, kv_lens, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        *dk_strides, *dv_strides,
        N, L, H, triton.cdiv(triton.cdiv(N, block_m), splits), 1 / math.sqrt(d), math.log2(math.e) / math.sqrt(d),
        D=d, BLOCK_M=block_m, BLOCK_L=block_l, D0=d0, D1=d1, ALIGN=_offset_alignment(q, k, v, do, dq, dk, dv),
        HALF_TILE=half_tile,
        PRECISION=_dot_precision(q), num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)  # (B, L, H, d) each
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library registration: the kernels are opaque custom ops with fake implementations and
# an autograd formula, so torch.compile(fullgraph=True) traces the op without a graph break.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::cross_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kv_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of the Triton forward."""
    return _cross_attention_fwd_triton(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), kv_lens)


@_fwd_op.register_fake
def _(q, k, v, kv_lens):
    B, N, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("engine::cross_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            lse: torch.Tensor, kv_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the Triton backward."""
    return _cross_attention_bwd_triton(*(_unit_last_stride(t) for t in (do, q, k, v)), lse, kv_lens)


@_bwd_op.register_fake
def _(do, q, k, v, lse, kv_lens):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_lens = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, lse, kv_lens)  # not o: the backward needs only P and dP


def _backward(ctx, do, _dlse):
    q, k, v, lse, kv_lens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, lse, kv_lens)
    return dq, dk, dv, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, kv_lens) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"cross_attention expects q (B, N, H, d) and k, v (B, L, H, d); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("cross_attention: q, k, v must share one floating-point dtype, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_lens is None:
        return
    if kv_lens.shape != (q.shape[0],):
        raise ValueError(f"cross_attention: kv_lens must have shape ({q.shape[0]},), got {tuple(kv_lens.shape)}")
    if kv_lens.is_floating_point() or kv_lens.is_complex() or kv_lens.dtype == torch.bool:
        raise TypeError(f"cross_attention: kv_lens must be an integer tensor, got {kv_lens.dtype}")
    for name, t in (("k", k), ("v", v), ("kv_lens", kv_lens)):
        if t.device != q.device:
            raise ValueError(f"cross_attention: {name} is on {t.device} but q is on {q.device}")


def _check_kernel_limits(q, k, backend) -> None:
    L, d = k.shape[1], q.shape[3]
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"cross_attention: the {backend} backend takes {KERNEL_DTYPES}, got {q.dtype}; "
                        "use backend='eager'")
    if L > MAX_KERNEL_KEYS:
        raise ValueError(f"cross_attention: the {backend} backend holds all keys in one tile, so L <= "
                         f"{MAX_KERNEL_KEYS}; got L = {L}; use backend='eager'")
    if d > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"cross_attention: the {backend} backend takes head dim d <= {MAX_KERNEL_HEAD_DIM}, got {d}")


# auto's order on CUDA. Triton first: forward + backward 241.7 us against masked SDPA's fastest
# kernel (cuDNN) 416.4 us at B64 N256 (1.72x), 330.9 against 701.2 at B32 N1024 (2.12x), full
# 120-key captions; 1.98x / 2.23x with random caption lengths (H100, bench/kernels.py --ops
# cross_attention --timer cudagraph; bench/results/h100_kernels_cross_attention_15a2a11.json).
AUTO_PREFERENCE: tuple[str, ...] = ("triton",)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
                    backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over each sample's first kv_lens[b] keys -> (B, N, H, d).

    q (B, N, H, d); k, v (B, L, H, d), any strides with a dense last dimension (views into a
    fused kv projection are fine); kv_lens (B,) integer tensor on q's device (never read on the
    host), or None when every key is valid (MicroDiT's unmasked captions: the eager backend then
    runs SDPA without a mask). backend: "eager" (SDPA), "triton", "cuda" (flash-attn varlen, when
    importable), "auto" or None (see engine.ops.backend): triton on CUDA tensors (the fastest
    measured), eager on the CPU.
    """
    _check_inputs(q, k, v, kv_lens)
    name = resolve(backend, q.device, "cross_attention", prefer=AUTO_PREFERENCE)
    if name == "eager":
        return _cross_attention_sdpa(q, k, v, kv_lens)
    if kv_lens is None:  # the kernels mask by length: every length L
        kv_lens = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)  # (B,)
    if name == "cuda":
        if _flash_attn_varlen_func is None:
            raise RuntimeError("cross_attention: backend 'cuda' runs flash-attn's flash_attn_varlen_func, "
                               "and the flash_attn package is not importable here; use 'triton' or 'eager'")
        return _cross_attention_flash(q, k, v, kv_lens)
    _check_kernel_limits(q, k, name)
    o, _ = _fwd_op(q, k, v, kv_lens)
    return o
