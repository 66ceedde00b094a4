"""Class-conditional DiT (Peebles & Xie, arXiv 2212.09748): stage 1 of PixArt-α's schedule.

Per-block adaLN: each block maps the conditioning c = embed(t) + embed(label) to its own six
modulation vectors. Blocks use the same fused-residual body as PixArt (engine/model/pixart.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import VAE_DOWNSAMPLE, DiTConfig
from engine.model.layers import FREQ_DIM, Mlp, PositionEmbedding, SelfAttention, TimestepEmbedder
from engine.model.pixart import modulated_block
from engine.ops.norm_modulate import add_norm_modulate
from engine.ops.patchify import patchify, unpatchify


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.adaln = nn.Linear(dim, 6 * dim)  # applied to SiLU(c)

    def forward(self, x, pending, pending_gate, cond):
        """x (B, N, D); cond = SiLU(c) (B, D)."""
        mods = self.adaln(cond).chunk(6, dim=1)  # shift/scale/gate for attention, then for the MLP; (B, D) each
        x, pending, gate, _ = modulated_block(self, x, pending, pending_gate, *mods)
        return x, pending, gate


class DiTFinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaln = nn.Linear(dim, 2 * dim)

    def forward(self, x, pending, pending_gate, cond):
        shift, scale = self.adaln(cond).chunk(2, dim=1)  # (B, D) each
        _, h = add_norm_modulate(x, pending, pending_gate, shift, scale)
        return self.linear(h)  # (B, N, p*p*out)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c, D, p = config, config.hidden_size, config.patch_size
        self.patch_embed = nn.Linear(c.in_channels * p * p, D)
        # DiT's fixed embedding: integer coordinates, i.e. PixArt's with base = grid side and scale 1
        self.pos_embed = PositionEmbedding(D, c.input_size // p, c.pe_interpolation)
        self.time_embed = TimestepEmbedder(D, FREQ_DIM)
        self.label_embed = nn.Embedding(c.num_classes + 1, D)  # row num_classes: the null class (guidance)
        self.blocks = nn.ModuleList(DiTBlock(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final = DiTFinalLayer(D, p, c.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self):
        """As DiT: Xavier Linears, N(0, 0.02) embeddings, zero adaLN (each block starts as identity) and head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.time_embed.fc2.weight, std=0.02)
        for layer in [b.adaln for b in self.blocks] + [self.final.adaln, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """c = embed(t) + embed(label): (B, D), before the SiLU the adaLN layers apply."""
        return self.time_embed(t) + self.label_embed(labels)

    def forward(self, x, t, labels):
        """x (B, C, H, W), t (B,), labels (B,) in [0, num_classes] (num_classes = null) -> (B, out, H, W)."""
        c, p = self.config, self.config.patch_size
        B, C, H, W = x.shape
        if C != c.in_channels or H % p or W % p:
            raise ValueError(f"DiT expects latents (B, {c.in_channels}, H, W) with H, W multiples of {p}; got {tuple(x.shape)}")
        tokens = self.patch_embed(patchify(x, p))  # (B, N, D)
        x = tokens + self.pos_embed(H // p, W // p, tokens.dtype)  # (B, N, D)
        cond = F.silu(self.condition(t, labels))  # (B, D)
        pending, gate = None, None
        for block in self.blocks:
            x, pending, gate = block(x, pending, gate, cond)
        out = self.final(x, pending, gate, cond)
        return unpatchify(out, c.out_channels, H, W, p)

    def flops_per_sample(self, height: int, width: int, text_len: int | None = None) -> float:
        """Training FLOPs per image (3 x forward, 2 per multiply-add), counted as PixArt.flops_per_sample
        without cross-attention and caption projection, with per-block adaLN. ``text_len`` is ignored."""
        c = self.config
        D, p = c.hidden_size, c.patch_size
        N = (height // VAE_DOWNSAMPLE // p) * (width // VAE_DOWNSAMPLE // p)
        mlp = int(D * c.mlp_ratio)
        per_block = N * (4 * D * D + 2 * D * mlp) + 2 * N * N * D + 6 * D * D
        embed = N * c.in_channels * p * p * D + N * D * p * p * c.out_channels + FREQ_DIM * D + D * D + 2 * D * D
        return 3.0 * 2.0 * (c.depth * per_block + embed)
