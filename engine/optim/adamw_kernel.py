"""AdamW's update over many tensors in one pass, writing a low-precision copy of each parameter and,
optionally, with the gradient clipping folded in and an exponential moving average kept alongside.

For each parameter p with gradient g and moments m, v (torch.optim.AdamW's update, decoupled
weight decay, step t counted from 1), a gradient scale c (a one-element device tensor, e.g. the
clipping coefficient) and an EMA shadow s with lerp weight w = 1 - decay:

    g <- g c                                        (when a scale is given)
    p <- p - lr wd p
    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    copy <- p rounded to the copy's dtype           (when the parameter has a copy)
    s <- torch.lerp(s, p, w)                        (when the parameter has a shadow)

All in fp32. ``g c`` is the product torch's clip_grad_norm_ writes into the fp32 gradients (its
``_foreach_mul_`` by the clamped coefficient), and the update then reads it as it would read the
clipped gradient: on the CPU the result is bitwise that of clipping first; compiled for an H100 the
pass with the scale fuses its multiply-adds differently from the pass without, and a few elements
land one fp32 ulp apart (39 of 8,195 in bench/results/h100_pytest_gpu_mini_d7cb49d.txt). The EMA step is torch.lerp's
(ATen/native/Lerp.h, in fp32): s + w (p - s) for |w| < 0.5, else p - (p - s)(1 - w), toward the
parameter as stored (``p.float()``, as ``torch._foreach_lerp_(shadows, [p.float() ...], w)``).

Why a kernel for the optimizer. Under bf16 autocast every Linear casts its fp32 weight and bias
to bf16 in the forward: in the graphed PixArt-XL/2 step at 256 px / 64 those casts are 440
launches, 2.06 ms of 132.7 ms (H100; bench/results/h100_profile_256_b64_engine_graph_9522df4.md),
each reading 4 bytes and writing 2 per parameter. The optimizer step reads every parameter
anyway; writing the bf16 copy there costs 2 more bytes per parameter in a pass that already
moves 28, and the Linears then read the copy (engine.optim.ParameterCopy) instead of casting.
torch's fused AdamW cannot write it. Measured in that step (H100): this pass 6.44 ms against
6.37 for torch's fused AdamW plus the 2.06 ms of casts
(bench/results/h100_profile_256_b64_engine_graph_{8069573,9522df4}.md); the whole step 491.0
against 486.4 img/s with torch's optimizer, back to back on one machine
(bench/results/h100_ab_optimizer_{auto,torch}_b119fd7.json).

Why clipping and the EMA fold in. The training step clips the gradients (torch's clip_grad_norm_:
a norm pass reading g, 4 bytes per fp32 parameter, then a multiply reading and writing g, 8) and
keeps an fp32 EMA (``_foreach_lerp_``: reads s and p, writes s, 12 bytes). Around this pass's 30
bytes (28 for the update, 2 for the copy) that is 54 bytes per parameter. Folded, the multiply is
a register operation on the g the update loads anyway, and the EMA reads the new p from a register:
the norm pass stays (the coefficient needs every gradient before any update), the EMA costs s's
read and write, 4 + 30 + 8 = 42 bytes. For PixArt-XL/2's 611.3M parameters that is 12 x 611.3M =
7.3 GB less per step (33.0 -> 25.7 GB), and two multi-tensor ops (_foreach_mul_, _foreach_lerp_)
fewer.

Backends:
- ``eager``: the formula above with torch ops, tensor by tensor, in fp32 and rounded once to
  the parameter's dtype; the EMA is ``torch.lerp_`` itself (the CPU path);
- ``triton``: one kernel launch for all tensors of one dtype combination. Each program updates
  BLOCK elements of one tensor, found through device tables of the tensors' addresses (the
  parameters and moments are separate allocations, as the model made them) and of each
  program's (tensor, first element). Arithmetic in fp32, as torch's fused AdamW; the EMA as
  one fused multiply-add (tl.fma), the form torch's lerp takes: on the CPU its result equals
  the fma's on every element (checked on 100K elements per branch; the tests compare bitwise),
  and on CUDA nvcc contracts a + b c into an fma by default. It writes through raw pointers,
  which moves no tensor's version counter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.ops.backend import resolve

# ---------------------------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------------------------


def adamw_ref(param, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float):
    """The definition, out of place: (param, exp_avg, exp_avg_sq) after step ``step`` (>= 1), in
    the inputs' dtype (fp64 inputs for the tests' reference)."""
    param = param - lr * weight_decay * param
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step) + eps
    return param - lr / (1 - beta1**step) * exp_avg / denom, exp_avg, exp_avg_sq


def _coefficients(step: int, lr: float, beta1: float, beta2: float, weight_decay: float):
    """(lr wd, lr / (1 - beta1^t), sqrt(1 - beta2^t)) in double on the host."""
    return lr * weight_decay, lr / (1 - beta1**step), math.sqrt(1 - beta2**step)


# 1 - beta is passed from the host, computed in double: 1 - fp32(0.999) in fp32 is 1.3e-5 off
# relative, which moves exp_avg_sq by ~200 ulps (the GPU test's failure in
# bench/results/h100_pytest_gpu_d1179c4.txt; torch's fused AdamW also forms it in double).


def _eager(params, grads, exp_avgs, exp_avg_sqs, copies, shadows, flag, scale, apply, step, lr, beta1, beta2, eps,
           weight_decay, ema_weight):
    """Tensor by tensor with torch ops, in fp32 (rounded once to the parameter's dtype, as the kernel)."""
    decay, step_size, bias2_sqrt = _coefficients(step, lr, beta1, beta2, weight_decay)
    scale = None if scale is None else scale.reshape(())
    keep = None if apply is None else apply.reshape(()) != 0  # the new values where True, the old ones where not
    for p, g, m, v, copy, shadow in zip(params, grads, exp_avgs, exp_avg_sqs, copies, shadows):
        p32, g32 = p.float(), g.float()
        if scale is not None:
            g32 = g32 * scale  # out of place: g.float() of an fp32 gradient is the gradient itself
        m32 = m.to(torch.float32, copy=True).mul_(beta1).add_(g32, alpha=1 - beta1)
        v32 = v.to(torch.float32, copy=True).mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        p32 = (p32 - decay * p32).addcdiv_(m32, v32.sqrt().div_(bias2_sqrt).add_(eps), value=-step_size)
        if keep is not None:
            p32, m32, v32 = (torch.where(keep, new, old.float()) for new, old in ((p32, p), (m32, m), (v32, v)))
        if flag is not None:
            finite = torch.isfinite(p32).all()
            flag.logical_or_(~finite if keep is None else keep & ~finite)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
        if copy is not None:
            copy.copy_(p32 if keep is None else torch.where(keep, p32, copy.float()))
        if shadow is not None:
            moved = torch.lerp(shadow, p.float(), ema_weight)
            shadow.copy_(moved if keep is None else torch.where(keep, moved, shadow))


# ---------------------------------------------------------------------------------------------
# Triton: one launch per dtype combination.
# ---------------------------------------------------------------------------------------------

# Elements per program. 611M parameters (PixArt-XL/2) make ~150K programs of 4096; the tables
# that map programs to tensors are built once per set of shapes.
BLOCK = 4096
NUM_WARPS = 8
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, shadow_ptr, flag_ptr, scale_ptr, offsets, ok, decay,
                  step_size, bias2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, ema_weight,
                  P_DTYPE: tl.constexpr, COPY_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr,
                  HAS_SHADOW: tl.constexpr, HAS_SCALE: tl.constexpr, CHECK_FINITE: tl.constexpr,
                  MASKED: tl.constexpr):
    if MASKED:
        p = tl.load(p_ptr + offsets, mask=ok).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=ok).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=ok).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=ok).to(tl.float32)
    else:
        p = tl.load(p_ptr + offsets).to(tl.float32)
        g = tl.load(g_ptr + offsets).to(tl.float32)
        m = tl.load(m_ptr + offsets).to(tl.float32)
        v = tl.load(v_ptr + offsets).to(tl.float32)
    if HAS_SCALE:
        # One rounded product, used only as a factor below (no add to contract it into): the
        # value clip_grad_norm_ would have stored in an fp32 gradient.
        g = g * tl.load(scale_ptr)
    p = p - decay * p
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
    if CHECK_FINITE:
        # Every writer stores the same 1, so plain stores need no atomics.
        # |p| <= float32's largest finite value: false for inf, and for NaN (every comparison with NaN is)
        finite = tl.abs(p) <= 3.4028234663852886e38
        if MASKED:
            finite = finite | ~ok  # lanes past the tensor load nothing to check
        if tl.min(finite.to(tl.int32), axis=0) == 0:
            tl.store(flag_ptr, 1)
    if MASKED:
        tl.store(p_ptr + offsets, p.to(P_DTYPE), mask=ok)
        tl.store(m_ptr + offsets, m.to(P_DTYPE), mask=ok)
        tl.store(v_ptr + offsets, v.to(P_DTYPE), mask=ok)
        if HAS_COPY:
            tl.store(copy_ptr + offsets, p.to(COPY_DTYPE), mask=ok)
    else:
        tl.store(p_ptr + offsets, p.to(P_DTYPE))
        tl.store(m_ptr + offsets, m.to(P_DTYPE))
        tl.store(v_ptr + offsets, v.to(P_DTYPE))
        if HAS_COPY:
            tl.store(copy_ptr + offsets, p.to(COPY_DTYPE))
    if HAS_SHADOW:
        if MASKED:
            s = tl.load(shadow_ptr + offsets, mask=ok)
        else:
            s = tl.load(shadow_ptr + offsets)
        end = p.to(P_DTYPE).to(tl.float32)  # the parameter as stored, as p.float() reads it
        # torch.lerp: s + w (end - s) for |w| < 0.5, else end - (end - s)(1 - w); as one fma
        # each, since w - 1 = -(1 - w) exactly in fp32.
        if tl.abs(ema_weight) < 0.5:
            s = tl.fma(end - s, ema_weight, s)
        else:
            s = tl.fma(end - s, ema_weight - 1.0, end)
        if MASKED:
            tl.store(shadow_ptr + offsets, s, mask=ok)
        else:
            tl.store(shadow_ptr + offsets, s)


