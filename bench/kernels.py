"""Kernel benchmarks: each engine op against eager, torch.compile(eager), triton, cuda and outside baselines.

    python bench/kernels.py [--ops cross_attention,patchify] [--shapes 64x256x16x72x120r,64x4x32x32p2]
                            [--dtype bf16] [--variants eager,triton,sdpa-cudnn] [--directions fwd,bwd,both]
                            [--timer do_bench|cudagraph] [--json PATH] [--csv PATH]

For every op, shape and direction (forward, backward, both) each variant is timed by
``triton.testing.do_bench`` (median, after warm-up; do_bench also flushes L2 between calls), and
the calls rotate over enough independent input sets that together they exceed L2 several times.
do_bench times what a Python caller sees: where an op's GPU time is shorter than its host-side
cost (Python, autograd, launches: ~200 us per fwd+bwd call here), the host sets the pace.
``--timer cudagraph`` captures a run of calls in a CUDA graph and times its replays instead:
the GPU work alone, as in a training step whose host runs ahead of the GPU.
GB/s counts the bytes the op must move at minimum (each op's spec says which tensors); the
``copy`` column divides that by the device-to-device copy bandwidth measured in the same run
(bytes read + written), so 100% means the op runs as fast as a plain copy of its bytes.

Variants: ``eager`` (the op's reference, plain PyTorch), ``compile`` (torch.compile of that
reference), ``triton`` and ``cuda`` (engine backends), then the op's outside baselines, timed the
same way: for attention, SDPA pinned to one kernel each (``sdpa-cudnn``, ``sdpa-flash``,
``sdpa-efficient``, ``sdpa-math``) and, for cross-attention, ``flash-attn`` (its varlen function
on packed keys, as its users call it) when the package is importable. A variant that cannot run
here, or a backend the op does not have, gets a row with the reason instead of a time. ``vs best``
divides the time of the op's fastest reference baseline (same shape and direction; for
cross-attention the fastest SDPA with a padding mask) by the row's time: >= 1.5 for
cross_attention's triton row is issue 5's bar. The ``kernel`` column names the SDPA kernel that
self_attention's eager and cuda backends ran.

Shapes (``--shapes`` takes a comma-separated list; each op runs the shapes its format accepts):
norm_modulate, add_norm_modulate, gated_add ``BxNxD``; swiglu ``BxNxH``; cross_attention ``BxNxHxdxL`` (L caption keys, all
valid) or ``BxNxHxdxLr`` (random caption lengths in [1, L]); self_attention ``BxNxHxd``;
patchify, unpatchify ``BxCxHxWpP``: the latent image (B, C, H, W) and patch size P (patchify's
input, unpatchify's output; PixArt's head unpatchifies C = 8: noise and learned variance);
linear ``MxKxN`` or ``MxKxNg``: M tokens through a K -> N Linear, with a trailing g followed by
tanh-GELU (a plain ``MxKxN`` also reads as BxNxD: give ``--ops`` to keep the ops apart); mlp
``MxKxHxN``: M tokens through K -> H (tanh-GELU) -> N; moe ``BxTxDxExH``: B samples of T tokens of
width D through E experts of hidden width H, expert-choice routing at capacity 2 (a plain
``BxNxHxdxL`` reads the same: give ``--ops``).

Without a GPU it runs one tiny shape per op on the CPU (Triton through its interpreter): a smoke
test of the script whose numbers mean nothing.

To benchmark another op, add an ``OpSpec`` to ``OPS``: how to parse a shape, how to build one
input set, how to call the op with a backend name, the bytes per direction and any baselines.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before engine's Triton kernels are defined

import hardware  # noqa: E402  (bench/ is on sys.path when run as a script)
from engine.ops._gemm import gemm_tuning_report  # noqa: E402
from engine.ops.backend import unavailable_reason  # noqa: E402
from engine.ops.cross_attention import cross_attention  # noqa: E402
from engine.ops.gated_add import gated_add  # noqa: E402
from engine.ops.swiglu import swiglu  # noqa: E402
from engine.ops.linear import linear  # noqa: E402
from engine.ops.mlp import mlp  # noqa: E402
from engine.ops.moe import moe  # noqa: E402
from engine.ops.norm_modulate import add_norm_modulate, norm_modulate  # noqa: E402
from engine.ops.patchify import patchify, unpatchify  # noqa: E402
from engine.ops.self_attention import active_backend, self_attention  # noqa: E402

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

VARIANTS = ("eager", "compile", "triton", "cuda")
DIRECTIONS = ("fwd", "bwd", "both")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Rotate over input sets until they hold this many bytes: several times the 50-60 MB L2 of
# H100 / H200, so no call finds its inputs left in L2 by the previous one.
ROTATION_BYTES = 256 * 2**20
MAX_INPUT_SETS = 8


@dataclasses.dataclass
class InputSet:
    """One independent set of tensors for one call of an op."""
    inputs: list[torch.Tensor]         # differentiable leaves, in call order
    extra: list                        # non-differentiable arguments after them (None allowed)
    grad_outputs: list[torch.Tensor]   # one per op output


@dataclasses.dataclass(frozen=True)
class Baseline:
    """An outside implementation of an op, timed exactly like the engine's variants."""
    name: str
    fn: Callable[..., tuple[torch.Tensor, ...]] | None    # fn(*inputs, *extra) -> outputs, as OpSpec.call
    reference: bool                  # one of those whose fastest sets the op's speedup_vs_best_baseline
    unavailable: str | None = None   # why it never runs (then fn is None)
    not_capturable: str | None = None  # why it cannot be captured in a CUDA graph (--timer cudagraph)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    gpu_shapes: tuple[str, ...]
    cpu_shape: str
    parse_shape: Callable[[str], tuple[int, ...]]
    make_inputs: Callable[[tuple[int, ...], torch.dtype, torch.device], InputSet]
    call: Callable[..., tuple[torch.Tensor, ...]]          # call(backend, *inputs, *extra) -> outputs
    bytes_moved: Callable[[tuple[int, ...], torch.dtype], dict[str, int]]   # {"fwd": .., "bwd": ..}
    bytes_note: str
    baselines: tuple[Baseline, ...] = ()
    # kernel_label(variant, *inputs, *extra): what the variant runs underneath, when that is a choice
    # made at run time (self_attention: SDPA's kernel); None where there is nothing to name.
    kernel_label: Callable[..., str | None] | None = None
    # engine backends the op does not have (gated_add: no cuda): their rows say so instead of timing an error
    missing_backends: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Shapes


