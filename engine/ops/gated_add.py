"""Gated residual add: r + a * gate, the gate one value per (sample, channel).

r, a (B, N, D) activations; gate (B, D) (adaLN's gate_msa, usually fp32 under autocast);
returns (B, N, D) in the promoted dtype of r and a, as eager's. PixArt adds its self-attention output this way
(x = r + gate_msa * attn(h)); the MLP's gated add is already inside add_norm_modulate.

Why an op. Eager runs the forward as a broadcast multiply and an add (two passes, the multiply
on TensorIterator's non-vectorised broadcast path), and the backward as another broadcast
multiply for d_a, a multiply and a reduction over tokens for d_gate: on the H200 profile of the
PixArt-XL/2 step (256px, batch 64; docs/performance.md) the two broadcast multiplies alone took
3.1 ms a step, 56 us a call, about twice their bytes at copy bandwidth. Here the forward is one pass
(read r, a; write out) and the backward one pass (read d_out, a; write d_a) that also sums
d_out * a over the tokens in fp32; d_r is d_out itself.

Backends: ``eager`` (the expression above, autograd's formulas: the reference), ``triton``;
``cuda``: no csrc/ kernel (both passes are plain streaming loops Triton already writes at copy
bandwidth); asking for it is an error. ``auto``: triton on CUDA, eager on the CPU and under
torch.compile (Inductor fuses the broadcast multiply and add itself).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from engine.ops.backend import multiprocessors, requested, resolve
from engine.ops.split_sums import arrival_counters, last_to_arrive, sum_splits


def gated_add_ref(r: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The definition: r + a * gate[:, None], gate cast to a's dtype first (the model's eager
    expression)."""
    return r + a * gate[:, None].to(a.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Both work on (B, N, D) tensors with unit channel stride; a program covers
# BLOCK_D channels of one sample and a range of its tokens.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _gated_add_fwd_kernel(r_ptr, a_ptr, gate_ptr, out_ptr, N, D, tokens_per_program,
                          stride_rb, stride_rn, stride_ab, stride_an, stride_gb, stride_ob, stride_on,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (d, s, b): channels [d BLOCK_D, ...) of tokens [s tokens_per_program, ...) of sample b."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    gate = tl.load(gate_ptr + b * stride_gb + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    begin = pid_s * tokens_per_program
    end = tl.minimum(begin + tokens_per_program, N)
    for n0 in range(begin, end, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        ok = (rows < end)[:, None] & col_ok[None, :]
        r = tl.load(r_ptr + b * stride_rb + rows[:, None] * stride_rn + cols[None, :], mask=ok, other=0.0)
        a = tl.load(a_ptr + b * stride_ab + rows[:, None] * stride_an + cols[None, :], mask=ok, other=0.0)
        out = r.to(tl.float32) + a.to(tl.float32) * gate[None, :]
        tl.store(out_ptr + b * stride_ob + rows[:, None] * stride_on + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_add_bwd_kernel(dout_ptr, a_ptr, gate_ptr, da_ptr, partial_ptr, dgate_ptr, counter_ptr, N, D,
                          tokens_per_program, stride_dob, stride_don, stride_ab, stride_an, stride_gb, stride_dab,
                          stride_dan, stride_ps, stride_pb,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_TILE: tl.constexpr):
    """Program (d, s, b): d_a = d_out * gate for its tokens, and partial[s, b, cols] = the fp32
    sum over its tokens of d_out * a (the d_gate contribution of token range s); the last of a
    (d, b)'s token ranges to finish sums them into d_gate[b, cols] (engine.ops.split_sums)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    gate = tl.load(gate_ptr + b * stride_gb + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    begin = pid_s * tokens_per_program
    end = tl.minimum(begin + tokens_per_program, N)
    for n0 in range(begin, end, BLOCK_N):
        rows = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        ok = (rows < end)[:, None] & col_ok[None, :]
        g = tl.load(dout_ptr + b * stride_dob + rows[:, None] * stride_don + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        a = tl.load(a_ptr + b * stride_ab + rows[:, None] * stride_an + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        tl.store(da_ptr + b * stride_dab + rows[:, None] * stride_dan + cols[None, :],
                 (g * gate[None, :]).to(da_ptr.dtype.element_ty), mask=ok)
        acc += g * a
    tl.store(partial_ptr + pid_s * stride_ps + b * stride_pb + cols, tl.sum(acc, axis=0), mask=col_ok)
    if last_to_arrive(counter_ptr, b * tl.num_programs(0) + pid_d, tl.num_programs(1)):
        sum_splits(partial_ptr + b * stride_pb, dgate_ptr + b * D, cols, col_ok, tl.num_programs(1), stride_ps,
                   BLOCK_D, SPLIT_TILE)


# (BLOCK_N, BLOCK_D, num_warps, programs per multiprocessor the token split aims for).
# A first choice after the linear op's bias-sum sweep (short row blocks, many programs in
# flight); not swept for this op yet.
FWD_CONFIG = (16, 128, 4, 8)
BWD_CONFIG = (16, 128, 4, 8)
SPLIT_TILE = 8  # token ranges the finishing program sums at once (2 per sample at 256 px / 64)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation point of every kernel output (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_split(B: int, N: int, D: int, config: tuple[int, int, int, int], device: torch.device) -> tuple[int, int]:
    """(programs per sample's channel block, tokens each): enough programs over the grid for
    the config's programs per multiprocessor, each at least one row block."""
    block_n, block_d, _, programs_per_sm = config
    sms = multiprocessors(device) if device.type == "cuda" else 2
    wanted = programs_per_sm * sms
    splits = max(1, min(triton.cdiv(N, block_n), triton.cdiv(wanted, B * triton.cdiv(D, block_d))))
    tokens = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    return triton.cdiv(N, tokens), tokens


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward_impl(r: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    r, a, gate = _unit_channel_stride(r), _unit_channel_stride(a), _unit_channel_stride(gate)
    B, N, D = a.shape
    out = _new_output((B, N, D), torch.promote_types(r.dtype, a.dtype), a.device)
    if out.numel() == 0:
        return out
    block_n, block_d, num_warps, _ = FWD_CONFIG
    splits, tokens = _token_split(B, N, D, FWD_CONFIG, a.device)
    _gated_add_fwd_kernel[(triton.cdiv(D, block_d), splits, B)](
        r, a, gate, out, N, D, tokens, r.stride(0), r.stride(1), a.stride(0), a.stride(1), gate.stride(0),
        out.stride(0), out.stride(1), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    return out


def _backward_impl(dout: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_a in a's dtype, d_gate (B, D) in gate's dtype)."""
    dout, a, gate = _unit_channel_stride(dout), _unit_channel_stride(a), _unit_channel_stride(gate)
    B, N, D = a.shape
    da = _new_output((B, N, D), a.dtype, a.device)
    if da.numel() == 0:
        return da, torch.zeros((B, D), dtype=gate.dtype, device=gate.device)
    block_n, block_d, num_warps, _ = BWD_CONFIG
    splits, tokens = _token_split(B, N, D, BWD_CONFIG, a.device)
    partial = _new_output((splits, B, D), torch.float32, a.device)
    dgate = _new_output((B, D), gate.dtype, a.device)
    column_blocks = triton.cdiv(D, block_d)
    _gated_add_bwd_kernel[(column_blocks, splits, B)](
        dout, a, gate, da, partial, dgate, arrival_counters(B * column_blocks, a.device), N, D, tokens,
        dout.stride(0), dout.stride(1), a.stride(0), a.stride(1), gate.stride(0), da.stride(0), da.stride(1),
        partial.stride(0), partial.stride(1), BLOCK_N=block_n, BLOCK_D=block_d, SPLIT_TILE=SPLIT_TILE,
        num_warps=num_warps)
    return da, dgate


# ---------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile traces for an explicit backend="triton"); in
# eager mode the autograd Function calls the implementations directly, skipping the custom-op
# dispatcher's host cost (see engine.ops.linear).
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::gated_add_fwd", mutates_args=())
def _fwd_op(r: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return _forward_impl(r, a, gate)


@_fwd_op.register_fake
def _(r, a, gate):
    return a.new_empty(a.shape, dtype=torch.promote_types(r.dtype, a.dtype))


@torch.library.custom_op("engine::gated_add_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, a: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, a, gate)


@_bwd_op.register_fake
def _(dout, a, gate):
    return a.new_empty(a.shape), gate.new_empty((a.shape[0], a.shape[2]))


class _GatedAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, a, gate):
        out = (_fwd_op if torch.compiler.is_compiling() else _forward_impl)(r, a, gate)
        ctx.save_for_backward(a, gate)
        ctx.r_dtype = r.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        a, gate = ctx.saved_tensors
        need_dr, need_da, need_dgate = ctx.needs_input_grad
        da = dgate = None
        if need_da or need_dgate:
            da, dgate = (_bwd_op if torch.compiler.is_compiling() else _backward_impl)(dout, a, gate)
        dr = dout.to(ctx.r_dtype) if need_dr else None  # the same tensor when the dtypes match
        return dr, (da if need_da else None), (dgate if need_dgate else None)


# ---------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------

def _check_inputs(r, a, gate) -> None:
    if a.dim() != 3 or r.shape != a.shape:
        raise ValueError(f"gated_add expects r and a of one shape (B, N, D); got r {tuple(r.shape)}, "
                         f"a {tuple(a.shape)}")
    if gate.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"gated_add: gate must have shape (B, D) = ({a.shape[0]}, {a.shape[2]}), "
                         f"got {tuple(gate.shape)}")
    for name, t in (("r", r), ("a", a), ("gate", gate)):
        if not t.is_floating_point():
            raise TypeError(f"gated_add: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != a.device:
            raise ValueError(f"gated_add: {name} is on {t.device} but a is on {a.device}")


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# auto's order on CUDA (outside torch.compile, which gets eager: see the module docstring).
AUTO_PREFERENCE: tuple[str, ...] = ("triton",)


def gated_add(r: torch.Tensor, a: torch.Tensor, gate: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """r + a * gate[:, None] -> (B, N, D): r, a (B, N, D), gate (B, D); any strides
    with a dense last dimension. backend: "eager", "triton", "auto" or None (see
    engine.ops.backend): triton on CUDA tensors, eager on the CPU and inside torch.compile."""
    _check_inputs(r, a, gate)
    if torch.compiler.is_compiling() and requested(backend, "gated_add") == "auto":
        name = "eager"
    else:
        name = resolve(backend, a.device, "gated_add", prefer=AUTO_PREFERENCE)
    if name == "eager":
        return gated_add_ref(r, a, gate)
    if name == "cuda":
        raise RuntimeError("gated_add: there is no 'cuda' backend (no csrc/ kernel: two streaming passes "
                           "that Triton runs as they are); use 'triton' or 'eager'")
    if any(t.dtype not in KERNEL_DTYPES for t in (r, a, gate)):
        raise TypeError(f"gated_add: the triton backend computes in fp32 and takes {KERNEL_DTYPES}, got r {r.dtype}, "
                        f"a {a.dtype}, gate {gate.dtype}; use backend='eager'")
    return _GatedAddFunction.apply(r, a, gate)
