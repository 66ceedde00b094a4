"""engine._C's norm_modulate ABI called with raw pointers, as engine/ops/norm_modulate.py calls it:
the C++ reference path on host pointers (what CI runs) and the CUDA kernels on device pointers
(marked gpu), against fp64 PyTorch written here, independent of engine.ops.norm_modulate.

Outputs and the workspace start as NaN, so an element a kernel fails to write shows. Tolerance
(docs/design.md §3, with the exact result rounded to the output dtype standing in for eager):
    max|out - exact| <= 2 * max|exact.to(out.dtype) - exact| + atol_fraction * max|exact|.
"""

import pytest
import torch
import torch.nn.functional as F

from engine import _C

EPS = 1e-6
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPES = [(3, 7, 1152), (3, 7, 360), (3, 1000, 360), (3, 1000, 1152)]
# fp64 activations run only on host pointers (device pointers refuse them, tested below).
DEVICE_DTYPES = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float64),
                 *[pytest.param("cuda", dtype, marks=pytest.mark.gpu) for dtype in (torch.float32, torch.bfloat16)]]


def atol_fraction(dtype, stage):
    """fp32 arithmetic (GPU sums over D and N): ~100 fp32 ulps. fp64 forward: fp64 throughout.
    fp64 backward: its mean / rstd inputs are fp32 by the ABI, ~1e-7 relative in every grad."""
    if dtype != torch.float64:
        return 1e-5
    return 1e-12 if stage == "forward" else 1e-6


def assert_close_to_exact(name, out, exact, fraction):
    assert not out.isnan().any(), f"{name}: unwritten (NaN) elements"
    err = (out.double() - exact).abs().max().item()
    rounding = (exact.to(out.dtype).double() - exact).abs().max().item()
    atol = fraction * exact.abs().max().item()
    assert err <= 2 * rounding + atol, f"{name}: error {err:.3g} > 2 x rounding {rounding:.3g} + atol {atol:.3g}"


def ptr(t):
    return 0 if t is None else t.data_ptr()


def device_args(t):
    """(device, stream) as the ABI takes them."""
    if t.device.type == "cpu":
        return -1, 0
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