@triton.jit
def _adamw_kernel(addresses_ptr, sizes_ptr, program_tensor_ptr, program_start_ptr, flag_ptr, scale_ptr, apply_ptr,
                  decay, step_size, bias2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, ema_weight,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, COPY_DTYPE: tl.constexpr,
                  HAS_COPY: tl.constexpr, HAS_SHADOW: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_APPLY: tl.constexpr,
                  CHECK_FINITE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Program i: elements [start, start + BLOCK) of tensor t = program_tensor[i]; the addresses
    of t's parameter, gradient, moments, copy and shadow are addresses[t, 0..5]. A block inside
    the tensor runs without a mask, so that (with ALIGNED: every address a multiple of 16 bytes)
    its accesses are 16-byte vectors: a pointer read from memory and a mask against a runtime
    size give Triton no alignment to prove, and it emitted one scalar access per element (PTX
    for sm_90, checked offline)."""
    pid = tl.program_id(0)
    t = tl.load(program_tensor_ptr + pid).to(tl.int64)
    start = tl.load(program_start_ptr + pid)
    n = tl.load(sizes_ptr + t)
    row = addresses_ptr + 6 * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(P_DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(P_DTYPE))
    copy_ptr = tl.load(row + 4).to(tl.pointer_type(COPY_DTYPE))
    shadow_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        copy_ptr = tl.multiple_of(copy_ptr, 16)
        shadow_ptr = tl.multiple_of(shadow_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offsets = start + tl.arange(0, BLOCK)
    ok = offsets < n
    run = True
    if HAS_APPLY:
        run = tl.load(apply_ptr) != 0  # a step skipped on the device: nothing is read or written
    if run:
        if start + BLOCK <= n:
            _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, shadow_ptr, flag_ptr, scale_ptr, offsets, ok, decay,
                          step_size, bias2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, ema_weight,
                          P_DTYPE, COPY_DTYPE, HAS_COPY, HAS_SHADOW, HAS_SCALE, CHECK_FINITE, False)
        else:
            _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, shadow_ptr, flag_ptr, scale_ptr, offsets, ok, decay,
                          step_size, bias2_sqrt, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, ema_weight,
                          P_DTYPE, COPY_DTYPE, HAS_COPY, HAS_SHADOW, HAS_SCALE, CHECK_FINITE, True)


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # no synchronisation in the step


# Device tables per tensor list: the program map per tuple of sizes, the address table per
# tuple of addresses (gradients stay put under engine.step_graph, so it is built once there; an
# eager step allocates new gradients, and its table is one small host-to-device copy).
_PROGRAM_MAPS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_ADDRESS_TABLES: dict[tuple, torch.Tensor] = {}
_MAX_CACHED = 64


def _cached(cache: dict, key, build):
    found = cache.get(key)
    if found is None:
        if len(cache) >= _MAX_CACHED:
            cache.clear()
        found = cache[key] = build()
    return found


def _program_map(sizes: tuple[int, ...], device: torch.device):
    def build():
        tensors, starts = [], []
        for index, n in enumerate(sizes):
            count = triton.cdiv(n, BLOCK)
            tensors += [index] * count
            starts += range(0, count * BLOCK, BLOCK)
        return _to_device(list(sizes), device), _to_device(tensors, device), _to_device(starts, device)
    return _cached(_PROGRAM_MAPS, (sizes, device), build)


def _triton(params, grads, exp_avgs, exp_avg_sqs, copies, shadows, flag, scale, apply, step, lr, beta1, beta2, eps,
            weight_decay, ema_weight):
    decay, step_size, bias2_sqrt = _coefficients(step, lr, beta1, beta2, weight_decay)
    groups: dict[tuple, list[int]] = {}
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, copies, shadows)):
        p, g, _, _, c, s = tensors
        if p.numel():
            aligned = all(t.data_ptr() % 16 == 0 for t in tensors if t is not None)
            groups.setdefault((p.dtype, g.dtype, None if c is None else c.dtype, s is not None, aligned),
                              []).append(i)
    for (p_dtype, g_dtype, copy_dtype, has_shadow, aligned), members in groups.items():
        device = params[members[0]].device
        addresses = tuple(t.data_ptr() if t is not None else 0 for i in members
                          for t in (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], copies[i], shadows[i]))
        table = _cached(_ADDRESS_TABLES, (addresses, device), lambda: _to_device(list(addresses), device))
        sizes, program_tensor, program_start = _program_map(tuple(params[i].numel() for i in members), device)
        _adamw_kernel[(program_tensor.numel(),)](
            table, sizes, program_tensor, program_start, flag, scale, apply, decay, step_size, bias2_sqrt, beta1, beta2,
            1 - beta1, 1 - beta2, eps, ema_weight,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], COPY_DTYPE=_TL_DTYPES[copy_dtype or p_dtype],
            HAS_COPY=copy_dtype is not None, HAS_SHADOW=has_shadow, HAS_SCALE=scale is not None,
            HAS_APPLY=apply is not None,
            CHECK_FINITE=flag is not None, ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# Public function.
# ---------------------------------------------------------------------------------------------


def _check_inputs(params, grads, exp_avgs, exp_avg_sqs, copies, shadows, step) -> None:
    if not len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(copies) == len(shadows):
        raise ValueError(f"adamw_step_: {len(params)} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs, "
                         f"{len(exp_avg_sqs)} exp_avg_sqs, {len(copies)} copies and {len(shadows)} shadows; "
                         "expected one of each per param")
    if step < 1:
        raise ValueError(f"adamw_step_: step counts from 1, got {step}")
    device = params[0].device if params else None
    for i, (p, g, m, v, c, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, copies, shadows)):
        for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v), ("copy", c), ("shadow", s)):
            if t is None and name in ("copy", "shadow"):
                continue
            if t.shape != p.shape or t.device != device or not t.is_contiguous():
                raise ValueError(f"adamw_step_: tensor {i}: {name} {tuple(t.shape)} on {t.device} "
                                 f"(contiguous: {t.is_contiguous()}) for a parameter {tuple(p.shape)} on {device}; "
                                 "expected the parameter's shape and device, contiguous")
        if p.device != device or not p.is_contiguous():
            raise ValueError(f"adamw_step_: parameter {i} is on {p.device} (contiguous: {p.is_contiguous()}); "
                             f"all must be contiguous and on {device}")
        if p.dtype not in _TL_DTYPES or g.dtype not in _TL_DTYPES or m.dtype != p.dtype or v.dtype != p.dtype or (
                c is not None and c.dtype not in _TL_DTYPES) or (s is not None and s.dtype != torch.float32):
            raise TypeError(f"adamw_step_: tensor {i}: parameter {p.dtype}, grad {g.dtype}, moments {m.dtype} / "
                            f"{v.dtype}, copy {None if c is None else c.dtype}, "
                            f"shadow {None if s is None else s.dtype}; expected float32/float16/bfloat16 with "
                            "moments in the parameter's dtype and a float32 shadow")


def _check_device_scalar(name: str, t: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> None:
    if t is not None and (t.numel() != 1 or t.dtype != dtype or t.device != device):
        raise ValueError(f"adamw_step_: {name} must be a one-element {dtype} tensor on {device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")


def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], copies: list[torch.Tensor | None], *, step: int, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, backend: str | None = None,
                nonfinite: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                shadows: list[torch.Tensor | None] | None = None, ema_weight: float = 0.0,
                apply: torch.Tensor | None = None) -> None:
    """AdamW step ``step`` (>= 1, shared by all tensors) on each parameter in place, its moments
    in place, and its copy (None: none) rewritten from the new value. Contiguous tensors on one
    device, moments in the parameter's dtype. backend: "eager" | "triton" | "auto" | None (see
    engine.ops.backend): auto is triton on CUDA tensors, eager on the CPU.

    ``nonfinite``: a one-element int32 tensor on the parameters' device, set to 1 (never reset)
    when an updated parameter value is inf or NaN; checked in the same pass, so watching the
    parameters costs no extra read of them. None: no check.

    ``grad_scale``: a one-element float32 tensor on the parameters' device, read there (no host
    synchronisation); every gradient element is multiplied by it in fp32 before anything else.
    With fp32 gradients the result is that of multiplying the gradients in place first
    (clip_grad_norm_'s coefficient: engine.optim.clip_coefficient), bitwise on the CPU and within
    an fp32 ulp on CUDA (module docstring); bf16 gradients are scaled without the product's
    rounding to bf16.

    ``shadows``: per parameter an fp32 tensor of its shape (None: none), moved toward the new
    parameter by ``torch.lerp(shadow, p.float(), ema_weight)`` (an EMA with decay 1 - ema_weight).

    ``apply``: a one-element float32 tensor on the parameters' device, read there: where it is 0
    the step writes nothing (parameters, moments, copies, shadows and ``nonfinite`` stay as they
    are), so that a step can be skipped on a condition the host has not read yet."""
    shadows = [None] * len(params) if shadows is None else shadows
    _check_inputs(params, grads, exp_avgs, exp_avg_sqs, copies, shadows, step)
    if not params:
        return
    device = params[0].device
    _check_device_scalar("nonfinite", nonfinite, torch.int32, device)
    _check_device_scalar("grad_scale", grad_scale, torch.float32, device)
    _check_device_scalar("apply", apply, torch.float32, device)
    name = resolve(backend, device, "adamw", prefer=("triton",))
    if name == "cuda":
        raise RuntimeError("adamw_step_ has no CUDA-extension kernel; use backend 'triton' or 'eager'")
    run = _triton if name == "triton" else _eager
    run(params, grads, exp_avgs, exp_avg_sqs, copies, shadows, nonfinite, grad_scale, apply, step, lr, beta1, beta2,
        eps, weight_decay, ema_weight)
