"""Per-sample loss reduction with an optional loss mask, shared by the objectives.

A mask says which elements of a sample count (1) and which do not (0): per latent pixel,
(B, 1 or C, H, W), or per patch token, (B, N) in row-major patch order with N = (H/p)(W/p) and
p inferred, as MicroDiT counts only the patches its backbone kept. Each sample's loss is the mean
over its counted elements; each sample must count at least one.
"""

from __future__ import annotations

import math

import torch


def expand_loss_mask(mask: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """A pixel mask (B, 1|C, H, W) or token mask (B, N) expanded to x0's shape (B, C, H, W)."""
    if x0.dim() != 4:
        raise ValueError(f"a loss mask needs x0 of shape (B, C, H, W), got {tuple(x0.shape)}")
    batch, channels, height, width = x0.shape
    if mask.dim() == 4:
        if mask.shape[0] != batch or mask.shape[1] not in (1, channels) or mask.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit x0 of shape {tuple(x0.shape)}; "
                f"expected ({batch}, 1 or {channels}, {height}, {width})"
            )
        return mask.expand(batch, channels, height, width)
    if mask.dim() == 2 and mask.shape[0] == batch:
        tokens = mask.shape[1]
        patch = math.isqrt(height * width // tokens) if tokens > 0 else 0
        if patch == 0 or patch * patch * tokens != height * width or height % patch or width % patch:
            raise ValueError(
                f"token mask with N={tokens} does not tile a {height}x{width} latent with square patches"
            )
        rows, cols = height // patch, width // patch
        per_patch = mask.view(batch, 1, rows, 1, cols, 1)
        return per_patch.expand(batch, channels, rows, patch, cols, patch).reshape(batch, channels, height, width)
    raise ValueError(f"mask must be (B, 1|C, H, W) or (B, N) with B={batch}, got shape {tuple(mask.shape)}")


def per_sample_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean of ``values`` (B, ...) over all but the batch dimension; with ``mask`` (see
    expand_loss_mask) over each sample's counted elements only."""
    dims = tuple(range(1, values.dim()))
    if mask is None:
        return values.mean(dim=dims)
    counted = expand_loss_mask(mask, values).to(values.dtype)  # (B, C, H, W)
    return (values * counted).sum(dim=dims) / counted.sum(dim=dims)
