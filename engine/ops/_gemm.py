"""The GEMM plumbing the Linear-based ops share (engine.ops.linear, engine.ops.mlp): no op of its own.

- compute dtype and casts: autocast's cast of F.linear's operands, done inside the ops' autograd
  Functions, with a parameter's low-precision copy (engine.optim.ParameterCopy) standing in for
  its cast when the caller hands one;
- ``auto``'s backend order for these ops, and the cuda backend's check for cuBLASLt;
- the bias gradient as a Triton column sum over tokens, optionally through tanh-GELU's backward
  (why: engine.ops.linear's docstring);
- cuBLASLt GEMMs with epilogues (engine._C.gemm_epilogue, csrc/gemm_epilogue.cu; on CPU tensors its
  C++ reference), each call signature's kernel chosen by timing cuBLASLt's candidates on first use;
- the input and weight gradients of y = x W^T, by cuBLASLt or torch.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from engine.hardware import median_seconds
from engine.ops.backend import cuda_stream, dtype_code, extension_function, in_graph_step, multiprocessors

# ---------------------------------------------------------------------------------------------
# Compute dtype and casts.
# ---------------------------------------------------------------------------------------------


def compute_dtype(x, weight, bias, caller: str = "linear") -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (as F.linear would run), else the
    one dtype x, weight and bias must share."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"{caller}: x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    return x.dtype


def check_copy(caller: str, name: str, param: torch.Tensor | None, copy: torch.Tensor | None) -> None:
    """A parameter's low-precision copy must have its shape and device."""
    if copy is None:
        return
    if param is None or copy.shape != param.shape or copy.device != param.device:
        raise ValueError(f"{caller}: {name}_lp is {tuple(copy.shape)} on {copy.device}, its parameter "
                         f"{None if param is None else (tuple(param.shape), str(param.device))}; expected the "
                         "parameter's shape and device")


def cast_operands(x, weight, bias, dtype, weight_lp=None, bias_lp=None):
    """x, weight, bias in the compute dtype (autocast's cast for F.linear, done by the Functions).
    ``weight_lp`` / ``bias_lp``, the parameters already rounded to a lower precision (an
    optimizer's copies), are used as they are when they have that dtype: no cast pass."""
    def low(param, copy):
        return copy if copy is not None and copy.dtype == dtype else param.to(dtype)

    return x.to(dtype), low(weight, weight_lp), (low(bias, bias_lp) if bias is not None else None)


# ---------------------------------------------------------------------------------------------
# auto's backend order.
# ---------------------------------------------------------------------------------------------

# auto's order on CUDA (outside torch.compile, which gets eager: see engine.ops.linear).
# Triton. cuda's tuned forward epilogues win per kernel (H100, bench/kernels.py --timer cudagraph,
# bf16, 16384 tokens, forward: 1152 -> 4608 + GELU 286 vs 375 us, 4608 -> 1152 229 vs 255, 1152 ->
# 3456 200 vs 212; bench/results/h100_kernels_linear_mlp_140441d.json), but the whole engine step
# ran 313.6 img/s with linear and mlp on cuda against 406.4 on triton (H100, same machine and call,
# 256px / 64; bench/results/h100_throughput_256_b64_1cd16bc_linear_{cuda,triton}.json): 47 ms a
# step more with faster kernels points at host time (each of the ~680 GEMM calls a step builds a
# signature key in Python and cuBLASLt descriptors in engine._C; the CUDA-graph timer of the kernel
# rows hides host time); docs/performance.md.
# Replayed from a CUDA graph (engine.step_graph) the host time is gone and cuda wins: engine+graph
# 472.1 / 471.6 img/s with linear and mlp on cuda against 464.2 / 465.8 on triton (H100,
# alternating runs in one call; bench/results/h100_ab_graph_linear_574b072.json).
AUTO_PREFERENCE: tuple[str, ...] = ("triton",)
GRAPH_STEP_PREFERENCE: tuple[str, ...] = ("cuda", "triton")


