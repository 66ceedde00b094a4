"""PixArt-α: a DiT backbone with text cross-attention and adaLN-single (Chen et al., arXiv 2310.00426).

The residual stream is fused across sub-blocks: each LayerNorm is computed together with the
residual add that precedes it (``add_norm_modulate``), so a block hands the next one its
MLP output and gate instead of an updated residual:

    r, h = add_norm_modulate(x, mlp_prev, gate_mlp_prev, shift_msa, scale_msa)   # residual + norm1
    x    = r + gate_msa * self_attn(h)
    x, h = add_norm_modulate(x, cross_attn(x, caption), None, shift_mlp, scale_mlp)  # residual + norm2
    return x, mlp(h), gate_mlp                                                      # added by the next block

(x and the caption also pass through the cross-attention's q and kv projections and come back
from it, so that their gradient fan-in is summed inside those projections' GEMMs.)

which is the official block (x += gate * attn(mod(norm(x))); x += cross(x); x += gate * mlp(mod(norm(x))))
with the adds moved into the fused ops.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import VAE_DOWNSAMPLE, PixArtConfig
from engine.model.layers import FREQ_DIM, CrossAttention, Linear, Mlp, PositionEmbedding, SelfAttention, TimestepEmbedder
from engine.ops.gated_add import gated_add
from engine.ops.norm_modulate import add_norm_modulate, norm_modulate
from engine.ops.patchify import patchify, unpatchify


class PixArtBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        # adaLN-single: this block's own offsets to the shared timestep modulation
        self.modulation = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, pending, pending_gate, t_mod, caption, caption_lens):
        """x (B, N, D) residual; pending (B, N, D) or None: the previous block's MLP output, not yet added.
        Returns (x, pending, gate, caption) for the next block."""
        B = x.shape[0]
        mod = self.modulation[None] + t_mod.view(B, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # (B, D) each
        return modulated_block(self, x, pending, pending_gate, shift_msa, scale_msa, gate_msa,
                               shift_mlp, scale_mlp, gate_mlp, caption, caption_lens)


def modulated_block(block, x, pending, pending_gate, shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
                    gate_mlp, caption=None, caption_lens=None):
    """The fused-residual block body shared by PixArt (with cross-attention) and DiT (without):
    -> (x, the MLP output and gate still to be added, the caption for the next block)."""
    if pending is None:  # first block: nothing to add yet
        r, h = x, norm_modulate(x, shift_msa, scale_msa)
    else:
        r, h = add_norm_modulate(x, pending, pending_gate, shift_msa, scale_msa)  # (B, N, D) each
    a = block.attn(h)  # (B, N, D)
    x = gated_add(r, a, gate_msa)  # r + a * gate_msa[:, None]
    if caption is None:
        h = norm_modulate(x, shift_mlp, scale_mlp)
    else:
        cross, x, caption = block.cross_attn(x, caption, caption_lens)  # (B, N, D); x, caption: their branches (Linear's branch)
        x, h = add_norm_modulate(x, cross, None, shift_mlp, scale_mlp)
    return x, block.mlp(h), gate_mlp, caption


class FinalLayer(nn.Module):
    """Adds the last pending residual, then norm -> modulate (table + timestep embedding) -> Linear."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, pending, pending_gate, t_emb):
        shift, scale = (self.modulation[None] + t_emb[:, None]).unbind(1)  # (B, D) each
        _, h = add_norm_modulate(x, pending, pending_gate, shift, scale)  # (B, N, D)
        return self.linear(h)  # (B, N, p*p*out)


