"""cross_attention: the Triton kernels (and the flash-attn path's sequence layout) against fp64.

Correctness rule (docs/design.md §3), for the output and dq, dk, dv:
    max|kernel - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol,
eager being the SDPA path. On CPU the kernels run under the Triton interpreter. Inputs are fresh
random draws each run (the seed is in every failure message); k, v are strided views into one
(B, L, 2, H, d) tensor, as the model passes them; every kernel output starts as NaN.
"""

import numpy as np
import pytest
import torch

import engine.ops.cross_attention as ca
from engine.ops.cross_attention import cross_attention, cross_attention_ref
from tests.ops.design_rule import assert_rule

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# The interpreter converts and multiplies bf16 as the GPU does (tests/ops/conftest.py).
pytestmark = pytest.mark.usefixtures("interpreter_dots_bf16_like_the_gpu")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write shows."""
    monkeypatch.setattr(ca, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make_inputs(B, N, H, d, L, dtype, device, lens=None):
    q = torch.randn(B, N, H, d, device=device).to(dtype)
    kv = torch.randn(B, L, 2, H, d, device=device).to(dtype)  # the fused kv projection's layout
    if lens is None:
        # empty caption, one token, full length, and random lengths for the rest
        lens = [0, 1, L] + torch.randint(2, L, (B - 3,)).tolist()
    return q, kv, torch.tensor(lens, device=device)


def run(q, kv, kv_lens, do, backend, cast=None):
    """[o, dq, dk, dv]; k, v are views into kv as in the model. backend: a name for
    cross_attention, or a function of (q, k, v, kv_lens)."""
    q = (q.to(cast) if cast else q.detach().clone()).requires_grad_()
    kv = (kv.to(cast) if cast else kv.detach().clone()).requires_grad_()
    k, v = kv.unbind(2)  # (B, L, H, d) strided views
    if callable(backend):
        o = backend(q, k, v, kv_lens)
    else:
        o = cross_attention(q, k, v, kv_lens, backend=backend)
    dq, dkv = torch.autograd.grad(o, (q, kv), do.to(o.dtype))
    return [o, dq, dkv[:, :, 0], dkv[:, :, 1]]


def assert_padding_untouched(o, dq, dk, dv, kv_lens, seed):
    """Keys past kv_len get exactly zero gradients; an empty caption gives exactly zero output and dq."""
    for b, n in enumerate(kv_lens.tolist()):
        assert (dk[b, n:] == 0).all() and (dv[b, n:] == 0).all(), \
            f"padded keys of sample {b} got gradients (seed {seed})"
        if n == 0:
            assert (o[b] == 0).all() and (dq[b] == 0).all(), \
                f"empty caption of sample {b}: output or dq not 0 (seed {seed})"


# (B, N, H, d, L, dtype). N = 37 and 250 match no block size; d = 72 runs the split 64 + 16
# head tile, d = 64 the single one; lengths 0, 1 and L in every case (see make_inputs). The last
# case has MicroDiT-XL/2's heads (16 x 64), its 77 caption keys and the 64 kept tokens of 256 px.
CASES = [
    (4, 37, 3, 72, 120, torch.bfloat16),
    (4, 37, 3, 72, 120, torch.float32),
    (4, 250, 3, 72, 120, torch.bfloat16),
    (4, 250, 3, 64, 120, torch.float32),
    (3, 37, 16, 64, 120, torch.bfloat16),
    (4, 37, 3, 72, 120, torch.float16),
    (3, 64, 16, 64, 77, torch.bfloat16),
]


def case_id(case):
    B, N, H, d, L, dtype = case
    return f"B{B}-N{N}-H{H}-d{d}-L{L}-{str(dtype)[6:]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_matches_reference(case, device, seed):
    B, N, H, d, L, dtype = case
    q, kv, kv_lens = make_inputs(B, N, H, d, L, dtype, device)
    do = torch.randn(B, N, H, d, device=device).to(dtype)
    kernel = run(q, kv, kv_lens, do, "triton")
    eager = run(q, kv, kv_lens, do, "eager")
    ref = run(q, kv, kv_lens, do, cross_attention_ref, cast=torch.float64)
    assert_rule(["o", "dq", "dk", "dv"], kernel, eager, ref, seed)
    assert_padding_untouched(*kernel, kv_lens, seed)


@pytest.mark.parametrize("device", DEVICES)
# (forward BLOCK_M, backward BLOCK_M, splits, half tile). fp32 tiles on the GPU are staged in
# shared memory, so the fp32 backward stays at its default 32 rows: on the H100 (227 KB a block)
# 128 rows asked for 233 KB and 64 rows (full key tile) for 275 KB.
@pytest.mark.parametrize("block_m, bwd_block_m, splits, half_tile",
                         [(64, 32, 1, False), (16, 16, 3, True), (32, 32, 2, False)])
def test_launch_configs(block_m, bwd_block_m, splits, half_tile, device, seed):
    """The GPU's tilings (several query blocks per program, a partial last one, split programs,
    fp32 dk/dv partials, half-width key tile on and off) at sizes the interpreter runs quickly."""
    B, N, H, d, L = 4, 50, 2, 72, 100
    q, kv, kv_lens = make_inputs(B, N, H, d, L, torch.float32, device, lens=[0, 1, L, 40])
    k, v = kv.unbind(2)
    o, lse = ca._cross_attention_fwd_triton(q, k, v, kv_lens, block_m=block_m, splits=splits, half_tile=half_tile)
    do = torch.randn_like(o)
    dq, dk, dv = ca._cross_attention_bwd_triton(do, q, k, v, lse, kv_lens, block_m=bwd_block_m, splits=splits,
                                                half_tile=half_tile)
    want = run(q, kv, kv_lens, do, cross_attention_ref, cast=torch.float64)
    for name, got, ref in zip(["o", "dq", "dk", "dv"], [o, dq, dk, dv], want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name} (seed {seed}): {m}")
    assert_padding_untouched(o, dq, dk, dv, kv_lens, seed)
    # lse: base-2 log-sum-exp of the scaled scores; -inf for the empty caption
    scores = torch.einsum("bnhd,blhd->bhnl", q.double(), k.double()) * d**-0.5  # (B, H, N, L)
    valid = torch.arange(L)[None, :].to(device) < kv_lens[:, None]
    want_lse = scores.masked_fill(~valid[:, None, None, :], float("-inf")).logsumexp(-1) / np.log(2)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


def test_custom_ops_pass_opcheck():
    q, kv, kv_lens = make_inputs(3, 9, 2, 24, 20, torch.float32, "cpu")
    k, v = kv.unbind(2)
    torch.library.opcheck(ca._fwd_op, (q, k, v, kv_lens))
    o, lse = ca._fwd_op(q, k, v, kv_lens)
    torch.library.opcheck(ca._bwd_op, (torch.randn_like(o), q, k, v, lse, kv_lens))


COMPILERS = [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device, compiler", COMPILERS)
def test_torch_compile_fullgraph_matches_eager_call(device, compiler):
    """fullgraph=True fails on any graph break; kv_lens stays a device tensor throughout."""
    B, N, H, d, L = 3, 9, 2, 24, 20

    def layer(x, context, kv_lens):
        q = x.view(B, N, H, d)
        k, v = context.view(B, L, 2, H, d).unbind(2)
        return cross_attention(q, k, v, kv_lens, backend="triton").square().sum()

    x, context = torch.randn(B, N, H * d, device=device), torch.randn(B, L, 2 * H * d, device=device)
    kv_lens = torch.tensor([0, 5, L], device=device)
    leaves = [x.clone().requires_grad_(), context.clone().requires_grad_()]
    want = torch.autograd.grad(layer(*leaves, kv_lens), leaves)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    leaves = [x.clone().requires_grad_(), context.clone().requires_grad_()]
    got = torch.autograd.grad(compiled(*leaves, kv_lens), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def varlen_attention_for_test(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """flash_attn_varlen_func's contract in plain PyTorch: packed (total, H, d) rows, sequence i
    = query rows [cu_q[i], cu_q[i+1]) against key rows [cu_k[i], cu_k[i+1]); no keys -> zeros."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert max(np.diff(cu_q)) <= max_seqlen_q and max(np.diff(cu_k)) <= max_seqlen_k
    assert cu_q[-1] == q.shape[0] and cu_k[-1] <= k.shape[0]
    outs = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        scores = torch.einsum("nhd,lhd->hnl", qi, ki) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores, dim=-1) if ki.shape[0] else scores
        outs.append(torch.einsum("hnl,lhd->nhd", probs, vi))
    return torch.cat(outs)


