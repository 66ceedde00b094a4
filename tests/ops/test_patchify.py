"""patchify / unpatchify on every backend: exact equality with the eager reference (a
permutation moves values unchanged), gradients, the Conv2d equivalence that defines the
layout, and clear errors. On CPU tensors, triton runs under TRITON_INTERPRET=1 and cuda
through the C++ reference path of engine._C; the gpu-marked cases repeat every check on CUDA
tensors with the compiled kernels."""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import engine.ops.backend as backend_module
from engine.ops.backend import triton_interpreted
from engine.ops.patchify import (_PATCHIFY_LAUNCHERS, _UNPATCHIFY_LAUNCHERS, patchify, patchify_ref, unpatchify,
                                 unpatchify_ref)

BACKENDS = ["eager", "triton", "cuda"]
KERNEL_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, C, H, W, p): odd batch, 4 and 8 channels (PixArt's in / out), H != W, p = 1, 2, 4.
SHAPES = [(3, 4, 6, 10, 2), (3, 8, 12, 8, 4), (3, 4, 5, 7, 1)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _shape_id(shape):
    return "B{}C{}H{}W{}p{}".format(*shape)


def _require_runnable(backend, device):
    # The interpreter is on where there is no GPU (CI); on the GPU machine it is off, Triton
    # cannot run on CPU tensors there, and the cuda-device cases test the compiled kernels.
    if backend == "triton" and device == "cpu" and not triton_interpreted():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (on by default without a GPU)")


def _random_image(shape, dtype, device="cpu", requires_grad=False):
    B, C, H, W, _ = shape
    x = torch.randn(B, C, H, W, device=device).to(dtype)  # (B, C, H, W)
    return x.requires_grad_(requires_grad)


def _random_tokens(shape, dtype, device="cpu", requires_grad=False):
    B, C, H, W, p = shape
    tokens = torch.randn(B, (H // p) * (W // p), C * p * p, device=device).to(dtype)  # (B, N, C*p*p)
    return tokens.requires_grad_(requires_grad)


def _patchify_by_index(x, p):
    """Tokens built straight from the layout's definition: token t is patch (t // (W/p), t % (W/p)),
    vector entry k is (channel k // p^2, row (k // p) % p, column k % p) inside it."""
    _, C, H, W = x.shape
    token = torch.arange((H // p) * (W // p), device=x.device)[:, None]  # (N, 1)
    k = torch.arange(C * p * p, device=x.device)[None, :]  # (1, C*p*p)
    rows = (token // (W // p)) * p + (k // p) % p  # (N, C*p*p)
    cols = (token % (W // p)) * p + k % p  # (N, C*p*p)
    return x[:, k // (p * p), rows, cols]  # (B, N, C*p*p)


# ---------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_reference_follows_layout_definition(shape):
    x = _random_image(shape, torch.float64)
    p = shape[-1]
    tokens = _patchify_by_index(x, p)
    assert torch.equal(patchify_ref(x, p), tokens)
    assert torch.equal(unpatchify_ref(tokens, *shape[1:]), x)


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_equals_reference(device, backend, dtype, shape):
    _require_runnable(backend, device)
    B, C, H, W, p = shape
    x = _random_image(shape, dtype, device)
    tokens = patchify(x, p, backend=backend)
    assert tokens.dtype == dtype and tokens.shape == (B, (H // p) * (W // p), C * p * p)
    assert torch.equal(tokens, _patchify_by_index(x, p))

    upstream = _random_tokens(shape, dtype, device)
    image = unpatchify(upstream, C, H, W, p, backend=backend)
    assert image.dtype == dtype and image.shape == (B, C, H, W)
    assert torch.equal(image, unpatchify_ref(upstream, C, H, W, p))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_launchers_write_every_element(device, backend, dtype, shape):
    _require_runnable(backend, device)
    B, C, H, W, p = shape
    x = _random_image(shape, dtype, device)
    tokens = torch.full((B, (H // p) * (W // p), C * p * p), float("nan"), dtype=dtype, device=device)  # poisoned
    _PATCHIFY_LAUNCHERS[backend](x, tokens, p)
    assert torch.equal(tokens, patchify_ref(x, p))

    upstream = _random_tokens(shape, dtype, device)
    image = torch.full((B, C, H, W), float("nan"), dtype=dtype, device=device)  # poisoned
    _UNPATCHIFY_LAUNCHERS[backend](upstream, image, p)
    assert torch.equal(image, unpatchify_ref(upstream, C, H, W, p))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, backend):
    _require_runnable(backend, device)
    B, C, H, W, p = 3, 8, 6, 10, 2
    x = torch.randn(B, C, H, W, device=device).to(memory_format=torch.channels_last)
    assert torch.equal(patchify(x, p, backend=backend), patchify_ref(x, p))
    tokens = torch.randn(B, C * p * p, (H // p) * (W // p), device=device).transpose(1, 2)  # (B, N, C*p*p), strided
    assert torch.equal(unpatchify(tokens, C, H, W, p, backend=backend), unpatchify_ref(tokens, C, H, W, p))


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_round_trip(device, backend, shape):
    _require_runnable(backend, device)
    x = _random_image(shape, torch.float32, device)
    C, H, W, p = shape[1:]
    assert torch.equal(unpatchify(patchify(x, p, backend=backend), C, H, W, p, backend=backend), x)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_linear_on_tokens_equals_conv(device, backend, shape):
    _require_runnable(backend, device)
    B, C, H, W, p = shape
    D = 7
    conv = torch.nn.Conv2d(C, D, kernel_size=p, stride=p, dtype=torch.float64, device=device)
    x = _random_image(shape, torch.float64, device)
    tokens = patchify(x, p, backend=backend)  # (B, N, C*p*p)
    embedded = F.linear(tokens, conv.weight.reshape(D, -1), conv.bias)  # (B, N, D)
    expected = conv(x).flatten(2).transpose(1, 2)  # (B, N, D)
    torch.testing.assert_close(embedded, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_equals_reference(device, backend, dtype, shape):
    _require_runnable(backend, device)
    C, H, W, p = shape[1:]
    x = _random_image(shape, dtype, device, requires_grad=True)
    grad_tokens = _random_tokens(shape, dtype, device)
    (grad_x,) = torch.autograd.grad(patchify(x, p, backend=backend), x, grad_tokens)
    (expected,) = torch.autograd.grad(patchify_ref(x, p), x, grad_tokens)
    assert torch.equal(grad_x, expected)

    tokens = _random_tokens(shape, dtype, device, requires_grad=True)
    grad_image = _random_image(shape, dtype, device)
    (grad_t,) = torch.autograd.grad(unpatchify(tokens, C, H, W, p, backend=backend), tokens, grad_image)
    (expected,) = torch.autograd.grad(unpatchify_ref(tokens, C, H, W, p), tokens, grad_image)
    assert torch.equal(grad_t, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_first_and_second_order(device, backend):
    _require_runnable(backend, device)
    shape = (2, 2, 4, 6, 2)
    C, H, W, p = shape[1:]
    x = _random_image(shape, torch.float64, device, requires_grad=True)
    tokens = _random_tokens(shape, torch.float64, device, requires_grad=True)
    # fast_mode compares random projections v^T J u instead of whole Jacobians: a handful of
    # kernel calls instead of thousands, which the Triton interpreter makes slow.
    for fn, inputs in ((lambda x: patchify(x, p, backend=backend), (x,)),
                       (lambda t: unpatchify(t, C, H, W, p, backend=backend), (tokens,))):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)  # the backward is a custom op too


# ---------------------------------------------------------------------------------------------
# torch.library registration


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device, backend):
    _require_runnable(backend, device)
    shape = (3, 4, 6, 10, 2)
    C, H, W, p = shape[1:]
    x = _random_image(shape, torch.float32, device, requires_grad=True)
    tokens = _random_tokens(shape, torch.float32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.engine.patchify.default, (x, p, backend))
    torch.library.opcheck(torch.ops.engine.unpatchify.default, (tokens, C, H, W, p, backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_break(device, backend):
    _require_runnable(backend, device)
    C, H, W, p = 4, 6, 10, 2

    def round_trip_scaled(x):
        return unpatchify(patchify(x, p, backend=backend) * 2, C, H, W, p, backend=backend)

    compiled = torch.compile(round_trip_scaled, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, C, H, W, device=device, requires_grad=True)
    out = compiled(x)
    out.backward(torch.ones_like(out))
    assert torch.equal(out, 2 * x)
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_backend_is_an_error():
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        patchify(x, 2, backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        unpatchify(patchify_ref(x, 2), 4, 4, 4, 2, backend="cudnn")


def test_cuda_backend_without_extension_is_an_error(monkeypatch):
    monkeypatch.setattr(backend_module, "extension", lambda: None)
    with pytest.raises(RuntimeError, match="engine._C is not built"):
        patchify(torch.randn(1, 4, 4, 4), 2, backend="cuda")


def test_cuda_backend_on_gpu_tensor_without_gpu_kernels_is_an_error(monkeypatch):
    class ReferenceOnlyExtension:
        @staticmethod
        def has_cuda():
            return False

    monkeypatch.setattr(backend_module, "extension", lambda: ReferenceOnlyExtension)
    with FakeTensorMode():  # a CUDA tensor's metadata, on machines with or without a GPU
        x = torch.empty(1, 4, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="built without nvcc"):
        patchify(x, 2, backend="cuda")


def test_bad_shapes_are_errors():
    x = torch.randn(2, 4, 6, 10)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\)"):
        patchify(x[0], 2)
    with pytest.raises(ValueError, match="multiples of p"):
        patchify(x, 4)
    with pytest.raises(ValueError, match="p \\(patch size\\)"):
        patchify(x, 0)
    tokens = patchify_ref(x, 2)  # (2, 15, 16)
    with pytest.raises(ValueError, match="tokens must be"):
        unpatchify(tokens, 8, 6, 10, 2)
    with pytest.raises(ValueError, match="C must be a positive int"):
        unpatchify(tokens, 0, 6, 10, 2)


# ---------------------------------------------------------------------------------------------
# GPU only: latent sizes of real runs, and streams

LATENT_SHAPES = [(3, 4, 64, 64, 2), (3, 8, 32, 48, 2), (2, 4, 128, 96, 2)]  # 512px, out channels, 1024px bucket


@pytest.mark.gpu
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_latent_sizes(backend, dtype, shape):
    C, H, W, p = shape[1:]
    x = _random_image(shape, dtype, "cuda")
    tokens = torch.full((x.shape[0], (H // p) * (W // p), C * p * p), float("nan"), dtype=dtype, device="cuda")
    _PATCHIFY_LAUNCHERS[backend](x, tokens, p)
    assert torch.equal(tokens, patchify_ref(x, p))
    image = torch.full_like(x, float("nan"))
    _UNPATCHIFY_LAUNCHERS[backend](tokens, image, p)
    assert torch.equal(image, x)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_runs_on_the_current_stream(backend):
    shape = (3, 4, 64, 64, 2)
    C, H, W, p = shape[1:]
    x = _random_image(shape, torch.bfloat16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tokens = patchify(x, p, backend=backend)
        image = unpatchify(tokens, C, H, W, p, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(image, x)