@torch.compiler.assume_constant_result
def cublaslt_missing(device_type: str) -> bool:
    """True when a cuda-backend call on this device type would find no cuBLASLt path in engine._C
    (CUDA tensors with a module built without cuBLASLt); CPU tensors run the C++ reference."""
    return device_type == "cuda" and not extension_function("has_cublaslt")()


def auto_preference(device_type: str) -> tuple[str, ...]:
    """The order ``auto`` tries: GRAPH_STEP_PREFERENCE inside a captured step (engine.ops.backend
    .graph_step), else AUTO_PREFERENCE; without ``cuda`` where engine._C has no cuBLASLt path for
    the device (on every op call: returns at once when there is no cuda entry to check)."""
    order = GRAPH_STEP_PREFERENCE if in_graph_step() else AUTO_PREFERENCE
    if "cuda" not in order:
        return order
    return tuple(name for name in order if name != "cuda" or not cublaslt_missing(device_type))


def require_cublaslt(device_type: str, caller: str) -> None:
    """The cuda backend's error where engine._C has no cuBLASLt path for the device."""
    if cublaslt_missing(device_type):
        raise RuntimeError(f"{caller}: the cuda backend runs cuBLASLt epilogues, and engine._C was built without "
                           "cuBLASLt; use 'triton', or rebuild with it found (ENGINE_CUBLAS_ROOT, see setup.py)")


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


# (BLOCK_M, BLOCK_N, num_warps, programs per multiprocessor the token split aims for), without
# and with GELU. Small row blocks and many programs win: the loop body is a load and an add, so
# latency hiding comes from programs in flight, not from work per program. From a sweep of BLOCK_M
# 16-128, BLOCK_N 64-256, 4/8 warps, 2-32 programs per SM on an H200 (triton's do_bench; eager =
# sum(0) [after aten's gelu_backward]; bench/results/h200_linear_bias_grad_sweep.txt): 16384 x 1152
# tokens x columns 23.2 us vs eager 36.8, with GELU 16384 x 4608 141.1 vs 170.2, each within 1% (4%
# with GELU) of that shape's best tiling. On an H100 with the CUDA-graph timer
# (bench/results/h100_bias_grad_sweep_15a2a11.txt, 12 tilings): without GELU (16, 64, 8, 4) is the
# fastest or within 3% at every shape (16384 x 1152 19.2 us, 65% of copy bandwidth); with GELU at
# 16384 x 4608 (32, 128, 4, 4) takes 164.3 us against 171.3 for the H200's pick.
BIAS_GRAD_CONFIG = {False: (16, 64, 8, 4), True: (32, 128, 4, 4)}
_SUM_BLOCK = 256  # columns per program of _bias_grad_sum_kernel


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation point of every kernel output of the GEMM ops (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def split_rows(M: int, column_blocks: int, block_m: int, programs_per_sm: int,
               device: torch.device) -> tuple[int, int]:
    """(splits, rows per program) of a column-sum grid: enough programs share the M rows of each
    column block for ``programs_per_sm`` programs per multiprocessor over the whole grid, each
    with a whole number of row blocks and at least one."""
    sms = multiprocessors(device) if device.type == "cuda" else 2
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(programs_per_sm * sms, column_blocks)))
    rows_per_program = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return triton.cdiv(M, rows_per_program), rows_per_program


