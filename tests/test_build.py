"""engine._C: it imports, reports how it was built, and its bindings refuse bad input with a
ValueError naming the argument (a RuntimeError naming the op for CUDA failures)."""

import pytest
import torch

from engine import _C
from engine.ops.patchify import patchify_ref, unpatchify_ref


def test_build_info():
    assert isinstance(_C.has_cuda(), bool)
    archs = _C.cuda_archs()
    assert isinstance(archs, str)
    assert (archs != "") == _C.has_cuda()


def _valid_call(op):
    """Arguments of a correct host-pointer call, with the buffers that keep them alive."""
    B, C, H, W, p = 2, 3, 4, 6, 2
    image = torch.randn(B, C, H, W)  # (B, C, H, W)
    tokens = torch.randn(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p)
    kwargs = dict(image_ptr=image.data_ptr(), tokens_ptr=tokens.data_ptr(), batch=B, channels=C, height=H,
                  width=W, patch=p, dtype=0, device=-1, stream=0)
    return kwargs, image, tokens


@pytest.mark.parametrize("op", ["patchify", "unpatchify"])
def test_valid_call_writes_output(op):
    kwargs, image, tokens = _valid_call(op)
    if op == "patchify":
        _C.patchify(**kwargs)
        assert torch.equal(tokens, patchify_ref(image, 2))
    else:
        _C.unpatchify(**kwargs)
        assert torch.equal(image, unpatchify_ref(tokens, 3, 4, 6, 2))


BAD_FIELDS = [
    ("image_ptr", 0, "image_ptr: null pointer"),
    ("tokens_ptr", 0, "tokens_ptr: null pointer"),
    ("batch", 0, "batch: must be positive"),
    ("channels", -3, "channels: must be positive"),
    ("height", 0, "height: must be positive"),
    ("width", -1, "width: must be positive"),
    ("patch", 0, "patch: must be positive"),
    ("height", 5, "height: 5 is not divisible by patch 2"),
    ("width", 7, "width: 7 is not divisible by patch 2"),
    ("dtype", 4, "dtype: unknown dtype code 4"),
    ("dtype", -1, "dtype: unknown dtype code -1"),
    ("device", -2, "device: -2"),
]


@pytest.mark.parametrize("op", ["patchify", "unpatchify"])
@pytest.mark.parametrize("field,value,message", BAD_FIELDS, ids=lambda v: str(v))
def test_bad_argument_raises_value_error_naming_it(op, field, value, message):
    kwargs, _, _ = _valid_call(op)
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        getattr(_C, op)(**kwargs)


@pytest.mark.parametrize("op,output", [("patchify", "tokens_ptr"), ("unpatchify", "image_ptr")])
def test_overlapping_buffers_raise_value_error(op, output):
    kwargs, _, _ = _valid_call(op)
    source = "image_ptr" if output == "tokens_ptr" else "tokens_ptr"
    kwargs[output] = kwargs[source] + 4  # one float past the input's start
    with pytest.raises(ValueError, match=f"{output}: output buffer overlaps"):
        getattr(_C, op)(**kwargs)


@pytest.mark.parametrize("op", ["patchify", "unpatchify"])
def test_missing_cuda_device_raises_runtime_error_naming_op(op):
    # Device index one past the last GPU: no GPU here (or a CPU-only build) on CI, an invalid
    # ordinal on the GPU machine; either way the call fails before touching the pointers.
    kwargs, _, _ = _valid_call(op)
    kwargs["device"] = torch.cuda.device_count()
    with pytest.raises(RuntimeError, match=f"^{op}: "):
        getattr(_C, op)(**kwargs)


def test_gemm_epilogue_refuses_bad_arguments():
    """gemm_epilogue's checks name the argument: epilogue code, leading dimensions, and the
    bias / aux pointers each epilogue needs (or must not get)."""
    a, b, d = torch.randn(4, 3), torch.randn(5, 3), torch.empty(5, 4)  # row-major: d (5 x 4) = ...
    bias, aux = torch.randn(4), torch.empty(5, 4)
    args = dict(trans_a=True, trans_b=False, m=4, n=5, k=3, a=a.data_ptr(), lda=3, b=b.data_ptr(), ldb=3,
                d=d.data_ptr(), ldd=4, epilogue=0, bias=0, aux=0, ld_aux=0, ab_dtype=0, d_dtype=0, bias_dtype=0,
                workspace=0, workspace_bytes=0, device=-1, stream=0)
    assert isinstance(_C.has_cublaslt(), bool)
    assert _C.gemm_epilogue(**args) == 1  # the candidate count: the C++ reference is one algorithm
    torch.testing.assert_close(d, b @ a.t())  # column-major D (4 x 5) = A^T (4 x 3) B (3 x 5)
    for change, message in [(dict(epilogue=7), "epilogue: unknown code 7"),
                            (dict(lda=2), "lda: 2 is below the 3 rows"),
                            (dict(ldd=3), "ldd: 3 is below the 4 rows"),
                            (dict(epilogue=1), "bias: null pointer"),
                            (dict(bias=bias.data_ptr()), "bias: must be 0"),
                            (dict(epilogue=2, bias=bias.data_ptr()), "aux: null pointer"),
                            (dict(epilogue=2, bias=bias.data_ptr(), aux=aux.data_ptr(), ld_aux=3), "ld_aux: 3 is below"),
                            (dict(epilogue=1, bias=bias.data_ptr(), aux=aux.data_ptr()), "aux: must be 0"),
                            (dict(epilogue=3), "aux: null pointer"),
                            (dict(epilogue=3, aux=aux.data_ptr(), ld_aux=4, bias=bias.data_ptr()), "bias: must be 0"),
                            (dict(m=0), "m: must be positive"),
                            (dict(algo=-1), "algo: -1 is negative"),
                            (dict(algo=1), "algo: the C\\+\\+ reference has one algorithm")]:
        with pytest.raises(ValueError, match=message):
            _C.gemm_epilogue(**{**args, **change})