def test_flash_attn_path_sequence_layout(monkeypatch, seed):
    """flash-attn does not install here, so its call is replaced by a plain-PyTorch varlen
    attention: what is tested is the cu_seqlens description of the padded keys (empty query
    sequences for the padding, kv_len 0 and L) and the reshapes around the call."""
    monkeypatch.setattr(ca, "_flash_attn_varlen_func", varlen_attention_for_test)
    B, N, H, d, L = 4, 7, 2, 24, 12
    q, kv, kv_lens = make_inputs(B, N, H, d, L, torch.float64, "cpu")
    do = torch.randn(B, N, H, d, dtype=torch.float64)
    got = run(q, kv, kv_lens, do, ca._cross_attention_flash)
    want = run(q, kv, kv_lens, do, cross_attention_ref)
    for name, g, w in zip(["o", "dq", "dk", "dv"], got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{name} (seed {seed}): {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_no_lengths_means_every_key(backend, device, seed):
    """kv_lens None (MicroDiT's unmasked captions) against the fp64 reference with every length L:
    output and gradients by the op's rule, on the unmasked SDPA path (eager) and the kernel."""
    B, N, H, d, L = 3, 37, 2, 64, 77
    q, kv, _ = make_inputs(B, N, H, d, L, torch.float32, device)
    full = torch.full((B,), L, device=device)
    do = torch.randn(B, N, H, d, device=device)
    got = run(q, kv, None, do, backend)
    eager = run(q, kv, full, do, "eager")
    ref = run(q, kv, full, do, cross_attention_ref, cast=torch.float64)
    assert_rule(["o", "dq", "dk", "dv"], got, eager, ref, seed)


def test_eager_path_gives_zero_not_nan_for_an_empty_caption():
    q, kv, kv_lens = make_inputs(3, 5, 2, 8, 6, torch.float32, "cpu")
    out = cross_attention(q, *kv.unbind(2), kv_lens, backend="eager")
    assert torch.isfinite(out).all() and (out[0] == 0).all()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    q, kv, kv_lens = make_inputs(3, 5, 2, 8, 6, torch.float32, "cpu")
    k, v = kv.unbind(2)
    with pytest.raises(ValueError, match="q \\(B, N, H, d\\)"):
        cross_attention(q[0], k, v, kv_lens, backend=backend)
    with pytest.raises(ValueError, match="k, v"):
        cross_attention(q, k[:, :, :1], v, kv_lens, backend=backend)
    with pytest.raises(ValueError, match="kv_lens must have shape"):
        cross_attention(q, k, v, kv_lens[:2], backend=backend)
    with pytest.raises(TypeError, match="kv_lens must be an integer"):
        cross_attention(q, k, v, kv_lens.float(), backend=backend)
    with pytest.raises(TypeError, match="one floating-point dtype"):
        cross_attention(q, k.double(), v, kv_lens, backend=backend)


def test_triton_limits_point_to_eager():
    q, kv, kv_lens = make_inputs(3, 5, 2, 8, 6, torch.float64, "cpu")
    with pytest.raises(TypeError, match="backend='eager'"):
        cross_attention(q, *kv.unbind(2), kv_lens, backend="triton")
    q, kv, kv_lens = make_inputs(3, 5, 2, 8, 300, torch.float32, "cpu")
    with pytest.raises(ValueError, match="L = 300"):
        cross_attention(q, *kv.unbind(2), kv_lens, backend="triton")


def test_cuda_backend_without_flash_attn_is_an_error(monkeypatch):
    monkeypatch.setattr(ca, "_flash_attn_varlen_func", None)
    q, kv, kv_lens = make_inputs(3, 5, 2, 8, 6, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        cross_attention(q, *kv.unbind(2), kv_lens, backend="cuda")


def test_offset_alignment_divides_every_stride():
    """The kernels declare their offsets and row strides multiples of this value (tl.multiple_of),
    which the interpreter ignores: a value too large would only show as misaligned vector accesses
    on the GPU, so it is checked here against the strides themselves."""
    q = torch.empty(2, 5, 16, 72, dtype=torch.bfloat16)       # strides 5760, 1152, 72: 8 elements (16 bytes)
    kv = torch.empty(2, 7, 2, 16, 72, dtype=torch.bfloat16)
    k, v = kv.unbind(2)                                        # row stride 2304
    assert ca._offset_alignment(q, k, v) == 8
    assert ca._offset_alignment(q.float()) == 4                # 16 bytes of fp32
    assert ca._offset_alignment(q, torch.empty(2, 5, 3, 36, dtype=torch.bfloat16)) == 4   # head stride 36
    assert ca._offset_alignment(torch.empty(2, 5, 3, 9, dtype=torch.bfloat16)) == 1       # head stride 9
    assert ca._offset_alignment(q, q[:, :, :, :70]) == 8       # strides, not sizes, decide
