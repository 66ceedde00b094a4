"""mlp (Linear -> tanh-GELU -> Linear): the triton and cuda backends against the fp64 reference.

Correctness rule (docs/design.md §3), for y and dx, dw1, db1, dw2, db2:
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol,
eager being F.linear -> F.gelu -> F.linear with PyTorch's autograd, the reference ``mlp_ref`` on
fp64 copies. On CPU tensors the cuda backend runs engine._C's C++ reference of cuBLASLt's GEMMs
and epilogues (so CI checks the row-major / column-major mapping of every GEMM), the Triton
passes run in the interpreter; on the GPU, cuBLASLt itself. Inputs are fresh random draws each
run (the seed is in every failure message); every kernel output starts as NaN.
"""

import contextlib
import functools

import pytest
import torch

from engine.ops import _gemm
from engine.ops.backend import extension
from engine.ops.mlp import mlp, mlp_ref
from tests.ops.design_rule import assert_rule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = ["triton", "cuda"]
NAMES = ["y", "dx", "dw1", "db1", "dw2", "db2"]
pytestmark = [pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu"),  # tests/ops/conftest.py
              pytest.mark.skipif(extension() is None, reason="engine._C is not built")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output (allocated in engine.ops._gemm, which both backends use) starts as NaN."""
    monkeypatch.setattr(_gemm, "new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                    device=device))


def make_inputs(tokens, K, H, N, dtype, device):
    """x (*tokens, K), then weights scaled so both pre-activations are ~N(0, 1) (GELU's curved
    region), and biases."""
    x = torch.randn(*tokens, K, device=device).to(dtype)
    w1 = (torch.randn(H, K, device=device) * K**-0.5).to(dtype)
    b1 = (0.5 * torch.randn(H, device=device)).to(dtype)
    w2 = (torch.randn(N, H, device=device) * H**-0.5).to(dtype)
    b2 = (0.5 * torch.randn(N, device=device)).to(dtype)
    return [x, w1, b1, w2, b2]


def run(inputs, dy, backend, cast=None, forward_context=contextlib.nullcontext):
    leaves = [(t.to(cast) if cast else t.detach().clone()).requires_grad_() for t in inputs]
    with forward_context():
        y = mlp_ref(*leaves) if backend == "reference" else mlp(*leaves, backend=backend)
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


def check_against_reference(tokens, K, H, N, dtype, backend, device, seed):
    inputs = make_inputs(tokens, K, H, N, dtype, device)
    dy = torch.randn(*tokens, N, device=device).to(dtype)
    assert_rule(NAMES, run(inputs, dy, backend), run(inputs, dy, "eager"),
                run(inputs, dy, "reference", cast=torch.float64), seed)


# (tokens, K, H, N, dtype): no size a multiple of 8 or of a Triton block.
CASES = [((3, 37), 40, 150, 24, torch.bfloat16), ((3, 37), 40, 150, 24, torch.float32),
         ((2, 19), 24, 72, 40, torch.float16), ((50,), 16, 96, 16, torch.bfloat16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[2]}-{c[3]}-{str(c[4])[6:]}")
def test_backends_match_reference(case, backend, device, seed):
    tokens, K, H, N, dtype = case
    if device == "cuda" and backend == "cuda" and any(n % 8 for n in (K, H, N)):
        K, H, N = 40, 152, 24  # cuBLASLt wants 16-byte-aligned rows for 16-bit operands
    check_against_reference(tokens, K, H, N, dtype, backend, device, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K, H, N", [(1152, 4608, 1152), (4096, 1152, 1152)])  # block MLP, caption projection
def test_pixart_shapes_match_reference(K, H, N, backend, seed):
    check_against_reference((8, 256), K, H, N, torch.bfloat16, backend, "cuda", seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_with_fp32_parameters(backend, device, seed):
    """As the model trains: fp32 parameters, the forward under bf16 autocast. y is bf16, every
    parameter gradient fp32 and unrounded (eager's are bf16 values cast up)."""
    inputs = make_inputs((3, 37), 40, 152, 24, torch.float32, device)
    dy = torch.randn(3, 37, 24, device=device)
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    kernel = run(inputs, dy, backend, forward_context=autocast)
    eager = run(inputs, dy, "eager", forward_context=autocast)
    assert kernel[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in kernel[1:])
    assert_rule(NAMES, kernel, eager, run(inputs, dy, "reference", cast=torch.float64), seed)
    for name, got, want in zip(NAMES[2:], kernel[2:], eager[2:]):
        assert torch.equal(want, want.bfloat16().float()), f"eager {name} is not bf16-valued"
        assert not torch.equal(got, got.bfloat16().float()), f"{name} was rounded to bf16"


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_input_and_frozen_layers(backend):
    """Gradients only where asked: x frozen (first layer on data), fc2 frozen, fc1 frozen."""
    inputs = make_inputs((2, 9), 16, 40, 8, torch.float32, "cpu")
    for trainable in [(False, True, True, True, True), (True, True, True, False, False),
                      (True, False, False, True, True)]:
        leaves = [t.clone().requires_grad_(flag) for t, flag in zip(inputs, trainable)]
        mlp(*leaves, backend=backend).square().sum().backward()
        ref = [t.clone().double().requires_grad_(flag) for t, flag in zip(inputs, trainable)]
        mlp_ref(*ref).square().sum().backward()
        for t, r, flag in zip(leaves, ref, trainable):
            assert (t.grad is None) == (not flag)
            if flag:
                torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


COMPILERS = [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device, compiler", COMPILERS)
def test_torch_compile_fullgraph_matches_eager_call(device, compiler):
    def fn(*args):
        return mlp(*args, backend="cuda").square().sum()

    inputs = make_inputs((2, 9), 16, 40, 16, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(fn(*leaves), leaves)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    x, w1, b1, w2, b2 = make_inputs((2, 5), 8, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"x \(..., K\), w1 \(H, K\), w2 \(N, H\); got x \(2, 5, 8\), w1 \(16, 8\), "
                                         r"w2 \(4, 15\)"):
        mlp(x, w1, b1, w2[:, :15], b2)
    with pytest.raises(ValueError, match=r"b1 must have shape \(16,\) and b2 \(4,\), got None and \(4,\)"):
        mlp(x, w1, None, w2, b2)
    with pytest.raises(TypeError, match="must share a dtype"):
        mlp(x, w1, b1, w2.double(), b2, backend="cuda")


def test_cuda_backend_without_cublaslt_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_gemm, "cublaslt_missing", lambda device_type: True)
    with pytest.raises(RuntimeError, match="built without cuBLASLt; use 'triton'"):
        mlp(*make_inputs((2, 5), 8, 16, 4, torch.float32, "cpu"), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_and_strided_input(backend, seed):
    """A (1, H) second weight whose row stride is 1 (torch calls it contiguous; as a leading
    dimension it is invalid), one token, and an x that is a transposed view."""
    _, w1, b1, _, b2 = make_inputs((1,), 16, 24, 1, torch.float32, "cpu")
    w2 = torch.randn(24, 1).t()  # (1, 24) with row stride 1: one output feature
    for x in (torch.randn(1, 1, 16), torch.randn(16, 5).t()):
        inputs = [x, w1, b1, w2, b2]
        dy = torch.randn(*x.shape[:-1], 1)
        got, want = run(inputs, dy, backend), run(inputs, dy, "reference", cast=torch.float64)
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} (seed {seed}): {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_output_gradient(backend, seed):
    """A loss of y's feature sums gives autograd's gradient of y as a broadcast view of one
    (N,) row (strides 0, 0, 1), which is not a valid GEMM operand as it stands."""
    inputs = make_inputs((3, 7), 16, 40, 8, torch.float32, "cpu")
    weights = torch.randn(8)
    grads = []
    for fn in (functools.partial(mlp, backend=backend), mlp_ref):
        leaves = [t.clone().double().requires_grad_() if fn is mlp_ref else t.clone().requires_grad_() for t in inputs]
        (fn(*leaves).sum(dim=(0, 1)) * weights.to(leaves[0].dtype)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(NAMES[1:], *grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} (seed {seed}): {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_gives_zero_gradients(backend):
    leaves = [t.requires_grad_() for t in make_inputs((0,), 8, 16, 4, torch.float32, "cpu")]
    y = mlp(*leaves, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 4)
    for t in leaves[1:]:
        assert torch.equal(t.grad, torch.zeros_like(t)), t.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_copies_stand_in_for_the_cast(backend):
    """w1_lp .. b2_lp in the compute dtype are read instead of the parameters' casts (copies of
    other values show in the output); gradients reach the fp32 parameters; a copy of the wrong
    shape is an error."""
    x, *params = make_inputs((3, 7), 16, 40, 8, torch.float32, "cpu")
    leaves = [p.clone().requires_grad_() for p in params]
    copies = [(0.5 * p).bfloat16() for p in params]  # not the parameters' values
    names = dict(zip(("w1_lp", "b1_lp", "w2_lp", "b2_lp"), copies))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x, *leaves, backend=backend, **names)
    torch.testing.assert_close(y.float(), mlp_ref(x.double(), *(c.double() for c in copies)).float(),
                               rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in leaves)
    with pytest.raises(ValueError, match=r"w2_lp is \(8, 20\)"):
        mlp(x, *params, backend=backend, w2_lp=copies[2][:, :20])
