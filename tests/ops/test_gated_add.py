"""gated_add: the Triton backend against the fp64 reference.

Correctness rule (docs/design.md §3), for the output and d_r, d_a, d_gate:
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol,
eager being ``r + a * gate[:, None].to(a.dtype)`` with PyTorch's autograd and the reference the
same expression on fp64 copies of the same values. On CPU the kernels run under the Triton
interpreter. Inputs are fresh random draws each run (the seed is in every failure message);
every kernel output starts as NaN.
"""

import contextlib
import functools

import pytest
import torch

import engine.ops.gated_add as ga
from engine.ops.gated_add import gated_add, gated_add_ref
from tests.ops.conftest import poison_outputs
from tests.ops.design_rule import assert_rule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu")  # tests/ops/conftest.py
NAMES = ["out", "dr", "da", "dgate"]


@pytest.fixture(autouse=True)
def allocations(monkeypatch):
    """Every kernel output starts as NaN; the (shape, dtype) of each allocation is recorded."""
    return poison_outputs(monkeypatch, ga)


def make_inputs(B, N, D, dtype, gate_dtype, device):
    r = torch.randn(B, N, D, device=device).to(dtype)
    a = torch.randn(B, N, D, device=device).to(dtype)
    gate = torch.randn(B, D, device=device).to(gate_dtype)
    return r, a, gate


def run(r, a, gate, dout, backend, cast=None, forward_context=contextlib.nullcontext):
    """[out, dr, da, dgate]; backend a name for gated_add, or "reference"."""
    leaves = [(t.to(cast) if cast else t.detach().clone()).requires_grad_() for t in (r, a, gate)]
    with forward_context():
        out = gated_add_ref(*leaves) if backend == "reference" else gated_add(*leaves, backend=backend)
    return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def check_against_reference(B, N, D, dtype, gate_dtype, device, seed):
    r, a, gate = make_inputs(B, N, D, dtype, gate_dtype, device)
    dout = torch.randn(B, N, D, device=device).to(dtype)
    kernel = run(r, a, gate, dout, "triton")
    eager = run(r, a, gate, dout, "eager")
    ref = run(r, a, gate, dout, "reference", cast=torch.float64)
    assert_rule(NAMES, kernel, eager, ref, seed)