class PixArt(nn.Module):
    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = config
        c, D, p = config, config.hidden_size, config.patch_size
        self.patch_embed = Linear(c.in_channels * p * p, D)  # = Conv2d(k=p, s=p) on patchified input
        self.pos_embed = PositionEmbedding(D, c.input_size // p, c.pe_interpolation)
        self.time_embed = TimestepEmbedder(D, FREQ_DIM)
        if c.micro_conditions:  # PixArt-α MS: original (h, w) and aspect ratio, D/3 channels each
            self.size_embed = TimestepEmbedder(D // 3, FREQ_DIM)
            self.aspect_embed = TimestepEmbedder(D // 3, FREQ_DIM)
        self.time_modulation = nn.Linear(D, 6 * D)  # adaLN-single, shared by all blocks (after SiLU)
        self.caption_proj = Mlp(c.caption_channels, D, D)
        # learned "empty caption" for caption dropout and classifier-free guidance
        self.null_caption = nn.Parameter(torch.randn(c.text_len, c.caption_channels) / c.caption_channels**0.5)
        self.blocks = nn.ModuleList(PixArtBlock(D, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final = FinalLayer(D, p, c.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """As the official PixArt-α code: Xavier Linears, N(0, 0.02) embedders, zero cross-attention out and head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        embedders = [self.time_embed, self.caption_proj]
        if self.config.micro_conditions:
            embedders += [self.size_embed, self.aspect_embed]
        for embedder in embedders:
            nn.init.normal_(embedder.fc1.weight, std=0.02)
            nn.init.normal_(embedder.fc2.weight, std=0.02)
        nn.init.normal_(self.time_modulation.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def embed_timestep(self, t, resolution=None, aspect_ratio=None) -> torch.Tensor:
        """Timestep (+ micro-conditions) -> (B, D): the final layer's modulation input."""
        t_emb = self.time_embed(t)  # (B, D)
        if self.config.micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this PixArt model has micro_conditions: pass resolution (B, 2) and aspect_ratio (B, 1)")
            B = t.shape[0]
            size = self.size_embed(resolution.reshape(-1)).view(B, -1)  # (B, 2D/3)
            aspect = self.aspect_embed(aspect_ratio.reshape(-1)).view(B, -1)  # (B, D/3)
            t_emb = t_emb + torch.cat([size, aspect], dim=1)
        return t_emb

    def forward(self, x, t, caption, caption_lens, resolution=None, aspect_ratio=None):
        """x (B, C, H, W) latents, t (B,), caption (B, L, caption_channels), caption_lens (B,) -> (B, out, H, W)."""
        c, p = self.config, self.config.patch_size
        B, C, H, W = x.shape
        if C != c.in_channels or H % p or W % p:
            raise ValueError(f"PixArt expects latents (B, {c.in_channels}, H, W) with H, W multiples of {p}; got {tuple(x.shape)}")
        tokens = self.patch_embed(patchify(x, p))  # (B, N, D)
        x = tokens + self.pos_embed(H // p, W // p, tokens.dtype)  # (B, N, D)
        t_emb = self.embed_timestep(t, resolution, aspect_ratio)  # (B, D)
        t_mod = self.time_modulation(F.silu(t_emb))  # (B, 6D)
        y = self.caption_proj(caption)  # (B, L, D)
        pending, gate = None, None
        for block in self.blocks:
            x, pending, gate, y = block(x, pending, gate, t_mod, y, caption_lens)
        out = self.final(x, pending, gate, t_emb)  # (B, N, p*p*out)
        return unpatchify(out, c.out_channels, H, W, p)  # (B, out, H, W)

    def drop_captions(self, caption: torch.Tensor, caption_lens: torch.Tensor, drop: torch.Tensor):
        """Replace the captions of samples where ``drop`` (B,) is True by the learned null caption (full length)."""
        L = caption.shape[1]
        if L > self.config.text_len:
            raise ValueError(f"caption length {L} exceeds the model's text_len {self.config.text_len}")
        null = self.null_caption[:L].to(caption.dtype)[None]  # (1, L, Cc)
        caption = torch.where(drop[:, None, None], null, caption)
        caption_lens = torch.where(drop, torch.full_like(caption_lens, L), caption_lens)
        return caption, caption_lens

    def flops_per_sample(self, height: int, width: int, text_len: int | None = None) -> float:
        """Training FLOPs (forward + backward = 3 x forward, 2 per multiply-add) for one image.

        height, width in pixels (latent = pixels / 8). Counted: every Linear (patch embedding,
        timestep / size embedders, adaLN-single, caption projection over the text tokens, per
        block QKV + out projection, cross-attention Q on image tokens and KV on text tokens +
        out projection, MLP, final head), and attention in full: 2·N·N·D multiply-adds for
        self-attention (QK^T and PV) and 2·N·L·D for cross-attention. Not counted: norms,
        softmax, elementwise ops, activation recompute.

        PixArt-XL/2, 256px (N = 256 tokens), L = 120, D = 1152, MLP 4608:
          per block  N·(3D² + D² + D² + D² + 2·D·4D) + 2·L·D² + 2·N²·D + 2·N·L·D = 5.2966e9 MACs
          28 blocks  148.305e9; caption projection L·(4096·D + D²) = 0.725e9;
          embeddings, adaLN-single, head 0.023e9  ->  149.05e9 MACs = 298.1 GFLOP forward
          training   3 x 298.1 = 0.894 TFLOP per sample.
        """
        c = self.config
        D, p, L = c.hidden_size, c.patch_size, c.text_len if text_len is None else text_len
        N = (height // VAE_DOWNSAMPLE // p) * (width // VAE_DOWNSAMPLE // p)
        mlp = int(D * c.mlp_ratio)
        per_block = N * (6 * D * D + 2 * D * mlp) + 2 * L * D * D + 2 * N * N * D + 2 * N * L * D
        embed = (N * c.in_channels * p * p * D + N * D * p * p * c.out_channels  # patch embed, head
                 + FREQ_DIM * D + D * D + D * 6 * D  # timestep embedder, adaLN-single
                 + L * (c.caption_channels * D + D * D))  # caption projection
        if c.micro_conditions:
            embed += 3 * (FREQ_DIM * (D // 3) + (D // 3) ** 2)
        return 3.0 * 2.0 * (c.depth * per_block + embed)
