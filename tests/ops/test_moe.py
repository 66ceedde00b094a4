"""moe: the eager (gather / bmm / indexed add) and triton backends against the dense fp64 reference.

Output and every gradient (x, gate_weight, w1, w2). In fp64 the eager backend and the reference
must agree to rounding; in fp32 and bf16 by the correctness rule of docs/design.md §3 with the
reference in the same dtype as "eager". The triton backend (fp32 on the CPU, where the Triton
interpreter's bf16 tl.dot is wrong; bf16 too on the GPU) meets the rule with the eager backend in
its dtype as "eager", every kernel output starting as NaN. Cases: odd token counts, k not a
multiple of any block size, k = 0 and k = T, exactly tied router scores (the lower token index
wins, in every backend), a token every expert takes and one no expert takes. Inputs are fresh
random draws each run; the seed is in every failure message.
"""

import pytest
import torch
import torch.nn.functional as F

import engine.ops.moe as moe_module
from engine.ops.moe import moe, moe_ref, tokens_per_expert
from tests.ops.conftest import poison_outputs
from tests.ops.design_rule import assert_rule

NAMES = ["out", "dx", "dgate", "dw1", "dw2"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["eager", "triton"]


@pytest.fixture(autouse=True)
def allocations(monkeypatch):
    """Every kernel output starts as NaN; the (shape, dtype) of each allocation is recorded."""
    return poison_outputs(monkeypatch, moe_module)


def make_inputs(B, T, D, E, H, dtype=torch.float64, router_scale=2.0):
    """Router logits of std ``router_scale`` (scores well apart, so rounding rarely reorders them)."""
    x = torch.randn(B, T, D, dtype=torch.float64)
    gate = torch.randn(E, D, dtype=torch.float64) * router_scale / D**0.5
    w1 = torch.randn(E, D, H, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, H, D, dtype=torch.float64) / H**0.5
    return [t.to(dtype) for t in (x, gate, w1, w2)]


def run(inputs, capacity, backend, dout, cast=None):
    """[out, dx, dgate, dw1, dw2] for the output gradient ``dout``; backend "eager" (the gather
    path), "triton" or "reference"."""
    leaves = [(t.to(cast) if cast else t.detach().clone()).requires_grad_() for t in inputs]
    out = moe_ref(*leaves, capacity) if backend == "reference" else moe(*leaves, capacity, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype), allow_unused=True)
    return [out] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def assert_same(got, expected, seed, rtol=1e-12):
    for name, g, e in zip(NAMES, got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, \
            f"{name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
        error = (g - e).abs().max().item() if g.numel() else 0.0
        scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
        assert error <= rtol * scale, f"{name}: max error {error:.3g} vs max {scale:.3g} (seed {seed})"


# (B, T, D, E, H, capacity): T odd and prime; k = int(capacity T / E) = 18, 25, 1, 3 (T = 9 with
# 3 experts at capacity 3: every expert takes every token), 0 (no expert takes any token).
CASES = [
    (3, 37, 24, 4, 40, 2.0),
    (2, 101, 16, 8, 24, 2.0),
    (2, 5, 8, 3, 12, 1.0),
    (2, 9, 8, 3, 8, 3.0),
    (2, 13, 8, 8, 16, 0.5),
]


@pytest.mark.parametrize("B,T,D,E,H,capacity", CASES)
def test_gather_matches_reference_fp64(B, T, D, E, H, capacity, seed):
    inputs = make_inputs(B, T, D, E, H)
    dout = torch.randn(B, T, D, dtype=torch.float64)
    assert_same(run(inputs, capacity, "eager", dout), run(inputs, capacity, "reference", dout), seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_design_rule(dtype, seed):
    B, T, D, E, H, capacity = 3, 37, 24, 4, 40, 2.0
    inputs = make_inputs(B, T, D, E, H, dtype)
    dout = torch.randn(B, T, D).to(dtype)
    kernel = run(inputs, capacity, "eager", dout)
    eager = run(inputs, capacity, "reference", dout)
    ref = run(inputs, capacity, "reference", dout, cast=torch.float64)
    assert_rule(NAMES, kernel, eager, ref, seed)


def check_backend(inputs, capacity, backend, dout, seed):
    """The backend's [out, dx, dgate, dw1, dw2] for fp64 ``inputs``, checked against the reference:
    eager in fp64 to rounding, triton in fp32 by the correctness rule."""
    if backend == "eager":
        got = run(inputs, capacity, "eager", dout)
        assert_same(got, run(inputs, capacity, "reference", dout), seed)
        return got
    low = [t.float() for t in inputs]
    got = run(low, capacity, backend, dout.float())
    assert_rule(NAMES, got, run(low, capacity, "eager", dout.float()), run(inputs, capacity, "reference", dout), seed)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_scores_go_to_the_lower_token_index(backend, seed):
    """A zero router: every token scores 1/E for every expert, so each expert takes tokens 0 .. k-1."""
    B, T, D, E, H, capacity = 2, 11, 8, 4, 16, 2.0
    x, gate, w1, w2 = make_inputs(B, T, D, E, H)
    gate = torch.zeros_like(gate)
    k = tokens_per_expert(T, E, capacity)
    dout = torch.randn(B, T, D, dtype=torch.float64)
    got = check_backend([x, gate, w1, w2], capacity, backend, dout, seed)
    expected = sum(F.gelu(x[:, :k] @ w1[e]) @ w2[e] for e in range(E)) / E  # (B, k, D)
    rtol = 1e-12 if backend == "eager" else 1e-5
    torch.testing.assert_close(got[0][:, :k].double(), expected, rtol=rtol, atol=rtol)
    assert torch.equal(got[0][:, k:], torch.zeros_like(got[0][:, k:]))
    assert torch.equal(got[1][:, k:], torch.zeros_like(got[1][:, k:]))  # dx of tokens no expert took


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_taken_by_every_expert_and_by_none(backend, seed):
    """The router is the identity on the first E channels, so x's first E channels are the logits.
    Sample 0: token 0 has equal logits (1/3 per expert) and wins every expert's second place,
    tokens 4-6 tie with it and lose by index. Sample 1: token 3's scores sit below every expert's
    two peaked tokens (no tie), so no expert takes it."""
    E, T, D, H, capacity = 3, 7, 6, 10, 1.0  # k = int(7 / 3) = 2
    assert tokens_per_expert(T, E, capacity) == 2
    x, _, w1, w2 = make_inputs(2, T, D, E, H)
    gate = torch.eye(E, D, dtype=torch.float64)
    logits = torch.zeros(2, T, E, dtype=torch.float64)
    logits[0, 1, 0] = logits[0, 2, 1] = logits[0, 3, 2] = 3.0
    for token, expert in ((0, 0), (1, 0), (2, 1), (4, 1), (5, 2), (6, 2)):
        logits[1, token, expert] = 3.0
    logits[1, 3] = torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64)
    x[..., :E] = logits
    dout = torch.randn(2, T, D, dtype=torch.float64)
    got = check_backend([x, gate, w1, w2], capacity, backend, dout, seed)
    every = sum(F.gelu(x[0, 0] @ w1[e]) @ w2[e] for e in range(E)) / E
    rtol = 1e-12 if backend == "eager" else 1e-5
    torch.testing.assert_close(got[0][0, 0].double(), every, rtol=rtol, atol=rtol)
    for b, token in ((0, 4), (0, 5), (0, 6), (1, 3)):
        assert torch.equal(got[0][b, token], torch.zeros_like(got[0][b, token])), (b, token)
        assert torch.equal(got[1][b, token], torch.zeros_like(got[1][b, token])), (b, token)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x, gate, w1, w2 = [t.float().requires_grad_() for t in make_inputs(0, 9, 8, 3, 8)]
    out = moe(x, gate, w1, w2, backend=backend)
    assert out.shape == (0, 9, 8)
    grads = torch.autograd.grad(out, [x, gate, w1, w2], torch.ones_like(out), allow_unused=True)
    for g, leaf in zip(grads, [x, gate, w1, w2]):
        assert g is None or torch.equal(g, torch.zeros_like(leaf))


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(x=a["x"][0]), "x of shape"),
    (lambda a: a.update(gate_weight=a["gate_weight"][:, :5]), "gate_weight must have shape"),
    (lambda a: a.update(w1=a["w1"][:2]), "w1 must have shape"),
    (lambda a: a.update(w2=a["w2"].transpose(1, 2)), "w2 must have shape"),
    (lambda a: a.update(x=a["x"].long()), "x must be a floating-point"),
    (lambda a: a.update(capacity=0.0), "capacity must be > 0"),
    (lambda a: a.update(capacity=4.0), "capacity must be at most E = 3"),
])
def test_errors(change, message):
    x, gate, w1, w2 = make_inputs(2, 9, 8, 3, 10)
    args = dict(x=x, gate_weight=gate, w1=w1, w2=w2, capacity=2.0)
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        moe(**args)