# (B, N, D, activation dtype, gate dtype). D = 150 and 72 are not multiples of BLOCK_D (128);
# N = 37 is one partial row block; N = 300 gives several token ranges per channel block (fp32
# d_gate partials summed afterwards), the last one partial. An fp32 gate with bf16 activations
# is the model's mixed-precision case.
CASES = [
    (3, 37, 150, torch.bfloat16, torch.float32),
    (3, 37, 150, torch.bfloat16, torch.bfloat16),
    (3, 37, 150, torch.float32, torch.float32),
    (2, 37, 72, torch.float16, torch.float32),
    (2, 300, 72, torch.bfloat16, torch.float32),
    (1, 300, 130, torch.float32, torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{str(c[3])[6:]}-gate-{str(c[4])[6:]}")
def test_triton_matches_reference(case, device, seed):
    check_against_reference(*case, device, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("B, N", [(64, 256), (32, 1024), (1, 4096)])
def test_pixart_shapes_match_reference(B, N, seed):
    check_against_reference(B, N, 1152, torch.bfloat16, torch.float32, "cuda", seed)


def test_token_ranges_are_split_over_programs(allocations, seed):
    """On CPU the split assumes 2 multiprocessors: 300 tokens of one sample go to several
    programs per channel block, whose fp32 partial d_gate sums are then added."""
    r, a, gate = make_inputs(1, 300, 130, torch.float32, torch.float32, "cpu")
    dout = torch.randn(1, 300, 130)
    got = run(r, a, gate, dout, "triton")
    (partial_shape, dtype), dgate_allocation = allocations[-2:]  # the last program sums the partials into d_gate
    assert partial_shape[0] > 1 and partial_shape[1:] == (1, 130) and dtype == torch.float32, allocations
    assert dgate_allocation == ((1, 130), torch.float32), allocations
    want = run(r, a, gate, dout, "reference", cast=torch.float64)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} (seed {seed}): {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_activations_with_fp32_gate(device, seed):
    """As in the model: bf16 activations, an fp32 gate, the forward under autocast. The output
    is bf16, d_gate comes back fp32, and d_r is the output gradient itself."""
    r, a, gate = make_inputs(2, 37, 150, torch.bfloat16, torch.float32, device)
    dout = torch.randn(2, 37, 150, device=device).to(torch.bfloat16)
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    kernel = run(r, a, gate, dout, "triton", forward_context=autocast)
    eager = run(r, a, gate, dout, "eager", forward_context=autocast)
    ref = run(r, a, gate, dout, "reference", cast=torch.float64)
    assert [t.dtype for t in kernel] == [torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32]
    assert torch.equal(kernel[1], dout)
    assert_rule(NAMES, kernel, eager, ref, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_gradients_are_deterministic(device):
    """d_gate adds fixed per-program partials in a fixed order: bitwise equal across runs."""
    B, N, D = (2, 300, 72) if device == "cpu" else (64, 256, 1152)
    r, a, gate = make_inputs(B, N, D, torch.bfloat16, torch.float32, device)
    dout = torch.randn(B, N, D, device=device).to(torch.bfloat16)
    first, second = run(r, a, gate, dout, "triton"), run(r, a, gate, dout, "triton")
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), name


def test_only_the_needed_gradients_are_computed(monkeypatch):
    calls, backward_impl = [], ga._backward_impl
    monkeypatch.setattr(ga, "_backward_impl", lambda *args: calls.append(1) or backward_impl(*args))
    r, a, gate = make_inputs(2, 5, 8, torch.float32, torch.float32, "cpu")
    r.requires_grad_()
    gated_add(r, a, gate, backend="triton").sum().backward()  # only r trains: no kernel
    assert calls == [] and torch.equal(r.grad, torch.ones_like(r))


def test_custom_ops_pass_opcheck():
    r, a, gate = make_inputs(2, 5, 8, torch.float32, torch.float32, "cpu")
    torch.library.opcheck(ga._fwd_op, (r, a, gate))
    torch.library.opcheck(ga._fwd_op, (r.bfloat16(), a.bfloat16(), gate))
    torch.library.opcheck(ga._bwd_op, (torch.randn_like(a), a, gate))
    torch.library.opcheck(ga._bwd_op, (torch.randn_like(a).bfloat16(), a.bfloat16(), gate))


COMPILERS = [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device, compiler", COMPILERS)
def test_torch_compile_fullgraph_matches_eager_call(device, compiler):
    def fn(r, a, gate):
        return gated_add(r, a, gate, backend="triton").square().sum()

    inputs = make_inputs(2, 9, 40, torch.float32, torch.float32, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(fn(*leaves), leaves)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_compile_with_auto_backend_traces_eager(monkeypatch):
    """Under torch.compile auto means eager (Inductor fuses the multiply and add itself). On CPU
    auto is eager anyway, so resolution is made to pick triton as on a GPU."""
    monkeypatch.setattr(ga, "resolve", lambda backend, device, op, prefer: "triton" if backend in (None, "auto") else backend)
    monkeypatch.delenv("ENGINE_BACKEND", raising=False)
    r, a, gate = make_inputs(2, 5, 8, torch.float32, torch.float32, "cpu")
    assert type(gated_add(r, a.requires_grad_(), gate).grad_fn).__name__ == "_GatedAddFunctionBackward"

    def graph_targets(backend):
        targets = []

        def record(gm, example_inputs):
            targets.extend(str(node.target) for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
                           for node in module.graph.nodes)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(lambda r, a, g: gated_add(r, a, g, backend=backend), fullgraph=True, backend=record)(r, a, gate)
        return targets

    assert "engine.gated_add_fwd.default" in graph_targets("triton")
    assert not any("engine.gated_add" in t for t in graph_targets(None))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    r, a, gate = make_inputs(2, 5, 8, torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"r and a of one shape \(B, N, D\); got r \(2, 5, 8\), a \(2, 4, 8\)"):
        gated_add(r, a[:, :4], gate, backend=backend)
    with pytest.raises(ValueError, match=r"gate must have shape \(B, D\) = \(2, 8\), got \(2, 1, 8\)"):
        gated_add(r, a, gate[:, None], backend=backend)
    with pytest.raises(TypeError, match="gate must be a floating-point tensor, got torch.int64"):
        gated_add(r, a, gate.long(), backend=backend)


def test_triton_refuses_fp64():
    r, a, gate = make_inputs(2, 5, 8, torch.float64, torch.float64, "cpu")
    with pytest.raises(TypeError, match="computes in fp32 .* got r torch.float64"):
        gated_add(r, a, gate, backend="triton")


def test_cuda_and_unknown_backends_are_errors():
    r, a, gate = make_inputs(2, 5, 8, torch.float32, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="'cuda'"):
        gated_add(r, a, gate, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        gated_add(r, a, gate, backend="fast")


def test_no_tokens_gives_zero_gate_gradient():
    r, a, gate = (t.requires_grad_() for t in make_inputs(2, 0, 8, torch.float32, torch.float32, "cpu"))
    out = gated_add(r, a, gate, backend="triton")
    out.sum().backward()
    assert out.shape == (2, 0, 8) and torch.equal(gate.grad, torch.zeros(2, 8))
