"""moe: the eager (gather / bmm / indexed add) backend against the dense fp64 reference.

Output and every gradient (x, gate_weight, w1, w2). In fp64 the two formulations must agree to
rounding; in fp32 and bf16 by the correctness rule of docs/design.md §3 with the reference in
the same dtype as "eager". Cases: odd token counts, k not a multiple of any block size, k = 0
and k = T, exactly tied router scores (the lower token index wins, in both), a token every
expert takes and one no expert takes. Inputs are fresh random draws each run; the seed is in
every failure message.
"""

import pytest
import torch
import torch.nn.functional as F

from engine.ops.moe import moe, moe_ref, tokens_per_expert
from tests.ops.design_rule import assert_rule

NAMES = ["out", "dx", "dgate", "dw1", "dw2"]


@pytest.fixture
def seed(_fresh_seed):
    return _fresh_seed


def make_inputs(B, T, D, E, H, dtype=torch.float64, router_scale=2.0):
    """Router logits of std ``router_scale`` (scores well apart, so rounding rarely reorders them)."""
    x = torch.randn(B, T, D, dtype=torch.float64)
    gate = torch.randn(E, D, dtype=torch.float64) * router_scale / D**0.5
    w1 = torch.randn(E, D, H, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, H, D, dtype=torch.float64) / H**0.5
    return [t.to(dtype) for t in (x, gate, w1, w2)]


def run(inputs, capacity, backend, dout, cast=None):
    """[out, dx, dgate, dw1, dw2] for the output gradient ``dout``; backend "eager" (the gather
    path) or "reference"."""
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


def test_tied_scores_go_to_the_lower_token_index(seed):
    """A zero router: every token scores 1/E for every expert, so each expert takes tokens 0 .. k-1."""
    B, T, D, E, H, capacity = 2, 11, 8, 4, 16, 2.0
    x, gate, w1, w2 = make_inputs(B, T, D, E, H)
    gate = torch.zeros_like(gate)
    k = tokens_per_expert(T, E, capacity)
    dout = torch.randn(B, T, D, dtype=torch.float64)
    got = run([x, gate, w1, w2], capacity, "eager", dout)
    assert_same(got, run([x, gate, w1, w2], capacity, "reference", dout), seed)
    expected = sum(F.gelu(x[:, :k] @ w1[e]) @ w2[e] for e in range(E)) / E  # (B, k, D)
    torch.testing.assert_close(got[0][:, :k], expected, rtol=1e-12, atol=0)
    assert torch.equal(got[0][:, k:], torch.zeros_like(got[0][:, k:]))
    assert torch.equal(got[1][:, k:], torch.zeros_like(got[1][:, k:]))  # dx of tokens no expert took


def test_token_taken_by_every_expert_and_by_none(seed):
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
    got = run([x, gate, w1, w2], capacity, "eager", dout)
    assert_same(got, run([x, gate, w1, w2], capacity, "reference", dout), seed)
    every = sum(F.gelu(x[0, 0] @ w1[e]) @ w2[e] for e in range(E)) / E
    torch.testing.assert_close(got[0][0, 0], every, rtol=1e-12, atol=0)
    for b, token in ((0, 4), (0, 5), (0, 6), (1, 3)):
        assert torch.equal(got[0][b, token], torch.zeros(D, dtype=torch.float64)), (b, token)
        assert torch.equal(got[1][b, token], torch.zeros(D, dtype=torch.float64)), (b, token)


def test_empty_batch():
    x, gate, w1, w2 = make_inputs(0, 9, 8, 3, 8)
    assert moe(x, gate, w1, w2).shape == (0, 9, 8)


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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_backends_are_not_written_yet(backend):
    x, gate, w1, w2 = make_inputs(2, 9, 8, 3, 10, torch.float32)
    with pytest.raises(RuntimeError, match=f"no '{backend}' backend"):
        moe(x, gate, w1, w2, backend=backend)
