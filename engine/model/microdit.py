"""MicroDiT (Sehwag et al., arXiv 2407.15811): a sparse DiT trained with deferred masking.

The network F of the EDM denoiser (engine.diffusion.EDM), as the official MicroDiT computes it:

    tokens = patch_embed(x) + sin-cos positions                          (B, T, D)
    y      = caption_block(caption_embed(caption))                       (B, L, D)  refined caption
    cond   = gelu_tanh(time_embed(c_noise) + pooled_caption_embed(mean_L y))   (B, D)
    h      = mixer_in(tokens); h = mixer blocks(h, mixer_caption(y), cond)     (B, T, Dm) all tokens
    h      = mixer_out(h[keep])                                          (B, K, D)  the kept tokens
    h      = blocks(h, y, cond); out = final(h, cond)                    (B, K, p*p*C)
    output = out at the kept positions, 0 elsewhere, unpatchified        (B, C, H, W)

Every block (mixer and backbone) is

    x += gate_msa * self_attn(modulate(norm1(x), shift_msa, scale_msa))
    x += cross_attn(norm2(x), y)                       no gate, no modulation
    x += gate_mlp * ffn(modulate(norm3(x), shift_mlp, scale_mlp))

with its own adaLN Linear on ``cond`` (adaLN-Zero), LayerNorms without bias (eps 1e-6), q and k
layer-normalised over all heads together (no affine), no bias in attention, FFN and experts.
Backbone block i has the attention width and FFN size of the layer-wise scaling rule
(``block_shapes``); its FFN is a SwiGLU, or on every ``experts_every``-th block an expert-choice
mixture of experts (engine.ops.moe). The caption is used without a padding mask: its zero
features count as tokens, as the official model sees its text encoder's 77 tokens.

How it runs: the same math on the engine's ops, as engine/model/pixart.py. Every Linear but the
MoE router is an engine.model.layers.Linear (engine.ops.linear; it reads the optimizer's
low-precision weight copies, engine.optim.AdamW.attach_copies). Every residual add is fused with
the LayerNorm after it (engine.ops.add_norm_modulate), so a block hands on its FFN output and
gate, and the next block, the mixer's output projection or the final layer adds them:

    r, h = add_norm_modulate(x, ffn_prev, gate_mlp_prev, shift_msa, scale_msa')   residual + norm1
    x, h = add_norm_modulate(r, self_attn(h), gate_msa, 0, w2 - 1)                residual + norm2
    x, h = add_norm_modulate(x, cross_attn(h, y), None, shift_mlp, scale_mlp')    residual + norm3
    hand on ffn(h), gate_mlp

The ops' LayerNorm has no affine: a LayerNorm of weight w is folded into the modulation,
LN(x) w (1 + scale) + shift = LN(x) (1 + scale') + shift with scale' = w (1 + scale) - 1, and an
unmodulated one is shift 0, scale' = w - 1 (``norm_args``). Self-attention runs through
engine.ops.self_attention (SDPA with its kernel chosen), cross-attention through
engine.ops.cross_attention with every caption key valid (no lengths), the qk-norm through the
norm op with zero modulation (``qk_norm``); the SwiGLU is three Linears around
engine.ops.swiglu; the MoE blocks read the optimizer's copies of the experts' weights too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import VAE_DOWNSAMPLE, MicroDiTConfig
from engine.model.layers import Linear, PositionEmbedding, timestep_frequencies
from engine.ops.cross_attention import cross_attention
from engine.ops.moe import moe, tokens_per_expert
from engine.ops.norm_modulate import add_norm_modulate, norm_modulate
from engine.ops.patchify import patchify, unpatchify
from engine.ops.self_attention import self_attention
from engine.ops.swiglu import swiglu

EPS = 1e-6  # every LayerNorm's, the qk-norms' included; engine.ops.norm_modulate's is the same
FREQ_DIM = 512  # sinusoidal features of the noise level
CAPTION_FFN_RATIO = 4.0  # the caption refinement block's SwiGLU, before its 2/3 and rounding


@dataclass(frozen=True)
class BlockShape:
    """One block's sizes: token width, self-attention width, FFN hidden size, MoE or SwiGLU."""

    width: int
    attn_width: int
    ffn_hidden: int
    moe: bool


