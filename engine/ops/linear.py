"""Linear layer, optionally followed by tanh-GELU, with the bias gradient fused into one pass.

y = act(x W^T + b): x (..., K), weight (N, K), bias (N,) or None; act is the identity or
PixArt's tanh-approximated GELU (``activation="gelu_tanh"``).

Why an op for a Linear. The GEMMs stay cuBLAS's (torch.mm / F.linear); what changes is the
work around them in the backward. Eager autograd computes a Linear's bias gradient as a
separate column sum of the output gradient over all tokens: on the H100 profile of the
PixArt-XL/2 step (256px, batch 64; docs/performance.md) those sums were 231 launches of a
reduction kernel, 9.0 ms of a 151 ms step, reading ~12.6 GB at ~42% of copy bandwidth. For the
MLP's first Linear eager also runs GELU's backward as its own pass (4.2 ms), whose output the
bias sum then reads again. Here:

- ``activation=None``: the backward sums the output gradient with a Triton reduction
  (``_bias_grad_kernel``, GELU off) that splits the tokens over enough programs to fill the GPU
  and accumulates in fp32, then one small deterministic sum of the per-program partials;
- ``activation="gelu_tanh"``: the forward keeps the pre-activation (eager keeps the same tensor
  for GELU's backward, so memory is unchanged); the backward's one Triton pass reads the
  gradient and the pre-activation, writes d_pre = dy * GELU'(pre) and accumulates its column
  sums as it goes, replacing eager's GELU-backward pass plus the bias-sum pass.

Backends:
- ``eager``: F.linear (+ F.gelu), with PyTorch's own autograd: the reference;
- ``triton``: the above;
- ``cuda``: the same Triton passes, and every GEMM through cuBLASLt (engine._C.gemm_epilogue,
  csrc/gemm_epilogue.cu) with the kernel chosen per GEMM shape by timing cuBLASLt's candidates on
  first use (``_gemm_epilogue``); the forward GEMM adds the bias, and for GELU writes the
  activation and its saved input, in its epilogue, so GELU's forward pass goes. On CPU tensors
  the same calls run engine._C's C++ reference (tests). cuBLASLt's bias-gradient epilogues
  measured slower than the plain GEMM plus the Triton pass, so none is used; GELU's backward in
  the next Linear's input-gradient GEMM (DGELU) is used by engine.ops.mlp, which sees both Linears.

Under ``torch.compile`` ``auto`` resolves to ``eager``: Inductor then fuses the bias sum and the
GELU with their neighbours itself, which an opaque custom op would prevent.

Autocast: the op casts x, weight and bias to the autocast dtype itself (what autocast does for
F.linear) and returns the weight and bias gradients in the parameters' dtype: fp32 parameters
get fp32 gradients out of the GEMM's accumulator and the column sum, with no bf16 rounding and no
cast pass in between (eager rounds dW to bf16, then casts it up).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops.adamw import low_precision
from engine.ops.backend import (cuda_stream, dtype_code, extension_function, in_graph_step, multiprocessors,
                                requested, resolve)

ACTIVATIONS = (None, "gelu_tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """The definition: act(x W^T + b) in x's dtype."""
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


# ---------------------------------------------------------------------------------------------
# Triton: bias gradient (column sum over tokens), optionally through GELU's backward.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _gelu_tanh_grad(p):
    """d/dp of 0.5 p (1 + tanh(u)), u = sqrt(2/pi) (p + 0.044715 p^3), in fp32."""
    u = 0.7978845608028654 * (p + 0.044715 * p * p * p)
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)  # tanh is +-1 in fp32 beyond; keeps exp finite
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), from sigmoid (no tanh in every Triton build)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * p * p)
    return 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * du


