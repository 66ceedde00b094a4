"""The whole PixArt model with its ops on the kernel backends, against the fp64 eager model.

The op tests check each kernel alone; this checks that the model wires them together right
(layouts, strides of the views it passes, autocast casts, which gradients flow where). Rule, per
tensor (the output and every parameter gradient), in relative Frobenius norm:
    err(kernel) <= 2 * err(eager, same dtype) + tol
with err(t) = ||t - t_fp64|| / ||t_fp64||. On the CPU the Triton kernels run under the
interpreter (fp32, a small model); on the GPU the model trains as bench/throughput.py's `engine`
variant does (bf16 autocast, fp32 weights, backend auto).
"""

import copy

import pytest
import torch

from engine import ops
from engine.config import PixArtConfig
from engine.model import build_model
from engine.ops.backend import extension, triton_interpreted
from tests.model.helpers import pixart_inputs, randomize


def _loss_and_grads(model, inputs, backend, monkeypatch, autocast_dtype=None):
    monkeypatch.setenv("ENGINE_BACKEND", backend)
    x, t, caption, lens, kwargs = inputs
    model.zero_grad(set_to_none=True)
    device = x.device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(x, t, caption=caption, caption_lens=lens, **kwargs)  # (B, C_out, H, W)
    # A fixed random projection of the output: every output element gets its own gradient.
    weights = torch.randn(out.shape, generator=torch.Generator(device).manual_seed(1), device=device)
    (out.double() * weights.double()).sum().backward()
    grads = {name: p.grad.double().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.double().detach(), grads


def _relative_error(t, ref):
    return ((t - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(candidate, eager, ref, tol, label):
    out_k, grads_k = candidate
    out_e, grads_e = eager
    out_r, grads_r = ref
    assert grads_k.keys() == grads_r.keys(), f"{label}: gradients of different parameters"
    failures = []
    for name, k, e, r in [("output", out_k, out_e, out_r)] + [(n, grads_k[n], grads_e[n], grads_r[n]) for n in grads_r]:
        err_k, err_e = _relative_error(k, r), _relative_error(e, r)
        if not err_k <= 2 * err_e + tol:
            failures.append(f"{name}: kernel {err_k:.3g} vs eager {err_e:.3g}")
    assert not failures, f"{label}: " + "; ".join(failures)


def _model_and_inputs(config, batch, device, seed):
    torch.manual_seed(seed)
    model64 = randomize(build_model(config).double(), std=0.05)
    inputs64 = pixart_inputs(config, batch=batch)
    return model64, tuple(t.to(device) if torch.is_tensor(t) else {k: v.to(device) for k, v in t.items()}
                          for t in inputs64)


# Which backend each op runs in the CPU check: every op with Triton kernels on them, or every op
# with engine._C kernels on their C++ reference (linear and mlp: the cuBLASLt epilogue path),
# the rest on Triton (self_attention's Triton backend: the cross-attention kernels, every key valid).
CPU_OP_BACKENDS = {
    "triton": {op: "triton" for op in ("linear", "mlp", "cross_attention", "self_attention", "norm_modulate",
                                       "patchify", "gated_add")},
    "cuda": {"linear": "cuda", "mlp": "cuda", "norm_modulate": "cuda", "patchify": "cuda",
             "cross_attention": "triton", "self_attention": "triton", "gated_add": "triton"},
}


@pytest.mark.skipif(not triton_interpreted(), reason="the CPU check runs the Triton kernels under the interpreter")
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_kernel_model_matches_fp64_on_cpu(kernels, _fresh_seed, monkeypatch):
    if kernels == "cuda" and extension() is None:
        pytest.skip("engine._C is not built")
    # 2 blocks; 36 tokens (6x6 patches) and 7 caption tokens: no dimension a multiple of a block size.
    config = PixArtConfig(input_size=12, hidden_size=72, depth=2, num_heads=2, caption_channels=40, text_len=7)
    model64, inputs64 = _model_and_inputs(config, 2, "cpu", _fresh_seed)
    ref = _loss_and_grads(model64, inputs64, "eager", monkeypatch)
    model32 = copy.deepcopy(model64).float()
    inputs32 = tuple(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs64)
    eager = _loss_and_grads(model32, inputs32, "eager", monkeypatch)
    with monkeypatch.context() as patch:
        for op, name in CPU_OP_BACKENDS[kernels].items():
            patch.setattr(getattr(ops, op), "resolve", lambda *args, _name=name, **kwargs: _name)
        kernel = _loss_and_grads(model32, inputs32, "eager", patch)
    _check(kernel, eager, ref, 1e-5, f"seed {_fresh_seed}")


@pytest.mark.gpu
def test_engine_model_matches_fp64_on_gpu(_fresh_seed, monkeypatch):
    # Two PixArt-XL/2-wide blocks at 256px (256 tokens), 120 caption tokens of random length.
    config = PixArtConfig(input_size=32, depth=2)
    model64, inputs64 = _model_and_inputs(config, 4, "cuda", _fresh_seed)
    model64 = model64.cuda()
    ref = _loss_and_grads(model64, inputs64, "eager", monkeypatch)
    model32 = copy.deepcopy(model64).float()
    inputs32 = tuple(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs64)
    eager = _loss_and_grads(model32, inputs32, "eager", monkeypatch, autocast_dtype=torch.bfloat16)
    engine = _loss_and_grads(model32, inputs32, "auto", monkeypatch, autocast_dtype=torch.bfloat16)
    _check(engine, eager, ref, 2e-3, f"seed {_fresh_seed}")