def round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def swiglu_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    """A SwiGLU of nominal hidden int(dim * ratio) keeps 2/3 of it (the same parameters as a
    plain MLP of that size), rounded up to a multiple of ``multiple_of``."""
    return round_up(int(2 * int(dim * ratio) / 3), multiple_of)


def moe_hidden(dim: int, ratio: float, multiple_of: int) -> int:
    return round_up(int(dim * ratio), multiple_of)


def is_moe(index: int, count: int, every: int, backbone: bool) -> bool:
    """Blocks i with (i + 1) % every == 0 are MoE, except the backbone's last and the mixer's first."""
    allowed = index < count - 1 if backbone else index >= 1
    return allowed and (index + 1) % every == 0


def block_shapes(config: MicroDiTConfig) -> tuple[list[BlockShape], list[BlockShape]]:
    """(mixer blocks, backbone blocks). Backbone block i of n takes r_qkv and r_ffn from
    linspace(*qkv_ratio, n) and linspace(*ffn_ratio, n): attention width int(D r_qkv) rounded up to
    a multiple of 2 head_dim (D itself at r_qkv = 1), FFN hidden from int(D r_ffn) (SwiGLU: 2/3 of
    it; both rounded up to multiple_of), unless the config lists the sizes. Mixer blocks keep the
    full width, their FFNs from mixer_ffn_ratio."""
    c, D = config, config.hidden_size
    qkv = np.linspace(*c.qkv_ratio, c.depth).tolist()
    ffn = np.linspace(*c.ffn_ratio, c.depth).tolist()
    backbone = []
    for i in range(c.depth):
        moe_block = is_moe(i, c.depth, c.experts_every, backbone=True)
        if c.attn_widths is not None:
            attn = c.attn_widths[i]
        else:
            attn = D if qkv[i] == 1 else round_up(int(D * qkv[i]), 2 * c.head_dim)
        if c.ffn_widths is not None:
            hidden = c.ffn_widths[i]
        else:
            hidden = (moe_hidden if moe_block else swiglu_hidden)(D, ffn[i], c.multiple_of)
        backbone.append(BlockShape(D, attn, hidden, moe_block))
    mixer = []
    for i in range(c.mixer_depth):
        moe_block = is_moe(i, c.mixer_depth, c.experts_every, backbone=False)
        hidden = (moe_hidden if moe_block else swiglu_hidden)(c.mixer_dim, c.mixer_ffn_ratio, c.multiple_of)
        mixer.append(BlockShape(c.mixer_dim, c.mixer_dim, hidden, moe_block))
    return mixer, backbone


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=EPS, bias=False)