def test_cuda_backend_is_an_error():
    x, gate, w1, w2 = make_inputs(2, 9, 8, 3, 10, torch.float32)
    with pytest.raises(RuntimeError, match="no 'cuda' backend"):
        moe(x, gate, w1, w2, backend="cuda")


def test_triton_refuses_fp64():
    x, gate, w1, w2 = make_inputs(2, 9, 8, 3, 10)
    with pytest.raises(TypeError, match="triton backend computes the experts in"):
        moe(x, gate, w1, w2, backend="triton")


# ---------------------------------------------------------------------------------------------
# The triton backend.


def check_triton(B, T, D, E, H, capacity, dtype, device, seed):
    inputs = [t.to(device) for t in make_inputs(B, T, D, E, H, dtype)]
    dout = torch.randn(B, T, D, device=device).to(dtype)
    kernel = run(inputs, capacity, "triton", dout)
    eager = run(inputs, capacity, "eager", dout)
    ref = run(inputs, capacity, "reference", dout, cast=torch.float64)
    assert_rule(NAMES, kernel, eager, ref, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,T,D,E,H,capacity", CASES)
def test_triton_matches_reference_fp32(B, T, D, E, H, capacity, device, seed):
    check_triton(B, T, D, E, H, capacity, torch.float32, device, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,D,E,H,capacity", CASES)
def test_triton_matches_reference_bf16(B, T, D, E, H, capacity, seed):
    check_triton(B, T, D, E, H, capacity, torch.bfloat16, "cuda", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("H", [768, 3840])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_microdit_sizes_match_reference(H, dtype, seed):
    """MicroDiT's MoE blocks (width 1024, 8 experts, capacity 2) at 256 tokens a sample."""
    check_triton(4, 256, 1024, 8, H, 2.0, dtype, "cuda", seed)


def test_triton_keeps_the_activations_and_expert_outputs_only():
    """What the backward keeps beyond the inputs and the routing tables: the pre-activation and
    its GELU (E, B k, H) each (for GELU's gradient and d_w2) and the expert outputs (E, B k, D)
    (for d_score); no gathered copy of x, no tensor with both an expert and a token axis of length T."""
    B, T, D, E, H, capacity = 2, 13, 8, 4, 24, 2.0
    k = tokens_per_expert(T, E, capacity)
    x, gate, w1, w2 = [t.requires_grad_() for t in make_inputs(B, T, D, E, H, torch.float32)]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        moe(x, gate, w1, w2, capacity, backend="triton")
    expert_path = [shape for shape, dtype in kept if dtype == torch.float32 and len(shape) == 3 and shape[0] == E]
    # pre, gelu(pre), y, w1, w2
    assert sorted(expert_path) == sorted([(E, B * k, H), (E, B * k, H), (E, B * k, D), (E, D, H), (E, H, D)])


CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def test_triton_launch_grids_fit_cuda_limits(monkeypatch):
    """Every kernel's grid at MicroDiT-XL/2's largest token count (the mixer at 256 px: 256 tokens
    a sample at stage 1's batch of 256, 65,536 in all) stays within CUDA's per-axis limits. The
    interpreter has no such limit, so the launches are recorded, not run."""
    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.setdefault(self.name, []).append(tuple(grid))
            return lambda *args, **kwargs: None

    for name in ("_moe_combine_kernel", "_moe_expert_grad_kernel"):
        monkeypatch.setattr(moe_module, name, Recorder(name))
    B, T, D, E, H = 256, 256, 8, 8, 16  # widths play no part in the token axes
    leaves = [t.requires_grad_() for t in make_inputs(B, T, D, E, H, torch.float32)]
    out = moe(*leaves, 2.0, backend="triton")
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert sorted(grids) == ["_moe_combine_kernel", "_moe_expert_grad_kernel"]
    for name, launched in grids.items():
        for grid in launched:
            assert all(0 < size <= limit for size, limit in zip(grid, CUDA_GRID_LIMITS)), (name, grid)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_gradients_are_deterministic(device):
    """No atomics: each weight gradient is one program's ordered sum, the combine sums experts in
    order, d_score's column-block partials are added by one torch sum. Bitwise equal across runs."""
    shape, dtype = ((2, 37, 24, 4, 40), torch.float32) if device == "cpu" else ((8, 256, 1024, 8, 3840), torch.bfloat16)
    inputs = [t.to(device) for t in make_inputs(*shape, dtype)]
    dout = torch.randn(*shape[:3], device=device).to(dtype)
    first, second = run(inputs, 2.0, "triton", dout), run(inputs, 2.0, "triton", dout)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_triton_under_autocast(seed):
    """fp32 inputs and weights, the forward under bf16 autocast: the experts run in bf16, the
    output is bf16, the gradients come back in the leaves' fp32."""
    inputs = [t.cuda() for t in make_inputs(2, 37, 64, 4, 96, torch.float32)]
    dout = torch.randn(2, 37, 64, device="cuda").to(torch.bfloat16)

    def under_autocast(backend):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = moe(*leaves, 2.0, backend=backend)
        return [out, *torch.autograd.grad(out, leaves, dout)]

    kernel, eager = under_autocast("triton"), under_autocast("eager")
    assert [t.dtype for t in kernel] == [torch.bfloat16] + [torch.float32] * 4
    ref = run(inputs, 2.0, "reference", dout, cast=torch.float64)
    assert_rule(NAMES, kernel, eager, ref, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_copies_are_read_and_gradients_reach_the_weights(backend, seed):
    """With w1_lp / w2_lp the experts compute with the copies (here made to differ from the
    weights, which a real copy never does, so that reading one shows): output and d_x those of
    moe on the copies' values, and the copies' gradients land on w1 / w2 in their own dtype."""
    x, gate, w1, w2 = make_inputs(2, 37, 24, 4, 40, torch.float32)
    w1_lp, w2_lp = 1.5 * w1, w2 - 0.25
    dout = torch.randn(2, 37, 24)
    leaves = [t.clone().requires_grad_() for t in (x, gate, w1, w2)]
    out = moe(*leaves, 2.0, backend=backend, w1_lp=w1_lp, w2_lp=w2_lp)
    got = [out, *torch.autograd.grad(out, leaves, dout)]
    want = run([x, gate, w1_lp, w2_lp], 2.0, backend, dout)
    assert_same(got, want, seed, rtol=1e-6)
    assert [t.dtype for t in got[3:]] == [torch.float32] * 2
    plain = moe(x, gate, w1, w2, 2.0, backend=backend)
    assert not torch.allclose(plain, out), "the copies were not read"
    with pytest.raises(ValueError, match="w2_lp"):
        moe(x, gate, w1, w2, 2.0, backend=backend, w2_lp=w2_lp[:, :-1])


def test_custom_ops_pass_opcheck():
    B, T, D, E, H, capacity = 2, 9, 8, 3, 16, 2.0
    x, gate, w1, w2 = make_inputs(B, T, D, E, H, torch.float32)
    score, rows = moe_module._choose(x, gate, capacity)
    rows = rows.to(torch.int32)
    slots = moe_module._slots(rows, B * T, E)
    args = (x.reshape(B * T, D), w1, w2, score.contiguous(), rows, slots)
    torch.library.opcheck(moe_module._fwd_op, args)
    _, pre, hidden, y = moe_module._forward_impl(*args)
    torch.library.opcheck(moe_module._bwd_op, (torch.randn(B * T, D), *args, pre, hidden, y, torch.float32))
    torch.library.opcheck(moe_module._bwd_op, (torch.randn(B * T, D), *args, pre, hidden, y, torch.float64))


def test_torch_compile_fullgraph_matches_eager_call():
    def fn(x, gate, w1, w2):
        return moe(x, gate, w1, w2, 2.0, backend="triton").square().sum()

    inputs = make_inputs(2, 9, 8, 3, 16, torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(fn(*leaves), leaves)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
