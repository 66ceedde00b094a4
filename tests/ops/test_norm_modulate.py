"""norm_modulate / add_norm_modulate: every backend against the fp64 reference.

Correctness rule (docs/design.md §3): for every output and gradient,
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol.
On CPU the triton backend runs under the Triton interpreter and cuda through engine._C's C++
reference path. Inputs are fresh random draws each run (tests/conftest.py seeds torch from
os.urandom); the seed is in every failure message.
"""

import pytest
import torch

import engine.ops.norm_modulate as nm
from engine.ops.norm_modulate import add_norm_modulate, add_norm_modulate_ref, norm_modulate, norm_modulate_ref

# atol as a fraction of the reference's largest magnitude, per result dtype. It only matters
# where eager happens to be almost exact (e.g. fp32 d_shift of bf16 activations: both sum the
# same values, differing only in summation order). fp32: ~100 fp32 ulps, room for reordered
# sums over N = 1000 rows; bf16 / fp16: a quarter of one rounding step of that dtype at 1.0.
ATOL_FRACTION = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 2.5e-4}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu")  # tests/ops/conftest.py
BACKENDS = ["triton", "cuda"]


@pytest.fixture
def seed(_fresh_seed):
    return _fresh_seed  # conftest seeds torch afresh for every test; failures name the seed


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output (and workspace) starts as NaN, so an element a kernel fails to write shows."""
    monkeypatch.setattr(nm, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make_inputs(B, N, D, dtype, mod_dtype, gated, device):
    x = torch.randn(B, N, D, device=device).to(dtype)
    y = torch.randn(B, N, D, device=device).to(dtype)
    # Modulation of PixArt's size: |scale|, |shift|, |gate| mostly 0.1 - 1.
    shift, scale, gate = (0.5 * torch.randn(B, D, device=device).to(mod_dtype) for _ in range(3))
    return x, y, (gate if gated else None), shift, scale


def run(op, inputs, out_grads, backend, cast=None):
    """Outputs and grads of every tensor input; `cast` converts inputs and output grads first."""
    leaves = [None if t is None else (t.to(cast) if cast else t.detach().clone()).requires_grad_() for t in inputs]
    outs = op(*leaves, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, present, [g.to(outs[0].dtype) for g in out_grads], allow_unused=False)
    return list(outs) + list(grads)


def assert_rule(names, kernel, eager, ref, seed):
    for name, k, e, r in zip(names, kernel, eager, ref, strict=True):
        assert k.dtype == e.dtype and k.shape == e.shape, f"{name}: {k.dtype}{tuple(k.shape)} vs eager {e.dtype}{tuple(e.shape)}"
        err_kernel = (k.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        atol = ATOL_FRACTION[k.dtype] * r.abs().max().item()
        assert err_kernel <= 2 * err_eager + atol, (
            f"{name}: kernel error {err_kernel:.3g} > 2 x eager error {err_eager:.3g} + atol {atol:.3g} (seed {seed})")


def check_add_norm_modulate(backend, device, B, N, D, dtype, mod_dtype, gated, with_dr, seed):
    x, y, gate, shift, scale = make_inputs(B, N, D, dtype, mod_dtype, gated, device)
    # Drawn in the activation dtype, so the fp64 reference sees exactly the same values.
    dh = torch.randn(B, N, D, device=device).to(dtype)
    # Without dr, r is not used downstream: only h carries a gradient.
    out_grads = [torch.randn(B, N, D, device=device).to(dtype), dh] if with_dr else [dh]

    def op(x, y, gate, shift, scale, backend):
        r, h = add_norm_modulate(x, y, gate, shift, scale, backend=backend)
        return (r, h) if with_dr else (h,)

    inputs = (x, y, gate, shift, scale)
    kernel = run(op, inputs, out_grads, backend)
    eager = run(op, inputs, out_grads, "eager")
    ref = run(op, inputs, out_grads, "eager", cast=torch.float64)
    names = (["r"] if with_dr else []) + ["h", "dx", "dy"] + (["dgate"] if gated else []) + ["dshift", "dscale"]
    assert_rule(names, kernel, eager, ref, seed)


def check_norm_modulate(backend, device, B, N, D, dtype, mod_dtype, seed):
    x, _, _, shift, scale = make_inputs(B, N, D, dtype, mod_dtype, False, device)
    out_grads = [torch.randn(B, N, D, device=device).to(dtype)]
    inputs = (x, shift, scale)
    kernel = run(norm_modulate, inputs, out_grads, backend)
    eager = run(norm_modulate, inputs, out_grads, "eager")
    ref = run(norm_modulate, inputs, out_grads, "eager", cast=torch.float64)
    assert_rule(["h", "dx", "dshift", "dscale"], kernel, eager, ref, seed)


# (B, N, D, activation dtype, modulation dtype, gated, with_dr). The interpreter spends ~8 s on
# one bf16 fwd+bwd at N = 1000, D = 1152, so the largest shape gets two cases that between them
# cover every flag and both dtypes; D = 360 (not a multiple of 128) and N = 7 get every flag.
ADD_CASES = [
    (3, 1000, 1152, torch.bfloat16, torch.bfloat16, True, True),
    (3, 1000, 1152, torch.float32, torch.float32, False, False),
    *[(3, 1000, 360, dtype, torch.float32, gated, with_dr)
      for dtype in (torch.bfloat16, torch.float32) for gated in (True, False) for with_dr in (True, False)],
    *[(2, 7, 360, dtype, mod_dtype, gated, with_dr)
      for dtype, mod_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16))
      for gated in (True, False) for with_dr in (True, False)],
]
NORM_CASES = [
    (3, 1000, 1152, torch.bfloat16, torch.float32),
    (3, 1000, 1152, torch.float32, torch.float32),
    (3, 1000, 360, torch.bfloat16, torch.bfloat16),
    (2, 7, 360, torch.float16, torch.float32),
]


def case_id(case):
    B, N, D, dtype, mod_dtype, *flags = case
    text = f"{B}x{N}x{D}-{str(dtype)[6:]}-mod_{str(mod_dtype)[6:]}"
    if flags:
        text += ("-gate" if flags[0] else "-nogate") + ("-dr" if flags[1] else "-nodr")
    return text


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ADD_CASES, ids=case_id)
def test_add_norm_modulate_matches_reference(case, backend, device, seed):
    B, N, D, dtype, mod_dtype, gated, with_dr = case
    check_add_norm_modulate(backend, device, B, N, D, dtype, mod_dtype, gated, with_dr, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NORM_CASES, ids=case_id)
def test_norm_modulate_matches_reference(case, backend, device, seed):
    B, N, D, dtype, mod_dtype = case
    check_norm_modulate(backend, device, B, N, D, dtype, mod_dtype, seed)


@pytest.mark.parametrize("gated", [True, False])
def test_triton_gpu_launch_config(gated, seed):
    """The GPU's default tiling (many programs per sample, a partial last program) on the
    interpreter, at a size where that stays cheap; the public path above uses big CPU tiles."""
    B, N, D = 2, 70, 360
    rows_per_bwd_program = nm.BWD_CONFIG[0] * nm.BWD_CONFIG[1]
    assert N > rows_per_bwd_program and N % rows_per_bwd_program, "want several programs, the last one partial"
    x, y, gate, shift, scale = make_inputs(B, N, D, torch.float32, torch.float32, gated, "cpu")
    r, h, mean, rstd = nm._norm_modulate_fwd_triton(x, y, gate, shift, scale, config=nm.FWD_CONFIG)
    dh, dr = torch.randn(B, N, D), torch.randn(B, N, D)
    dx, dy, dmod = nm._norm_modulate_bwd_triton(dh, dr, r, y, gate, scale, mean, rstd, config=nm.BWD_CONFIG)

    leaves = [t.double().requires_grad_() for t in (x, y, shift, scale)]
    gate64 = None if gate is None else gate.double().requires_grad_()
    ref_r, ref_h = add_norm_modulate_ref(leaves[0], leaves[1], gate64, leaves[2], leaves[3])
    wrt = leaves + ([gate64] if gated else [])
    ref_grads = torch.autograd.grad([ref_r, ref_h], wrt, [dr.double(), dh.double()])
    got = [r, h, dx, dx if dy is None else dy, dmod[0], dmod[1]] + ([dmod[2]] if gated else [])
    want = [ref_r, ref_h, *ref_grads]
    for name, g, w in zip(["r", "h", "dx", "dy", "dshift", "dscale", "dgate"], got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} (seed {seed}): {m}")


def test_custom_ops_pass_opcheck():
    B, N, D = 2, 5, 40
    x, y, gate, shift, scale = make_inputs(B, N, D, torch.float32, torch.float32, True, "cpu")
    for args in [(x, y, gate, shift, scale, "triton"), (x, y, None, shift, scale, "triton"),
                 (x, None, None, shift, scale, "triton")]:
        torch.library.opcheck(nm._fwd_op, args)
    h, mean, rstd, r = nm._fwd_op(x, y, gate, shift, scale, "triton")
    dh = torch.randn_like(h)
    for args in [(dh, torch.randn_like(r), r, y, gate, scale, mean, rstd, "triton"),
                 (dh, None, r, None, None, scale, mean, rstd, "triton")]:
        torch.library.opcheck(nm._bwd_op, args)


@pytest.mark.parametrize("device, compiler", [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph_matches_eager_call(device, compiler):
    """fullgraph=True fails on any graph break. On CPU, aot_eager traces forward and backward
    through the custom ops' fake implementations without needing a code generator."""
    def block(x, y, gate, shift, scale):
        r, h = add_norm_modulate(x, y, gate, shift, scale, backend="triton")
        h2 = norm_modulate(h, shift, scale, backend="triton")
        return (h2 * h2).sum() + (r * r).sum()

    inputs = [torch.randn(2, 9, 48, device=device) for _ in range(2)] + [0.5 * torch.randn(2, 48, device=device) for _ in range(3)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(block(*leaves), leaves)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, w in zip(got, want):
        # The compiled graph may sum the loss in another order: fp32 rounding, not a kernel error.
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


class TinyAdaLNStack(torch.nn.Module):
    """PixArt's residual pattern: each sub-block's output is added (gated) to the residual
    stream and the sum normalised and modulated for the next sub-block, all through
    add_norm_modulate; modulation comes from a conditioning vector as in adaLN-single."""

    def __init__(self, dim, depth, cond_dim, backend):
        super().__init__()
        self.depth, self.backend = depth, backend
        self.modulation = torch.nn.Linear(cond_dim, (2 + 6 * depth) * dim)
        self.mixers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2 * depth))
        self.head = torch.nn.Linear(dim, dim)

    def forward(self, x, cond):                                             # x (B, N, D), cond (B, C)
        mods = self.modulation(cond).chunk(2 + 6 * self.depth, dim=-1)       # each (B, D)
        h = norm_modulate(x, mods[0], mods[1], backend=self.backend)
        for i, mixer in enumerate(self.mixers):
            gate, shift, scale = mods[2 + 3 * i: 5 + 3 * i]
            x, h = add_norm_modulate(x, torch.tanh(mixer(h)), gate, shift, scale, backend=self.backend)
        return self.head(h)                                                 # (B, N, D)