@triton.jit
def _bias_grad_kernel(dy_ptr, pre_ptr, dpre_ptr, partial_ptr, M, N, rows_per_program,
                      stride_dy, stride_pre, stride_dpre,
                      GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n, s): columns [n BLOCK_N, (n+1) BLOCK_N) of rows [s rows_per_program, ...).
    Writes the fp32 column sums of its rows to partial[s]; with GELU, the gradient summed is
    dy * GELU'(pre), which it also stores to dpre."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_begin = pid_s * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for row0 in range(row_begin, row_end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        g = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dy + cols[None, :], mask=ok, other=0.0)
        g = g.to(tl.float32)
        if GELU:
            p = tl.load(pre_ptr + rows[:, None].to(tl.int64) * stride_pre + cols[None, :], mask=ok, other=0.0)
            g = g * _gelu_tanh_grad(p.to(tl.float32))
            tl.store(dpre_ptr + rows[:, None].to(tl.int64) * stride_dpre + cols[None, :],
                     g.to(dpre_ptr.dtype.element_ty), mask=ok)
        acc += g
    tl.store(partial_ptr + pid_s * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _bias_grad_sum_kernel(partial_ptr, db_ptr, splits, N, BLOCK_N: tl.constexpr):
    """db[n] = sum over s of partial[s, n], in fixed order (deterministic), stored in db's dtype.
    A launch of its own, not finished by the last program (engine.ops.split_sums): measured
    slower here, see there."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * N + cols, mask=ok, other=0.0)
    tl.store(db_ptr + cols, acc.to(db_ptr.dtype.element_ty), mask=ok)


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


# (BLOCK_M, BLOCK_N, num_warps, programs per multiprocessor the token split aims for), without
# and with GELU. Chosen from a sweep of BLOCK_M 16-128, BLOCK_N 64-256, 4/8 warps, 2-32 programs
# per SM on an H200 (triton 3.6, bf16; do_bench, 2026-11-21), eager = sum(0) [after aten's
# gelu_backward]: 16384 x 1152 tokens x columns 23.2 us vs eager 36.8; 16384 x 3456 43.2 vs 51.4;
# 7680 x 2304 21.5 vs 29.3; with GELU 16384 x 4608 141.1 vs 170.2 and 32768 x 4608 268.5 vs
# 312.8, each within 1% (4% with GELU) of that shape's best tiling. Small row blocks and many
# programs win: the loop body is a load and an add, so latency hiding comes from programs in
# flight, not from work per program. Re-swept on an H100 with the CUDA-graph timer (commit 15a2a11,
# 12 tilings, bench/results/h100_bias_grad_sweep_15a2a11.txt): without GELU (16, 64, 8, 4) stays
# the fastest or within 3% at every shape (16384 x 1152 19.2 us, 65% of copy bandwidth; 16384 x
# 3456 41.6; 7680 x 2304 17.8; 32768 x 1152 30.8); with GELU at 16384 x 4608 (32, 128, 4, 4)
# took 164.3 us against 171.3 for the H200's pick.
BIAS_GRAD_CONFIG = {False: (16, 64, 8, 4), True: (32, 128, 4, 4)}


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation point of every kernel output (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_splits(M: int, column_blocks: int, block_m: int, programs_per_sm: int, device: torch.device) -> int:
    """How many programs share the tokens of one column block: enough for ``programs_per_sm``
    programs per multiprocessor over the whole grid, each with at least one row block."""
    sms = multiprocessors(device) if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(M, block_m), triton.cdiv(programs_per_sm * sms, column_blocks)))


def _bias_grad_triton(dy: torch.Tensor, pre: torch.Tensor | None, bias_dtype: torch.dtype):
    """(d_pre, d_bias) from the 2-D output gradient dy (M, N) and, for GELU, the 2-D
    pre-activation; d_pre is dy itself when there is no activation."""
    M, N = dy.shape
    if M == 0:  # no tokens: nothing to launch, the bias gradient is zero
        return (torch.zeros_like(dy) if pre is not None else dy), torch.zeros(N, dtype=bias_dtype, device=dy.device)
    gelu = pre is not None
    block_m, block_n, num_warps, programs_per_sm = BIAS_GRAD_CONFIG[gelu]
    column_blocks = triton.cdiv(N, block_n)
    splits = _token_splits(M, column_blocks, block_m, programs_per_sm, dy.device)
    rows_per_program = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_program)
    partial = _new_output((splits, N), torch.float32, dy.device)
    dpre = _new_output((M, N), dy.dtype, dy.device) if gelu else dy
    _bias_grad_kernel[(column_blocks, splits)](
        dy, pre if gelu else dy, dpre, partial, M, N, rows_per_program,
        dy.stride(0), (pre if gelu else dy).stride(0), dpre.stride(0),
        GELU=gelu, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    db = _new_output((N,), bias_dtype, dy.device)
    _bias_grad_sum_kernel[(triton.cdiv(N, 256),)](partial, db, splits, N, BLOCK_N=256)
    return dpre, db


MAX_CHUNKS = 3  # linear_chunks' packing kernel takes up to three gradient pointers (q, k, v)
# (BLOCK_M, BLOCK_N, num_warps, programs per multiprocessor) of the packing pass. It stores as much
# as it loads, so it wants wider tiles than the read-only column sum: three 16384 x 1152 bf16
# parts (PixArt-XL/2's qkv at 256 px / 64) took 88.8 us with (32, 128, 4, 4), 88.0 with (64, 128,
# 8, 2), 99.9 with the column sum's (16, 64, 8, 4), against 120.3 us for torch.cat plus the column
# sum (H100, commit 862d842, CUDA-graph timer; bench/results/h100_linear_chunks_ab_862d842.txt).
PACK_CONFIG = (32, 128, 4, 4)


def _pack_bias_grad_triton(grads: list[torch.Tensor], bias_dtype: torch.dtype):
    """(dy (M, C N_c) packed, column sums (C N_c,) in bias_dtype) from C chunk gradients, each
    (M, N_c) with unit column stride, in one pass: what torch.cat and the column sum of
    _bias_grad_triton would do in two, each reading every element."""
    M, n_chunk = grads[0].shape
    chunks = len(grads)
    N = chunks * n_chunk
    packed = _new_output((M, N), grads[0].dtype, grads[0].device)
    if M == 0:
        return packed, torch.zeros(N, dtype=bias_dtype, device=packed.device)
    block_m, block_n, num_warps, programs_per_sm = PACK_CONFIG
    column_blocks = triton.cdiv(n_chunk, block_n)
    splits = _token_splits(M, column_blocks * chunks, block_m, programs_per_sm, packed.device)
    rows_per_program = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_program)
    partial = _new_output((splits, N), torch.float32, packed.device)
    pointers = grads + grads[:1] * (MAX_CHUNKS - chunks)  # unused slots: never read
    _pack_bias_grad_kernel[(column_blocks, splits, chunks)](
        *pointers, packed, partial, M, n_chunk, rows_per_program, *(g.stride(0) for g in pointers), packed.stride(0),
        CHUNKS=chunks, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    db = _new_output((N,), bias_dtype, packed.device)
    _bias_grad_sum_kernel[(triton.cdiv(N, 256),)](partial, db, splits, N, BLOCK_N=256)
    return packed, db


# ---------------------------------------------------------------------------------------------
# cuBLASLt epilogues (engine._C.gemm_epilogue; on CPU tensors its C++ reference). cuBLASLt is
# column-major: a row-major (rows, cols) matrix with row stride ld is its column-major
# (cols, rows) transpose with the same ld, so each helper below states the GEMM it asks for in
# those terms.
# ---------------------------------------------------------------------------------------------

_EPILOGUE_CODES = dict(none=0, bias=1, gelu_aux_bias=2, dgelu=3)
CUBLASLT_WORKSPACE_BYTES = 32 * 2**20  # what torch gives cuBLASLt on Hopper


@functools.cache
def _cublaslt_workspace(device_index: int) -> torch.Tensor:
    # One per device, shared by every call: safe because the engine issues its GEMMs on one
    # stream (the current one); GEMMs on concurrent streams would each need their own.
    return torch.empty(CUBLASLT_WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device("cuda", device_index))


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _leading_dim(t: torch.Tensor) -> int:
    """A row-major 2-D tensor's row stride, i.e. its column-major leading dimension; for a single
    row (whose stride torch leaves arbitrary) the row length, the smallest valid one."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _alignment(t: torch.Tensor | None) -> int:
    """The largest power of two (up to 256) dividing the tensor's address: cuBLASLt's candidate
    list depends on it (engine._C computes the same)."""
    if t is None:
        return 256
    address = t.data_ptr()
    return min(256, address & -address) if address else 256


# Autotuning of cuBLASLt's candidates. For each call signature (shapes, leading dimensions,
# epilogue, dtypes, alignments) the first call on the GPU times every candidate kernel engine._C
# reports (up to 16) and keeps the fastest; later calls run it. Measured reason: the heuristic's
# first choice is not always the fastest (H100, commit 140441d: fc1's GELU_AUX_BIAS GEMM took
# 341 us as candidate 0, 286 us as candidate 4 of 0-4; docs/performance.md).
# ENGINE_GEMM_TUNE=0 keeps the heuristic's first choice. Not tuned while a
# CUDA graph is being captured (timing needs a synchronisation): a signature first seen there
# runs candidate 0.
# 20 timed calls, not 5: with 5 the kernels picked for the same step differed between runs (H100
# profiles at b119fd7 and 56442c4: GEMM 81.8 vs 82.4 ms a step); more calls make the pick less a
# matter of timing noise. Costs ~1 s of warm-up; whether it made the step faster is not measured.
TUNE_REPEATS = 20
_TUNED_ALGOS: dict[tuple, int] = {}
_TUNING_TIMES: dict[tuple, list[float | None]] = {}


def gemm_tuning_report() -> list[dict]:
    """Every signature tuned in this process: its candidates' median microseconds (None = the
    candidate failed) and the one chosen. For benchmarks' result files."""
    names = {code: name for name, code in _EPILOGUE_CODES.items()}
    report = []
    for key, times in _TUNING_TIMES.items():
        trans_a, trans_b, m, n, k, epilogue = key[:6]
        report.append(dict(m=m, n=n, k=k, trans_a=trans_a, trans_b=trans_b, epilogue=names[epilogue],
                           dtypes=[str(t) for t in key[6]], chosen=_TUNED_ALGOS[key],
                           candidate_us=[None if t is None else round(t * 1e6, 2) for t in times]))
    return report


def _median_cuda_seconds(fn) -> float:
    """Median GPU seconds of ``fn()`` over TUNE_REPEATS timed calls, after one warm-up call."""
    fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(TUNE_REPEATS)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) / 1e3 for start, end in events)
    return times[len(times) // 2]


def _tune(run, count: int, seconds_of=_median_cuda_seconds) -> tuple[int, list[float | None]]:
    """(fastest candidate, seconds per candidate) of ``run(algo)`` over ``count`` candidates, each
    timed by ``seconds_of``; a candidate that raises RuntimeError gets None and is skipped."""
    seconds: list[float | None] = []
    for algo in range(count):
        try:
            seconds.append(seconds_of(lambda: run(algo)))
        except RuntimeError:  # a candidate cuBLASLt lists but refuses to run (workspace, say)
            seconds.append(None)
    timed = [(t, algo) for algo, t in enumerate(seconds) if t is not None]
    if not timed:
        raise RuntimeError("gemm_epilogue: none of cuBLASLt's candidates ran")
    return min(timed)[1], seconds


def _gemm_epilogue(trans_a, trans_b, m, n, k, a, b, d, epilogue, bias=None, aux=None, algo=None, c=None) -> int:
    """One engine._C.gemm_epilogue call; a, b, d, aux, c row-major 2-D tensors with unit column
    stride (c: added before the epilogue, d's dtype and row stride), bias a vector. On the GPU with
    the signature's tuned candidate (tuned on first use), or candidate ``algo`` when given. Returns
    the number of candidates."""
    gemm = extension_function("gemm_epilogue")
    on_gpu = d.is_cuda
    device = d.device.index if d.device.index is not None else torch.cuda.current_device() if on_gpu else -1
    workspace = _cublaslt_workspace(device) if on_gpu else None

    def run(algo: int) -> int:
        return gemm(trans_a, trans_b, m, n, k, a.data_ptr(), _leading_dim(a), b.data_ptr(), _leading_dim(b),
                    d.data_ptr(), _leading_dim(d), _EPILOGUE_CODES[epilogue], 0 if bias is None else bias.data_ptr(),
                    0 if aux is None else aux.data_ptr(), 0 if aux is None else _leading_dim(aux), dtype_code(a),
                    dtype_code(d), dtype_code(bias) if bias is not None else dtype_code(d),
                    0 if workspace is None else workspace.data_ptr(),
                    0 if workspace is None else CUBLASLT_WORKSPACE_BYTES, device, cuda_stream(d), algo,
                    0 if c is None else c.data_ptr())

    if not on_gpu or algo is not None:
        return run(algo or 0)
    key = (trans_a, trans_b, m, n, k, _EPILOGUE_CODES[epilogue],
           (a.dtype, d.dtype, None if bias is None else bias.dtype), _leading_dim(a), _leading_dim(b), _leading_dim(d), 0 if aux is None else _leading_dim(aux),
           _alignment(a), _alignment(b), _alignment(d), _alignment(aux), device, c is not None, _alignment(c))
    tuned = _TUNED_ALGOS.get(key)
    if tuned is not None:
        return run(tuned)
    count = run(0)
    if os.environ.get("ENGINE_GEMM_TUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return count
    tuned, seconds = _tune(run, count)
    _TUNED_ALGOS[key], _TUNING_TIMES[key] = tuned, seconds
    return run(tuned)  # every candidate computes the same outputs; this leaves the chosen one's


def _cublaslt_forward(x2, weight, bias, gelu):
    """(y, pre) of y = act(x2 W^T + b), x2 (M, K), weight (N, K): column-major y^T (N x M) =
    W (as stored: K x N, transposed) times x2^T (K x M); bias per row of y^T; GELU's input
    written to pre by the same GEMM."""
    M, K = x2.shape
    N = weight.shape[0]
    y = _new_output((M, N), x2.dtype, x2.device)
    if not gelu:
        _gemm_epilogue(True, False, N, M, K, weight, x2, y, "bias" if bias is not None else "none", bias)
        return y, y.new_empty(0)
    pre = _new_output((M, N), x2.dtype, x2.device)
    bias = bias if bias is not None else torch.zeros(N, dtype=x2.dtype, device=x2.device)
    _gemm_epilogue(True, False, N, M, K, weight, x2, y, "gelu_aux_bias", bias, pre)
    return y, pre


def _cublaslt_weight_grad(dy2, x2, grad_dtype):
    """dW (N, K) in grad_dtype from dy2 (M, N), x2 (M, K): column-major dW^T (K x N) = x2^T (K x M,
    as stored) times dy2 (M x N: dy2^T as stored, transposed)."""
    M, N = dy2.shape
    K = x2.shape[1]
    dw = _new_output((N, K), grad_dtype, dy2.device)
    _gemm_epilogue(False, True, K, N, M, x2, dy2, dw, "none")
    return dw


def _cublaslt_input_grad(dy2, weight, add=None, dgelu_of=None):
    """dx (M, K) = dy2 (M, N) W (N, K) [+ add (M, K), contiguous, dy2's dtype, summed in the GEMM's
    fp32 accumulator] [times GELU'(dgelu_of) (M, K), row-major, dy2's dtype: the input gradient of
    a Linear whose input was GELU(dgelu_of), carried through GELU's backward by the epilogue]:
    column-major dx^T (K x M) = W^T (K x N, W as stored) times dy2^T (N x M, as stored) [+ add^T]."""
    M, N = dy2.shape
    K = weight.shape[1]
    dx = _new_output((M, K), dy2.dtype, dy2.device)
    _gemm_epilogue(False, False, K, M, N, weight, dy2, dx, "none" if dgelu_of is None else "dgelu", aux=dgelu_of,
                   c=add)
    return dx


def _matmul_into(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b for 2-D a, b, with fp32 accumulation, stored in ``dtype``. For bf16 / fp16 operands
    and fp32 parameters (mixed precision) the weight gradient then comes out of the GEMM in fp32
    instead of being rounded to bf16 and cast back up in a separate pass (450 cast kernels, 2.7 ms
    of a 143 ms step in the H200 profile at 919055b)."""
    if dtype == a.dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)  # cuBLAS writes fp32 from its fp32 accumulator
    return a.to(dtype) @ b.to(dtype)  # elsewhere: the same exact products, summed in `dtype`


def _forward_impl(x, weight, bias, gelu, backend):
    if backend == "cuda" and x.numel() > 0:  # one cuBLASLt GEMM: bias, GELU and GELU's saved input in its epilogue
        N, K = weight.shape
        y, pre = _cublaslt_forward(_row_major(x.reshape(-1, K)), _row_major(weight), bias, gelu)
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
        dpre, column_sums = _bias_grad_triton(dy2, pre.reshape(-1, N) if gelu else None, grad_dtype)
        db = column_sums if has_bias else db
    dx, dw = _gemm_grads(dpre, x2, weight, need_dx, need_dw, grad_dtype, cublaslt)
    return (dx.view(*dy.shape[:-1], K) if need_dx else dx), dw, db


def _gemm_grads(dpre, x2, weight, need_dx, need_dw, grad_dtype, cublaslt, dx_add=None):
    """(dx (M, K), dW (N, K) in grad_dtype) of y = x2 W^T from dpre = dL/d(x2 W^T) (M, N); an
    output that is not needed comes back empty. ``dx_add`` (M, K), when given, is added to dx: by
    the GEMM itself where it has dx's dtype (cuBLASLt's C on cuda, addmm elsewhere)."""
    dw = weight.new_empty(0, dtype=grad_dtype)
    if need_dw:
        dw = (_cublaslt_weight_grad(_row_major(dpre), _row_major(x2), grad_dtype) if cublaslt
              else _matmul_into(dpre.t(), x2, grad_dtype))
    if not need_dx:
        return x2.new_empty(0), dw
    if dx_add is not None and dx_add.dtype == dpre.dtype:
        if cublaslt:
            return _cublaslt_input_grad(_row_major(dpre), _row_major(weight), add=dx_add.contiguous()), dw
        return torch.addmm(dx_add, dpre, weight), dw
    dx = _cublaslt_input_grad(_row_major(dpre), _row_major(weight)) if cublaslt else dpre @ weight
    return (dx if dx_add is None else dx.to(dx_add.dtype) + dx_add), dw


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


def _cast_operands(x, weight, bias, dtype):
    """x, weight, bias in the compute dtype (autocast's cast for F.linear, done by the Functions);
    the parameters' copies written by engine.optim.AdamW when it keeps them in that dtype."""
    return x.to(dtype), low_precision(weight, dtype), (low_precision(bias, dtype) if bias is not None else None)


class _LinearFunction(torch.autograd.Function):
    """Casts to the compute dtype inside the Function (autocast's job for F.linear), so the
    backward can hand fp32 parameters fp32 gradients straight from the GEMM and the column sum.
    Its one output is y: the GELU Linear's pre-activation is saved, not returned, so autograd has
    no zero gradient to materialise for it (as an output of the registered custom op it cost a
    151 MB fill per MLP, 1.3 ms a step, H200 profile at 919055b)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gelu, dtype, backend):
        x_low, w_low, b_low = _cast_operands(x, weight, bias, dtype)
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
                db if ctx.has_bias and need_db else None, None, None, None)


class _LinearChunksFunction(torch.autograd.Function):
    """A Linear whose output is used as ``chunks`` equal parts of its last dimension (a fused QKV
    or KV projection). Returned as separate views, each part's gradient reaches the backward on
    its own, so packing them for the GEMMs and summing them for the bias gradient are one pass
    (_pack_bias_grad_kernel) instead of autograd's concatenation (unbind's backward) plus the
    bias gradient's column sum, which read every element twice (H100 profile of the graphed
    step at 9522df4: the concatenations 2.8 ms, 56 a step). Measured on the whole step (H100,
    commit 862d842, engine+graph at 256 px / 64, two alternating pairs in one process, the pass
    on the column sum's tiling): 483.6 / 480.7 img/s against 479.2 / 479.8 with linear(...)
    .chunk(...), i.e. +0.2-0.9%.

    With ``branch`` the input comes back too, as a last output, for the caller's other uses of x
    (linear_branch): the gradient those uses send back is added to dx by the input-gradient GEMM
    (cuBLASLt's C) instead of by autograd's separate add of the two."""

    @staticmethod
    def forward(ctx, x, weight, bias, chunks, branch, dtype, backend):
        x_low, w_low, b_low = _cast_operands(x, weight, bias, dtype)
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
            dy2 = _row_major(parts[0])
            db = _bias_grad_triton(dy2, None, ctx.grad_dtype)[1] if ctx.has_bias and need_db else None
        else:
            dy2, db = _pack_bias_grad_triton([_row_major(g) for g in parts], ctx.grad_dtype)
        cublaslt = ctx.backend == "cuda" and dy2.shape[0] > 0
        dx_add = dx_branch.reshape(-1, K) if dx_branch is not None else None
        dx, dw = _gemm_grads(dy2, x.reshape(-1, K), weight, need_dx, need_dw, ctx.grad_dtype, cublaslt, dx_add)
        return (dx.view(*lead, K).to(ctx.x_dtype) if need_dx else None, dw if need_dw else None,
                db if ctx.has_bias and need_db else None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------

def _check_inputs(x, weight, bias, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear expects x (..., K) and weight (N, K); got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


@torch.compiler.assume_constant_result
def cublaslt_missing(device_type: str) -> bool:
    """True when a cuda-backend call on this device type would find no cuBLASLt path in engine._C
    (CUDA tensors with a module built without cuBLASLt); CPU tensors run the C++ reference."""
    return device_type == "cuda" and not extension_function("has_cublaslt")()


def _compute_dtype(x, weight, bias) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (as F.linear would run), else the
    one dtype x, weight and bias must share."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"linear: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    return x.dtype


# auto's order on CUDA (outside torch.compile, which gets eager: see the module docstring).
# Triton. cuda's tuned forward epilogues win per kernel (H100, commit 140441d, bench/kernels.py
# --timer cudagraph, bf16, 16384 tokens, forward: 1152 -> 4608 + GELU 286 vs 375 us, 4608 -> 1152
# 229 vs 255, 1152 -> 3456 200 vs 212), but the whole engine step ran 313.6 img/s with linear and
# mlp on cuda against 406.4 on triton (H100, commit 1cd16bc, same machine and call, 256px / 64):
# 47 ms a step more, with the kernels faster, points at host time (each of the ~680 GEMM calls a
# step builds a signature key in Python and cuBLASLt descriptors in engine._C; the CUDA-graph
# timer of the kernel rows hides host time). Not profiled yet: see docs/performance.md.
# Replayed from a CUDA graph (engine.step_graph) the host time is gone and cuda wins: engine+graph
# 472.1 / 471.6 img/s with linear and mlp on cuda against 464.2 / 465.8 on triton (H100, commit
# 574b072, alternating runs in one call; bench/results/h100_ab_graph_linear_574b072.json).
AUTO_PREFERENCE: tuple[str, ...] = ("triton",)
GRAPH_STEP_PREFERENCE: tuple[str, ...] = ("cuda", "triton")


def auto_preference(device_type: str) -> tuple[str, ...]:
    """The order ``auto`` tries: GRAPH_STEP_PREFERENCE inside a captured step (engine.ops.backend
    .graph_step), else AUTO_PREFERENCE; without ``cuda`` where engine._C has no cuBLASLt path for
    the device (on every op call: returns at once when there is no cuda entry to check)."""
    order = GRAPH_STEP_PREFERENCE if in_graph_step() else AUTO_PREFERENCE
    if "cuda" not in order:
        return order
    return tuple(name for name in order if name != "cuda" or not cublaslt_missing(device_type))


def _backend_name(x: torch.Tensor, backend: str | None, caller: str) -> str:
    """The backend linear and linear_chunks run: eager for ``auto`` under torch.compile (module
    docstring), else resolved with ``auto_preference``; a cuda backend without cuBLASLt is an error."""
    if torch.compiler.is_compiling() and requested(backend, "linear") == "auto":
        return "eager"
    name = resolve(backend, x.device, "linear", prefer=auto_preference(x.device.type))
    if name == "cuda":
        require_cublaslt(x.device.type, caller)
    return name


def require_cublaslt(device_type: str, caller: str) -> None:
    """The cuda backend's error where engine._C has no cuBLASLt path for the device."""
    if cublaslt_missing(device_type):
        raise RuntimeError(f"{caller}: the cuda backend runs cuBLASLt epilogues, and engine._C was built without "
                           "cuBLASLt; use 'triton', or rebuild with it found (ENGINE_CUBLAS_ROOT, see setup.py)")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """act(x W^T + b) -> (..., N): x (..., K), weight (N, K), bias (N,) or None; activation None
    or "gelu_tanh". backend: "eager", "triton", "cuda", "auto" or None (see engine.ops.backend):
    triton on CUDA tensors, eager on the CPU and inside torch.compile."""
    _check_inputs(x, weight, bias, activation)
    name = _backend_name(x, backend, "linear")
    if name == "eager":
        return linear_ref(x, weight, bias, activation)
    return _LinearFunction.apply(x, weight, bias, activation == "gelu_tanh", _compute_dtype(x, weight, bias), name)


def _projection_parts(x, weight, bias, chunks, backend, branch, caller):
    """linear_chunks (branch False) and linear_branch (branch True): checks, then the backend."""
    _check_inputs(x, weight, bias, None)
    if not 1 <= chunks <= MAX_CHUNKS or weight.shape[0] % chunks:
        raise ValueError(f"{caller}: chunks must be 1..{MAX_CHUNKS} and divide the output size "
                         f"{weight.shape[0]}; got {chunks}")
    tail = (x,) if branch else ()
    if torch.compiler.is_compiling():
        return (*linear(x, weight, bias, backend=backend).chunk(chunks, dim=-1), *tail)
    name = _backend_name(x, backend, caller)
    if name == "eager":
        return (*linear_ref(x, weight, bias).chunk(chunks, dim=-1), *tail)
    return _LinearChunksFunction.apply(x, weight, bias, chunks, branch, _compute_dtype(x, weight, bias), name)


def linear_chunks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: int,
                  backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """``linear(x, weight, bias).chunk(chunks, dim=-1)``: the fused projection of several
    tensors (q, k, v) as ``chunks`` views of shape (..., N / chunks). Same backends and dtypes as
    ``linear`` (no activation). On triton and cuda the backward packs the parts' gradients and
    sums them for the bias gradient in one pass; under torch.compile (and on eager) it is the
    plain expression, which Inductor fuses itself."""
    return _projection_parts(x, weight, bias, chunks, backend, False, "linear_chunks")


def linear_branch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunks: int = 1,
                  backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """``(*linear_chunks(x, weight, bias, chunks), x)``: a projection of x and x itself, for an x
    that is also used elsewhere (the residual stream that feeds a query projection, the caption
    that feeds every block's key / value projection). Use the returned x for those other uses:
    on triton and cuda the gradient they send back is added to the projection's input gradient
    inside its GEMM (cuBLASLt's C input; addmm on triton), which saves autograd's separate add
    of the two (a read of both and a write, B x N x D elements each). Values are those of
    linear_chunks and x; under torch.compile and on eager it is that expression."""
    return _projection_parts(x, weight, bias, chunks, backend, True, "linear_branch")