def _positive_ints(text: str, count: int) -> list[int] | None:
    parts = text.lower().split("x")
    if len(parts) != count or not all(p.isdecimal() and int(p) > 0 for p in parts):
        return None
    return [int(p) for p in parts]


def parse_bnd(text: str) -> tuple[int, int, int]:
    dims = _positive_ints(text, 3)
    if dims is None:
        raise ValueError(f"shape {text!r} must be BxNxD with positive integers, e.g. 64x256x1152")
    return tuple(dims)


def parse_cross_shape(text: str) -> tuple[int, int, int, int, int, bool]:
    """BxNxHxdxL, with a trailing 'r' for random caption lengths in [1, L] -> (B, N, H, d, L, random)."""
    random_lens = text.lower().endswith("r")
    dims = _positive_ints(text[:-1] if random_lens else text, 5)
    if dims is None:
        raise ValueError(f"cross-attention shape {text!r} must be BxNxHxdxL with positive integers and an "
                         "optional r (random caption lengths), e.g. 64x256x16x72x120r")
    return (*dims, random_lens)


def parse_self_shape(text: str) -> tuple[int, int, int, int]:
    dims = _positive_ints(text, 4)
    if dims is None:
        raise ValueError(f"self-attention shape {text!r} must be BxNxHxd with positive integers, e.g. 64x256x16x72")
    return tuple(dims)


def parse_image_shape(text: str) -> tuple[int, int, int, int, int]:
    """BxCxHxWpP -> (B, C, H, W, P), with H and W multiples of the patch size P."""
    image, _, patch = text.lower().partition("p")
    dims = _positive_ints(image, 4)
    if dims is None or not patch.isdecimal() or int(patch) == 0:
        raise ValueError(f"image shape {text!r} must be BxCxHxWpP with positive integers (P the patch size), "
                         "e.g. 64x4x32x32p2")
    B, C, H, W = dims
    p = int(patch)
    if H % p or W % p:
        raise ValueError(f"image shape {text!r}: H = {H} and W = {W} must be multiples of the patch size {p}")
    return B, C, H, W, p


def parse_linear_shape(text: str) -> tuple[int, int, int, bool]:
    """MxKxN, with a trailing 'g' for tanh-GELU after the Linear -> (M, K, N, gelu)."""
    gelu = text.lower().endswith("g")
    dims = _positive_ints(text[:-1] if gelu else text, 3)
    if dims is None:
        raise ValueError(f"linear shape {text!r} must be MxKxN (M tokens, K -> N features) with positive integers "
                         "and an optional g (tanh-GELU after it), e.g. 16384x1152x4608g")
    return (*dims, gelu)


def parse_mlp_shape(text: str) -> tuple[int, int, int, int]:
    """MxKxHxN -> (M, K, H, N): M tokens through K -> H (tanh-GELU) -> N."""
    dims = _positive_ints(text, 4)
    if dims is None:
        raise ValueError(f"mlp shape {text!r} must be MxKxHxN (M tokens, K -> H -> N features) with positive "
                         "integers, e.g. 16384x1152x4608x1152")
    return tuple(dims)


def parse_moe_shape(text: str) -> tuple[int, int, int, int, int]:
    """BxTxDxExH -> (B, T, D, E, H): B samples of T tokens, width D, E experts of hidden width H."""
    dims = _positive_ints(text, 5)
    if dims is None:
        raise ValueError(f"moe shape {text!r} must be BxTxDxExH (samples, tokens, width, experts, expert hidden "
                         "width) with positive integers, e.g. 64x256x1024x8x3840")
    return tuple(dims)


# ---------------------------------------------------------------------------------------------
# Inputs, calls and bytes


def _activation(shape, dtype, device):
    return torch.randn(shape, device=device, dtype=dtype)


def _modulation(B, D, device):
    return (0.5 * torch.randn(B, D, device=device)).requires_grad_()  # fp32, as adaLN-single makes it


