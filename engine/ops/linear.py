"""Linear layer, optionally followed by tanh-GELU, with the bias gradient fused into one pass.

y = act(x W^T + b): x (..., K), weight (N, K), bias (N,) or None; act is the identity or
PixArt's tanh-approximated GELU (``activation="gelu_tanh"``).

Why an op for a Linear. The GEMMs stay cuBLAS's (torch.mm / F.linear); what changes is the
work around them in the backward. Eager autograd computes a Linear's bias gradient as a
separate column sum of the output gradient over all tokens: on the H100 profile of a
PixArt-XL/2 step with eager Linears (256px, batch 64; bench/results/h100_profile_256_b64_engine.md)
those sums are 231 launches of a reduction kernel, 9.0 ms of a 151 ms step, reading ~12.6 GB at
~42% of copy bandwidth. For the MLP's first Linear eager also runs GELU's backward as its own
pass (4.2 ms), whose output the bias sum then reads again. Here:

- ``activation=None``: the backward sums the output gradient with a Triton reduction
  (``_bias_grad_kernel`` of engine.ops._gemm, GELU off) that splits the tokens over enough
  programs to fill the GPU and accumulates in fp32, then one small deterministic sum of the
  per-program partials;
- ``activation="gelu_tanh"``: the forward keeps the pre-activation (eager keeps the same tensor
  for GELU's backward, so memory is unchanged); the backward's one Triton pass reads the
  gradient and the pre-activation, writes d_pre = dy * GELU'(pre) and accumulates its column
  sums as it goes, replacing eager's GELU-backward pass plus the bias-sum pass.

Backends:
- ``eager``: F.linear (+ F.gelu), with PyTorch's own autograd: the reference;
- ``triton``: the above;
- ``cuda``: the same Triton passes, and every GEMM through cuBLASLt (engine._C.gemm_epilogue,
  csrc/gemm_epilogue.cu) with the kernel chosen per GEMM shape by timing cuBLASLt's candidates on
  first use (engine.ops._gemm); the forward GEMM adds the bias, and for GELU writes the
  activation and its saved input, in its epilogue, so GELU's forward pass goes. On CPU tensors
  the same calls run engine._C's C++ reference (tests). cuBLASLt's bias-gradient epilogues
  measured slower than the plain GEMM plus the Triton pass, so none is used; GELU's backward in
  the next Linear's input-gradient GEMM (DGELU) is used by engine.ops.mlp, which sees both Linears.

Under ``torch.compile`` ``auto`` resolves to ``eager``: Inductor then fuses the bias sum and the
GELU with their neighbours itself, which an opaque custom op would prevent.

Autocast: the op casts x, weight and bias to the autocast dtype itself (what autocast does for
F.linear) and returns the weight and bias gradients in the parameters' dtype: fp32 parameters
get fp32 gradients out of the GEMM's accumulator and the column sum, with no bf16 rounding and no
cast pass in between (eager rounds dW to bf16, then casts it up). ``weight_lp`` / ``bias_lp``
hand the op the parameters already in the compute dtype (the copies engine.optim.AdamW writes:
engine.model.layers.Linear passes them), which it then reads instead of casting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops import _gemm
from engine.ops.backend import requested, resolve

ACTIVATIONS = (None, "gelu_tanh")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """The definition: act(x W^T + b) in x's dtype."""
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