def test_tiny_stack_loss_and_grads_match_eager(seed):
    B, N, D, C = 2, 37, 96, 16
    x, cond, target = torch.randn(B, N, D), torch.randn(B, C), torch.randn(B, N, D)
    stacks = {name: TinyAdaLNStack(D, depth=2, cond_dim=C, backend=name) for name in ("eager", "triton")}
    stacks["triton"].load_state_dict(stacks["eager"].state_dict())
    reference = TinyAdaLNStack(D, depth=2, cond_dim=C, backend="eager").double()
    reference.load_state_dict(stacks["eager"].state_dict())  # the same fp32 values, held in fp64

    def loss_and_grads(stack, dtype):
        loss = torch.nn.functional.mse_loss(stack(x.to(dtype), cond.to(dtype)), target.to(dtype))
        return [loss] + list(torch.autograd.grad(loss, list(stack.parameters())))

    names = ["loss"] + [f"d {name}" for name, _ in reference.named_parameters()]
    assert_rule(names, loss_and_grads(stacks["triton"], torch.float32), loss_and_grads(stacks["eager"], torch.float32),
                loss_and_grads(reference, torch.float64), seed)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    B, N, D = 2, 3, 8
    x, y = torch.randn(B, N, D), torch.randn(B, N, D)
    mod = torch.randn(B, D)
    bad_mod = torch.randn(B, D + 1)
    with pytest.raises(ValueError, match="shift"):
        norm_modulate(x, bad_mod, mod, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        add_norm_modulate(x, y, mod, mod, bad_mod, backend=backend)
    with pytest.raises(ValueError, match="gate"):
        add_norm_modulate(x, y, bad_mod, mod, mod, backend=backend)
    with pytest.raises(ValueError, match="y must"):
        add_norm_modulate(x, torch.randn(B, N + 1, D), None, mod, mod, backend=backend)
    with pytest.raises(ValueError, match="x must"):
        norm_modulate(torch.randn(B, D), mod, mod, backend=backend)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        norm_modulate(torch.ones(B, N, D, dtype=torch.int32), mod, mod, backend=backend)
    with pytest.raises(TypeError, match="shift must be a floating-point"):
        norm_modulate(x, torch.ones(B, D, dtype=torch.int64), mod, backend=backend)
    with pytest.raises(TypeError, match="y must have x's dtype"):
        add_norm_modulate(x, y.double(), None, mod, mod, backend=backend)


def test_kernel_backends_reject_float64_with_a_pointer_to_eager():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='eager'"):
        norm_modulate(x, torch.randn(2, 8), torch.randn(2, 8), backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_modulation_rows_of_a_wider_tensor(backend, device, seed):
    """shift, scale, gate as the model passes them: (B, D) views with row stride 6 D into one
    (B, 6, D) tensor (read in place by the Triton kernels). Outputs and the gradient reaching the
    (B, 6, D) tensor equal those of the same values passed as separate contiguous tensors."""
    B, N, D = 2, 37, 96
    x, y, _, _, _ = make_inputs(B, N, D, torch.bfloat16, torch.float32, True, device)
    mod = 0.5 * torch.randn(B, 6, D, device=device)
    dr, dh = torch.randn(B, N, D, device=device).bfloat16(), torch.randn(B, N, D, device=device).bfloat16()

    def outputs_and_mod_grad(split):
        leaf = mod.clone().requires_grad_()
        gate, shift, scale = (m.contiguous() if not split else m for m in leaf.unbind(1)[:3])
        assert split or gate.is_contiguous()
        assert not split or gate.stride(0) == 6 * D
        r, h = add_norm_modulate(x, y, gate, shift, scale, backend=backend)
        (grad,) = torch.autograd.grad((r, h), leaf, (dr, dh))
        return r, h, grad

    for name, got, want in zip(("r", "h", "dmod"), outputs_and_mod_grad(True), outputs_and_mod_grad(False)):
        assert torch.equal(got, want), f"{name} (seed {seed})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_rows_of_a_fused_projection(backend, device, seed, monkeypatch):
    """x as MicroDiT's qk-norm passes it: a (B, N, D) chunk of a (B, N, 3 D) projection output
    (row stride 3 D). Output and the gradient reaching the (B, N, 3 D) tensor equal those of the
    same values passed contiguous, and the Triton kernels read the chunk in place: no copy of x."""
    B, N, D = 2, 37, 96
    fused = torch.randn(B, N, 3 * D, device=device).bfloat16()
    shift, scale = (0.5 * torch.randn(B, D, device=device) for _ in range(2))
    dh = torch.randn(B, N, D, device=device).bfloat16()
    copies = []
    contiguous = torch.Tensor.contiguous

    def counting_contiguous(t, *args, **kwargs):
        if not t.is_contiguous():
            copies.append(tuple(t.shape))
        return contiguous(t, *args, **kwargs)

    def output_and_grad(in_place):
        leaf = fused.clone().requires_grad_()
        x = leaf.chunk(3, dim=-1)[1] if in_place else leaf.chunk(3, dim=-1)[1].contiguous()
        assert x.stride(1) == (3 * D if in_place else D)
        copies.clear()
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "contiguous", counting_contiguous)
            h = norm_modulate(x, shift, scale, backend=backend)
        (grad,) = torch.autograd.grad(h, leaf, dh)
        return h, grad, list(copies)

    h, grad, copied = output_and_grad(True)
    h_ref, grad_ref, _ = output_and_grad(False)
    assert torch.equal(h, h_ref) and torch.equal(grad, grad_ref), f"seed {seed}"
    assert copied == ([] if backend == "triton" else [(B, N, D)]), copied
