"""Layers shared by the PixArt-α and DiT transformers: embeddings, attention, MLP."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.ops.cross_attention import cross_attention
from engine.ops.linear import linear, linear_branch, linear_chunks
from engine.ops.mlp import mlp
from engine.ops.self_attention import self_attention

FREQ_DIM = 256  # sinusoidal features fed to the timestep and size embedders


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation: float) -> torch.Tensor:
    """2-D sin-cos position embedding of a (grid_h, grid_w) token grid -> (grid_h * grid_w, dim), float64.

    PixArt-α's scheme: each axis spans [0, base_size / interpolation) whatever its token count, so a
    model trained at one resolution sees the same coordinate range at another (512px: scale 1,
    1024px: scale 2). The first dim/2 channels encode the column, the last dim/2 the row.
    """
    rows = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / interpolation
    cols = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / interpolation
    row_pos, col_pos = torch.meshgrid(rows, cols, indexing="ij")  # (grid_h, grid_w) each
    return torch.cat([_sincos_1d(dim // 2, col_pos.flatten()), _sincos_1d(dim // 2, row_pos.flatten())], dim=1)


@functools.lru_cache(maxsize=32)
def pos_embed_table(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation: float,
                    device: torch.device) -> torch.Tensor:
    """sincos_pos_embed in float32 on ``device``, computed once per grid (multi-aspect training
    cycles through a few dozen grids; recomputing and copying it every step is wasted work)."""
    return sincos_pos_embed(dim, grid_h, grid_w, base_size, interpolation).float().to(device)


class PositionEmbedding(nn.Module):
    """The fixed sin-cos table of a ``base_size`` x ``base_size`` token grid, kept as a
    non-persistent buffer (checkpoints don't carry it; under torch.compile the graph reads a
    tensor instead of recomputing the table every step). Other grids (multi-aspect buckets,
    other resolutions) are computed on demand and cached per grid."""

    def __init__(self, dim: int, base_size: int, interpolation: float):
        super().__init__()
        self.dim, self.base_size, self.interpolation = dim, base_size, interpolation
        self.register_buffer("table", self._compute(base_size, base_size), persistent=False)

    def _compute(self, grid_h: int, grid_w: int) -> torch.Tensor:
        return sincos_pos_embed(self.dim, grid_h, grid_w, self.base_size, self.interpolation).float()

    def reset_table(self, device: torch.device) -> None:
        """Recompute the buffer on ``device``, for models built on the meta device and then loaded."""
        self.table = self._compute(self.base_size, self.base_size).to(device)

    def forward(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        if grid_h == grid_w == self.base_size:
            return self.table.to(dtype)  # (N, D)
        return pos_embed_table(self.dim, grid_h, grid_w, self.base_size, self.interpolation,
                               self.table.device).to(dtype)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def timestep_frequencies(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first (as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoidal features -> Linear -> SiLU -> Linear. Also embeds PixArt's size micro-conditions."""

    def __init__(self, out_dim: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.freq_dim).to(self.fc1.weight.dtype)  # (B, freq_dim)
        return self.fc2(F.silu(self.fc1(freqs)))  # (B, out_dim)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names; ``bias=False`` registers none, as
    nn.Linear's), optionally followed by tanh-GELU, through ``engine.ops.linear``: its backward
    sums the bias gradient, and for GELU runs GELU's backward, in one fused pass instead of
    autograd's separate ones (used for the token-wide layers, where that sum reads B x N x D).
    With ``chunks`` > 1 (a fused QKV or KV projection) the output comes as that many equal parts
    of the last dimension, through ``engine.ops.linear.linear_chunks``, whose backward packs the
    parts' gradients (and sums them for the bias, when there is one) in one pass.

    ``weight_copy`` / ``bias_copy``: the optimizer's low-precision copies of the parameters
    (engine.optim.ParameterCopy, set by engine.optim.AdamW.attach_copies; None without), handed to
    the op while they hold the parameters' values, so that it reads them instead of casting."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 chunks: int = 1):
        super().__init__(in_features, out_features, bias=bias)
        if chunks > 1 and activation is not None:
            raise ValueError(f"Linear: chunks = {chunks} takes no activation, got {activation!r}")
        self.activation = activation
        self.chunks = chunks
        self.weight_copy = self.bias_copy = None

    def low_precision(self) -> dict[str, torch.Tensor | None]:
        """The ops' ``weight_lp`` and ``bias_lp``: each copy while it holds its parameter's value, else None."""
        return dict(weight_lp=self.weight_copy.current() if self.weight_copy is not None else None,
                    bias_lp=self.bias_copy.current() if self.bias_copy is not None else None)

    def forward(self, x: torch.Tensor, branch: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output (``chunks`` parts of it when chunks > 1). With ``branch``: (part(s)..., x),
        for an x that is used elsewhere too, which should then use the returned x: the gradients
        of both uses are summed by this Linear's input-gradient GEMM (``engine.ops.linear.linear_branch``)
        instead of by a separate add."""
        if branch:
            if self.activation is not None:
                raise ValueError(f"Linear: branch=True takes no activation, this Linear has {self.activation!r}")
            return linear_branch(x, self.weight, self.bias, self.chunks, **self.low_precision())  # (part(s)..., x)
        if self.chunks > 1:
            # chunks x (..., out / chunks)
            return linear_chunks(x, self.weight, self.bias, self.chunks, **self.low_precision())
        return linear(x, self.weight, self.bias, self.activation, **self.low_precision())

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation else "") + (
            f", chunks={self.chunks}" if self.chunks > 1 else "")


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear (the transformer MLP and PixArt's caption projection), as
    one ``engine.ops.mlp`` call, so one backend choice covers both Linears (and their copies)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = Linear(in_dim, hidden_dim, activation="gelu_tanh")
        self.fc2 = Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1.low_precision(), self.fc2.low_precision()
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                   w1_lp=fc1["weight_lp"], b1_lp=fc1["bias_lp"], w2_lp=fc2["weight_lp"], b2_lp=fc2["bias_lp"])


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, chunks=3)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (t.view(B, N, self.num_heads, D // self.num_heads) for t in self.qkv(x))  # (B, N, H, d) each
        out = self_attention(q, k, v)  # (B, N, H, d)
        return self.proj(out.reshape(B, N, D))


class CrossAttention(nn.Module):
    """Image tokens attend to the padded caption tokens; padding is excluded by length."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim, chunks=2)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_lens: torch.Tensor):
        """-> (output (B, N, D), x, context): x and context come back through the q and kv
        projections (Linear's branch), for the caller's other uses of them (the residual stream;
        the next blocks' captions), so that the GEMMs sum their gradients."""
        B, N, D = x.shape
        L = context.shape[1]
        H, d = self.num_heads, D // self.num_heads
        q, x = self.q(x, branch=True)
        k, v, context = self.kv(context, branch=True)
        q, k, v = q.view(B, N, H, d), k.view(B, L, H, d), v.view(B, L, H, d)  # (B, N|L, H, d)
        out = cross_attention(q, k, v, context_lens)  # (B, N, H, d)
        return self.proj(out.reshape(B, N, D)), x, context
