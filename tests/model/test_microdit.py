"""MicroDiT against a functional transcription of the official forward, on the official state dict.

``official_forward`` below computes what SonyResearch/micro_diffusion's DiT.forward_without_cfg
computes (models/dit.py, models/utils.py), written here as plain functions of the official-layout
state dict that engine.interop.microdit.save produces, so the comparison checks the model and
the key mapping together. It routes the experts as the official code does (top-k by score, one-hot
gather and combine) and masks as it does (ids_keep, then a zero token in output space put back
with ids_restore). The model runs on the engine's fused ops; ``official_forward`` uses none of
them, so it is the plain reference the fused model is checked against, outputs and gradients.
"""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import engine.model.microdit as microdit_module
from engine import family
from engine.config import MicroDiTConfig, preset
from engine.diffusion import EDM
from engine.interop import microdit as interop
from engine.interop import to_engine
from engine.model import MicroDiT
from engine.model.layers import Linear, sincos_pos_embed
from engine.model.microdit import FREQ_DIM, block_shapes, swiglu_hidden
from engine.ops import _gemm
from engine.ops import norm_modulate as norm_modulate_op
from engine.ops.backend import triton_interpreted
from engine.optim import AdamW
from tests.model.helpers import randomize

EPS = 1e-6


# ------------------------------------------------------------------------------ the official math


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _norm(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], eps=EPS)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _attention(q, k, v, heads):
    """q (B, N, A), k, v (B, M, A): LN without affine over the whole q and k, then per head
    softmax(q kᵀ / sqrt(d)) v."""
    B, N, A = q.shape
    d = A // heads
    q = F.layer_norm(q, (A,), eps=EPS).view(B, N, heads, d).transpose(1, 2)
    k = F.layer_norm(k, (A,), eps=EPS).view(B, -1, heads, d).transpose(1, 2)
    v = v.reshape(B, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, h, N, M)
    return (weights @ v).transpose(1, 2).reshape(B, N, A)