def _norm_modulate_inputs(shape, dtype, device):
    B, N, D = shape
    return InputSet(inputs=[_activation(shape, dtype, device).requires_grad_(), _modulation(B, D, device),
                            _modulation(B, D, device)],
                    extra=[], grad_outputs=[_activation(shape, dtype, device)])


def _add_norm_modulate_inputs(shape, dtype, device):
    B, N, D = shape
    return InputSet(inputs=[_activation(shape, dtype, device).requires_grad_(),
                            _activation(shape, dtype, device).requires_grad_(),
                            _modulation(B, D, device), _modulation(B, D, device), _modulation(B, D, device)],
                    extra=[], grad_outputs=[_activation(shape, dtype, device), _activation(shape, dtype, device)])


def _gated_add_inputs(shape, dtype, device):
    B, N, D = shape
    return InputSet(inputs=[_activation(shape, dtype, device).requires_grad_(),
                            _activation(shape, dtype, device).requires_grad_(), _modulation(B, D, device)],
                    extra=[], grad_outputs=[_activation(shape, dtype, device)])


def _swiglu_inputs(shape, dtype, device):
    return InputSet(inputs=[_activation(shape, dtype, device).requires_grad_(),
                            _activation(shape, dtype, device).requires_grad_()],
                    extra=[], grad_outputs=[_activation(shape, dtype, device)])


def _activation_bytes(shape, dtype):
    return math.prod(shape) * dtype.itemsize


def _cross_inputs(shape, dtype, device):
    """inputs: q (B, N, H, d) and the fused kv projection (B, L, 2, H, d), as the model makes them;
    extra: the caption lengths kv_lens (B,)."""
    B, N, H, d, L, random_lens = shape
    q = _activation((B, N, H, d), dtype, device).requires_grad_()
    kv = _activation((B, L, 2, H, d), dtype, device).requires_grad_()
    kv_lens = torch.randint(1, L + 1, (B,), device=device) if random_lens else torch.full((B,), L, device=device)
    return InputSet(inputs=[q, kv], extra=[kv_lens], grad_outputs=[_activation((B, N, H, d), dtype, device)])


def _cross_call(backend, q, kv, kv_lens):
    k, v = kv.unbind(2)  # (B, L, H, d) views into the fused projection, as the model passes them
    return (cross_attention(q, k, v, kv_lens, backend=backend),)


def _cross_bytes(shape, dtype):
    B, N, H, d, L, _ = shape
    q_bytes, kv_bytes = B * N * H * d * dtype.itemsize, B * L * H * d * dtype.itemsize
    # fwd reads q, k, v, writes o; bwd reads q, o, dO, k, v, writes dq, dk, dv (row statistics O(B*H*N)).
    return {"fwd": 2 * q_bytes + 2 * kv_bytes, "bwd": 4 * q_bytes + 4 * kv_bytes}


def _self_inputs(shape, dtype, device):
    """inputs: the fused qkv projection (B, N, 3, H, d), as the model makes it."""
    B, N, H, d = shape
    qkv = _activation((B, N, 3, H, d), dtype, device).requires_grad_()
    return InputSet(inputs=[qkv], extra=[], grad_outputs=[_activation((B, N, H, d), dtype, device)])


def _self_call(backend, qkv):
    q, k, v = qkv.unbind(2)  # (B, N, H, d) views
    return (self_attention(q, k, v, backend=backend),)


def _self_kernel(variant, qkv):
    """The kernel self_attention's eager / cuda / triton backend runs for these inputs."""
    if variant not in ("eager", "cuda", "triton"):
        return None  # compile: Inductor's choice
    q, k, v = qkv.unbind(2)
    return active_backend(q, k, v, backend=variant)


def _self_bytes(shape, dtype):
    t = math.prod(shape) * dtype.itemsize
    return {"fwd": 4 * t, "bwd": 8 * t}  # fwd q, k, v, o; bwd q, k, v, o, dO, dq, dk, dv


def _linear_inputs(shape, dtype, device):
    """inputs: x (M, K), weight (N, K), bias (N,), all in the benchmark dtype (what autocast hands
    the GEMMs; the casts of fp32 master weights are the same for every variant and left out);
    extra: the activation name."""
    M, K, N, gelu = shape
    weight = (K**-0.5 * torch.randn(N, K, device=device)).to(dtype)  # pre-activations ~N(0, 1)
    return InputSet(inputs=[_activation((M, K), dtype, device).requires_grad_(), weight.requires_grad_(),
                            _activation((N,), dtype, device).requires_grad_()],
                    extra=["gelu_tanh" if gelu else None], grad_outputs=[_activation((M, N), dtype, device)])


def _mlp_inputs(shape, dtype, device):
    """inputs: x (M, K), w1 (H, K), b1, w2 (N, H), b2 in the benchmark dtype (as _linear_inputs)."""
    M, K, H, N = shape
    tensors = [_activation((M, K), dtype, device), (K**-0.5 * torch.randn(H, K, device=device)).to(dtype),
               _activation((H,), dtype, device), (H**-0.5 * torch.randn(N, H, device=device)).to(dtype),
               _activation((N,), dtype, device)]
    return InputSet(inputs=[t.requires_grad_() for t in tensors], extra=[],
                    grad_outputs=[_activation((M, N), dtype, device)])


MOE_CAPACITY = 2.0  # MicroDiT's: each expert takes 2 T / E tokens of a sample