# ---------------------------------------------------------------------------------------------
# Triton: linear_chunks' gradient parts packed and summed for the bias gradient in one pass.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _pack_bias_grad_kernel(g0_ptr, g1_ptr, g2_ptr, out_ptr, partial_ptr, M, N_CHUNK, rows_per_program,
                           stride_g0, stride_g1, stride_g2, stride_out,
                           CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n, s, c): columns [n BLOCK_N, (n+1) BLOCK_N) of chunk c's gradient g_c (M, N_CHUNK),
    rows [s rows_per_program, ...). Copies them into columns c N_CHUNK + ... of the packed
    (M, CHUNKS N_CHUNK) gradient and writes their fp32 column sums to partial[s]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    chunk = tl.program_id(2)
    src, stride = g0_ptr, stride_g0
    if CHUNKS > 1:
        if chunk == 1:
            src, stride = g1_ptr, stride_g1
    if CHUNKS > 2:
        if chunk == 2:
            src, stride = g2_ptr, stride_g2
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N_CHUNK
    row_begin = pid_s * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_M):
        rows = (row0 + tl.arange(0, BLOCK_M))[:, None].to(tl.int64)
        ok = (rows < row_end) & col_ok[None, :]
        g = tl.load(src + rows * stride + cols[None, :], mask=ok, other=0.0)
        tl.store(out_ptr + rows * stride_out + (chunk * N_CHUNK + cols)[None, :], g, mask=ok)
        acc += g.to(tl.float32)
    tl.store(partial_ptr + pid_s * (CHUNKS * N_CHUNK) + chunk * N_CHUNK + cols, tl.sum(acc, axis=0), mask=col_ok)


MAX_CHUNKS = 3  # linear_chunks' packing kernel takes up to three gradient pointers (q, k, v)
# (BLOCK_M, BLOCK_N, num_warps, programs per multiprocessor) of the packing pass. It stores as much
# as it loads, so it wants wider tiles than the read-only column sum: three 16384 x 1152 bf16
# parts (PixArt-XL/2's qkv at 256 px / 64) take 88.8 us with (32, 128, 4, 4), 88.0 with (64, 128,
# 8, 2), 99.9 with the column sum's (16, 64, 8, 4), against 120.3 us for torch.cat plus the column
# sum (H100, CUDA-graph timer; bench/results/h100_linear_chunks_ab_862d842.txt).
PACK_CONFIG = (32, 128, 4, 4)


