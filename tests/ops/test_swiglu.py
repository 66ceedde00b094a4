"""swiglu: the Triton backend against the fp64 reference.

Correctness rule (docs/design.md §3), for the output and d_a, d_b:
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol,
eager being ``F.silu(a) * b`` with PyTorch's autograd and the reference the same expression on
fp64 copies of the same values. On CPU the kernels run under the Triton interpreter. Inputs are
fresh random draws each run (the seed is in every failure message); every kernel output starts
as NaN.
"""

import pytest
import torch

import engine.ops.swiglu as sw
from engine.ops.swiglu import swiglu, swiglu_ref
from tests.ops.conftest import poison_outputs
from tests.ops.design_rule import assert_rule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu")  # tests/ops/conftest.py
NAMES = ["out", "da", "db"]


@pytest.fixture(autouse=True)
def allocations(monkeypatch):
    """Every kernel output starts as NaN; the (shape, dtype) of each allocation is recorded."""
    return poison_outputs(monkeypatch, sw)


def make_inputs(shape, dtype, device):
    # a spread over silu's bend and both tails, b of either sign
    a = (3 * torch.randn(shape, device=device)).to(dtype)
    b = torch.randn(shape, device=device).to(dtype)
    return a, b


def run(a, b, dh, backend, cast=None):
    """[out, da, db]; backend a name for swiglu, or "reference"."""
    leaves = [(t.to(cast) if cast else t.detach().clone()).requires_grad_() for t in (a, b)]
    out = swiglu_ref(*leaves) if backend == "reference" else swiglu(*leaves, backend=backend)
    return [out, *torch.autograd.grad(out, leaves, dh.to(out.dtype))]


def check_against_reference(shape, dtype, device, seed):
    a, b = make_inputs(shape, dtype, device)
    dh = torch.randn(shape, device=device).to(dtype)
    kernel = run(a, b, dh, "triton")
    eager = run(a, b, dh, "eager")
    ref = run(a, b, dh, "reference", cast=torch.float64)
    assert_rule(NAMES, kernel, eager, ref, seed)


# Element counts below one program, one spanning several with a ragged end, and the model's
# (B, N, H) layout; all three kernel dtypes.
CASES = [((7, 5), torch.float32), ((2, 37, 300), torch.bfloat16), ((3, 4099), torch.float16),
         ((2, 37, 300), torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dtype", CASES)
def test_triton_matches_reference(shape, dtype, device, seed):
    check_against_reference(shape, dtype, device, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, hidden", [(256 * 256, 2048), (64 * 256, 2816)])
def test_microdit_shapes_match_reference(tokens, hidden, seed):
    """MicroDiT-XL/2's mixer SwiGLU on all 256 tokens of 256 samples, a backbone one on the kept 64."""
    check_against_reference((tokens, hidden), torch.bfloat16, "cuda", seed)


def test_only_the_inputs_are_kept_and_outputs_allocated_once(allocations):
    a, b = (t.requires_grad_() for t in make_inputs((3, 50), torch.float32, "cpu"))
    out = swiglu(a, b, backend="triton")
    assert allocations == [((3, 50), torch.float32)]
    assert [t.data_ptr() for t in out.grad_fn.saved_tensors] == [a.data_ptr(), b.data_ptr()]
    out.sum().backward()
    assert allocations[1:] == [((3, 50), torch.float32)] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device, seed):
    """Views of a packed projection (the two halves of one (N, 2H) output) work as copies do."""
    packed = torch.randn(37, 2 * 96, device=device)
    a, b = packed[:, :96], packed[:, 96:]
    assert not a.is_contiguous()
    torch.testing.assert_close(swiglu(a, b, backend="triton"), swiglu_ref(a, b), rtol=1e-6, atol=1e-6)


def test_custom_ops_pass_opcheck():
    a, b = make_inputs((2, 5, 8), torch.float32, "cpu")
    torch.library.opcheck(sw._fwd_op, (a, b))
    torch.library.opcheck(sw._fwd_op, (a.bfloat16(), b.bfloat16()))
    torch.library.opcheck(sw._bwd_op, (torch.randn_like(a), a, b))


def test_torch_compile_fullgraph_matches_eager_call():
    def fn(a, b):
        return swiglu(a, b, backend="triton").square().sum()

    inputs = make_inputs((2, 9, 40), torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(fn(*leaves), leaves)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_errors():
    a, b = make_inputs((2, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"one shape, dtype and device; got a \(2, 5\) torch.float32 on cpu, b \(2, 4\)"):
        swiglu(a, b[:, :4])
    with pytest.raises(ValueError, match="b \\(2, 5\\) torch.bfloat16"):
        swiglu(a, b.bfloat16())
    with pytest.raises(TypeError, match="floating-point"):
        swiglu(a.long(), b.long())
    with pytest.raises(TypeError, match="computes in fp32 .* got torch.float64"):
        swiglu(a.double(), b.double(), backend="triton")
    with pytest.raises(RuntimeError, match="'cuda'"):
        swiglu(a, b, backend="cuda")
