"""Fused adaLN ops: ``norm_modulate`` and ``add_norm_modulate``.

    norm_modulate(x, shift, scale)                = LN(x) * (1 + scale) + shift
    add_norm_modulate(x, y, gate, shift, scale)   = (r, norm_modulate(r, shift, scale)),  r = x + gate * y

x, y: (B, N, D) activations; shift, scale, gate: (B, D) per-sample modulation broadcast over
the N tokens; LN has no affine, eps 1e-6, statistics in fp32. ``add_norm_modulate`` is the
residual add of one PixArt sub-block fused with the norm of the next, so the residual stream
is read once and written once per sub-block.

Both ops share one Triton kernel pair (constexpr flags pick the variant). A program owns a
run of rows of ONE sample: the sample's modulation is loaded once, and the backward sums
d_shift / d_scale / d_gate over its rows in registers, writing one partial row per program
to a (B, P, D) workspace that a torch ``sum`` over P finishes.

Bytes that must move, for the benchmark's GB/s (E = B*N*D elements of the activation dtype):
add_norm_modulate forward reads x, y and writes r, h (4E); backward reads dh, dr, r, y and
writes dx, dy (6E). norm_modulate: forward 2E, backward reads dh, x and writes dx (3E). The
forward saves only the LN input, y (when gated), the modulation and per-row mean / rstd.
``norm_modulate``'s Triton kernels read x with any batch and row strides (unit column stride):
MicroDiT's qk-norms normalise chunks of a fused QKV / KV projection's output in place, which
would otherwise cost a copy of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops.backend import cuda_stream, dtype_code, extension_function, resolve
from engine.ops.split_sums import arrival_counters, last_to_arrive, sum_splits

EPS = 1e-6
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# Reference: the definition of correct.
# ---------------------------------------------------------------------------------------------

def norm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift in plain PyTorch; math in fp32 (fp64 for fp64 inputs)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xhat = F.layer_norm(x.to(compute), (x.shape[-1],), eps=EPS)                       # (B, N, D)
    h = xhat * (1 + scale.to(compute)[:, None]) + shift.to(compute)[:, None]           # (B, N, D)
    return h.to(x.dtype)


def add_norm_modulate_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                          shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, h) with r = x + gate * y rounded to x.dtype (gate None = 1) and h = norm_modulate(r)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    update = y.to(compute) if gate is None else gate.to(compute)[:, None] * y.to(compute)  # (B, N, D)
    r = (x.to(compute) + update).to(x.dtype)                                            # (B, N, D)
    return r, norm_modulate_ref(r, shift, scale)


# ---------------------------------------------------------------------------------------------
# Triton kernels. Grid (B, P): program (b, p) owns rows [p * TILES * BLOCK_N, ...) of sample b,
# in TILES tiles of BLOCK_N rows by the whole (masked) D row.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _norm_modulate_fwd_kernel(X, Y, GATE, SHIFT, SCALE, R, H, MEAN, RSTD, N, D, eps, stride_xb, stride_xn,
                              stride_gate, stride_shift, stride_scale, HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    shift = tl.load(SHIFT + b * stride_shift + cols, mask=col_ok, other=0.0)           # (BLOCK_D,)
    scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=col_ok, other=0.0)
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gate + cols, mask=col_ok, other=0.0)
    for t in tl.range(TILES, num_stages=STAGES):
        rows = (p * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)                          # (BLOCK_N,)
        row_ok = rows < N
        row_ids = b.to(tl.int64) * N + rows                                               # flat row index
        offs = row_ids[:, None] * D + cols[None, :]                                       # (BLOCK_N, BLOCK_D)
        x_offs = b.to(tl.int64) * stride_xb + rows[:, None].to(tl.int64) * stride_xn + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        r = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_GATE:
                r += gate[None, :] * y
            else:
                r += y
            # Normalise r as stored, so the backward (which re-reads the stored r) sees
            # exactly the values the statistics were taken from.
            r_stored = r.to(X.dtype.element_ty)
            tl.store(R + offs, r_stored, mask=mask)
            r = r_stored.to(tl.float32)
        mean = tl.sum(r, axis=1) / D                                                      # (BLOCK_N,)
        centred = tl.where(mask, r - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / D + eps)
        h = centred * rstd[:, None] * scale1[None, :] + shift[None, :]
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        tl.store(MEAN + row_ids, mean, mask=row_ok)
        tl.store(RSTD + row_ids, rstd, mask=row_ok)


@triton.jit
def _norm_modulate_bwd_kernel(DH, DR, R, Y, GATE, SCALE, MEAN, RSTD, DX, DY, PARTIALS, DMOD, COUNTERS, N, D, P,
                              stride_rb, stride_rn, stride_gate, stride_scale, HAS_GATE: tl.constexpr, HAS_DR: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr,
                              SPLIT_TILE: tl.constexpr):
    b = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=col_ok, other=0.0)    # (BLOCK_D,)
    if HAS_GATE:
        gate = tl.load(GATE + b * stride_gate + cols, mask=col_ok, other=0.0)
    dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Every load of a tile is issued before its row reductions, and the tile loop is software
    # pipelined (STAGES), so the next tiles' loads are in flight while this one reduces: on an
    # H200 this took the backward from 106 to 71 us (B=64, N=256, D=1152 bf16).
    for t in tl.range(TILES, num_stages=STAGES):
        rows = (p * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)                          # (BLOCK_N,)
        row_ok = rows < N
        row_ids = b.to(tl.int64) * N + rows
        offs = row_ids[:, None] * D + cols[None, :]                                       # (BLOCK_N, BLOCK_D)
        mask = row_ok[:, None] & col_ok[None, :]
        mean = tl.load(MEAN + row_ids, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + row_ids, mask=row_ok, other=0.0)
        r_offs = b.to(tl.int64) * stride_rb + rows[:, None].to(tl.int64) * stride_rn + cols[None, :]
        r = tl.load(R + r_offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DR:
            dr_in = tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
        dshift += tl.sum(dh, axis=0)
        dscale += tl.sum(dh * xhat, axis=0)
        g = dh * scale1[None, :]
        g_mean = tl.sum(g, axis=1) / D                                                    # (BLOCK_N,)
        gx_mean = tl.sum(g * xhat, axis=1) / D
        dr = rstd[:, None] * (g - g_mean[:, None] - xhat * gx_mean[:, None])              # (BLOCK_N, BLOCK_D)
        if HAS_DR:
            dr += dr_in
        tl.store(DX + offs, dr.to(DX.dtype.element_ty), mask=mask)
        if HAS_GATE:
            dgate += tl.sum(dr * y, axis=0)
            tl.store(DY + offs, (dr * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
    # PARTIALS: (2 or 3, B, P, D) fp32 = d_shift, d_scale[, d_gate] partial sums of this program's rows;
    # the last of sample b's P programs sums them into DMOD (2 or 3, B, D) (engine.ops.split_sums).
    part = (b * P + p) * D + cols
    plane = tl.num_programs(0) * P * D
    tl.store(PARTIALS + part, dshift, mask=col_ok)
    tl.store(PARTIALS + plane + part, dscale, mask=col_ok)
    if HAS_GATE:
        tl.store(PARTIALS + 2 * plane + part, dgate, mask=col_ok)
    if last_to_arrive(COUNTERS, b, P):
        out_plane = tl.num_programs(0) * D
        sum_splits(PARTIALS + b * P * D, DMOD + b * D, cols, col_ok, P, D, BLOCK_D, SPLIT_TILE)
        sum_splits(PARTIALS + plane + b * P * D, DMOD + out_plane + b * D, cols, col_ok, P, D, BLOCK_D, SPLIT_TILE)
        if HAS_GATE:
            sum_splits(PARTIALS + 2 * plane + b * P * D, DMOD + 2 * out_plane + b * D, cols, col_ok, P, D, BLOCK_D,
                       SPLIT_TILE)


# ---------------------------------------------------------------------------------------------
# Launchers. Every output is allocated through _new_output, so tests can poison them with NaN.
# ---------------------------------------------------------------------------------------------

def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


# (BLOCK_N, TILES, STAGES, num_warps) on the GPU: the fastest of sweeps on an H200 (copy
# bandwidth 4.25 TB/s) for add_norm_modulate, gated, D=1152 bf16. At B=64, N=256: forward
# 48 us (74% of copy), backward 71 us (75%); at B=32, N=1024: 86 us (82%) and 129 us (83%).
# The backward's 64-row programs keep its (B, P, D) partial sums small (P = 4 at N = 256).
FWD_CONFIG = (2, 8, 3, 4)
BWD_CONFIG = (2, 32, 3, 4)


def _config(x: torch.Tensor, gpu_config: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if x.device.type == "cuda":
        return gpu_config
    # Under the CPU interpreter each tile op is one numpy call, so the cost is per call plus per
    # element: use tiles of ~0.5M elements (Triton caps a block at 2^20), no taller than N.
    _, N, D = x.shape
    block_n = min(max(1, 2**19 // triton.next_power_of_2(D)), triton.next_power_of_2(N))
    return block_n, 4, 1, 4


def _norm_modulate_fwd_triton(x, y, gate, shift, scale, config=None):
    """x: (B, N, D) with unit column stride (any batch and row strides: a view into a fused
    projection's output is read in place); y: (B, N, D) contiguous; gate, shift, scale: (B, D)
    fp32 with unit column stride (rows of the model's (B, 6, D) modulation, read in place).
    Returns (r or None, h, mean, rstd), each contiguous."""
    block_n, tiles, stages, num_warps = config or _config(x, FWD_CONFIG)
    B, N, D = x.shape
    r = _new_output((B, N, D), x.dtype, x.device) if y is not None else None
    h = _new_output((B, N, D), x.dtype, x.device)
    mean = _new_output((B, N), torch.float32, x.device)
    rstd = _new_output((B, N), torch.float32, x.device)
    grid = (B, triton.cdiv(N, block_n * tiles))
    _norm_modulate_fwd_kernel[grid](
        x, x if y is None else y, shift if gate is None else gate, shift, scale,
        h if r is None else r, h, mean, rstd, N, D, EPS, x.stride(0), x.stride(1),
        (shift if gate is None else gate).stride(0), shift.stride(0), scale.stride(0), HAS_Y=y is not None, HAS_GATE=gate is not None,
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D), TILES=tiles, STAGES=stages,
        num_warps=num_warps)
    return r, h, mean, rstd


def _norm_modulate_bwd_triton(dh, dr, r, y, gate, scale, mean, rstd, config=None):
    """dh, dr (or None), y: (B, N, D) contiguous; r (the LN input) (B, N, D) with unit column
    stride; gate, scale: (B, D) fp32 with unit column stride.
    y is read only with gate. Returns (dx, dy or None, dmod): dy only when gate is given
    (ungated, dy = dx); dmod fp32 (2, B, D) = d_shift, d_scale, or (3, B, D) with d_gate."""
    block_n, tiles, stages, num_warps = config or _config(r, BWD_CONFIG)
    B, N, D = r.shape
    P = triton.cdiv(N, block_n * tiles)
    dx = _new_output((B, N, D), r.dtype, r.device)
    dy = _new_output((B, N, D), r.dtype, r.device) if gate is not None else None
    planes = 3 if gate is not None else 2
    partials = _new_output((planes, B, P, D), torch.float32, r.device)
    dmod = _new_output((planes, B, D), torch.float32, r.device)
    _norm_modulate_bwd_kernel[(B, P)](
        dh, dh if dr is None else dr, r, r if y is None else y, scale if gate is None else gate,
        scale, mean, rstd, dx, dx if dy is None else dy, partials, dmod, arrival_counters(B, r.device), N, D, P,
        r.stride(0), r.stride(1), (scale if gate is None else gate).stride(0), scale.stride(0), HAS_GATE=gate is not None, HAS_DR=dr is not None,
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D), TILES=tiles, STAGES=stages, SPLIT_TILE=2,
        num_warps=num_warps)
    return dx, dy, dmod                                                                  # (2|3, B, D)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _device_index(t: torch.Tensor) -> int:
    return -1 if t.device.type == "cpu" else t.device.index


def _norm_modulate_fwd_cuda(x, y, gate, shift, scale):
    """Same contract as _norm_modulate_fwd_triton, through engine._C.norm_modulate_fwd."""
    fwd = extension_function("norm_modulate_fwd")
    x = x.contiguous()
    B, N, D = x.shape
    r = _new_output((B, N, D), x.dtype, x.device) if y is not None else None
    h = _new_output((B, N, D), x.dtype, x.device)
    mean = _new_output((B, N), torch.float32, x.device)
    rstd = _new_output((B, N), torch.float32, x.device)
    fwd(x.data_ptr(), _ptr(y), _ptr(gate), shift.data_ptr(), scale.data_ptr(),
        _ptr(r), h.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        B, N, D, dtype_code(x), _device_index(x), cuda_stream(x))
    return r, h, mean, rstd


def _norm_modulate_bwd_cuda(dh, dr, r, y, gate, scale, mean, rstd):
    """Same contract as _norm_modulate_bwd_triton, through engine._C.norm_modulate_bwd."""
    bwd = extension_function("norm_modulate_bwd")
    workspace_elements = extension_function("norm_modulate_bwd_workspace")
    r = r.contiguous()
    B, N, D = r.shape
    dx = _new_output((B, N, D), r.dtype, r.device)
    dy = _new_output((B, N, D), r.dtype, r.device) if gate is not None else None
    dmod = _new_output((3 if gate is not None else 2, B, D), torch.float32, r.device)  # d_shift, d_scale[, d_gate]
    workspace = _new_output((workspace_elements(B, N, D),), torch.float32, r.device)
    bwd(dh.data_ptr(), _ptr(dr), r.data_ptr(), _ptr(y if gate is not None else None), _ptr(gate),
        scale.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        dx.data_ptr(), _ptr(dy), _ptr(dmod[2] if gate is not None else None), dmod[0].data_ptr(), dmod[1].data_ptr(),
        workspace.data_ptr(), B, N, D, dtype_code(r), _device_index(r), cuda_stream(r))
    return dx, dy, dmod


_FWD = {"triton": _norm_modulate_fwd_triton, "cuda": _norm_modulate_fwd_cuda}
_BWD = {"triton": _norm_modulate_bwd_triton, "cuda": _norm_modulate_bwd_cuda}


def _forward_kernels(x, y, gate, shift, scale, backend: str) -> list[torch.Tensor]:
    """[h, mean, rstd], plus r when y is given."""
    r, h, mean, rstd = _FWD[backend](x, y, gate, shift, scale)
    return [h, mean, rstd] if r is None else [h, mean, rstd, r]


def _backward_kernels(dh, dr, r, y, gate, scale, mean, rstd, backend: str) -> list[torch.Tensor]:
    """[dx, dmod], plus dy when gate is given; dmod = d_shift, d_scale[, d_gate] stacked, fp32."""
    dx, dy, dmod = _BWD[backend](dh, dr, r, y, gate, scale, mean, rstd)
    return [dx, dmod] if dy is None else [dx, dmod, dy]


# ---------------------------------------------------------------------------------------------
# torch.library registration: forward and backward kernels are opaque custom ops (with fake
# implementations for tracing), so torch.compile(fullgraph=True) keeps them in one graph.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("engine::norm_modulate_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None,
            shift: torch.Tensor, scale: torch.Tensor, backend: str) -> list[torch.Tensor]:
    return _forward_kernels(x, y, gate, shift, scale, backend)


@_fwd_op.register_fake
def _(x, y, gate, shift, scale, backend):
    B, N, _ = x.shape
    outs = [torch.empty_like(x), x.new_empty((B, N), dtype=torch.float32), x.new_empty((B, N), dtype=torch.float32)]
    return outs if y is None else outs + [torch.empty_like(x)]


@torch.library.custom_op("engine::norm_modulate_bwd", mutates_args=())
def _bwd_op(dh: torch.Tensor, dr: torch.Tensor | None, r: torch.Tensor, y: torch.Tensor | None,
            gate: torch.Tensor | None, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
            backend: str) -> list[torch.Tensor]:
    return _backward_kernels(dh, dr, r, y, gate, scale, mean, rstd, backend)


@_bwd_op.register_fake
def _(dh, dr, r, y, gate, scale, mean, rstd, backend):
    B, _, D = r.shape
    dmod = r.new_empty((2 if gate is None else 3, B, D), dtype=torch.float32)
    return [torch.empty_like(r), dmod] if gate is None else [torch.empty_like(r), dmod, torch.empty_like(r)]


class _NormModulateFunction(torch.autograd.Function):
    """Autograd around the kernels. A Function rather than register_autograd because it can
    leave unused output grads as None: when r is not used downstream the backward then skips
    reading a materialised all-zero dr (B*N*D elements).

    Under torch.compile the kernels run as the opaque custom ops; in eager mode the Function
    calls them directly: the custom-op dispatcher costs ~20 us of host time per call (measured
    on the H200 machine), against ~48 us of GPU time for the forward kernel at B=64, N=256."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, backend):
        if torch.compiler.is_compiling():
            outs = _fwd_op(x, y, gate, shift, scale, backend)
        else:
            outs = _forward_kernels(x, y, gate, shift, scale, backend)
        h, mean, rstd = outs[:3]
        normed = x if y is None else outs[3]                   # the LN input
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(normed, y if gate is not None else None, gate, scale, mean, rstd)
        ctx.has_y = y is not None
        ctx.backend = backend
        return h if y is None else (outs[3], h)

    @staticmethod
    def backward(ctx, *grads):
        normed, y, gate, scale, mean, rstd = ctx.saved_tensors
        dr, dh = grads if ctx.has_y else (None, grads[0])
        dh = torch.zeros_like(normed) if dh is None else dh.contiguous()
        dr = None if dr is None else dr.contiguous()
        args = (dh, dr, normed, y, gate, scale, mean, rstd, ctx.backend)
        outs = _bwd_op(*args) if torch.compiler.is_compiling() else _backward_kernels(*args)
        dx, dmod = outs[:2]
        if gate is not None:
            dy, dgate = outs[2], dmod[2]
        else:
            dy, dgate = (dx if ctx.has_y else None), None
        return dx, dy, dgate, dmod[0], dmod[1], None


# ---------------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------------

def _check_inputs(x, y, gate, shift, scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, N, D) tensor, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    B, N, D = x.shape
    if y is not None:
        if tuple(y.shape) != (B, N, D):
            raise ValueError(f"y must have x's shape {(B, N, D)}, got {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
    for name, mod in (("gate", gate), ("shift", shift), ("scale", scale)):
        if mod is None:
            continue
        if tuple(mod.shape) != (B, D):
            raise ValueError(f"{name} must be (B, D) = {(B, D)} to match x, got {tuple(mod.shape)}")
        if not mod.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {mod.dtype}")
        if mod.device != x.device:
            raise ValueError(f"{name} is on {mod.device} but x is on {x.device}")


def _run_kernels(x, y, gate, shift, scale, backend):
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the {backend} backend takes x in {KERNEL_DTYPES}, got {x.dtype}; use backend='eager'")
    # Modulation is B*D elements: cast it to fp32 here so the kernels read one dtype; autograd
    # casts its fp32 grads back to the caller's dtype. The Triton kernels read rows with any row
    # stride, so the model's shift / scale / gate views into its (B, 6, D) modulation are not
    # copied (146 small strided copies, 0.33 ms of the graphed H100 step in
    # bench/results/h100_profile_256_b64_engine_graph_b119fd7.md);
    # engine._C takes contiguous (B, D).
    def as_fp32(m):
        if m is None:
            return None
        m = m.to(torch.float32)
        return m if backend == "triton" and m.stride(-1) == 1 else m.contiguous()
    # Without y the Triton kernels read x's rows in place (a qk-norm's input is a view into the
    # fused QKV projection's output); with y, x and y are read at the offsets r is written at.
    if y is not None or backend != "triton" or x.stride(-1) != 1:
        x = x.contiguous()
    return _NormModulateFunction.apply(
        x, None if y is None else y.contiguous(), as_fp32(gate), as_fp32(shift), as_fp32(scale), backend)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  backend: str | None = None) -> torch.Tensor:
    """LayerNorm(x, no affine, eps 1e-6) * (1 + scale) + shift.

    x: (B, N, D); shift, scale: (B, D), any float dtype. Returns h (B, N, D) in x.dtype.
    backend: "eager" | "triton" | "cuda" | "auto" | None (see engine.ops.backend).
    """
    _check_inputs(x, None, None, shift, scale)
    name = resolve(backend, x.device, "norm_modulate", prefer=("triton", "cuda"))
    if name == "eager":
        return norm_modulate_ref(x, shift, scale)
    return _run_kernels(x, None, None, shift, scale, name)


def add_norm_modulate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                      shift: torch.Tensor, scale: torch.Tensor,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """r = x + gate * y (gate None = 1), h = norm_modulate(r, shift, scale); returns (r, h).

    x, y: (B, N, D), same dtype; gate, shift, scale: (B, D), any float dtype. r and h in x.dtype.
    """
    _check_inputs(x, y, gate, shift, scale)
    name = resolve(backend, x.device, "add_norm_modulate", prefer=("triton", "cuda"))
    if name == "eager":
        return add_norm_modulate_ref(x, y, gate, shift, scale)
    return _run_kernels(x, y, gate, shift, scale, name)