def norm_args(weight: torch.Tensor, batch: int, shift: torch.Tensor | None = None,
              scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale') for the engine's norm ops (LayerNorm without affine) standing for a
    LayerNorm of weight w followed by the modulation: LN(x) w (1 + scale) + shift
    = LN(x) (1 + scale') + shift with scale' = w (1 + scale) - 1, (B, D). Without shift and
    scale, the plain LayerNorm of ``batch`` samples: shift 0, scale' = w - 1. The gradient reaches
    w through scale'. Folded in fp32 at least (the ops read fp32 modulation anyway): in bf16 (FSDP2's
    gathered weights) 1 + scale' would be rounded to steps of 2^-7."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    if scale is None:
        scale = (w - 1).expand(batch, -1)  # (B, D), one row read by every sample
        return w.new_zeros(scale.shape), scale
    return shift, w * (1 + scale.to(w.dtype)) - 1


def add_norm(x: torch.Tensor, pending: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor,
             scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, h): r = x + gate * pending (x when nothing is pending), h = LN(r) (1 + scale) + shift."""
    if pending is None:
        return x, norm_modulate(x, shift, scale)
    return add_norm_modulate(x, pending, gate, shift, scale)  # (B, N, D) each


def qk_norm(q: torch.Tensor, k: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(LN(q), LN(k)), each over a token's whole vector, all heads together, no affine: q (B, N, A),
    k (B, M, A) -> (B, N, h, d), (B, M, h, d) with d = head_dim. The fused norm op with zero
    modulation, which normalises in fp32 and writes the compute dtype (under autocast
    F.layer_norm would write fp32 q and k for attention to cast back, three times the bytes of a
    bf16 write and read)."""
    zero = torch.zeros(q.shape[0], q.shape[-1], dtype=torch.float32, device=q.device)  # (B, A): no shift, no scale
    return heads(norm_modulate(q, zero, zero), head_dim), heads(norm_modulate(k, zero, zero), head_dim)


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, A) -> (B, N, A / head_dim, head_dim), a view."""
    return t.unflatten(-1, (t.shape[-1] // head_dim, head_dim))


class SelfAttention(nn.Module):
    """Self-attention of width ``width`` (heads of head_dim) on dim-wide tokens."""

    def __init__(self, dim: int, width: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = Linear(dim, 3 * width, bias=False, chunks=3)
        self.proj = Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)  # (B, N, A) each
        d = self.head_dim
        out = self_attention(*qk_norm(q, k, d), heads(v, d))  # (B, N, h, d)
        return self.proj(out.flatten(2))  # (B, N, dim)


class CrossAttention(nn.Module):
    """Image tokens attend to every caption token (no padding mask), at the full width."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q = Linear(dim, dim, bias=False)
        self.kv = Linear(dim, 2 * dim, bias=False, chunks=2)
        self.proj = Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output (B, N, dim), y): y comes back through the kv projection (Linear's branch), for
        the next blocks, so that the gradients of all its uses are summed inside those GEMMs."""
        k, v, y = self.kv(y, branch=True)  # (B, L, dim) each
        d = self.head_dim
        out = cross_attention(*qk_norm(self.q(x), k, d), heads(v, d), None)  # (B, N, h, d): every key
        return self.proj(out.flatten(2)), y  # (B, N, dim)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), no biases; the gating through engine.ops.swiglu (one pass each way)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(swiglu(self.w1(x), self.w2(x)))


class MoE(nn.Module):
    """Expert-choice mixture of experts (engine.ops.moe): a router, and per expert
    Linear -> GELU -> Linear stored as (E, D, H) and (E, H, D). The router is a plain nn.Linear
    (the op reads its weight and casts it itself, so a low-precision copy would go unread); the
    experts' weights have copies (``w1_copy``, ``w2_copy``: engine.optim.AdamW.attach_copies),
    read instead of casting them every step."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float):
        super().__init__()
        self.capacity = capacity
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w1_copy = self.w2_copy = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = {f"{name}_lp": copy.current() if copy is not None else None
                  for name, copy in (("w1", self.w1_copy), ("w2", self.w2_copy))}
        return moe(x, self.gate.weight, self.w1, self.w2, self.capacity, **copies)  # (B, N, dim)


class NormMlp(nn.Module):
    """Linear -> GELU(tanh) -> LayerNorm -> Linear, with biases: the caption and pooled-caption
    embedders. The LayerNorm stays nn.LayerNorm: the pooled caption is (B, D), not the (B, N, D)
    the norm ops take, and the caption's L tokens are few."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = Linear(in_dim, dim, activation="gelu_tanh")
        self.norm = layer_norm(dim)
        self.fc2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class NormLinear(nn.Module):
    """LayerNorm -> Linear without bias: the projections into and out of the patch-mixer's width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = layer_norm(in_dim)
        self.linear = Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, in_dim), plus ``pending`` times ``gate`` (B, in_dim) when given (the last
        mixer block's FFN output, added here) -> (B, N, out_dim)."""
        _, h = add_norm(x, pending, gate, *norm_args(self.norm.weight, x.shape[0]))
        return self.linear(h)


class TimestepEmbedder(nn.Module):
    """c_noise -> 512 sinusoidal features (cosines first) -> Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = Linear(FREQ_DIM, dim, activation="gelu_tanh")
        self.fc2 = Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, FREQ_DIM).to(self.fc1.weight.dtype)  # (B, 512)
        return self.fc2(self.fc1(freqs))  # (B, dim)


class CaptionBlock(nn.Module):
    """The caption's one refinement block: y += SA(LN y); y += SwiGLU(LN y), unmodulated; the first
    add fused with the second norm."""

    def __init__(self, dim: int, head_dim: int, ffn_hidden: int):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, dim, head_dim)
        self.norm2 = layer_norm(dim)
        self.mlp = SwiGLU(dim, ffn_hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        B = y.shape[0]
        h = norm_modulate(y, *norm_args(self.norm1.weight, B))  # (B, L, D)
        y, h = add_norm_modulate(y, self.attn(h), None, *norm_args(self.norm2.weight, B))
        return y + self.mlp(h)


class Block(nn.Module):
    """A mixer or backbone block: the module docstring's three residual branches, each add fused
    with the norm after it; the FFN's output and gate go to what follows, not yet added."""

    # what engine.recompute can recompute: the norms' weights are read by the fused ops, their
    # forward never runs, and the adaLN Linear works on (B, D) only
    recompute_parts = ("attn", "cross_attn", "mlp")

    def __init__(self, shape: BlockShape, cond_dim: int, head_dim: int, num_experts: int, capacity: float):
        super().__init__()
        dim = shape.width
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, shape.attn_width, head_dim)
        self.norm2 = layer_norm(dim)
        self.cross_attn = CrossAttention(dim, head_dim)
        self.norm3 = layer_norm(dim)
        self.mlp = MoE(dim, shape.ffn_hidden, num_experts, capacity) if shape.moe else SwiGLU(dim, shape.ffn_hidden)
        self.adaln = Linear(cond_dim, 6 * dim)  # on gelu_tanh(cond), zero-initialised (adaLN-Zero)

    def forward(self, x, pending, pending_gate, y, cond):
        """x (B, N, dim) the residual stream without ``pending`` (B, N, dim), the previous block's
        FFN output, to be added times ``pending_gate`` (B, dim) (both None: nothing pending);
        y (B, L, dim) the caption; cond (B, D) already through GELU(tanh).
        -> (x, this block's FFN output, gate_mlp, y back through the cross-attention's kv projection)."""
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln(cond).chunk(6, dim=1)  # (B, dim)
        r, h = add_norm(x, pending, pending_gate, *norm_args(self.norm1.weight, B, shift_msa, scale_msa))
        x, h = add_norm_modulate(r, self.attn(h), gate_msa, *norm_args(self.norm2.weight, B))  # (B, N, dim)
        cross, y = self.cross_attn(h, y)  # (B, N, dim), (B, L, dim)
        x, h = add_norm_modulate(x, cross, None, *norm_args(self.norm3.weight, B, shift_mlp, scale_mlp))
        return x, self.mlp(h), gate_mlp, y