def _pack_bias_grad_triton(grads: list[torch.Tensor], bias_dtype: torch.dtype):
    """(dy (M, C N_c) packed, column sums (C N_c,) in bias_dtype) from C chunk gradients, each
    (M, N_c) with unit column stride, in one pass: what torch.cat and the column sum of
    engine.ops._gemm.bias_grad would do in two, each reading every element."""
    M, n_chunk = grads[0].shape
    chunks = len(grads)
    N = chunks * n_chunk
    packed = _gemm.new_output((M, N), grads[0].dtype, grads[0].device)
    if M == 0:
        return packed, torch.zeros(N, dtype=bias_dtype, device=packed.device)
    block_m, block_n, num_warps, programs_per_sm = PACK_CONFIG
    column_blocks = triton.cdiv(n_chunk, block_n)
    splits, rows_per_program = _gemm.split_rows(M, column_blocks * chunks, block_m, programs_per_sm, packed.device)
    partial = _gemm.new_output((splits, N), torch.float32, packed.device)
    pointers = grads + grads[:1] * (MAX_CHUNKS - chunks)  # unused slots: never read
    _pack_bias_grad_kernel[(column_blocks, splits, chunks)](
        *pointers, packed, partial, M, n_chunk, rows_per_program, *(g.stride(0) for g in pointers), packed.stride(0),
        CHUNKS=chunks, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return packed, _gemm.sum_partials(partial, bias_dtype)


# ---------------------------------------------------------------------------------------------
# Forward and backward on 2-D views: cuBLAS (torch) or tuned cuBLASLt GEMMs, Triton bias gradient.
# ---------------------------------------------------------------------------------------------

def _forward_impl(x, weight, bias, gelu, backend):
    if backend == "cuda" and x.numel() > 0:  # one cuBLASLt GEMM: bias, GELU and GELU's saved input in its epilogue
        N, K = weight.shape
        y, pre = _gemm.cublaslt_forward(_gemm.row_major(x.reshape(-1, K)), _gemm.row_major(weight), bias, gelu)
        return y.view(*x.shape[:-1], N), (pre.view(*x.shape[:-1], N) if gelu else pre)
    pre = F.linear(x, weight, bias)
    if gelu:
        return F.gelu(pre, approximate="tanh"), pre
    return pre, pre.new_empty(0)


def _backward_impl(dy, x, weight, pre, gelu, has_bias, need_dx, need_dw, grad_dtype, backend):
    N, K = weight.shape
    dy2 = dy.reshape(-1, N)
    x2 = x.reshape(-1, K)
    dpre, db = dy2, weight.new_empty(0, dtype=grad_dtype)
    cublaslt = backend == "cuda" and dy2.shape[0] > 0  # GEMMs through the tuned cuBLASLt path
    if gelu or has_bias:  # one Triton pass: d_pre through GELU's backward and its column sums
        dpre, column_sums = _gemm.bias_grad(dy2, pre.reshape(-1, N) if gelu else None, grad_dtype)
        db = column_sums if has_bias else db
    dx, dw = _gemm.gemm_grads(dpre, x2, weight, need_dx, need_dw, grad_dtype, cublaslt)
    return (dx.view(*dy.shape[:-1], K) if need_dx else dx), dw, db


# ---------------------------------------------------------------------------------------------
# torch.library registration: forward and backward are also custom ops with fake
# implementations, which is what torch.compile traces (an explicit backend="triton" under
# compile). In eager mode the autograd Function below calls the implementations directly: the
# custom-op dispatcher costs ~20 us of host time a call (engine.ops.norm_modulate), and the
# PixArt-XL/2 step has 226 Linears, each a forward and a backward call.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::linear_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            gelu: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, pre): pre = x W^T + b by cuBLAS and y = GELU(pre) when gelu; without it y = x W^T + b
    and pre is an empty placeholder (a custom op's outputs may not alias each other)."""
    return _forward_impl(x, weight, bias, gelu, backend)


@_fwd_op.register_fake
def _(x, weight, bias, gelu, backend):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, (x.new_empty(y.shape) if gelu else x.new_empty(0))


@torch.library.custom_op("engine::linear_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, gelu: bool,
            has_bias: bool, need_dx: bool, need_dw: bool, grad_dtype: torch.dtype,
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db), dw and db in grad_dtype (the parameters'); an output that is not needed
    comes back empty."""
    return _backward_impl(dy, x, weight, pre, gelu, has_bias, need_dx, need_dw, grad_dtype, backend)


@_bwd_op.register_fake
def _(dy, x, weight, pre, gelu, has_bias, need_dx, need_dw, grad_dtype, backend):
    N = weight.shape[0]
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape, dtype=grad_dtype) if need_dw else weight.new_empty(0, dtype=grad_dtype),
            weight.new_empty((N,), dtype=grad_dtype) if has_bias else weight.new_empty(0, dtype=grad_dtype))


class _LinearFunction(torch.autograd.Function):
    """Casts to the compute dtype inside the Function (autocast's job for F.linear), so the
    backward can hand fp32 parameters fp32 gradients straight from the GEMM and the column sum.
    Its one output is y: the GELU Linear's pre-activation is saved, not returned, so autograd has
    no zero gradient to materialise for it (as an output of the registered custom op it cost a
    151 MB fill per MLP, 1.3 ms a step on the H200 profile of the PixArt-XL/2 step;
    docs/performance.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_lp, bias_lp, gelu, dtype, backend):
        x_low, w_low, b_low = _gemm.cast_operands(x, weight, bias, dtype, weight_lp, bias_lp)
        run = _fwd_op if torch.compiler.is_compiling() else _forward_impl
        y, pre = run(x_low, w_low, b_low, gelu, backend)
        ctx.save_for_backward(x_low, w_low, pre)
        ctx.gelu, ctx.has_bias, ctx.grad_dtype, ctx.backend = gelu, bias is not None, weight.dtype, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, pre = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        run = _bwd_op if torch.compiler.is_compiling() else _backward_impl
        dx, dw, db = run(dy.contiguous(), x, weight, pre, ctx.gelu, ctx.has_bias and need_db, need_dx, need_dw,
                         ctx.grad_dtype, ctx.backend)
        return (dx if need_dx else None, dw if need_dw else None,
                db if ctx.has_bias and need_db else None, None, None, None, None, None)


class _LinearChunksFunction(torch.autograd.Function):
    """A Linear whose output is used as ``chunks`` equal parts of its last dimension (a fused QKV
    or KV projection). Returned as separate views, each part's gradient reaches the backward on
    its own, so packing them for the GEMMs and summing them for the bias gradient are one pass
    (_pack_bias_grad_kernel) instead of autograd's concatenation (unbind's backward) plus the
    bias gradient's column sum, which read every element twice (the concatenations: 2.8 ms, 56 a
    step, in the H100 profile of the graphed step,
    bench/results/h100_profile_256_b64_engine_graph_9522df4.md). On the whole step (H100,
    engine+graph at 256 px / 64, two alternating pairs in one process, the pass on the column
    sum's tiling): 483.6 / 480.7 img/s against 479.2 / 479.8 with linear(...).chunk(...), i.e.
    +0.2-0.9% (bench/results/h100_linear_chunks_ab_862d842.txt).

    With ``branch`` the input comes back too, as a last output, for the caller's other uses of x
    (linear_branch): the gradient those uses send back is added to dx by the input-gradient GEMM
    (cuBLASLt's C) instead of by autograd's separate add of the two."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_lp, bias_lp, chunks, branch, dtype, backend):
        x_low, w_low, b_low = _gemm.cast_operands(x, weight, bias, dtype, weight_lp, bias_lp)
        y, _ = _forward_impl(x_low, w_low, b_low, False, backend)
        ctx.save_for_backward(x_low, w_low)
        ctx.has_bias, ctx.grad_dtype, ctx.backend, ctx.chunks = bias is not None, weight.dtype, backend, chunks
        ctx.x_dtype = x.dtype
        parts = tuple(y.chunk(chunks, dim=-1))
        return (*parts, x) if branch else parts  # x itself: autograd hands the caller a view of it

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        N, K = weight.shape
        lead = x.shape[:-1]
        grads, dx_branch = grads[:ctx.chunks], (grads[ctx.chunks] if len(grads) > ctx.chunks else None)
        parts = [(g if g is not None else x.new_zeros((*lead, N // ctx.chunks))).reshape(-1, N // ctx.chunks)
                 for g in grads]
        if ctx.chunks == 1:  # nothing to pack: the column sum reads the one gradient
            dy2 = _gemm.row_major(parts[0])
            db = _gemm.bias_grad(dy2, None, ctx.grad_dtype)[1] if ctx.has_bias and need_db else None
        else:
            dy2, db = _pack_bias_grad_triton([_gemm.row_major(g) for g in parts], ctx.grad_dtype)
        cublaslt = ctx.backend == "cuda" and dy2.shape[0] > 0
        dx_add = dx_branch.reshape(-1, K) if dx_branch is not None else None
        dx, dw = _gemm.gemm_grads(dy2, x.reshape(-1, K), weight, need_dx, need_dw, ctx.grad_dtype, cublaslt, dx_add)
        return (dx.view(*lead, K).to(ctx.x_dtype) if need_dx else None, dw if need_dw else None,
                db if ctx.has_bias and need_db else None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------

def _check_inputs(x, weight, bias, activation, weight_lp, bias_lp, caller) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{caller}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{caller} expects x (..., K) and weight (N, K); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{caller}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _gemm.check_copy(caller, "weight", weight, weight_lp)
    _gemm.check_copy(caller, "bias", bias, bias_lp)


def _backend_name(x: torch.Tensor, backend: str | None, caller: str) -> str:
    """The backend linear and linear_chunks run: eager for ``auto`` under torch.compile (module
    docstring), else resolved with engine.ops._gemm's ``auto_preference``; a cuda backend without
    cuBLASLt is an error."""
    if torch.compiler.is_compiling() and requested(backend, "linear") == "auto":
        return "eager"
    name = resolve(backend, x.device, "linear", prefer=_gemm.auto_preference(x.device.type))
    if name == "cuda":
        _gemm.require_cublaslt(x.device.type, caller)
    return name


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, backend: str | None = None, *,
           weight_lp: torch.Tensor | None = None, bias_lp: torch.Tensor | None = None) -> torch.Tensor:
    """act(x W^T + b) -> (..., N): x (..., K), weight (N, K), bias (N,) or None; activation None
    or "gelu_tanh". backend: "eager", "triton", "cuda", "auto" or None (see engine.ops.backend):
    triton on CUDA tensors, eager on the CPU and inside torch.compile.

    ``weight_lp`` / ``bias_lp``: the parameters' values already rounded to a lower precision (an
    optimizer's copies, engine.optim.ParameterCopy), read in place of casting the parameters where
    their dtype is the compute dtype (triton and cuda backends; eager casts). The caller vouches
    that they hold the parameters' current values; gradients still go to weight and bias."""
    _check_inputs(x, weight, bias, activation, weight_lp, bias_lp, "linear")
    name = _backend_name(x, backend, "linear")
    if name == "eager":
        return linear_ref(x, weight, bias, activation)
    return _LinearFunction.apply(x, weight, bias, weight_lp, bias_lp, activation == "gelu_tanh",
                                 _gemm.compute_dtype(x, weight, bias), name)


def _projection_parts(x, weight, bias, chunks, backend, branch, weight_lp, bias_lp, caller):
    """linear_chunks (branch False) and linear_branch (branch True): checks, then the backend."""
    _check_inputs(x, weight, bias, None, weight_lp, bias_lp, caller)
    if not 1 <= chunks <= MAX_CHUNKS or weight.shape[0] % chunks:
        raise ValueError(f"{caller}: chunks must be 1..{MAX_CHUNKS} and divide the output size "
                         f"{weight.shape[0]}; got {chunks}")
    tail = (x,) if branch else ()
    if torch.compiler.is_compiling():
        y = linear(x, weight, bias, backend=backend, weight_lp=weight_lp, bias_lp=bias_lp)
        return (*y.chunk(chunks, dim=-1), *tail)
    name = _backend_name(x, backend, caller)
    if name == "eager":
        return (*linear_ref(x, weight, bias).chunk(chunks, dim=-1), *tail)
    return _LinearChunksFunction.apply(x, weight, bias, weight_lp, bias_lp, chunks, branch,
                                       _gemm.compute_dtype(x, weight, bias, caller), name)


def linear_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: int,
                  backend: str | None = None, *, weight_lp: torch.Tensor | None = None,
                  bias_lp: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``linear(x, weight, bias).chunk(chunks, dim=-1)``: the fused projection of several
    tensors (q, k, v) as ``chunks`` views of shape (..., N / chunks). Same backends, dtypes and
    low-precision copies as ``linear`` (no activation). On triton and cuda the backward packs the
    parts' gradients and sums them for the bias gradient in one pass; under torch.compile (and on
    eager) it is the plain expression, which Inductor fuses itself."""
    return _projection_parts(x, weight, bias, chunks, backend, False, weight_lp, bias_lp, "linear_chunks")


def linear_branch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: int = 1,
                  backend: str | None = None, *, weight_lp: torch.Tensor | None = None,
                  bias_lp: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(*linear_chunks(x, weight, bias, chunks), x)``: a projection of x and x itself, for an x
    that is also used elsewhere (the residual stream that feeds a query projection, the caption
    that feeds every block's key / value projection). Use the returned x for those other uses:
    on triton and cuda the gradient they send back is added to the projection's input gradient
    inside its GEMM (cuBLASLt's C input; addmm on triton), which saves autograd's separate add
    of the two (a read of both and a write, B x N x D elements each). Values are those of
    linear_chunks and x; under torch.compile and on eager it is that expression."""
    return _projection_parts(x, weight, bias, chunks, backend, True, weight_lp, bias_lp, "linear_branch")
