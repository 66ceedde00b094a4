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

Attention runs through torch's scaled_dot_product_attention; the model is eager PyTorch apart
from the patchify and moe ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import VAE_DOWNSAMPLE, MicroDiTConfig
from engine.model.layers import PositionEmbedding, timestep_frequencies
from engine.ops.moe import moe, tokens_per_expert
from engine.ops.patchify import patchify, unpatchify

EPS = 1e-6  # every LayerNorm's, the qk-norms' included
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


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """softmax(LN(q) LN(k)ᵀ / sqrt(d)) v in heads of d = head_dim: q (B, N, A), k, v (B, M, A) -> (B, N, A).
    The qk-norm is over each token's whole q (or k) vector, all heads together, without affine."""
    A = q.shape[-1]
    q, k = F.layer_norm(q, (A,), eps=EPS), F.layer_norm(k, (A,), eps=EPS)
    q, k, v = (t.unflatten(-1, (A // head_dim, head_dim)).transpose(1, 2) for t in (q, k, v))  # (B, h, N|M, d)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
    return out.transpose(1, 2).flatten(2)  # (B, N, A)


class SelfAttention(nn.Module):
    """Self-attention of width ``width`` (heads of head_dim) on dim-wide tokens."""

    def __init__(self, dim: int, width: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=False)
        self.proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, A) each
        return self.proj(attend(q, k, v, self.head_dim))  # (B, N, dim)


class CrossAttention(nn.Module):
    """Image tokens attend to every caption token (no padding mask), at the full width."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(y).chunk(2, dim=-1)  # (B, L, dim) each
        return self.proj(attend(self.q(x), k, v, self.head_dim))  # (B, N, dim)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MoE(nn.Module):
    """Expert-choice mixture of experts (engine.ops.moe): a router, and per expert
    Linear -> GELU -> Linear stored as (E, D, H) and (E, H, D)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float):
        super().__init__()
        self.capacity = capacity
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe(x, self.gate.weight, self.w1, self.w2, self.capacity)  # (B, N, dim)


class NormMlp(nn.Module):
    """Linear -> GELU(tanh) -> LayerNorm -> Linear, with biases: the caption and pooled-caption embedders."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.norm = layer_norm(dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x), approximate="tanh")))


class NormLinear(nn.Module):
    """LayerNorm -> Linear without bias: the projections into and out of the patch-mixer's width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = layer_norm(in_dim)
        self.linear = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class TimestepEmbedder(nn.Module):
    """c_noise -> 512 sinusoidal features (cosines first) -> Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(FREQ_DIM, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, FREQ_DIM).to(self.fc1.weight.dtype)  # (B, 512)
        return self.fc2(F.gelu(self.fc1(freqs), approximate="tanh"))  # (B, dim)


class CaptionBlock(nn.Module):
    """The caption's one refinement block: x += SA(LN x); x += SwiGLU(LN x), unmodulated."""

    def __init__(self, dim: int, head_dim: int, ffn_hidden: int):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, dim, head_dim)
        self.norm2 = layer_norm(dim)
        self.mlp = SwiGLU(dim, ffn_hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y + self.attn(self.norm1(y))  # (B, L, D)
        return y + self.mlp(self.norm2(y))


class Block(nn.Module):
    """A mixer or backbone block (the module docstring's three residual branches)."""

    def __init__(self, shape: BlockShape, cond_dim: int, head_dim: int, num_experts: int, capacity: float):
        super().__init__()
        dim = shape.width
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, shape.attn_width, head_dim)
        self.norm2 = layer_norm(dim)
        self.cross_attn = CrossAttention(dim, head_dim)
        self.norm3 = layer_norm(dim)
        self.mlp = MoE(dim, shape.ffn_hidden, num_experts, capacity) if shape.moe else SwiGLU(dim, shape.ffn_hidden)
        self.adaln = nn.Linear(cond_dim, 6 * dim)  # on gelu_tanh(cond), zero-initialised (adaLN-Zero)

    def forward(self, x: torch.Tensor, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), y (B, L, dim), cond (B, D) already through GELU(tanh)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln(cond).chunk(6, dim=1)  # (B, dim)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), y)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.adaln = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(cond).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class MicroDiT(nn.Module):
    def __init__(self, config: MicroDiTConfig):
        super().__init__()
        self.config = config
        c, D, Dm, p = config, config.hidden_size, config.mixer_dim, config.patch_size
        mixer_shapes, backbone_shapes = block_shapes(config)
        self.patch_embed = nn.Linear(c.in_channels * p * p, D)  # = Conv2d(k=p, s=p) on patchified input
        self.pos_embed = PositionEmbedding(D, c.input_size // p, c.pe_interpolation)
        self.time_embed = TimestepEmbedder(D)
        self.caption_embed = NormMlp(c.caption_channels, D)
        self.caption_block = CaptionBlock(D, c.head_dim, swiglu_hidden(D, CAPTION_FFN_RATIO, c.multiple_of))
        self.pooled_caption_embed = NormMlp(D, D)
        # into and out of the mixer's width; none when the widths are equal (as MicroDiT_Tiny_2)
        self.mixer_in = NormLinear(D, Dm) if Dm != D else nn.Identity()
        self.mixer_caption = NormLinear(D, Dm) if Dm != D else nn.Identity()
        self.mixer_out = NormLinear(Dm, D) if Dm != D else nn.Identity()
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
        tokens = self.patch_embed(patchify(x, p))  # (B, T, D)
        x = tokens + self.pos_embed(H // p, W // p, tokens.dtype)  # (B, T, D)
        y, cond = self.embed_caption(caption, c_noise)  # (B, L, D), (B, D)
        x = self.mixer_in(x)  # (B, T, Dm)
        y_mixer = self.mixer_caption(y)  # (B, L, Dm)
        for block in self.mixer:
            x = block(x, y_mixer, cond)  # (B, T, Dm)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, Dm)
        x = self.mixer_out(x)  # (B, K, D)
        for block in self.blocks:
            x = block(x, y, cond)  # (B, K, D)
        out = self.final(x, cond)  # (B, K, p*p*C)
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