def _moe_inputs(shape, dtype, device):
    """inputs: x (B, T, D), the router (E, D), w1 (E, D, H), w2 (E, H, D), all in the benchmark
    dtype; router logits and pre-activations ~N(0, 1); extra: the capacity."""
    B, T, D, E, H = shape
    tensors = [_activation((B, T, D), dtype, device), (D**-0.5 * torch.randn(E, D, device=device)).to(dtype),
               (D**-0.5 * torch.randn(E, D, H, device=device)).to(dtype),
               (H**-0.5 * torch.randn(E, H, D, device=device)).to(dtype)]
    return InputSet(inputs=[t.requires_grad_() for t in tensors], extra=[MOE_CAPACITY],
                    grad_outputs=[_activation((B, T, D), dtype, device)])


def _moe_bytes(shape, dtype):
    """Each tensor once: fwd reads x, w1, w2, writes out; bwd reads d_out, x, w1, w2, writes dx,
    dw1, dw2 (the router's E x D is left out). The experts' GEMMs set the time, so GB/s here is
    no roofline; the expert activations (E, B k, H) are not counted."""
    B, T, D, E, H = shape
    e = dtype.itemsize
    x, w = B * T * D * e, 2 * E * D * H * e
    return {"fwd": 2 * x + w, "bwd": 3 * x + 2 * w}


def _mlp_bytes(shape, dtype):
    """The two Linears' bytes (see _linear_bytes), the hidden activation counted once each way."""
    M, K, H, N = shape
    first, second = _linear_bytes((M, K, H, True), dtype), _linear_bytes((M, H, N, False), dtype)
    hidden = M * H * dtype.itemsize
    return {"fwd": first["fwd"] + second["fwd"] - hidden, "bwd": first["bwd"] + second["bwd"] - hidden}


def _linear_bytes(shape, dtype):
    """Each tensor once: fwd reads x, W, b, writes y (and pre for GELU's backward); bwd reads dy
    (with GELU: pre, and writes d_pre), x and W, writes dx, dW, db. The GEMMs' FLOPs set the
    time, so GB/s here is no roofline: these bytes are what the fused bias sum and GELU backward
    change (the GEMMs' own re-reads of their operands are not counted)."""
    M, K, N, gelu = shape
    e = dtype.itemsize
    x, w, b, y = M * K * e, N * K * e, N * e, M * N * e
    pre = y if gelu else 0  # written in the forward; read, and d_pre written, in the backward
    return {"fwd": x + w + b + y + pre, "bwd": y + 2 * pre + 2 * (x + w) + b}


