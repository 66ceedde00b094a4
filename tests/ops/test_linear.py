"""linear (+ tanh-GELU): the Triton backend against the fp64 reference.

Correctness rule (docs/design.md §3), for the output and dx, dw, db:
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol,
eager being F.linear (+ F.gelu) with PyTorch's autograd and the reference ``linear_ref`` on fp64
copies of the same values. The GEMMs are cuBLAS's (torch's) in both backends; what the Triton
backend changes is the bias gradient (a split column sum) and, with GELU, GELU's backward, whose
d_pre it stores in the activation dtype. On CPU the kernel runs under the Triton interpreter.
Inputs are fresh random draws each run (the seed is in every failure message); every kernel
output starts as NaN.
"""

import contextlib
import functools

import pytest
import torch

import engine.ops.linear as lm
from engine.ops import _gemm
from engine.ops.backend import extension
from engine.ops.linear import linear, linear_branch, linear_chunks, linear_ref
from tests.ops.conftest import poison_outputs
from tests.ops.design_rule import assert_rule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
pytestmark = pytest.mark.usefixtures("interpreter_rounds_bf16_like_the_gpu")  # tests/ops/conftest.py
NAMES = ["y", "dx", "dw", "db"]


@pytest.fixture(autouse=True)
def allocations(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel fails to write shows; the
    (shape, dtype) of each allocation is recorded for the tests that check the launch split."""
    return poison_outputs(monkeypatch, _gemm, "new_output")


def make_inputs(tokens, K, N, dtype, device, with_bias=True):
    """x (*tokens, K), weight (N, K) scaled so the pre-activation is ~N(0, 1) (GELU's curved
    region), bias (N,) or None."""
    x = torch.randn(*tokens, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    bias = (0.5 * torch.randn(N, device=device)).to(dtype) if with_bias else None
    return x, weight, bias


def run(x, weight, bias, dy, activation, backend, cast=None, forward_context=contextlib.nullcontext):
    """[y, dx, dw, (db)]; backend: a name for linear, or "reference" for linear_ref. `cast`
    converts the inputs first (fp64 for the reference); the forward runs in forward_context()
    (e.g. autocast), the backward outside it, as in a training step."""
    leaves = [None if t is None else (t.to(cast) if cast else t.detach().clone()).requires_grad_()
              for t in (x, weight, bias)]
    with forward_context():
        if backend == "reference":
            y = linear_ref(*leaves, activation=activation)
        else:
            y = linear(*leaves, activation=activation, backend=backend)
    present = [t for t in leaves if t is not None]
    return [y, *torch.autograd.grad(y, present, dy.to(y.dtype))]


def check_against_reference(tokens, K, N, activation, with_bias, dtype, device, seed, backend="triton"):
    x, weight, bias = make_inputs(tokens, K, N, dtype, device, with_bias)
    dy = torch.randn(*tokens, N, device=device).to(dtype)
    kernel = run(x, weight, bias, dy, activation, backend)
    eager = run(x, weight, bias, dy, activation, "eager")
    ref = run(x, weight, bias, dy, activation, "reference", cast=torch.float64)
    assert_rule(NAMES[:len(ref)], kernel, eager, ref, seed)


# (tokens, K, N, activation, bias, dtype). 3 x 37 = 111 tokens and N = 150 / 130 match neither
# BLOCK_M (32) nor BLOCK_N (128); 20 tokens of a 2-D x are one partial row block (one program per
# column block); 3 x 257 = 771 tokens give several programs per column block, each over several
# row blocks, the last one partial.
CASES = [
    ((3, 37), 40, 150, "gelu_tanh", True, torch.bfloat16),
    ((3, 37), 40, 150, "gelu_tanh", True, torch.float32),
    ((3, 37), 40, 150, None, True, torch.bfloat16),
    ((3, 37), 40, 150, None, True, torch.float32),
    ((3, 37), 40, 150, "gelu_tanh", False, torch.bfloat16),
    ((3, 37), 40, 150, None, False, torch.float32),
    ((2, 37), 40, 150, "gelu_tanh", True, torch.float16),
    ((20,), 24, 130, "gelu_tanh", True, torch.float32),
    ((20,), 24, 130, None, True, torch.bfloat16),
    ((3, 257), 16, 130, "gelu_tanh", True, torch.bfloat16),
    ((3, 257), 16, 130, None, True, torch.float32),
]


def case_id(case):
    tokens, K, N, activation, with_bias, dtype = case
    return (f"{'x'.join(map(str, tokens))}x{K}-to-{N}-{activation or 'identity'}-"
            f"{'bias' if with_bias else 'nobias'}-{str(dtype)[6:]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backends_match_reference(case, backend, device, seed):
    """cuda: cuBLASLt epilogues on the GPU, engine._C's C++ reference of them on CPU tensors."""
    tokens, K, N, activation, with_bias, dtype = case
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    if device == "cuda" and backend == "cuda" and dtype != torch.float32:
        K, N = 40, 152  # cuBLASLt wants 16-byte-aligned rows for 16-bit operands
    check_against_reference(tokens, K, N, activation, with_bias, dtype, device, seed, backend)


# PixArt-XL/2's MLP (1152 -> 4608 with GELU, 4608 -> 1152) and an attention projection
# (1152 -> 1152), bf16, 8 samples of 256 tokens.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("K, N, activation", [(1152, 4608, "gelu_tanh"), (4608, 1152, None), (1152, 1152, None)])
def test_pixart_shapes_match_reference(K, N, activation, backend, seed):
    check_against_reference((8, 256), K, N, activation, True, torch.bfloat16, "cuda", seed, backend)


def test_bias_sum_splits_the_tokens_over_programs(allocations, seed):
    """On CPU the split assumes 2 multiprocessors; with GELU's launch config 771 tokens and 130
    columns go to several programs per column block (10 at (16, 64, 8, 16): 80 rows each, the last
    only 51), whose fp32 partials are then summed."""
    tokens, K, N = (3, 257), 16, 130
    x, weight, bias = make_inputs(tokens, K, N, torch.float32, "cpu")
    dy = torch.randn(*tokens, N)
    got = run(x, weight, bias, dy, "gelu_tanh", "triton")
    (splits, columns), dtype = allocations[0]  # the per-program partial sums
    assert splits > 1 and columns == N and dtype == torch.float32, allocations
    want = run(x, weight, bias, dy, "gelu_tanh", "reference", cast=torch.float64)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} (seed {seed}): {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_gradient_at_large_pre_activations(dtype, device, seed):
    """Pre-activations up to ~+-60, where tanh saturates and GELU' is 0 or 1: the kernel's tanh
    (built from exp) must stay finite and agree with the reference there."""
    tokens, K, N = (2, 37), 40, 150
    x, weight, bias = make_inputs(tokens, K, N, dtype, device)
    x = (20 * x.float()).to(dtype)
    dy = torch.randn(*tokens, N, device=device).to(dtype)
    kernel = run(x, weight, bias, dy, "gelu_tanh", "triton")
    eager = run(x, weight, bias, dy, "gelu_tanh", "eager")
    ref = run(x, weight, bias, dy, "gelu_tanh", "reference", cast=torch.float64)
    assert ref[0].abs().max() > 30, "want pre-activations deep in the saturated range"
    assert_rule(NAMES, kernel, eager, ref, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("activation", ["gelu_tanh", None])
def test_autocast_bf16_with_fp32_parameters(activation, backend, device, seed):
    """As the model trains: fp32 activations and parameters, the forward under bf16 autocast, the
    backward after it. The output is bf16, every gradient comes back fp32 to its leaf, and the
    values obey the rule against eager under the same autocast (reference: fp64 of the fp32 values)."""
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    tokens, K, N = (3, 37), 40, 152
    x, weight, bias = make_inputs(tokens, K, N, torch.float32, device)
    dy = torch.randn(*tokens, N, device=device)
    results = {}
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    for name in (backend, "eager"):
        results[name] = run(x, weight, bias, dy, activation, name, forward_context=autocast)
    ref = run(x, weight, bias, dy, activation, "reference", cast=torch.float64)
    y, *grads = results[backend]
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads), \
        [t.dtype for t in results[backend]]
    assert_rule(NAMES, results[backend], results["eager"], ref, seed)
    # dw and db leave the fp32 accumulators unrounded; eager's are bf16 values cast up
    for name in NAMES[2:]:
        got, eager = results[backend][NAMES.index(name)], results["eager"][NAMES.index(name)]
        assert torch.equal(eager, eager.bfloat16().float()), f"eager {name} is not bf16-valued"
        assert not torch.equal(got, got.bfloat16().float()), f"{name} was rounded to bf16"


class BackwardSpy:
    """Wraps the backward's implementation and records which gradients it was asked for."""

    def __init__(self, impl):
        self.impl, self.calls = impl, []

    def __call__(self, dy, x, weight, pre, gelu, has_bias, need_dx, need_dw, grad_dtype, backend):
        self.calls.append(dict(has_bias=has_bias, need_dx=need_dx, need_dw=need_dw))
        return self.impl(dy, x, weight, pre, gelu, has_bias, need_dx, need_dw, grad_dtype, backend)


# (x, weight, bias) requires_grad: a frozen input (first layer on data), a frozen layer whose
# input still needs its gradient (LoRA-style), and a frozen weight with a trainable bias.
@pytest.mark.parametrize("trainable", [(False, True, True), (True, False, False), (True, False, True)],
                         ids=["x-frozen", "weight-and-bias-frozen", "weight-frozen"])
@pytest.mark.parametrize("activation", ["gelu_tanh", None])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_only_the_needed_gradients_are_computed(trainable, activation, backend, monkeypatch, seed):
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    spy = BackwardSpy(lm._backward_impl)
    monkeypatch.setattr(lm, "_backward_impl", spy)
    tokens, K, N = (3, 37), 40, 150
    x, weight, bias = make_inputs(tokens, K, N, torch.float32, "cpu")
    dy = torch.randn(*tokens, N)

    def grads(backend, cast=None):
        leaves = [(t.to(cast) if cast else t.clone()).requires_grad_(needed)
                  for t, needed in zip((x, weight, bias), trainable)]
        op = linear_ref if backend == "reference" else lambda *a, **k: linear(*a, **k, backend=backend)
        y = op(*leaves, activation=activation)
        y.backward(dy.to(y.dtype))
        assert all((t.grad is None) != needed for t, needed in zip(leaves, trainable)), \
            [t.grad is None for t in leaves]
        return [y] + [t.grad for t, needed in zip(leaves, trainable) if needed]

    kernel = grads(backend)
    x_grad, w_grad, b_grad = trainable
    assert spy.calls == [dict(has_bias=b_grad, need_dx=x_grad, need_dw=w_grad)]
    names = ["y"] + [name for name, needed in zip(NAMES[1:], trainable) if needed]
    assert_rule(names, kernel, grads("eager"), grads("reference", cast=torch.float64), seed)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_gradients_are_deterministic(device):
    """The bias sum adds fixed per-program partials in a fixed order (no atomics): two backward
    passes over the same values give bitwise the same gradients."""
    tokens, K, N = ((3, 257), 16, 130) if device == "cpu" else ((8, 256), 1152, 4608)
    x, weight, bias = make_inputs(tokens, K, N, torch.bfloat16, device)
    dy = torch.randn(*tokens, N, device=device).to(torch.bfloat16)
    first = run(x, weight, bias, dy, "gelu_tanh", "triton")
    second = run(x, weight, bias, dy, "gelu_tanh", "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_custom_ops_pass_opcheck():
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    backends = ["triton"] + (["cuda"] if extension() is not None else [])
    for backend in backends:
        for args in [(x, weight, bias, True), (x, weight, None, False), (x, weight, bias, False)]:
            torch.library.opcheck(lm._fwd_op, (*args, backend))
    y, pre = lm._fwd_op(x, weight, bias, True, "triton")
    dy = torch.randn_like(y)
    for backend in backends:
        for args in [(dy, x, weight, pre, True, True, True, True, torch.float32),
                     (dy, x, weight, pre, True, False, False, True, torch.float32),
                     (dy, x, weight, torch.empty(0), False, True, True, False, torch.float32),
                     (dy.bfloat16(), x.bfloat16(), weight.bfloat16(), pre.bfloat16(), True, True, True, True,
                      torch.float32)]:
            torch.library.opcheck(lm._bwd_op, (*args, backend))


COMPILERS = [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device, compiler", COMPILERS)
def test_torch_compile_fullgraph_matches_eager_call(device, compiler):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    the custom ops' fake implementations."""
    def mlp(x, w1, b1, w2, b2):
        h = linear(x, w1, b1, activation="gelu_tanh", backend="triton")
        return linear(h, w2, b2, backend="triton").square().sum()

    x, w1, b1 = make_inputs((2, 9), 16, 40, torch.float32, device)
    _, w2, b2 = make_inputs((1,), 40, 16, torch.float32, device)
    inputs = [x, w1, b1, w2, b2]
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(mlp(*leaves), leaves)
    compiled = torch.compile(mlp, fullgraph=True, backend=compiler)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_compile_with_auto_backend_traces_eager(monkeypatch):
    """Under torch.compile, auto means eager (Inductor fuses the bias sum and GELU itself). On CPU
    auto is eager anyway, so resolution is made to pick triton for auto, as it would on a GPU:
    a plain call then runs the custom op and the compiled graph still must not contain it."""
    monkeypatch.setattr(lm, "resolve",
                        lambda backend, device, op, prefer: "triton" if backend in (None, "auto") else backend)
    monkeypatch.delenv("ENGINE_BACKEND", raising=False)
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    plain = linear(x, weight.requires_grad_(), bias, activation="gelu_tanh")
    assert type(plain.grad_fn).__name__ == "_LinearFunctionBackward", type(plain.grad_fn).__name__

    def graph_targets(backend):
        targets = []

        def record(gm, example_inputs):  # the graph and its subgraphs (an autograd.Function's body)
            targets.extend(str(node.target) for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
                           for node in module.graph.nodes)
            return gm.forward

        torch._dynamo.reset()
        fn = torch.compile(lambda x, w, b: linear(x, w, b, activation="gelu_tanh", backend=backend), fullgraph=True,
                           backend=record)
        fn(x, weight, bias)
        return targets

    assert "engine.linear_fwd.default" in graph_targets("triton")  # the recorder sees the custom op
    auto_targets = graph_targets(None)
    assert not any("engine.linear" in t for t in auto_targets), auto_targets
    assert any("linear" in t for t in auto_targets), auto_targets  # F.linear's eager path


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation must be one of .* got 'gelu'"):
        linear(x, weight, bias, activation="gelu", backend=backend)
    with pytest.raises(ValueError, match=r"x \(..., K\) and weight \(N, K\); got x \(2, 5, 8\), weight \(12, 7\)"):
        linear(x, weight[:, :7], bias, backend=backend)
    with pytest.raises(ValueError, match=r"weight \(N, K\)"):
        linear(x, weight[0], None, backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\), got \(11,\)"):
        linear(x, weight, bias[:11], backend=backend)


def test_triton_needs_one_dtype_outside_autocast():
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    with pytest.raises(TypeError, match="must share a dtype"):
        linear(x.bfloat16(), weight, bias, backend="triton")


def test_unknown_backend_is_an_error():
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        linear(x, weight, bias, backend="fast")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_no_tokens_gives_zero_gradients(backend):
    x = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(6, 8, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    for activation in (None, "gelu_tanh"):
        linear(x, weight, bias, activation, backend=backend).sum().backward()
        assert torch.equal(bias.grad, torch.zeros(6)) and torch.equal(weight.grad, torch.zeros(6, 8))
        bias.grad = weight.grad = None
    sum(part.sum() for part in linear_chunks(x, weight, bias, 2, backend=backend)).backward()
    assert torch.equal(bias.grad, torch.zeros(6)) and torch.equal(weight.grad, torch.zeros(6, 8))


def test_cuda_backend_without_cublaslt_is_a_clear_error(monkeypatch):
    """A CUDA build of engine._C made where cuBLASLt was not found has no GPU path for the cuda
    backend: the call says so instead of failing inside the extension."""
    monkeypatch.setattr(_gemm, "cublaslt_missing", lambda device_type: True)
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="built without cuBLASLt; use 'triton'"):
        linear(x, weight, bias, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["bias", "gelu_aux_bias", "weight_grad", "input_grad", "input_grad_add",
                                  "input_grad_dgelu"])
def test_every_cublaslt_candidate_is_correct_and_tuning_keeps_the_fastest(gemm, seed):
    """The tuner may pick any of cuBLASLt's candidates, so each one must compute the GEMM and its
    epilogue: every candidate's outputs against fp64 (bf16 operands, fp32 accumulation: relative
    error under 1e-2), for each GEMM layout the cuda backend runs; then the tuner's choice is the
    fastest candidate it timed."""
    M, K, N = 1000, 1152, 4608  # tokens not a multiple of any tile
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") * K**-0.5).to(torch.bfloat16)
    bias = torch.randn(N, device="cuda").to(torch.bfloat16)
    dy = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    gelu = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    outputs = {}
    if gemm in ("bias", "gelu_aux_bias"):  # y (M, N) = x W^T + b [-> GELU, pre kept]
        pre64 = x64 @ w64.t() + bias.double()
        outputs["y"] = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        expected = dict(y=pre64 if gemm == "bias" else gelu(pre64), pre=pre64)
        if gemm == "gelu_aux_bias":
            outputs["pre"] = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        call = lambda algo: _gemm.gemm_epilogue(True, False, N, M, K, w, x, outputs["y"], gemm, bias,
                                              outputs.get("pre"), algo=algo)
    elif gemm == "weight_grad":  # dW (N, K) = dy^T x, fp32 as for fp32 parameters
        outputs["dw"], expected = torch.empty(N, K, device="cuda"), dict(dw=dy64.t() @ x64)
        call = lambda algo: _gemm.gemm_epilogue(False, True, K, N, M, x, dy, outputs["dw"], "none", algo=algo)
    elif gemm == "input_grad":  # dx (M, K) = dy W
        outputs["dx"], expected = torch.empty(M, K, device="cuda", dtype=torch.bfloat16), dict(dx=dy64 @ w64)
        call = lambda algo: _gemm.gemm_epilogue(False, False, K, M, N, w, dy, outputs["dx"], "none", algo=algo)
    elif gemm == "input_grad_dgelu":  # d_pre (M, K) = (dy W) * GELU'(pre) (engine.ops.mlp's backward)
        pre = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        pre64 = pre.double().requires_grad_()
        (gelu_grad,) = torch.autograd.grad(gelu(pre64).sum(), pre64)
        outputs["dx"] = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
        expected = dict(dx=(dy64 @ w64) * gelu_grad)
        call = lambda algo: _gemm.gemm_epilogue(False, False, K, M, N, w, dy, outputs["dx"], "dgelu", aux=pre, algo=algo)
    else:  # dx (M, K) = dy W + add (linear_branch): cuBLASLt's C input
        add = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        outputs["dx"] = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
        expected = dict(dx=dy64 @ w64 + add.double())
        call = lambda algo: _gemm.gemm_epilogue(False, False, K, M, N, w, dy, outputs["dx"], "none", algo=algo, c=add)
    count = call(0)
    assert count >= 1
    for algo in range(count):
        for t in outputs.values():
            t.fill_(float("nan"))
        try:
            call(algo)
        except RuntimeError:
            continue  # listed but refused at launch: the tuner skips such a candidate too
        for name, value in outputs.items():
            error = (value.double() - expected[name]).norm() / expected[name].norm()
            assert error < 1e-2, f"candidate {algo}/{count} {name}: relative error {error:.2e} (seed {seed})"
    _gemm._TUNED_ALGOS.clear(), _gemm._TUNING_TIMES.clear()
    call(None)
    (entry,) = _gemm.gemm_tuning_report()
    times = [t if t is not None else float("inf") for t in entry["candidate_us"]]
    assert len(times) == count and entry["chosen"] == times.index(min(times))


def test_tuning_keeps_the_fastest_candidate_that_runs():
    """The tuner's choice, with a stand-in timer: the fastest of the candidates that ran, a
    candidate that raises is skipped (None), and none running is an error."""
    costs = {0: 3.0, 1: None, 2: 1.5, 3: 2.0}  # None: the candidate raises at launch

    def run(algo):
        if costs[algo] is None:
            raise RuntimeError("refused")
        return algo

    def seconds_of(call):
        return costs[call()]

    assert _gemm._tune(run, 4, seconds_of) == (2, [3.0, None, 1.5, 2.0])
    costs.update({0: None, 2: None, 3: None})
    with pytest.raises(RuntimeError, match="none of cuBLASLt's candidates ran"):
        _gemm._tune(run, 4, seconds_of)


# ---------------------------------------------------------------------------------------------
# linear_chunks: the fused projection whose parts' gradients are packed and summed in one pass.
# ---------------------------------------------------------------------------------------------

def run_chunks(x, weight, bias, douts, chunks, backend, cast=None, forward_context=contextlib.nullcontext):
    """[part_0, ..., dx, dw, (db)]; a part whose entry in douts is None takes no part in the loss
    (its gradient reaches the backward as None)."""
    leaves = [None if t is None else (t.to(cast) if cast else t.detach().clone()).requires_grad_()
              for t in (x, weight, bias)]
    with forward_context():
        if backend == "reference":
            parts = linear_ref(*leaves).chunk(chunks, dim=-1)
        else:
            parts = linear_chunks(*leaves, chunks, backend=backend)
    used = [(p, d) for p, d in zip(parts, douts) if d is not None]
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad([p for p, _ in used], present, [d.to(p.dtype) for p, d in used])
    return [*parts, *grads]


# (tokens, K, chunks, part width, bias, dtype, unused part): 3 x 257 tokens give several programs
# per column block; part widths 50 / 65 are no multiple of BLOCK_N (64).
CHUNK_CASES = [
    ((3, 37), 40, 3, 50, True, torch.bfloat16, None),
    ((3, 257), 16, 3, 50, True, torch.float32, None),
    ((3, 257), 16, 2, 65, True, torch.bfloat16, None),
    ((20,), 24, 3, 50, False, torch.float32, None),
    ((3, 37), 40, 3, 50, True, torch.bfloat16, 1),
    ((2, 37), 40, 2, 65, True, torch.float16, 0),
    ((3, 37), 40, 1, 50, True, torch.float32, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}x{c[1]}-{c[2]}x{c[3]}-"
                         f"{'bias' if c[4] else 'nobias'}-{str(c[5])[6:]}-unused{c[6]}")
def test_chunks_match_reference(case, backend, device, seed):
    tokens, K, chunks, width, with_bias, dtype, unused = case
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    if device == "cuda" and backend == "cuda" and dtype != torch.float32:
        width = 56  # cuBLASLt wants 16-byte-aligned rows for 16-bit operands
    x, weight, bias = make_inputs(tokens, K, chunks * width, dtype, device, with_bias)
    douts = [None if i == unused else torch.randn(*tokens, width, device=device).to(dtype) for i in range(chunks)]
    kernel = run_chunks(x, weight, bias, douts, chunks, backend)
    eager = run_chunks(x, weight, bias, douts, chunks, "eager")
    ref = run_chunks(x, weight, bias, douts, chunks, "reference", cast=torch.float64)
    names = [f"part{i}" for i in range(chunks)] + NAMES[1:len(ref) - chunks + 1]
    assert_rule(names, kernel, eager, ref, seed)


def test_chunks_pack_and_sum_in_one_pass(allocations, seed):
    """The backward's only kernel outputs are the packed gradient, the per-program partial sums
    (several programs per column block for 3 x 257 tokens) and the bias gradient: no separate
    concatenation and no second read for the column sum."""
    x, weight, bias = make_inputs((3, 257), 16, 150, torch.float32, "cpu")
    parts = linear_chunks(x, weight.requires_grad_(), bias.requires_grad_(), 3, backend="triton")
    allocations.clear()
    torch.autograd.grad(parts, (weight, bias), [torch.randn_like(p) for p in parts])
    shapes = [shape for shape, _ in allocations]
    assert shapes[0] == (771, 150) and shapes[1][1] == 150 and shapes[1][0] > 1 and shapes[2] == (150,), shapes


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_autocast_bf16_with_fp32_parameters(device, seed):
    """As the model trains: bf16 parts, fp32 gradients for fp32 leaves, within the rule against
    eager under the same autocast."""
    tokens, K, chunks, width = (3, 37), 40, 3, 56
    x, weight, bias = make_inputs(tokens, K, chunks * width, torch.float32, device)
    douts = [torch.randn(*tokens, width, device=device) for _ in range(chunks)]
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    kernel = run_chunks(x, weight, bias, douts, chunks, "triton", forward_context=autocast)
    eager = run_chunks(x, weight, bias, douts, chunks, "eager", forward_context=autocast)
    ref = run_chunks(x, weight, bias, douts, chunks, "reference", cast=torch.float64)
    assert all(p.dtype == torch.bfloat16 for p in kernel[:chunks]) and all(
        g.dtype == torch.float32 for g in kernel[chunks:]), [t.dtype for t in kernel]
    assert_rule([f"part{i}" for i in range(chunks)] + NAMES[1:], kernel, eager, ref, seed)


def test_chunks_bad_inputs_raise_clear_errors():
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    with pytest.raises(ValueError, match="chunks must be 1..3 and divide the output size 12; got 5"):
        linear_chunks(x, weight, bias, 5, backend="triton")
    with pytest.raises(ValueError, match="chunks must be 1..3 .* got 4"):
        linear_chunks(x, weight, bias, 4, backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(12,\)"):
        linear_chunks(x, weight, bias[:6], 3, backend="triton")


def assert_compiled_grads_match(f, inputs):
    """Gradients of f(*inputs) through torch.compile(fullgraph=True, aot_eager) equal the eager call's."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(f(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_chunks_compile_fullgraph_matches_eager_call():
    """Under torch.compile linear_chunks is linear(...).chunk(...): traced without a graph break."""
    def f(x, w, b):
        q, k, v = linear_chunks(x, w, b, 3, backend="triton")
        return (q * k).sum() + v.square().sum()

    x, weight, bias = make_inputs((2, 9), 16, 24, torch.float32, "cpu")
    assert_compiled_grads_match(f, (x, weight, bias))


# ---------------------------------------------------------------------------------------------
# linear_branch: a projection of x and x itself, whose two gradients the input-gradient GEMM sums.
# ---------------------------------------------------------------------------------------------

def run_branch(x, weight, bias, douts, dbranch, chunks, backend, cast=None, forward_context=contextlib.nullcontext):
    """[part_0, ..., x out, dx, dw, (db)] with the loss sum(part_i * douts_i) + sum(x_out * dbranch)."""
    leaves = [None if t is None else (t.to(cast) if cast else t.detach().clone()).requires_grad_()
              for t in (x, weight, bias)]
    with forward_context():
        if backend == "reference":
            outputs = (*linear_ref(*leaves).chunk(chunks, dim=-1), leaves[0])
        else:
            outputs = linear_branch(*leaves, chunks, backend=backend)
    present = [t for t in leaves if t is not None]
    dys = [d.to(o.dtype) for o, d in zip(outputs, [*douts, dbranch])]
    return [*outputs, *torch.autograd.grad(outputs, present, dys)]


# (tokens, K, chunks, part width, bias, dtype)
BRANCH_CASES = [
    ((3, 37), 40, 1, 48, True, torch.bfloat16),
    ((3, 257), 16, 2, 65, True, torch.float32),
    ((2, 37), 40, 2, 56, False, torch.float16),
    ((20,), 24, 3, 50, True, torch.float32),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", BRANCH_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}x{c[1]}-{c[2]}x{c[3]}-"
                         f"{'bias' if c[4] else 'nobias'}-{str(c[5])[6:]}")
def test_branch_matches_reference(case, backend, device, monkeypatch, seed):
    """Outputs and gradients within the rule, x comes back unchanged, and dx is one GEMM with the
    branch's gradient as its added input (cuBLASLt's C on cuda)."""
    tokens, K, chunks, width, with_bias, dtype = case
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    if device == "cuda" and backend == "cuda" and dtype != torch.float32:
        width = 56  # cuBLASLt wants 16-byte-aligned rows for 16-bit operands
    x, weight, bias = make_inputs(tokens, K, chunks * width, dtype, device, with_bias)
    douts = [torch.randn(*tokens, width, device=device).to(dtype) for _ in range(chunks)]
    dbranch = torch.randn(*tokens, K, device=device).to(dtype)
    added = []
    input_grad = _gemm.cublaslt_input_grad
    monkeypatch.setattr(_gemm, "cublaslt_input_grad", lambda dy2, w, add=None: added.append(add) or input_grad(dy2, w, add))
    kernel = run_branch(x, weight, bias, douts, dbranch, chunks, backend)
    eager = run_branch(x, weight, bias, douts, dbranch, chunks, "eager")
    ref = run_branch(x, weight, bias, douts, dbranch, chunks, "reference", cast=torch.float64)
    assert torch.equal(kernel[chunks], x), "x must come back unchanged"
    names = [f"part{i}" for i in range(chunks)] + ["x", "dx", "dw", "db"][:len(ref) - chunks]
    assert_rule(names, kernel, eager, ref, seed)
    if backend == "cuda":
        assert len(added) == 1 and torch.equal(added[0], dbranch.reshape(-1, K)), "dx: not one GEMM with C"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_branch_autocast_with_fp32_input(device, backend, seed):
    """Under bf16 autocast an fp32 x gets an fp32 dx: the bf16 GEMM's result, cast, plus the fp32
    branch gradient (no C input of another dtype)."""
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    tokens, K, chunks, width = (3, 37), 40, 2, 56
    x, weight, bias = make_inputs(tokens, K, chunks * width, torch.float32, device)
    douts = [torch.randn(*tokens, width, device=device) for _ in range(chunks)]
    dbranch = torch.randn(*tokens, K, device=device)
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    kernel = run_branch(x, weight, bias, douts, dbranch, chunks, backend, forward_context=autocast)
    eager = run_branch(x, weight, bias, douts, dbranch, chunks, "eager", forward_context=autocast)
    ref = run_branch(x, weight, bias, douts, dbranch, chunks, "reference", cast=torch.float64)
    assert [t.dtype for t in kernel[chunks:]] == [torch.float32] * 4, [t.dtype for t in kernel]
    assert_rule(["part0", "part1", "x", "dx", "dw", "db"], kernel, eager, ref, seed)


def test_branch_without_a_gradient_on_x_or_the_parts():
    """x's other uses may send no gradient (the last block's caption), and a part may be unused."""
    x, weight, bias = make_inputs((2, 9), 16, 24, torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    k, v, _ = linear_branch(*leaves, 2, backend="triton")
    got = torch.autograd.grad(k.square().sum(), leaves)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    k, v = linear_ref(*leaves).chunk(2, dim=-1)
    want = torch.autograd.grad(k.square().sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_branch_bad_inputs_and_compile():
    x, weight, bias = make_inputs((2, 9), 16, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="linear_branch: chunks must be 1..3 and divide the output size 24; got 5"):
        linear_branch(x, weight, bias, 5, backend="triton")

    def f(x, w, b):
        k, v, x = linear_branch(x, w, b, 2, backend="triton")
        return (k * v).sum() + x.square().sum()

    assert_compiled_grads_match(f, (x, weight, bias))


# ---------------------------------------------------------------------------------------------
# Low-precision copies of the parameters (weight_lp / bias_lp).
# ---------------------------------------------------------------------------------------------

def _projection(op, x, weight, bias, backend, **copies):
    """The op's output as one tensor: linear, linear_chunks' parts or linear_branch's parts, joined."""
    if op == "linear":
        return linear(x, weight, bias, backend=backend, **copies)
    parts = (linear_chunks(x, weight, bias, 2, backend=backend, **copies) if op == "chunks"
             else linear_branch(x, weight, bias, 2, backend=backend, **copies)[:2])
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("op", ["linear", "chunks", "branch"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_low_precision_copies_stand_in_for_the_cast(op, backend):
    """Copies in the compute dtype are read instead of the parameters' cast (copies of other values
    show in the output), copies of another dtype are not, gradients still reach the fp32
    parameters, and a copy of the wrong shape is an error."""
    if backend == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    x, weight, bias = make_inputs((2, 5), 8, 12, torch.float32, "cpu")
    leaves = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    w_lp, b_lp = (2 * weight).bfloat16(), (bias - 1).bfloat16()  # not the parameters' values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _projection(op, x, *leaves, backend, weight_lp=w_lp, bias_lp=b_lp)
        ignored = _projection(op, x, weight, bias, backend, weight_lp=w_lp.half(), bias_lp=b_lp.half())
        cast = _projection(op, x, weight, bias, backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.bfloat16(), w_lp, b_lp), rtol=1e-2, atol=1e-2)
    assert not torch.allclose(y, cast, rtol=1e-2, atol=1e-2)
    assert torch.equal(ignored, cast)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert leaves[0].grad.dtype == torch.float32 and leaves[1].grad.dtype == torch.float32
    torch.testing.assert_close(leaves[1].grad, dy.float().sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"weight_lp is \(12, 4\)"):
        _projection(op, x, weight, bias, backend, weight_lp=w_lp[:, :4])
    with pytest.raises(ValueError, match="bias_lp is"):
        _projection(op, x, weight, None, backend, bias_lp=b_lp)