def sum_partials(partial: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    """(N,) in bias_dtype: the column sums of the fp32 partial sums (splits, N), in fixed order."""
    splits, N = partial.shape
    db = new_output((N,), bias_dtype, partial.device)
    _bias_grad_sum_kernel[(triton.cdiv(N, _SUM_BLOCK),)](partial, db, splits, N, BLOCK_N=_SUM_BLOCK)
    return db


def bias_grad(dy: torch.Tensor, pre: torch.Tensor | None, bias_dtype: torch.dtype):
    """(d_pre, d_bias) from the 2-D output gradient dy (M, N) and, for GELU, the 2-D
    pre-activation; d_pre is dy itself when there is no activation."""
    M, N = dy.shape
    if M == 0:  # no tokens: nothing to launch, the bias gradient is zero
        return (torch.zeros_like(dy) if pre is not None else dy), torch.zeros(N, dtype=bias_dtype, device=dy.device)
    gelu = pre is not None
    block_m, block_n, num_warps, programs_per_sm = BIAS_GRAD_CONFIG[gelu]
    column_blocks = triton.cdiv(N, block_n)
    splits, rows_per_program = split_rows(M, column_blocks, block_m, programs_per_sm, dy.device)
    partial = new_output((splits, N), torch.float32, dy.device)
    dpre = new_output((M, N), dy.dtype, dy.device) if gelu else dy
    _bias_grad_kernel[(column_blocks, splits)](
        dy, pre if gelu else dy, dpre, partial, M, N, rows_per_program,
        dy.stride(0), (pre if gelu else dy).stride(0), dpre.stride(0),
        GELU=gelu, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dpre, sum_partials(partial, bias_dtype)


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


def row_major(t: torch.Tensor) -> torch.Tensor:
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


# Tuning of cuBLASLt's candidates. For each call signature (shapes, leading dimensions, epilogue,
# dtypes, alignments) the first call on the GPU times every candidate kernel engine._C reports (up
# to 16; no GEMM of the PixArt step has more than 8:
# bench/results/h100_gemm_candidates_64_dbbb8d9.json) and keeps the fastest; later calls run it.
# Measured reason: the heuristic's first choice is not always the fastest (H100: fc1's
# GELU_AUX_BIAS GEMM took 341 us as candidate 0, 286 us as candidate 4;
# bench/results/h100_kernels_linear_mlp_140441d.json). ENGINE_GEMM_TUNE=0 keeps the heuristic's
# first choice. Not tuned while a CUDA graph is being captured (timing needs a synchronisation): a
# signature first seen there runs candidate 0.
# Each candidate: the median of TUNE_REPEATS timed calls after one warm-up call. Five calls leave
# the pick to timing noise: two H100 profiles of the same step tuned that way picked different
# kernels (GEMM 81.8 and 82.4 ms a step: bench/results/h100_profile_256_b64_engine_graph_b119fd7.md
# and h100_profile_256_b64_engine_graph_56442c4.md). 20 calls cost ~1 s of warm-up; their effect on
# the step's speed is not measured.
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


def _tune(run, count: int, seconds_of) -> tuple[int, list[float | None]]:
    """(fastest candidate, seconds per candidate) of ``run(algo)`` over ``count`` candidates, each
    timed by ``seconds_of(call)``; a candidate that raises RuntimeError gets None and is skipped."""
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


def gemm_epilogue(trans_a, trans_b, m, n, k, a, b, d, epilogue, bias=None, aux=None, algo=None, c=None) -> int:
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
    gpu = torch.device("cuda", device)
    tuned, seconds = _tune(run, count, lambda call: median_seconds(call, gpu, TUNE_REPEATS, warmup=1))
    _TUNED_ALGOS[key], _TUNING_TIMES[key] = tuned, seconds
    return run(tuned)  # every candidate computes the same outputs; this leaves the chosen one's


def cublaslt_forward(x2, weight, bias, gelu):
    """(y, pre) of y = act(x2 W^T + b), x2 (M, K), weight (N, K): column-major y^T (N x M) =
    W (as stored: K x N, transposed) times x2^T (K x M); bias per row of y^T; GELU's input
    written to pre by the same GEMM."""
    M, K = x2.shape
    N = weight.shape[0]
    y = new_output((M, N), x2.dtype, x2.device)
    if not gelu:
        gemm_epilogue(True, False, N, M, K, weight, x2, y, "bias" if bias is not None else "none", bias)
        return y, y.new_empty(0)
    pre = new_output((M, N), x2.dtype, x2.device)
    bias = bias if bias is not None else torch.zeros(N, dtype=x2.dtype, device=x2.device)
    gemm_epilogue(True, False, N, M, K, weight, x2, y, "gelu_aux_bias", bias, pre)
    return y, pre


def cublaslt_weight_grad(dy2, x2, grad_dtype):
    """dW (N, K) in grad_dtype from dy2 (M, N), x2 (M, K): column-major dW^T (K x N) = x2^T (K x M,
    as stored) times dy2 (M x N: dy2^T as stored, transposed)."""
    M, N = dy2.shape
    K = x2.shape[1]
    dw = new_output((N, K), grad_dtype, dy2.device)
    gemm_epilogue(False, True, K, N, M, x2, dy2, dw, "none")
    return dw


def cublaslt_input_grad(dy2, weight, add=None, dgelu_of=None):
    """dx (M, K) = dy2 (M, N) W (N, K) [+ add (M, K), contiguous, dy2's dtype, summed in the GEMM's
    fp32 accumulator] [times GELU'(dgelu_of) (M, K), row-major, dy2's dtype: the input gradient of
    a Linear whose input was GELU(dgelu_of), carried through GELU's backward by the epilogue]:
    column-major dx^T (K x M) = W^T (K x N, W as stored) times dy2^T (N x M, as stored) [+ add^T]."""
    M, N = dy2.shape
    K = weight.shape[1]
    dx = new_output((M, K), dy2.dtype, dy2.device)
    gemm_epilogue(False, False, K, M, N, weight, dy2, dx, "none" if dgelu_of is None else "dgelu", aux=dgelu_of,
                  c=add)
    return dx


# ---------------------------------------------------------------------------------------------
# Input and weight gradients.
# ---------------------------------------------------------------------------------------------

def _matmul_into(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b for 2-D a, b, with fp32 accumulation, stored in ``dtype``. For bf16 / fp16 operands
    and fp32 parameters (mixed precision) the weight gradient then comes out of the GEMM in fp32
    instead of being rounded to bf16 and cast back up in a separate pass (450 cast kernels, 2.7 ms
    a step on the H200 profile of the PixArt-XL/2 step; docs/performance.md)."""
    if dtype == a.dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)  # cuBLAS writes fp32 from its fp32 accumulator
    return a.to(dtype) @ b.to(dtype)  # elsewhere: the same exact products, summed in `dtype`


def gemm_grads(dpre, x2, weight, need_dx, need_dw, grad_dtype, cublaslt, dx_add=None):
    """(dx (M, K), dW (N, K) in grad_dtype) of y = x2 W^T from dpre = dL/d(x2 W^T) (M, N); an
    output that is not needed comes back empty. ``cublaslt``: the GEMMs through the tuned cuBLASLt
    path, else torch's. ``dx_add`` (M, K), when given, is added to dx: by the GEMM itself where it
    has dx's dtype (cuBLASLt's C on cuda, addmm elsewhere)."""
    dw = weight.new_empty(0, dtype=grad_dtype)
    if need_dw:
        dw = (cublaslt_weight_grad(row_major(dpre), row_major(x2), grad_dtype) if cublaslt
              else _matmul_into(dpre.t(), x2, grad_dtype))
    if not need_dx:
        return x2.new_empty(0), dw
    if dx_add is not None and dx_add.dtype == dpre.dtype:
        if cublaslt:
            return cublaslt_input_grad(row_major(dpre), row_major(weight), add=dx_add.contiguous()), dw
        return torch.addmm(dx_add, dpre, weight), dw
    dx = cublaslt_input_grad(row_major(dpre), row_major(weight)) if cublaslt else dpre @ weight
    return (dx if dx_add is None else dx.to(dx_add.dtype) + dx_add), dw