def _patchify_inputs(shape, dtype, device):
    B, C, H, W, p = shape
    return InputSet(inputs=[_activation((B, C, H, W), dtype, device).requires_grad_()], extra=[p],
                    grad_outputs=[_activation((B, (H // p) * (W // p), C * p * p), dtype, device)])


def _unpatchify_inputs(shape, dtype, device):
    B, C, H, W, p = shape
    return InputSet(inputs=[_activation((B, (H // p) * (W // p), C * p * p), dtype, device).requires_grad_()],
                    extra=[C, H, W, p], grad_outputs=[_activation((B, C, H, W), dtype, device)])


def _permutation_bytes(shape, dtype):
    B, C, H, W, _ = shape
    image = B * C * H * W * dtype.itemsize
    return {"fwd": 2 * image, "bwd": 2 * image}  # each direction reads and writes every element once


# ---------------------------------------------------------------------------------------------
# Outside baselines: SDPA with its kernel pinned, flash-attn


SDPA_KERNELS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}


def _pinned(kernel: SDPBackend, fn):
    """fn with SDPA limited to one kernel: SDPA raises where that kernel refuses the inputs."""
    def run(*args):
        with sdpa_kernel(kernel):
            return fn(*args)
    return run


def _masked_sdpa(q, kv, kv_lens):
    """SDPA with a boolean padding mask over the keys, what diffusers' PixArt runs (lengths >= 1)."""
    k, v = kv.unbind(2)  # (B, L, H, d)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < kv_lens[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :])  # (B, H, N, d)
    return (out.transpose(1, 2),)  # (B, N, H, d)


def _plain_sdpa(qkv):
    q, k, v = qkv.unbind(2)  # (B, N, H, d)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, N, d)
    return (out.transpose(1, 2),)


def _flash_attn_packed(q, kv, kv_lens):
    """flash-attn's varlen call as its users make it: the valid keys packed back to back (a gather
    whose size the host must read), sequence boundaries as cumulative lengths."""
    B, N, H, d = q.shape
    L = kv.shape[1]
    valid = torch.arange(L, device=q.device)[None, :] < kv_lens[:, None]  # (B, L)
    k, v = kv[valid].unbind(1)  # (total keys, H, d) each
    cu_seqlens_k = F.pad(kv_lens.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    cu_seqlens_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * N  # (B + 1,)
    out = flash_attn_varlen_func(q.reshape(B * N, H, d), k, v, cu_seqlens_q, cu_seqlens_k, N, L)  # (B*N, H, d)
    return (out.view(B, N, H, d),)


CROSS_BASELINES = (
    Baseline("sdpa-cudnn", _pinned(SDPA_KERNELS["sdpa-cudnn"], _masked_sdpa), reference=True),
    Baseline("sdpa-flash", None, reference=True,
             unavailable="SDPA's flash kernel takes no attention mask, and the padded caption keys need one"),
    Baseline("sdpa-efficient", _pinned(SDPA_KERNELS["sdpa-efficient"], _masked_sdpa), reference=True),
    Baseline("sdpa-math", _pinned(SDPA_KERNELS["sdpa-math"], _masked_sdpa), reference=True),
    # Not a reference: issue 5's bar is the fastest SDPA with a padding mask.
    Baseline("flash-attn", _flash_attn_packed if flash_attn_varlen_func is not None else None, reference=False,
             unavailable=None if flash_attn_varlen_func is not None else "the flash_attn package is not importable",
             not_capturable="packing the keys reads their count on the host, which a CUDA graph cannot capture"),
)

SELF_BASELINES = tuple(Baseline(name, _pinned(kernel, _plain_sdpa), reference=True)
                       for name, kernel in SDPA_KERNELS.items())


OPS = {
    "norm_modulate": OpSpec(
        name="norm_modulate",
        gpu_shapes=("64x256x1152", "32x1024x1152"),
        cpu_shape="2x32x256",
        parse_shape=parse_bnd,
        make_inputs=_norm_modulate_inputs,
        call=lambda backend, x, shift, scale: (norm_modulate(x, shift, scale, backend=backend),),
        # fwd reads x, writes h; bwd reads dh, x, writes dx (modulation and row stats are O(B*D + B*N)).
        bytes_moved=lambda shape, dtype: {"fwd": 2 * _activation_bytes(shape, dtype),
                                          "bwd": 3 * _activation_bytes(shape, dtype)},
        bytes_note="fwd x,h; bwd dh,x,dx",
    ),
    "add_norm_modulate": OpSpec(
        name="add_norm_modulate",
        gpu_shapes=("64x256x1152", "32x1024x1152"),
        cpu_shape="2x32x256",
        parse_shape=parse_bnd,
        make_inputs=_add_norm_modulate_inputs,
        call=lambda backend, x, y, gate, shift, scale: add_norm_modulate(x, y, gate, shift, scale, backend=backend),
        # gated, as PixArt's attention and MLP residuals are: fwd reads x, y, writes r, h;
        # bwd reads dh, dr, r, y, writes dx, dy.
        bytes_moved=lambda shape, dtype: {"fwd": 4 * _activation_bytes(shape, dtype),
                                          "bwd": 6 * _activation_bytes(shape, dtype)},
        bytes_note="fwd x,y,r,h; bwd dh,dr,r,y,dx,dy",
    ),
    "gated_add": OpSpec(
        name="gated_add",
        gpu_shapes=("64x256x1152", "32x1024x1152"),
        cpu_shape="2x32x256",
        parse_shape=parse_bnd,
        make_inputs=_gated_add_inputs,
        call=lambda backend, r, a, gate: (gated_add(r, a, gate, backend=backend),),
        # fwd reads r, a, writes out; bwd reads dout, a, writes da (dr is dout; gate is O(B*D)).
        bytes_moved=lambda shape, dtype: {"fwd": 3 * _activation_bytes(shape, dtype),
                                          "bwd": 3 * _activation_bytes(shape, dtype)},
        bytes_note="fwd r,a,out; bwd dout,a,da",
        missing_backends=("cuda",),
    ),
    "swiglu": OpSpec(
        name="swiglu",
        # MicroDiT-XL/2 at 256 px, batch 256: a mixer SwiGLU (all 256 tokens, hidden 2048) and a
        # backbone one (64 kept tokens, hidden 2816), as (B, N, H)
        gpu_shapes=("256x256x2048", "256x64x2816"),
        cpu_shape="2x32x256",
        parse_shape=parse_bnd,
        make_inputs=_swiglu_inputs,
        call=lambda backend, a, b: (swiglu(a, b, backend=backend),),
        # fwd reads a, b, writes h; bwd reads dh, a, b, writes da, db.
        bytes_moved=lambda shape, dtype: {"fwd": 3 * _activation_bytes(shape, dtype),
                                          "bwd": 5 * _activation_bytes(shape, dtype)},
        bytes_note="fwd a,b,h; bwd dh,a,b,da,db",
        missing_backends=("cuda",),
    ),
    "cross_attention": OpSpec(
        name="cross_attention",
        # PixArt at 256px / batch 64 and 512px / batch 32: 16 heads of 72, 120 T5 tokens, captions
        # all full or of random length.
        gpu_shapes=("64x256x16x72x120", "64x256x16x72x120r", "32x1024x16x72x120", "32x1024x16x72x120r"),
        cpu_shape="2x32x2x72x24r",
        parse_shape=parse_cross_shape,
        make_inputs=_cross_inputs,
        call=_cross_call,
        bytes_moved=_cross_bytes,
        bytes_note="fwd q,k,v,o; bwd q,k,v,o,dO,dq,dk,dv",
        baselines=CROSS_BASELINES,
    ),
    "self_attention": OpSpec(
        name="self_attention",
        gpu_shapes=("64x256x16x72", "32x1024x16x72"),
        cpu_shape="2x32x2x72",
        parse_shape=parse_self_shape,
        make_inputs=_self_inputs,
        call=_self_call,
        bytes_moved=_self_bytes,
        bytes_note="fwd q,k,v,o; bwd q,k,v,o,dO,dq,dk,dv",
        baselines=SELF_BASELINES,
        kernel_label=_self_kernel,
    ),
    "linear": OpSpec(
        name="linear",
        # PixArt-XL/2 at 256px / batch 64 (64 x 256 tokens): the MLP's fc1 (1152 -> 4608, tanh-GELU)
        # and fc2 (4608 -> 1152), the fused qkv projection (1152 -> 3 x 1152), the attention
        # projections (1152 -> 1152) and the cross-attention's kv projection of 64 x 120 caption tokens.
        gpu_shapes=("16384x1152x4608g", "16384x4608x1152", "16384x1152x3456", "16384x1152x1152", "7680x1152x2304"),
        cpu_shape="64x48x160g",
        parse_shape=parse_linear_shape,
        make_inputs=_linear_inputs,
        call=lambda backend, x, weight, bias, activation: (linear(x, weight, bias, activation, backend=backend),),
        bytes_moved=_linear_bytes,
        bytes_note="fwd x,W,b,y(,pre); bwd dy(,pre,dpre),x,W,dx,dW,db",
    ),
    "mlp": OpSpec(
        name="mlp",
        # PixArt-XL/2 at 256px / batch 64: a block's MLP (1152 -> 4608 -> 1152).
        gpu_shapes=("16384x1152x4608x1152",),
        cpu_shape="64x48x160x48",
        parse_shape=parse_mlp_shape,
        make_inputs=_mlp_inputs,
        call=lambda backend, x, w1, b1, w2, b2: (mlp(x, w1, b1, w2, b2, backend=backend),),
        bytes_moved=_mlp_bytes,
        bytes_note="the two linear rows' bytes, the hidden activation once each way",
    ),
    "moe": OpSpec(
        name="moe",
        # MicroDiT's MoE blocks (width 1024, 8 experts of hidden 3840, capacity 2) at 256 px, batch 256:
        # the masked stage's backbone runs on the 64 tokens a sample keeps, the unmasked one on 256
        # tokens (here at batch 64).
        gpu_shapes=("256x64x1024x8x3840", "64x256x1024x8x3840"),
        cpu_shape="2x16x32x4x48",
        parse_shape=parse_moe_shape,
        make_inputs=_moe_inputs,
        call=lambda backend, x, gate, w1, w2, capacity: (moe(x, gate, w1, w2, capacity, backend=backend),),
        bytes_moved=_moe_bytes,
        bytes_note="fwd x,w1,w2,out; bwd dout,x,w1,w2,dx,dw1,dw2",
        missing_backends=("cuda",),
    ),
    "patchify": OpSpec(
        name="patchify",
        # PixArt-XL/2 latents (4 channels, patch 2) at 256px / batch 64 and 512px / batch 32.
        gpu_shapes=("64x4x32x32p2", "32x4x64x64p2"),
        cpu_shape="2x4x8x8p2",
        parse_shape=parse_image_shape,
        make_inputs=_patchify_inputs,
        call=lambda backend, x, p: (patchify(x, p, backend=backend),),
        bytes_moved=_permutation_bytes,
        bytes_note="fwd x,tokens; bwd dtokens,dx",
    ),
    "unpatchify": OpSpec(
        name="unpatchify",
        # The final layer's tokens back to 8-channel images (noise and learned variance).
        gpu_shapes=("64x8x32x32p2", "32x8x64x64p2"),
        cpu_shape="2x8x8x8p2",
        parse_shape=parse_image_shape,
        make_inputs=_unpatchify_inputs,
        call=lambda backend, tokens, C, H, W, p: (unpatchify(tokens, C, H, W, p, backend=backend),),
        bytes_moved=_permutation_bytes,
        bytes_note="fwd tokens,image; bwd dimage,dtokens",
    ),
}


# ---------------------------------------------------------------------------------------------
# Timing


def cuda_graph_seconds(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Median GPU seconds per call of ``fn``, from replays of a graph of ``calls`` calls. Runs on
    the current stream, which must not be the default one (capture needs a side stream)."""
    for _ in range(3):
        fn()  # warm-up: JIT compiles and allocator pools happen outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        for _ in range(calls):
            fn()
    seconds = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(seconds)


def median_seconds(fn: Callable[[], object], device: torch.device, timer: str) -> float:
    if device.type != "cuda":
        return hardware.median_seconds(fn, device, repeats=3, warmup=1)
    if timer == "cudagraph":
        return cuda_graph_seconds(fn)
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def variant_function(spec: OpSpec, variant: str, device: torch.device):
    """(function of the op's arguments, None) or (None, reason it cannot run here)."""
    if variant == "compile":
        if device.type != "cuda":
            return None, "torch.compile is timed on the GPU only (a CPU build compiles slowly and says nothing)"
        return torch.compile(lambda *args: spec.call("eager", *args), dynamic=False), None
    if variant in spec.missing_backends:
        return None, f"{spec.name} has no {variant} backend"
    reason = unavailable_reason(variant, device)
    if reason is not None:
        return None, reason
    return (lambda *args: spec.call(variant, *args)), None


def baseline_function(baseline: Baseline, device: torch.device, timer: str):
    """(function of the op's arguments, None) or (None, reason it cannot run here)."""
    if baseline.unavailable is not None:
        return None, baseline.unavailable
    if timer == "cudagraph" and device.type == "cuda" and baseline.not_capturable is not None:
        return None, f"{baseline.not_capturable}; time it with --timer do_bench"
    return baseline.fn, None


def candidates(spec: OpSpec, names, device, timer):
    """(name, kind, function or None, reason) for each engine variant, then each baseline, in ``names``."""
    for variant in VARIANTS:
        if variant in names:
            yield (variant, "engine", *variant_function(spec, variant, device))
    for baseline in spec.baselines:
        if baseline.name in names:
            yield (baseline.name, "baseline", *baseline_function(baseline, device, timer))


def time_directions(fn, sets: list[InputSet], directions, device, timer) -> dict[str, float]:
    """Median seconds per direction, each call on the next input set in turn."""
    turn = iter(range(10**12))

    def next_set() -> InputSet:
        return sets[next(turn) % len(sets)]

    def forward():
        s = next_set()
        return fn(*s.inputs, *s.extra)

    def both():
        s = next_set()
        return torch.autograd.grad(fn(*s.inputs, *s.extra), s.inputs, s.grad_outputs)

    seconds = {}
    if "fwd" in directions:
        seconds["fwd"] = median_seconds(forward, device, timer)
    if "bwd" in directions:
        graphs = [(fn(*s.inputs, *s.extra), s) for s in sets]   # one retained graph per input set
        step = iter(range(10**12))

        def backward():
            outputs, s = graphs[next(step) % len(graphs)]
            return torch.autograd.grad(outputs, s.inputs, s.grad_outputs, retain_graph=True)

        seconds["bwd"] = median_seconds(backward, device, timer)
        del graphs
    if "both" in directions:
        seconds["both"] = median_seconds(both, device, timer)
    return seconds


def add_baseline_speedups(spec: OpSpec, rows: list[dict]) -> None:
    """Per direction: name the fastest reference baseline that ran, and divide its time by each row's."""
    reference = {b.name for b in spec.baselines if b.reference}
    for direction in {r["direction"] for r in rows}:
        same = [r for r in rows if r["direction"] == direction]
        timed = [r for r in same if r["kind"] == "baseline" and r["variant"] in reference and r["time_us"] is not None]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["time_us"])
        for r in same:
            r["best_baseline"] = best["variant"]
            if r["time_us"] is not None:
                r["speedup_vs_best_baseline"] = best["time_us"] / r["time_us"]


def bench_op(spec: OpSpec, shape_text: str, shape: tuple[int, ...], dtype: torch.dtype, names, directions, device,
             timer, copy_bandwidth):
    moved = spec.bytes_moved(shape, dtype)
    moved["both"] = moved["fwd"] + moved["bwd"]
    one_set = spec.make_inputs(shape, dtype, device)
    set_bytes = sum(t.numel() * t.element_size() for t in one_set.inputs + one_set.grad_outputs)
    n_sets = min(MAX_INPUT_SETS, math.ceil(ROTATION_BYTES / set_bytes)) if device.type == "cuda" else 1
    sets = [one_set] + [spec.make_inputs(shape, dtype, device) for _ in range(n_sets - 1)]
    rows, eager_seconds = [], {}
    for name, kind, fn, reason in candidates(spec, names, device, timer):
        base = dict(op=spec.name, shape=shape_text, dtype=str(dtype).removeprefix("torch."), variant=name, kind=kind,
                    kernel=None, timer=timer if device.type == "cuda" else "host clock", bytes_note=spec.bytes_note)
        seconds = {}
        if fn is not None:
            try:
                # For graph capture everything, the retained autograd graphs included, runs on
                # one side stream: backward kernels run on the stream of their forward.
                side_stream = torch.cuda.stream(torch.cuda.Stream()) if timer == "cudagraph" and device.type == "cuda" \
                    else contextlib.nullcontext()
                with side_stream:
                    seconds = time_directions(fn, sets, directions, device, timer)
                if kind == "engine" and spec.kernel_label is not None:
                    base["kernel"] = spec.kernel_label(name, *one_set.inputs, *one_set.extra)
            except Exception as error:  # a variant that fails gets its error in its row, the run goes on
                reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        for direction in directions:
            row = dict(base, direction=direction, bytes=moved[direction], time_us=None, gbps=None, copy_share=None,
                       speedup_vs_eager=None, speedup_vs_best_baseline=None, best_baseline=None, skipped=reason)
            if direction in seconds:
                s = seconds[direction]
                row.update(time_us=s * 1e6, gbps=moved[direction] / s / 1e9,
                           copy_share=moved[direction] / s / copy_bandwidth)
                if name == "eager":
                    eager_seconds[direction] = s
                if direction in eager_seconds:
                    row["speedup_vs_eager"] = eager_seconds[direction] / s
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_baseline_speedups(spec, rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def print_table(rows, copy_bandwidth):
    print(f"copy bandwidth (read + write): {copy_bandwidth / 1e9:.0f} GB/s")
    header = (f"{'op':<18} {'shape':<18} {'dtype':<8} {'dir':<4} {'variant':<14} {'kernel':<9} {'time us':>9} "
              f"{'GB/s':>7} {'copy':>6} {'vs eager':>8} {'vs best':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        start = (f"{r['op']:<18} {r['shape']:<18} {r['dtype']:<8} {r['direction']:<4} {r['variant']:<14} "
                 f"{r['kernel'] or '':<9}")
        if r["time_us"] is None:
            print(f"{start} skipped: {r['skipped']}")
            continue
        vs_eager = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] is not None else ""
        vs_best = f"{r['speedup_vs_best_baseline']:.2f}x" if r["speedup_vs_best_baseline"] is not None else ""
        print(f"{start} {r['time_us']:>9.1f} {r['gbps']:>7.0f} {r['copy_share']:>6.0%} {vs_eager:>8} {vs_best:>8}")
    best = {}  # (op, shape) -> {direction: fastest reference baseline}
    for r in rows:
        if r["best_baseline"] is not None:
            best.setdefault((r["op"], r["shape"]), {})[r["direction"]] = r["best_baseline"]
    if best:
        print("vs best: time of the fastest reference baseline / the row's time; that baseline, per direction:")
        for (op, shape), by_direction in best.items():
            print(f"  {op} {shape}: " + ", ".join(f"{d} {name}" for d, name in by_direction.items()))


def write_results(rows, env, copy_bandwidth, json_path, csv_path):
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        # gemm_tuning: the cuBLASLt candidates the cuda backends of linear and mlp timed, per GEMM
        Path(json_path).write_text(json.dumps(dict(environment=env, copy_bandwidth_bytes_per_s=copy_bandwidth,
                                                   rows=rows, gemm_tuning=gemm_tuning_report()), indent=2))
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        fields = list(rows[0]) + ["copy_bandwidth_bytes_per_s"] + list(env)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow(dict(r, copy_bandwidth_bytes_per_s=copy_bandwidth, **env))


# ---------------------------------------------------------------------------------------------
# Command line


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise SystemExit(f"--{what}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def shapes_per_op(ops: list[str], shapes_text: str | None, device: torch.device) -> dict[str, list[tuple[str, tuple]]]:
    """{op: [(shape text, parsed shape)]}, all parsed before anything is timed. Without --shapes each
    op runs its own shapes; with it, each op runs the listed shapes its format accepts, and a shape
    no selected op accepts, or an op left with none, is an error."""
    if shapes_text is None:
        return {name: [(text, OPS[name].parse_shape(text))
                       for text in (OPS[name].gpu_shapes if device.type == "cuda" else (OPS[name].cpu_shape,))]
                for name in ops}
    texts = [t.strip() for t in shapes_text.split(",") if t.strip()]
    if not texts:
        raise SystemExit("--shapes: empty list")
    chosen = {name: [] for name in ops}
    for text in texts:
        errors = []
        for name in ops:
            try:
                chosen[name].append((text, OPS[name].parse_shape(text)))
            except ValueError as error:
                errors.append(f"{name}: {error}")
        if len(errors) == len(ops):
            raise SystemExit(f"--shapes: no selected op takes shape {text!r}:\n  " + "\n  ".join(errors))
    left_out = [name for name, shapes in chosen.items() if not shapes]
    if left_out:
        raise SystemExit(f"--shapes {shapes_text!r} holds no shape for {', '.join(left_out)}: add one or drop "
                         "it from --ops")
    return chosen


def main(argv=None):
    baseline_names = list(dict.fromkeys(b.name for spec in OPS.values() for b in spec.baselines))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shapes, each run by the ops whose format takes it (default: each op's "
                             "PixArt shapes; formats in the module docstring)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--variants", default=",".join(VARIANTS + tuple(baseline_names)),
                        help="engine variants and baselines, from: " + ", ".join(VARIANTS + tuple(baseline_names)))
    parser.add_argument("--directions", default=",".join(DIRECTIONS))
    parser.add_argument("--timer", default="do_bench", choices=("do_bench", "cudagraph"),
                        help="do_bench: as a Python caller sees it; cudagraph: GPU time alone")
    parser.add_argument("--json", default=None, help="write rows and environment as JSON here")
    parser.add_argument("--csv", default=None, help="write rows (with environment columns) as CSV here")
    args = parser.parse_args(argv)
    ops = parse_list(args.ops, OPS, "ops")
    names = parse_list(args.variants, VARIANTS + tuple(baseline_names), "variants")
    directions = parse_list(args.directions, DIRECTIONS, "directions")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = shapes_per_op(ops, args.shapes, device)
    if device.type == "cpu":
        print("No GPU: CPU smoke test at a tiny shape, Triton interpreted. These numbers mean nothing.")
        copy_bandwidth = hardware.measure_copy_bandwidth(device, nbytes=64 * 2**20, repeats=3, warmup=1)
    else:
        copy_bandwidth = hardware.measure_copy_bandwidth(device)
    rows = []
    for name in ops:
        for shape_text, shape in shapes[name]:
            rows += bench_op(OPS[name], shape_text, shape, DTYPES[args.dtype], names, directions, device, args.timer,
                             copy_bandwidth)
    env = hardware.environment(sys.argv if argv is None else ["bench/kernels.py", *argv])
    print_table(rows, copy_bandwidth)
    print(f"{env['gpu_name'] or env['cpu']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    write_results(rows, env, copy_bandwidth, args.json, args.csv)


if __name__ == "__main__":
    main()