def nans(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def modulation(B, D, device):
    return 0.5 * torch.randn(B, D, device=device)  # fp32 (B, D), PixArt-sized: mostly |m| < 1


def run_forward(x, y, gate, shift, scale):
    B, N, D = x.shape
    r = nans((B, N, D), x.dtype, x.device) if y is not None else None
    h = nans((B, N, D), x.dtype, x.device)
    mean, rstd = nans((B, N), torch.float32, x.device), nans((B, N), torch.float32, x.device)
    _C.norm_modulate_fwd(ptr(x), ptr(y), ptr(gate), ptr(shift), ptr(scale), ptr(r), ptr(h), ptr(mean), ptr(rstd),
                         B, N, D, DTYPE_CODES[x.dtype], *device_args(x))
    return r, h, mean, rstd


def run_backward(dh, dr, r, y, gate, scale, mean, rstd):
    B, N, D = r.shape
    dx = nans((B, N, D), r.dtype, r.device)
    dy = nans((B, N, D), r.dtype, r.device) if gate is not None else None
    dgate = nans((B, D), torch.float32, r.device) if gate is not None else None
    dshift, dscale = nans((B, D), torch.float32, r.device), nans((B, D), torch.float32, r.device)
    workspace = nans((_C.norm_modulate_bwd_workspace(B, N, D),), torch.float32, r.device)
    _C.norm_modulate_bwd(ptr(dh), ptr(dr), ptr(r), ptr(y), ptr(gate), ptr(scale), ptr(mean), ptr(rstd),
                         ptr(dx), ptr(dy), ptr(dgate), ptr(dshift), ptr(dscale), ptr(workspace),
                         B, N, D, DTYPE_CODES[r.dtype], *device_args(r))
    return dx, dy, dgate, dshift, dscale


def check_forward(B, N, D, dtype, variant, device, make=torch.randn):
    """variant: 'norm' (plain norm_modulate), 'add' (ungated residual), 'add_gate'."""
    x = make(B, N, D, device=device).to(dtype)
    y = make(B, N, D, device=device).to(dtype) if variant != "norm" else None
    gate = modulation(B, D, device) if variant == "add_gate" else None
    shift, scale = modulation(B, D, device), modulation(B, D, device)
    r, h, mean, rstd = run_forward(x, y, gate, shift, scale)

    fraction = atol_fraction(dtype, "forward")
    if y is not None:
        update = y.double() if gate is None else gate.double()[:, None] * y.double()
        assert_close_to_exact("r", r, x.double() + update, fraction)
    # h normalises r as stored (rounded to the activation dtype), so the exact h starts from it.
    normed = (x if y is None else r).double()                                        # (B, N, D)
    exact_mean = normed.mean(-1)                                                     # (B, N)
    exact_rstd = (normed.var(-1, unbiased=False) + EPS).rsqrt()
    exact_h = F.layer_norm(normed, (D,), eps=EPS) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    assert_close_to_exact("h", h, exact_h, fraction)
    assert_close_to_exact("mean", mean, exact_mean, atol_fraction(torch.float32, "forward"))
    assert_close_to_exact("rstd", rstd, exact_rstd, atol_fraction(torch.float32, "forward"))


def check_backward(B, N, D, dtype, gated, with_dr, device, make=torch.randn):
    r = make(B, N, D, device=device).to(dtype)                                       # the LN input
    y = make(B, N, D, device=device).to(dtype) if gated else None
    gate = modulation(B, D, device) if gated else None
    shift, scale = modulation(B, D, device), modulation(B, D, device)
    dh = make(B, N, D, device=device).to(dtype)
    dr = make(B, N, D, device=device).to(dtype) if with_dr else None
    # Row statistics as the forward hands them over: exact, rounded to fp32.
    mean = r.double().mean(-1).float()                                               # (B, N)
    rstd = (r.double().var(-1, unbiased=False) + EPS).rsqrt().float()
    dx, dy, dgate, dshift, dscale = run_backward(dh, dr, r, y, gate, scale, mean, rstd)

    # fp64 autograd through r = x + gate * y and h = LN(r) * (1 + scale) + shift, with x chosen
    # so that r equals the stored r the kernel reads.
    leaves = {"shift": shift.double(), "scale": scale.double()}
    if gated:
        leaves |= {"y": y.double(), "gate": gate.double()}
        leaves["x"] = r.double() - leaves["gate"][:, None] * leaves["y"]
    else:
        leaves["x"] = r.double()
    for t in leaves.values():
        t.requires_grad_()
    r64 = leaves["x"] + leaves["gate"][:, None] * leaves["y"] if gated else leaves["x"]  # (B, N, D)
    h64 = F.layer_norm(r64, (D,), eps=EPS) * (1 + leaves["scale"][:, None]) + leaves["shift"][:, None]
    loss = (h64 * dh.double()).sum() + ((r64 * dr.double()).sum() if with_dr else 0)
    exact = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    fraction = atol_fraction(dtype, "backward")
    assert_close_to_exact("dx", dx, exact["x"], fraction)
    assert_close_to_exact("dshift", dshift, exact["shift"], fraction)
    assert_close_to_exact("dscale", dscale, exact["scale"], fraction)
    if gated:
        assert_close_to_exact("dy", dy, exact["y"], fraction)
        assert_close_to_exact("dgate", dgate, exact["gate"], fraction)


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("variant", ["norm", "add", "add_gate"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_matches_fp64(shape, device, dtype, variant):
    check_forward(*shape, dtype, variant, device)


@pytest.mark.parametrize("gated,with_dr", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["nogate-nodr", "nogate-dr", "gate-nodr", "gate-dr"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backward_matches_fp64(shape, device, dtype, gated, with_dr):
    check_backward(*shape, dtype, gated, with_dr, device)


@pytest.mark.parametrize("device", DEVICES)
def test_float16(device):
    check_forward(2, 5, 360, torch.float16, "add_gate", device)
    check_backward(2, 5, 360, torch.float16, True, True, device)


# GPU-only layouts: D not a multiple of 4 (scalar path), the largest D, PixArt's training shape
# (many chunks per sample), a single row per sample, and buffers one element off 16-byte alignment.
GPU_CASES = [(2, 33, 330), (2, 9, 4096), (64, 256, 1152), (5, 1, 1152), (3, 100, 1024), (3, 17, 72)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_CASES, ids=shape_id)
def test_cuda_layouts(shape, dtype):
    check_forward(*shape, dtype, "add_gate", "cuda")
    check_forward(*shape, dtype, "norm", "cuda")
    check_backward(*shape, dtype, True, True, "cuda")
    check_backward(*shape, dtype, False, False, "cuda")


def misaligned_randn(*shape, device):
    """Standard-normal tensor whose data starts 4 bytes past a 16-byte boundary."""
    flat = torch.randn(shape[0] * shape[1] * shape[2] + 1, device=device)
    return flat[1:].view(*shape)


@pytest.mark.gpu
def test_cuda_misaligned_buffers_take_the_scalar_path():
    check_forward(3, 50, 1152, torch.float32, "add_gate", "cuda", make=misaligned_randn)
    check_backward(3, 50, 1152, torch.float32, True, True, "cuda", make=misaligned_randn)


# ---------------------------------------------------------------------------------------------
# Argument checks: every bad argument is a ValueError naming it.
# ---------------------------------------------------------------------------------------------

def forward_call(gated=True):
    """Keyword arguments of a valid host-pointer forward call, and the tensors behind them."""
    B, N, D = 2, 3, 8
    t = {name: torch.randn(B, N, D) for name in ("x", "y", "r_out", "h_out")}
    t |= {name: torch.randn(B, D) for name in ("gate", "shift", "scale")}
    t |= {name: torch.randn(B, N) for name in ("mean_out", "rstd_out")}
    kwargs = {name: tensor.data_ptr() for name, tensor in t.items()}
    if not gated:
        kwargs |= {"y": 0, "gate": 0, "r_out": 0}
    return kwargs | dict(B=B, N=N, D=D, dtype=0, device=-1, stream=0), t


def backward_call(gated=True):
    B, N, D = 2, 3, 8
    t = {name: torch.randn(B, N, D) for name in ("dh", "dr", "r", "y", "dx_out", "dy_out")}
    t |= {name: torch.randn(B, D) for name in ("gate", "scale", "dgate_out", "dshift_out", "dscale_out")}
    t |= {name: torch.randn(B, N) for name in ("mean", "rstd")}
    t["workspace"] = torch.empty(_C.norm_modulate_bwd_workspace(B, N, D))
    kwargs = {name: tensor.data_ptr() for name, tensor in t.items()}
    if not gated:
        kwargs |= {"y": 0, "gate": 0, "dy_out": 0, "dgate_out": 0}
    return kwargs | dict(B=B, N=N, D=D, dtype=0, device=-1, stream=0), t


@pytest.mark.parametrize("gated", [True, False])
def test_valid_calls_pass(gated):
    kwargs, _ = forward_call(gated)
    _C.norm_modulate_fwd(**kwargs)
    kwargs, _ = backward_call(gated)
    _C.norm_modulate_bwd(**kwargs)


SHARED_BAD = [
    ("B", 0, "B: must be positive"),
    ("N", -1, "N: must be positive"),
    ("D", 0, "D: must be positive"),
    ("dtype", 4, "dtype: unknown dtype code 4"),
    ("dtype", -1, "dtype: unknown dtype code -1"),
    ("device", -2, "device: -2"),
]

FORWARD_BAD = SHARED_BAD + [
    *[(name, 0, f"{name}: null pointer") for name in ("x", "shift", "scale", "h_out", "mean_out", "rstd_out")],
    ("r_out", 0, "r_out: null pointer; with y given"),
]

BACKWARD_BAD = SHARED_BAD + [
    *[(name, 0, f"{name}: null pointer") for name in
      ("dh", "r", "scale", "mean", "rstd", "dx_out", "dshift_out", "dscale_out", "workspace")],
    ("y", 0, "y: null pointer; with gate given"),
    ("dy_out", 0, "dy_out: null pointer; with gate given"),
    ("dgate_out", 0, "dgate_out: null pointer; with gate given"),
]


@pytest.mark.parametrize("field,value,message", FORWARD_BAD, ids=lambda v: str(v))
def test_forward_bad_argument_names_it(field, value, message):
    kwargs, _ = forward_call()
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        _C.norm_modulate_fwd(**kwargs)


@pytest.mark.parametrize("field,value,message", BACKWARD_BAD, ids=lambda v: str(v))
def test_backward_bad_argument_names_it(field, value, message):
    kwargs, _ = backward_call()
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        _C.norm_modulate_bwd(**kwargs)


@pytest.mark.parametrize("field", ["r_out", "gate"])
def test_forward_without_y_refuses_r_out_and_gate(field):
    kwargs, t = forward_call(gated=False)
    kwargs[field] = t[field].data_ptr()
    with pytest.raises(ValueError, match=f"{field}: must be 0 \\(absent\\) without y"):
        _C.norm_modulate_fwd(**kwargs)


@pytest.mark.parametrize("field", ["y", "dy_out", "dgate_out"])
def test_backward_without_gate_refuses_gate_only_buffers(field):
    kwargs, t = backward_call(gated=False)
    kwargs[field] = t[field].data_ptr()
    with pytest.raises(ValueError, match=f"{field}: must be 0 \\(absent\\) without gate"):
        _C.norm_modulate_bwd(**kwargs)


@pytest.mark.parametrize("output,other,message", [
    ("h_out", "x", "h_out: output buffer overlaps input x"),
    ("r_out", "y", "r_out: output buffer overlaps input y"),
    ("mean_out", "scale", "mean_out: output buffer overlaps input scale"),
    ("rstd_out", "mean_out", "rstd_out: output buffer overlaps output mean_out"),
])
def test_forward_overlapping_buffers(output, other, message):
    kwargs, _ = forward_call()
    kwargs[output] = kwargs[other] + 4  # one fp32 element past the other buffer's start
    with pytest.raises(ValueError, match=message):
        _C.norm_modulate_fwd(**kwargs)


@pytest.mark.parametrize("output,other,message", [
    ("dx_out", "dh", "dx_out: output buffer overlaps input dh"),
    ("dy_out", "r", "dy_out: output buffer overlaps input r"),
    ("dgate_out", "mean", "dgate_out: output buffer overlaps input mean"),
    ("workspace", "dscale_out", "workspace: output buffer overlaps output dscale_out"),
])
def test_backward_overlapping_buffers(output, other, message):
    kwargs, _ = backward_call()
    kwargs[output] = kwargs[other] + 4
    with pytest.raises(ValueError, match=message):
        _C.norm_modulate_bwd(**kwargs)


@pytest.mark.parametrize("field", ["B", "N", "D"])
def test_workspace_refuses_non_positive_shapes(field):
    kwargs = dict(B=2, N=3, D=8) | {field: 0}
    with pytest.raises(ValueError, match=f"{field}: must be positive"):
        _C.norm_modulate_bwd_workspace(**kwargs)


@pytest.mark.parametrize("op", ["fwd", "bwd"])
@pytest.mark.parametrize("field,value,message", [
    ("dtype", 3, "dtype: float64 \\(3\\) runs only on host pointers"),
    ("D", 4097, "D: 4097 exceeds the CUDA kernels' limit of 4096"),
])
def test_device_pointers_refuse_what_the_cuda_kernels_lack(op, field, value, message):
    # Checked before any CUDA call, so this runs (and must pass) on machines without a GPU too.
    kwargs, _ = forward_call() if op == "fwd" else backward_call()
    kwargs |= {"device": 0, field: value}
    with pytest.raises(ValueError, match=message):
        getattr(_C, f"norm_modulate_{op}")(**kwargs)


@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_missing_cuda_device_raises_runtime_error_naming_op(op):
    # One past the last GPU: no GPU (or no CUDA in the build) here, an invalid ordinal on the
    # GPU machine; either way the call fails before touching the pointers.
    kwargs, _ = forward_call() if op == "fwd" else backward_call()
    kwargs["device"] = torch.cuda.device_count()
    with pytest.raises(RuntimeError, match=f"^norm_modulate_{op}: "):
        getattr(_C, f"norm_modulate_{op}")(**kwargs)