def _self_attention(sd, name, x, head_dim):
    qkv = _linear(sd, f"{name}.qkv", x)  # (B, N, 3A): q, k, v each A wide
    A = qkv.shape[-1] // 3
    out = _attention(qkv[..., :A], qkv[..., A:2 * A], qkv[..., 2 * A:], A // head_dim)
    return _linear(sd, f"{name}.proj", out)


def _cross_attention(sd, name, x, y, head_dim):
    q = _linear(sd, f"{name}.q_linear", x)
    kv = _linear(sd, f"{name}.kv_linear", y)  # (B, L, 2A): k then v
    A = q.shape[-1]
    return _linear(sd, f"{name}.proj", _attention(q, kv[..., :A], kv[..., A:], A // head_dim))


def _ffn(sd, name, x, capacity):
    if f"{name}.gate.weight" not in sd:  # SwiGLU
        return _linear(sd, f"{name}.w3", F.silu(_linear(sd, f"{name}.w1", x)) * _linear(sd, f"{name}.w2", x))
    w1, w2 = sd[f"{name}.w1"], sd[f"{name}.w2"]
    E, T = w1.shape[0], x.shape[1]
    k = int(capacity * T / E)
    probs = torch.softmax(_linear(sd, f"{name}.gate", x), dim=-1)  # (n, t, e)
    score, token = torch.topk(probs.transpose(1, 2), k, dim=-1)  # (n, e, k)
    onehot = F.one_hot(token, T).to(x.dtype)  # (n, e, k, t)
    chosen = torch.einsum("nekt,ntd->nekd", onehot, x)
    out = torch.einsum("nekf,efd->nekd", F.gelu(torch.einsum("nekd,edf->nekf", chosen, w1)), w2)
    return torch.einsum("nekt,nekd->ntd", onehot, score[..., None] * out)


def _block(sd, name, x, y, c, head_dim, capacity):
    mod = _linear(sd, f"{name}.adaLN_modulation.1", _gelu_tanh(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in mod.chunk(6, dim=1))
    x = x + gate1 * _self_attention(sd, f"{name}.attn", _norm(sd, f"{name}.norm1", x) * (1 + scale1) + shift1, head_dim)
    x = x + _cross_attention(sd, f"{name}.cross_attn", _norm(sd, f"{name}.norm2", x), y, head_dim)
    return x + gate2 * _ffn(sd, f"{name}.mlp", _norm(sd, f"{name}.norm3", x) * (1 + scale2) + shift2, capacity)


def _mlp_with_norm(sd, name, x):
    return _linear(sd, f"{name}.fc2", _norm(sd, f"{name}.norm", _gelu_tanh(_linear(sd, f"{name}.fc1", x))))


def _count(sd, prefix):
    return len({k.split(".")[1] for k in sd if k.startswith(prefix)})


def official_forward(sd, x, t, y, head_dim, capacity, ids_keep=None, ids_restore=None):
    """x (N, C, H, W), t (N,) c_noise, y (N, L, Ct) -> (N, C, H, W)."""
    weight = sd["x_embedder.proj.weight"]
    p, C = weight.shape[-1], x.shape[1]
    h = F.conv2d(x, weight, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 256  # 512 sinusoidal features, computed in fp32 as the official embedder does
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).to(x.dtype)
    c = _linear(sd, "t_embedder.mlp.2", _gelu_tanh(_linear(sd, "t_embedder.mlp.0", t_freq)))
    y = _mlp_with_norm(sd, "y_embedder.y_proj", y)
    y = y + _self_attention(sd, "y_emb_preprocess.attn", _norm(sd, "y_emb_preprocess.norm1", y), head_dim)
    y = y + _ffn(sd, "y_emb_preprocess.mlp", _norm(sd, "y_emb_preprocess.norm2", y), capacity)
    c = c + _mlp_with_norm(sd, "pooled_y_emb_process", y.mean(dim=1))
    y_mixer = y
    if "patch_mixer_map_xin.0.weight" in sd:
        h = _linear(sd, "patch_mixer_map_xin.1", _norm(sd, "patch_mixer_map_xin.0", h))
        y_mixer = _linear(sd, "patch_mixer_map_y.1", _norm(sd, "patch_mixer_map_y.0", y))
    for i in range(_count(sd, "patch_mixer.")):
        h = _block(sd, f"patch_mixer.{i}", h, y_mixer, c, head_dim, capacity)
    if ids_keep is not None:
        h = torch.gather(h, 1, ids_keep[..., None].expand(-1, -1, h.shape[-1]))
    if "patch_mixer_map_xout.0.weight" in sd:
        h = _linear(sd, "patch_mixer_map_xout.1", _norm(sd, "patch_mixer_map_xout.0", h))
    for i in range(_count(sd, "blocks.")):
        h = _block(sd, f"blocks.{i}", h, y, c, head_dim, capacity)
    shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", _gelu_tanh(c)).chunk(2, dim=1)
    h = _norm(sd, "final_layer.norm_final", h) * (1 + scale[:, None]) + shift[:, None]
    h = _linear(sd, "final_layer.linear", h)
    if ids_restore is not None:
        tokens = ids_restore.shape[1]
        h = torch.cat([h, sd["mask_token"].expand(h.shape[0], tokens - h.shape[1], -1)], dim=1)
        h = torch.gather(h, 1, ids_restore[..., None].expand(-1, -1, h.shape[-1]))
    side = int(h.shape[1] ** 0.5)
    h = h.reshape(h.shape[0], side, side, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], C, side * p, side * p)


# ------------------------------------------------------------------------------ tests

# the tiny preset (mixer of another width, MoE in mixer block 1 and backbone block 1), and one
# with the mixer at the backbone's width (no projections, as MicroDiT_Tiny_2) and MoE everywhere
# allowed (experts_every = 1)
CONFIGS = [dict(), dict(mixer_dim=128, experts_every=1, num_experts=3)]


def tiny(**fields) -> MicroDiTConfig:
    return preset("microdit-tiny", **fields)


def inputs(config, batch=3):
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, dtype=torch.float64)
    c_noise = torch.randn(batch, dtype=torch.float64)
    caption = torch.randn(batch, config.text_len, config.caption_channels, dtype=torch.float64)
    return x, c_noise, caption


def draw_mask(batch, tokens, ratio):
    """The official masking: ids_keep, the first of a random shuffle, and ids_restore, its inverse."""
    shuffle = torch.argsort(torch.rand(batch, tokens), dim=1)
    return shuffle[:, :int(tokens * (1 - ratio))], torch.argsort(shuffle, dim=1)


@pytest.mark.parametrize("fields", CONFIGS)
@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_matches_official_forward(fields, ratio, tmp_path):
    config = tiny(**fields)
    model = randomize(MicroDiT(config).double()).eval()
    interop.save(model, tmp_path / "dit.pt")
    sd = torch.load(tmp_path / "dit.pt", weights_only=True)
    x, c_noise, caption = inputs(config)
    T = (config.input_size // config.patch_size) ** 2
    keep, restore = draw_mask(3, T, ratio) if ratio else (None, None)
    with torch.no_grad():
        expected = official_forward(sd, x, c_noise, caption, config.head_dim, config.expert_capacity, keep, restore)
        out = model(x, c_noise, caption, keep)
    assert out.shape == x.shape
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 1e-12


def _relative_error(t, ref):
    return ((t.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def official_output_and_grads(model64, x, c_noise, caption, keep, restore, weights):
    """The fp64 official forward on the model's weights: its output and the gradient of
    sum(output * weights) for every parameter, brought back to the engine's names and layouts
    (interop.to_engine: a permutation of the patch embedding and the head's rows, as the weights')."""
    c = model64.config
    sd = {k: v.requires_grad_(k not in ("pos_embed", "mask_token")) for k, v in interop.to_official(model64).items()}
    params = {k: v for k, v in sd.items() if v.requires_grad}
    out = official_forward(sd, x, c_noise, caption, c.head_dim, c.expert_capacity, keep, restore)
    grads = dict(zip(params, torch.autograd.grad((out * weights).sum(), list(params.values()))))
    return out.detach(), to_engine(grads, interop.key_table(c), c.patch_size, c.out_channels)


def output_and_grads(model, x, c_noise, caption, keep, weights):
    model.zero_grad(set_to_none=True)
    out = model(x, c_noise, caption, keep)
    (out.double() * weights).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


# A smaller model than the tiny preset, for the Triton interpreter's sake: 2 mixer blocks (the
# second MoE) at width 96 and 2 backbone blocks at 128, so the mixer projections run too.
SMALL = dict(depth=2, mixer_depth=2)


@pytest.mark.skipif(not triton_interpreted(), reason="runs the Triton kernels on the CPU under the interpreter")
@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_fused_model_matches_official_math_on_each_backend(ratio, _fresh_seed, monkeypatch):
    """fp32, against the fp64 official forward, output and every parameter gradient, in relative
    Frobenius norm: the eager backend within fp32 rounding (1e-4), the triton backend within
    2 x eager's error + 1e-5 (the rule of tests/model/test_backends.py). Every op on triton but
    moe, whose kernels have their own tests."""
    config = tiny(**SMALL)
    model64 = randomize(MicroDiT(config).double(), std=0.05)
    x, c_noise, caption = inputs(config, batch=2)
    T = (config.input_size // config.patch_size) ** 2
    keep, restore = draw_mask(2, T, ratio) if ratio else (None, None)
    weights = torch.randn(x.shape, dtype=torch.float64)
    ref_out, ref_grads = official_output_and_grads(model64, x, c_noise, caption, keep, restore, weights)
    model32 = copy.deepcopy(model64).float()
    x32, c_noise32, caption32 = x.float(), c_noise.float(), caption.float()
    results = {}
    for backend in ("eager", "triton"):
        monkeypatch.setenv("ENGINE_BACKEND", backend)
        monkeypatch.setenv("ENGINE_BACKEND_MOE", "eager")
        results[backend] = output_and_grads(model32, x32, c_noise32, caption32, keep, weights)
    assert results["eager"][1].keys() == ref_grads.keys()
    failures = []
    for name in ["output", *ref_grads]:
        ref = ref_out if name == "output" else ref_grads[name]
        err = {b: _relative_error(r[0] if name == "output" else r[1][name], ref) for b, r in results.items()}
        if not (err["eager"] < 1e-4 and err["triton"] <= 2 * err["eager"] + 1e-5):
            failures.append(f"{name}: eager {err['eager']:.3g}, triton {err['triton']:.3g}")
    assert not failures, f"seed {_fresh_seed}: " + "; ".join(failures)
    if keep is not None:  # masked patches: exactly zero on every backend
        for out, _ in results.values():
            kept = torch.zeros(2, T, dtype=torch.bool).scatter_(1, keep, True)
            p = config.patch_size
            side = config.input_size // p
            per_patch = out.reshape(2, -1, side, p, side, p).abs().sum(dim=(1, 3, 5)).flatten(1)
            assert (per_patch[~kept] == 0).all()


def test_norm_ops_share_the_model_eps():
    from engine.model import microdit

    assert microdit.EPS == norm_modulate_op.EPS == 1e-6


def test_bias_free_engine_linear_is_an_nn_linear():
    """layers.Linear(bias=False): no bias parameter or state-dict entry, nn.Linear's output."""
    ours, theirs = Linear(24, 36, bias=False, chunks=3), nn.Linear(24, 36, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == ["weight"]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(torch.cat(ours(x), dim=-1), theirs(x), rtol=0, atol=0)


@pytest.mark.skipif(not triton_interpreted(), reason="runs the Triton linear on the CPU under the interpreter")
def test_linears_read_the_optimizer_copies(monkeypatch):
    """With AdamW's bf16 copies attached, under bf16 autocast every Linear of the model but the MoE
    routers (whose weights the moe op reads itself) hands its op the copies of its weight and bias,
    and every MoE block the copies of its experts' weights, which the ops read instead of casting:
    the same output as casting, bit for bit; zeroed copies change it. The linear op's triton
    backend (the GPU's auto) is the one that reads copies."""
    monkeypatch.setenv("ENGINE_BACKEND", "eager")
    monkeypatch.setenv("ENGINE_BACKEND_LINEAR", "triton")
    config = tiny()
    model = randomize(MicroDiT(config))
    x, c_noise, caption = (t.float() for t in inputs(config, batch=2))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    plain = [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, Linear)]
    routers = [b.mlp.gate for b in [*model.mixer, *model.blocks] if hasattr(b.mlp, "gate")]
    assert len(plain) == len(routers) > 0 and all(any(m is r for r in routers) for m in plain)
    # Forward only: the copies are read there (the weight gradient goes to the parameter anyway).

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, c_noise, caption)

    cast = run()
    optimizer = AdamW(model.parameters())
    experts = [b.mlp for b in [*model.mixer, *model.blocks] if hasattr(b.mlp, "gate")]
    assert optimizer.attach_copies(model, torch.bfloat16) == sum(1 + (m.bias is not None) for m in linears) + 2 * len(
        experts)
    read, expert_copies = [], []
    moe_op = microdit_module.moe

    def moe_spy(x, gate, w1, w2, capacity, w1_lp=None, w2_lp=None):
        expert_copies.append((w1_lp is optimizer.copies[w1].tensor, w2_lp is optimizer.copies[w2].tensor))
        return moe_op(x, gate, w1, w2, capacity, w1_lp=w1_lp, w2_lp=w2_lp)

    monkeypatch.setattr(microdit_module, "moe", moe_spy)
    cast_operands = _gemm.cast_operands

    def spy(x, weight, bias, dtype, weight_lp=None, bias_lp=None):
        read.append((weight, weight_lp, bias, bias_lp))
        return cast_operands(x, weight, bias, dtype, weight_lp, bias_lp)

    monkeypatch.setattr(_gemm, "cast_operands", spy)
    with_copies = run()
    assert torch.equal(with_copies, cast)
    copied = {id(w) for w, w_lp, _, _ in read if w_lp is optimizer.copies[w].tensor}
    copied |= {id(b) for _, _, b, b_lp in read if b is not None and b_lp is optimizer.copies[b].tensor}
    expected = {id(p) for m in linears for p in (m.weight, m.bias) if p is not None}
    assert copied == expected and len(read) >= len(linears)
    assert expert_copies == [(True, True)] * len(experts)
    for c in optimizer.copies.values():
        c.tensor.zero_()
    assert not torch.equal(run(), cast)


def expected_state_shapes(config: MicroDiTConfig) -> dict[str, tuple[int, ...]]:
    """The model's state dict as it was written before the model ran on the engine's ops (nn.Linear,
    nn.LayerNorm(bias=False) and the experts' parameters): names and shapes, spelled out."""
    c, D, Dm, p = config, config.hidden_size, config.mixer_dim, config.patch_size
    shapes = {}

    def linear(name, n_in, n_out, bias=True):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name, dim):
        shapes[f"{name}.weight"] = (dim,)

    def norm_mlp(name, n_in):
        linear(f"{name}.fc1", n_in, D)
        norm(f"{name}.norm", D)
        linear(f"{name}.fc2", D, D)

    def swiglu(name, dim, hidden):
        linear(f"{name}.w1", dim, hidden, False)
        linear(f"{name}.w2", dim, hidden, False)
        linear(f"{name}.w3", hidden, dim, False)

    def block(name, s):
        w = s.width
        norm(f"{name}.norm1", w)
        linear(f"{name}.attn.qkv", w, 3 * s.attn_width, False)
        linear(f"{name}.attn.proj", s.attn_width, w, False)
        norm(f"{name}.norm2", w)
        linear(f"{name}.cross_attn.q", w, w, False)
        linear(f"{name}.cross_attn.kv", w, 2 * w, False)
        linear(f"{name}.cross_attn.proj", w, w, False)
        norm(f"{name}.norm3", w)
        if s.moe:
            linear(f"{name}.mlp.gate", w, c.num_experts, False)
            shapes[f"{name}.mlp.w1"] = (c.num_experts, w, s.ffn_hidden)
            shapes[f"{name}.mlp.w2"] = (c.num_experts, s.ffn_hidden, w)
        else:
            swiglu(f"{name}.mlp", w, s.ffn_hidden)
        linear(f"{name}.adaln", D, 6 * w)

    linear("patch_embed", c.in_channels * p * p, D)
    linear("time_embed.fc1", FREQ_DIM, D)
    linear("time_embed.fc2", D, D)
    norm_mlp("caption_embed", c.caption_channels)
    norm("caption_block.norm1", D)
    linear("caption_block.attn.qkv", D, 3 * D, False)
    linear("caption_block.attn.proj", D, D, False)
    norm("caption_block.norm2", D)
    swiglu("caption_block.mlp", D, swiglu_hidden(D, 4.0, c.multiple_of))
    norm_mlp("pooled_caption_embed", D)
    if Dm != D:
        for name, n_in, n_out in (("mixer_in", D, Dm), ("mixer_caption", D, Dm), ("mixer_out", Dm, D)):
            norm(f"{name}.norm", n_in)
            linear(f"{name}.linear", n_in, n_out, False)
    mixer, backbone = block_shapes(config)
    for i, s in enumerate(mixer):
        block(f"mixer.{i}", s)
    for i, s in enumerate(backbone):
        block(f"blocks.{i}", s)
    norm("final.norm", D)
    linear("final.adaln", D, 2 * D)
    linear("final.linear", D, p * p * c.out_channels)
    return shapes


@pytest.mark.parametrize("name,fields", [("microdit-tiny", {}), ("microdit-tiny", CONFIGS[1]), ("microdit-xl2", {})])
def test_state_dict_keys_and_shapes_are_unchanged(name, fields):
    with torch.device("meta"):
        model = MicroDiT(preset(name, **fields))
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert state == expected_state_shapes(model.config)
    assert all(interop.official_key(k) for k in state)  # every key has its official name


def test_masked_positions_are_zero():
    config = tiny()
    model = randomize(MicroDiT(config).double())
    x, c_noise, caption = inputs(config)
    p, side = config.patch_size, config.input_size // config.patch_size
    keep, _ = draw_mask(3, side * side, 0.75)
    out = model(x, c_noise, caption, keep)
    per_patch = out.reshape(3, config.in_channels, side, p, side, p).abs().sum(dim=(1, 3, 5)).flatten(1)  # (B, T)
    kept = torch.zeros(3, side * side, dtype=torch.bool).scatter_(1, keep, True)
    assert (per_patch[~kept] == 0).all() and (per_patch[kept] > 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_xl2_is_the_official_size():
    with torch.device("meta"):
        model = MicroDiT(preset("microdit-xl2"))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 1165.4
    shapes = [(b.attn.qkv.out_features // 3, b.mlp.w1.shape[2] if hasattr(b.mlp, "gate") else b.mlp.w1.out_features)
              for b in model.blocks]
    assert shapes[0] == (512, 512) and shapes[1] == (640, 768) and shapes[25] == (1024, 3840)
    assert shapes[26] == shapes[27] == (1024, 2816)  # MoE on blocks 1, 3, ..., 25: the last stays dense
    assert [hasattr(b.mlp, "gate") for b in model.mixer] == [False, True] * 3
    assert sum(hasattr(b.mlp, "gate") for b in model.blocks) == 13


def test_presets_at_256_and_512():
    for name in ("microdit-xl2", "microdit-tiny"):
        assert preset(name, 256).pe_interpolation == 1.0 and preset(name, 256).input_size == 32
        assert preset(name, 512).pe_interpolation == 2.0 and preset(name, 512).input_size == 64


@pytest.mark.parametrize("scale,grid", [(1.0, 16), (2.0, 32), (0.25, 4)])
def test_positions_are_the_official_table(scale, grid):
    """The official table in numpy: each axis at arange(g) / (g / base) / scale with base = g, the
    first half of the channels the column, the second the row, sines then cosines."""
    dim = 64
    coords = np.arange(grid, dtype=np.float32) / (grid / grid) / scale
    column, row = (a.reshape(-1) for a in np.meshgrid(coords, coords))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(column), encode(row)], axis=1)
    torch.testing.assert_close(sincos_pos_embed(dim, grid, grid, grid, scale), torch.from_numpy(table), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_flops_per_sample_matches_counted_flops(ratio):
    """torch's FlopCounter over one forward (attention through SDPA's math path, so its products
    are counted as matmuls), times 3, equals flops_per_sample: every matmul counted, routing none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = tiny()
    model = MicroDiT(config).double()
    x, c_noise, caption = inputs(config, batch=2)
    T = (config.input_size // config.patch_size) ** 2
    keep = draw_mask(2, T, ratio)[0] if ratio else None
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, c_noise, caption, keep)
    assert 3 * counter.get_total_flops() / 2 == model.flops_per_sample(64, 64, ratio)


def test_flops_per_sample_xl2():
    with torch.device("meta"):
        model = MicroDiT(preset("microdit-xl2"))
    masked, full = model.flops_per_sample(256, 256, 0.75), model.flops_per_sample(256, 256)
    assert round(masked / 1e12, 3) == 0.282 and round(full / 1e12, 3) == 0.714
    # the official one-hot routing adds 2 x 2N x N x w multiply-adds per MoE block (3 in the mixer
    # at N = 256, w = 768; 13 in the backbone at N = 64 or 256, w = 1024), counted 3x
    routing = lambda n: 6 * (3 * 4 * 256 * 256 * 768 + 13 * 4 * n * n * 1024)  # noqa: E731
    assert round((masked + routing(64)) / 1e12, 3) == 0.287  # MICRODIT.md: 0.287 measured
    assert round((full + routing(256)) / 1e12, 3) == 0.739  # MICRODIT.md: 0.736 measured, 738 GFLOP in its table


# ------------------------------------------------------------------------------ the family


def batch_of(config, batch=4):
    return {"latent": torch.randn(batch, config.in_channels, config.input_size, config.input_size),
            "caption": torch.randn(batch, config.text_len, config.caption_channels),
            "caption_lens": torch.full((batch,), config.text_len)}


def test_training_conditions_draw_keep_from_the_generator():
    fam = family.get("microdit")
    config = tiny()
    model = fam.build(config)
    batch = batch_of(config)
    train = SimpleNamespace(caption_dropout=0.5, mask_ratio=0.75)
    draws = [fam.training_conditions(model, batch, torch.Generator().manual_seed(7), train) for _ in range(2)]
    other = fam.training_conditions(model, batch, torch.Generator().manual_seed(8), train)
    assert torch.equal(draws[0]["keep"], draws[1]["keep"]) and torch.equal(draws[0]["caption"], draws[1]["caption"])
    assert not torch.equal(draws[0]["keep"], other["keep"])
    keep, mask = draws[0]["keep"], draws[0]["loss_mask"]
    assert keep.shape == (4, 4) and keep.dtype == torch.int64  # int(16 x 0.25) of 16 tokens
    assert torch.equal(mask.sum(1), torch.full((4,), 4.0)) and (mask.gather(1, keep) == 1).all()
    # the caption drop comes first from the generator: the same draw as a bare torch.rand(B)
    dropped = torch.rand(4, generator=torch.Generator().manual_seed(7)) < 0.5
    caption = draws[0]["caption"]
    assert all(torch.equal(caption[b], torch.zeros_like(caption[b]) if dropped[b] else batch["caption"][b])
               for b in range(4))
    unmasked = fam.training_conditions(model, batch, torch.Generator().manual_seed(7), SimpleNamespace(
        caption_dropout=0.5, mask_ratio=0.0))
    assert set(unmasked) == {"caption"}


def test_loss_mask_gives_the_official_masked_loss():
    """EDM's loss with the family's loss mask equals the official one: weighted squared error,
    mean over channels, p x p average per patch, mean over the kept patches, per sample."""
    fam = family.get("microdit")
    config = tiny()
    model = randomize(fam.build(config))
    batch = batch_of(config, 3)
    kwargs = fam.training_conditions(model, batch, torch.Generator().manual_seed(3),
                                     SimpleNamespace(caption_dropout=0.0, mask_ratio=0.75))
    mask = kwargs.pop("loss_mask")
    edm = EDM(sigma_data=0.9, p_mean=-0.6, p_std=1.2)
    x0 = batch["latent"]
    sigma = torch.tensor([0.3, 1.0, 4.0])
    noise = torch.randn_like(x0)
    losses = edm.training_losses(model, x0, sigma, kwargs, noise=noise, mask=mask)["loss"]
    denoised = edm.denoise(model, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, kwargs)
    error = edm.loss_weight(sigma).view(-1, 1, 1, 1) * (denoised - x0) ** 2
    per_patch = F.avg_pool2d(error.mean(dim=1), config.patch_size).flatten(1)  # (B, T)
    expected = (per_patch * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)


def test_sampling_and_null_conditions():
    fam = family.get("microdit")
    config = tiny()
    model = fam.build(config)
    cond = fam.sampling_conditions(model, 2, [np.ones((3, 32), np.float16), np.ones((9, 32), np.float16)], 8, "cpu")
    assert cond["caption"].shape == (2, 8, 32) and cond["caption"][0, 3:].abs().sum() == 0
    null = fam.null_conditions(model, 2)
    assert set(null) == {"caption"} and torch.equal(null["caption"], torch.zeros(2, 8, 32))
    with pytest.raises(ValueError, match="caption_channels"):
        fam.sampling_conditions(model, 1, [np.ones((3, 16), np.float16)], 8, "cpu")


def test_check_cache():
    fam = family.get("microdit")
    config = preset("microdit-xl2")
    fam.check_cache(config, SimpleNamespace(path="c", text_width=1024, max_tokens=77))
    for cache, message in ((SimpleNamespace(path="c", text_width=0, max_tokens=77), "no text features"),
                           (SimpleNamespace(path="c", text_width=4096, max_tokens=77), "caption_channels"),
                           (SimpleNamespace(path="c", text_width=1024, max_tokens=120), "--max-tokens 77")):
        with pytest.raises(ValueError, match=message):
            fam.check_cache(config, cache)


def test_family_flops_follow_the_mask_ratio():
    fam = family.get("microdit")
    config = tiny()
    model = fam.build(config)
    batch = batch_of(config, 2)
    assert fam.flops(model, batch, SimpleNamespace(mask_ratio=0.0)) == 2 * model.flops_per_sample(64, 64)
    assert fam.flops(model, batch, SimpleNamespace(mask_ratio=0.75)) == 2 * model.flops_per_sample(64, 64, 0.75)
    assert fam.describe(config).startswith("MicroDiT (4 blocks of width 128")


def test_forward_rejects_captions_and_keep_sets_that_do_not_fit():
    """Caption features of another width or length and keep sets of no token, too many tokens or
    the wrong dtype are refused before any work, naming what was expected."""
    config = tiny()
    model = MicroDiT(config)
    x, c_noise, caption = inputs(config, batch=2)
    T = (config.input_size // config.patch_size) ** 2
    for bad, message in ((caption[..., :-1], "caption_channels = 32"), (caption[:, :-1], "text_len = 8"),
                         (caption[:1], r"caption features \(2,")):
        with pytest.raises(ValueError, match=message):
            model(x, c_noise, bad)
    for keep in (torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, T + 1, dtype=torch.int64),
                 torch.zeros(2, 3, dtype=torch.int32), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=f"1 <= K <= T = {T}"):
            model(x, c_noise, caption, keep)
