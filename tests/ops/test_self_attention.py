"""self_attention: SDPA eager and pinned (``cuda``), and the Triton kernels (``triton``: the
cross-attention kernels with every key valid), against the fp64 reference.

Correctness rule (docs/design.md §3) for the output and dq, dk, dv:
    max|backend - fp64 ref| <= 2 * max|eager same-dtype - fp64 ref| + atol.
q, k, v are strided views into one (B, N, 3, H, d) tensor, as the model passes them. On CPU the
pinned priority list reaches SDPA's CPU flash kernel (cuDNN has no CPU kernel), which is what
makes the fallback order testable here.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.ops.cross_attention import MAX_KERNEL_KEYS
from engine.ops.self_attention import (AUTO_TRITON_MAX_TOKENS, SDPA_PRIORITY, active_backend, self_attention,
                                       self_attention_ref)

ATOL_FRACTION = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 2.5e-4}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKEND_NAMES = {"cudnn", "flash", "efficient", "math"}
# The interpreter converts and multiplies bf16 as the GPU does (tests/ops/conftest.py).
pytestmark = pytest.mark.usefixtures("interpreter_dots_bf16_like_the_gpu")


def run(qkv, do, backend, cast=None):
    """[o, dq, dk, dv]; backend: a name for self_attention or a function of (q, k, v)."""
    qkv = (qkv.to(cast) if cast else qkv.detach().clone()).requires_grad_()
    q, k, v = qkv.unbind(2)  # (B, N, H, d) strided views
    o = backend(q, k, v) if callable(backend) else self_attention(q, k, v, backend=backend)
    (dqkv,) = torch.autograd.grad(o, qkv, do.to(o.dtype))
    return [o, *dqkv.unbind(2)]


CASES = [(2, 37, 3, 72, torch.bfloat16), (2, 37, 3, 72, torch.float32), (2, 64, 16, 64, torch.bfloat16),
         (3, 250, 2, 72, torch.float16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-H{c[2]}-d{c[3]}-{str(c[4])[6:]}")
def test_backend_matches_reference(case, backend, device, seed):
    B, N, H, d, dtype = case
    qkv = torch.randn(B, N, 3, H, d, device=device).to(dtype)
    do = torch.randn(B, N, H, d, device=device).to(dtype)
    got = run(qkv, do, backend)
    eager = run(qkv, do, "eager")
    ref = run(qkv, do, self_attention_ref, cast=torch.float64)
    for name, g, e, r in zip(["o", "dq", "dk", "dv"], got, eager, ref):
        assert g.dtype == dtype and g.shape == (B, N, H, d)
        err, err_eager = (g.double() - r).abs().max().item(), (e.double() - r).abs().max().item()
        atol = ATOL_FRACTION[dtype] * r.abs().max().item()
        assert err <= 2 * err_eager + atol, \
            f"{name}: error {err:.3g} > 2 x eager {err_eager:.3g} + {atol:.3g} (seed {seed})"


def test_reference_is_softmax_attention(seed):
    """The reference against a loop of per-head softmax(q k^T / sqrt(d)) v, in fp64."""
    q, k, v = torch.randn(3, 2, 5, 3, 8, dtype=torch.float64).unbind(0)  # (B, N, H, d) each
    want = torch.stack([torch.stack([torch.softmax(q[b, :, h] @ k[b, :, h].T / 8**0.5, -1) @ v[b, :, h]
                                     for h in range(3)], dim=1) for b in range(2)])
    torch.testing.assert_close(self_attention_ref(q, k, v), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_active_backend_names_the_kernel_that_runs(device, dtype):
    q, k, v = torch.randn(2, 16, 3, 4, 72, device=device).to(dtype).unbind(2)
    pinned = active_backend(q, k, v, backend="cuda")
    assert pinned in BACKEND_NAMES and active_backend(q, k, v, backend="eager") in BACKEND_NAMES
    # The named kernel alone gives the same output as the pinned call.
    by_name = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    with sdpa_kernel(by_name[pinned]):
        alone = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(self_attention(q, k, v, backend="cuda"), alone.transpose(1, 2), rtol=0, atol=0)
    if device == "cpu":
        assert pinned == "flash"  # cuDNN has no CPU kernel: the next in SDPA_PRIORITY
    elif dtype == torch.float32:
        assert pinned in ("efficient", "math")  # cuDNN and flash take only fp16 / bf16
    else:
        assert pinned in ("cudnn", "flash")


def test_priority_order_is_cudnn_first():
    assert SDPA_PRIORITY[:2] == (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)


COMPILERS = [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device, compiler", COMPILERS)
def test_torch_compile_fullgraph_with_pinned_kernel(device, compiler):
    """sdpa_kernel as a context manager inside the op: fullgraph=True fails on any graph break."""
    B, N, H, d = 2, 16, 2, 64

    def layer(x):
        q, k, v = x.view(B, N, 3, H, d).unbind(2)
        return self_attention(q, k, v, backend="cuda").square().sum()

    x = torch.randn(B, N, 3 * H * d, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(layer(leaf), leaf)
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    leaf = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(compiled(leaf), leaf)
    torch.testing.assert_close(got, want)


def test_triton_backend_limits_and_name():
    q, k, v = torch.randn(3, 1, MAX_KERNEL_KEYS + 1, 2, 16).unbind(0)
    with pytest.raises(ValueError, match=f"N <= {MAX_KERNEL_KEYS}; got N = {MAX_KERNEL_KEYS + 1}"):
        self_attention(q, k, v, backend="triton")
    assert active_backend(q, k, v, backend="triton") == "triton"


def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(3, 2, 5, 2, 8).unbind(0)
    with pytest.raises(ValueError, match="one shape"):
        self_attention(q, k[:, :3], v)
    with pytest.raises(ValueError, match="one shape"):
        self_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="floating-point dtype"):
        self_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="unknown backend"):
        self_attention(q, k, v, backend="cudnn")


@pytest.mark.gpu
def test_auto_takes_triton_for_short_sequences():
    """auto on CUDA: the Triton kernels for bf16 up to AUTO_TRITON_MAX_TOKENS tokens, SDPA above
    and for fp32."""
    short = torch.randn(2, AUTO_TRITON_MAX_TOKENS, 3, 4, 64, device="cuda", dtype=torch.bfloat16).unbind(2)
    longer = torch.randn(2, AUTO_TRITON_MAX_TOKENS + 1, 3, 4, 64, device="cuda", dtype=torch.bfloat16).unbind(2)
    assert active_backend(*short, backend="auto") == "triton"
    assert active_backend(*longer, backend="auto") in BACKEND_NAMES
    assert active_backend(*(t.float() for t in short), backend="auto") in BACKEND_NAMES
    torch.testing.assert_close(self_attention(*short, backend="auto"), self_attention(*short, backend="triton"),
                               rtol=0, atol=0)