class FinalLayer(nn.Module):
    """Adds the last block's pending FFN output, then norm -> modulate -> Linear."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.adaln = Linear(dim, 2 * dim)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x, pending, pending_gate, cond):
        shift, scale = self.adaln(cond).chunk(2, dim=1)  # (B, D) each
        _, h = add_norm(x, pending, pending_gate, *norm_args(self.norm.weight, x.shape[0], shift, scale))
        return self.linear(h)  # (B, N, p*p*C)


class MicroDiT(nn.Module):
    block_lists = ("mixer", "blocks")  # the blocks in forward order (engine.parallel.blocks_in_order)

    def __init__(self, config: MicroDiTConfig):
        super().__init__()
        self.config = config
        c, D, Dm, p = config, config.hidden_size, config.mixer_dim, config.patch_size
        mixer_shapes, backbone_shapes = block_shapes(config)
        self.patch_embed = Linear(c.in_channels * p * p, D)  # = Conv2d(k=p, s=p) on patchified input
        self.pos_embed = PositionEmbedding(D, c.input_size // p, c.pe_interpolation)
        self.time_embed = TimestepEmbedder(D)
        self.caption_embed = NormMlp(c.caption_channels, D)
        self.caption_block = CaptionBlock(D, c.head_dim, swiglu_hidden(D, CAPTION_FFN_RATIO, c.multiple_of))
        self.pooled_caption_embed = NormMlp(D, D)
        # into and out of the mixer's width; none when the widths are equal (as MicroDiT_Tiny_2)
        self.mixer_in = NormLinear(D, Dm) if Dm != D else None
        self.mixer_caption = NormLinear(D, Dm) if Dm != D else None
        self.mixer_out = NormLinear(Dm, D) if Dm != D else None
        self.mixer = nn.ModuleList(Block(s, D, c.head_dim, c.num_experts, c.expert_capacity) for s in mixer_shapes)
        self.blocks = nn.ModuleList(Block(s, D, c.head_dim, c.num_experts, c.expert_capacity) for s in backbone_shapes)
        self.final = FinalLayer(D, p, c.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """As the official code: Xavier Linears with zero biases; N(0, 0.02) embedder MLPs; in each
        block truncated N(0, 0.02) for the attention inputs, the router and the first FFN Linear,
        truncated N(0, s) for the output projections and the other FFN Linears (the SwiGLU's w2
        too), s = 0.02 / sqrt(2 (i + 1)) in backbone block i, 0.02 / sqrt(2 depth) in the mixer,
        0.02 in the caption block; zero adaLN weights, final layer and caption-block outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.time_embed, self.caption_embed, self.pooled_caption_embed):
            nn.init.normal_(embedder.fc1.weight, std=0.02)
            nn.init.normal_(embedder.fc2.weight, std=0.02)

        def init_block(block: Block | CaptionBlock, std: float) -> None:
            inputs, outputs = [block.attn.qkv.weight], [block.attn.proj.weight]
            if isinstance(block, Block):
                inputs += [block.cross_attn.q.weight, block.cross_attn.kv.weight]
                outputs.append(block.cross_attn.proj.weight)
                nn.init.zeros_(block.adaln.weight)
            if isinstance(block.mlp, MoE):
                inputs += [block.mlp.gate.weight, block.mlp.w1]
                outputs.append(block.mlp.w2)
            else:
                inputs.append(block.mlp.w1.weight)
                outputs += [block.mlp.w2.weight, block.mlp.w3.weight]
            for weight in inputs:
                nn.init.trunc_normal_(weight, std=0.02)
            for weight in outputs:
                nn.init.trunc_normal_(weight, std=std)

        for i, block in enumerate(self.blocks):
            init_block(block, 0.02 / math.sqrt(2 * (i + 1)))
        for block in self.mixer:
            init_block(block, 0.02 / math.sqrt(2 * self.config.depth))
        init_block(self.caption_block, 0.02)
        nn.init.zeros_(self.caption_block.attn.proj.weight)
        nn.init.zeros_(self.caption_block.mlp.w3.weight)
        nn.init.zeros_(self.final.adaln.weight)
        nn.init.zeros_(self.final.linear.weight)

    def embed_caption(self, caption: torch.Tensor, c_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (refined caption (B, L, D), cond (B, D)): the blocks' keys and values, and the
        input of every adaLN Linear (the GELU each official adaLN applies first, done once)."""
        y = self.caption_block(self.caption_embed(caption))  # (B, L, D)
        cond = self.time_embed(c_noise) + self.pooled_caption_embed(y.mean(dim=1))  # (B, D)
        return y, F.gelu(cond, approximate="tanh")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, caption: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) latents scaled by c_in, c_noise (B,) = ln σ / 4, caption (B, L, caption_channels),
        keep (B, K) int64 distinct token indices kept after the mixer (row-major patch order; their
        order is the order the backbone sees them in) or None for all -> (B, C, H, W), zero on
        the patches not kept."""
        c, p = self.config, self.config.patch_size
        B, C, H, W = x.shape
        if C != c.in_channels or H % p or W % p:
            raise ValueError(f"MicroDiT expects latents (B, {c.in_channels}, H, W) with H, W multiples of {p}; "
                             f"got {tuple(x.shape)}")
        if caption.dim() != 3 or caption.shape[0] != B or caption.shape[1:] != (c.text_len, c.caption_channels):
            raise ValueError(f"MicroDiT expects caption features ({B}, text_len = {c.text_len}, caption_channels = "
                             f"{c.caption_channels}); got {tuple(caption.shape)}")
        T = (H // p) * (W // p)
        if keep is not None and (keep.dim() != 2 or keep.shape[0] != B or not 1 <= keep.shape[1] <= T
                                 or keep.dtype != torch.int64):
            raise ValueError(f"MicroDiT expects keep as ({B}, K) int64 token indices with 1 <= K <= T = {T}; got "
                             f"{tuple(keep.shape)} {keep.dtype}")
        tokens = self.patch_embed(patchify(x, p))  # (B, T, D)
        x = tokens + self.pos_embed(H // p, W // p, tokens.dtype)  # (B, T, D)
        y, cond = self.embed_caption(caption, c_noise)  # (B, L, D), (B, D)
        y_mixer = y
        if self.mixer_in is not None:
            x, y_mixer = self.mixer_in(x), self.mixer_caption(y)  # (B, T, Dm), (B, L, Dm)
        pending, gate = None, None  # a block's FFN output and gate, added by what follows it
        for block in self.mixer:
            x, pending, gate, y_mixer = block(x, pending, gate, y_mixer, cond)  # (B, T, Dm)
        if keep is not None:
            # The pending add is per token: keeping K tokens of x and of the FFN output, then
            # adding, is the same as adding on all T tokens first, and moves less.
            index = keep[..., None].expand(-1, -1, x.shape[-1])
            x = x.gather(1, index)  # (B, K, Dm)
            pending = pending.gather(1, index) if pending is not None else None
        if self.mixer_out is not None:
            x, pending, gate = self.mixer_out(x, pending, gate), None, None  # (B, K, D)
        for block in self.blocks:
            x, pending, gate, y = block(x, pending, gate, y, cond)  # (B, K, D)
        out = self.final(x, pending, gate, cond)  # (B, K, p*p*C)
        if keep is not None:
            full = out.new_zeros(B, tokens.shape[1], out.shape[-1])  # (B, T, p*p*C)
            out = full.scatter(1, keep[..., None].expand(-1, -1, out.shape[-1]), out)
        return unpatchify(out, c.out_channels, H, W, p)  # (B, C, H, W)

    def flops_per_sample(self, height: int, width: int, mask_ratio: float = 0.0) -> float:
        """Training FLOPs (forward + backward = 3 x forward, 2 per multiply-add) of one image of
        height x width pixels (latent = pixels / 8) when the backbone keeps K = int(T (1 - mask_ratio))
        of its T tokens.

        Counted: every Linear on the tokens it sees (patch embedding, timestep, caption and pooled
        caption MLPs, the caption block, mixer in / caption / out projections, each block's adaLN,
        QKV, output projection, cross-attention Q on image tokens and KV on the L caption tokens,
        FFN, final layer) and attention in full: 2 N M A multiply-adds for N queries, M keys and
        width A. A SwiGLU counts its three Linears; a MoE block counts its router on every token
        and each expert's two Linears on the k = int(capacity N / E) tokens it takes. Not counted:
        routing (the gather and the indexed add move data and do no FLOPs), norms, softmax,
        elementwise work, recomputation.

        MicroDiT-XL/2 (L = 77), per training image: 0.282 TFLOP at 256 px with mask 0.75 and 0.714
        unmasked; 1.069 and 3.003 at 512 px. The official code's one-hot routing adds 2 x 2N x N x w
        multiply-adds per MoE block (w its width): with them, counted 3x like the rest, 0.287,
        0.739, 1.148 and 3.396, the counts MicroDiT's published measurements give.
        """
        c = self.config
        D, Dm, L, p = c.hidden_size, c.mixer_dim, c.text_len, c.patch_size
        T = (height // VAE_DOWNSAMPLE // p) * (width // VAE_DOWNSAMPLE // p)
        K = int(T * (1 - mask_ratio))
        mixer_shapes, backbone_shapes = block_shapes(c)

        def block(s: BlockShape, N: int) -> int:
            w, A = s.width, s.attn_width
            attn = N * 4 * w * A + 2 * N * N * A  # QKV and projection; QKᵀ and PV
            cross = 2 * N * w * w + L * 2 * w * w + 2 * N * L * w  # Q, projection; KV on the caption; QKᵀ and PV
            if s.moe:
                ffn = N * w * c.num_experts + c.num_experts * tokens_per_expert(
                    N, c.num_experts, c.expert_capacity) * 2 * w * s.ffn_hidden
            else:
                ffn = N * 3 * w * s.ffn_hidden
            return D * 6 * w + attn + cross + ffn  # adaLN first

        caption_ffn = swiglu_hidden(D, CAPTION_FFN_RATIO, c.multiple_of)
        embed = (T * c.in_channels * p * p * D  # patch embedding
                 + FREQ_DIM * D + D * D  # timestep MLP
                 + L * (c.caption_channels * D + D * D)  # caption MLP
                 + L * 4 * D * D + 2 * L * L * D + L * 3 * D * caption_ffn  # caption block
                 + 2 * D * D  # pooled caption MLP
                 + D * 2 * D + K * D * p * p * c.out_channels)  # final layer
        if Dm != D:
            embed += T * D * Dm + L * D * Dm + K * Dm * D  # mixer in, mixer caption, mixer out
        macs = embed + sum(block(s, T) for s in mixer_shapes) + sum(block(s, K) for s in backbone_shapes)
        return 3.0 * 2.0 * macs
