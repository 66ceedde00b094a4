"""PixArt-α's re-parameterisation: start a text-to-image PixArt from a class-conditional DiT.

PixArt-α (arXiv 2310.00426, "re-parameterization") replaces DiT's per-block adaLN by adaLN-single
and initialises the new model so that it reproduces the DiT at one operating point. Here:

- every weight present in both models is copied: patch embedding, timestep embedder, each
  block's self-attention and MLP, the output head;
- at t = t_ref with the null class, DiT block i modulates with m_i = adaln_i(SiLU(c_null)),
  c_null = time_embed(t_ref) + label_embed(null), while PixArt block i uses
  table_i + time_modulation(SiLU(t_emb)), t_emb = time_embed(t_ref) (no label term). Setting
  table_i = m_i - time_modulation(SiLU(t_emb)) makes them equal at t_ref exactly; the final layer
  adds its table to t_emb itself, so its table is final.adaln(SiLU(c_null)) - t_emb;
- cross-attention's output projection is zero, so the caption contributes nothing yet;
- time_modulation (the shared adaLN-single MLP) has no DiT counterpart: it keeps the fresh
  N(0, 0.02) init the official code's initialize_weights gives t_block, and the tables absorb
  whatever it adds at t_ref; caption projection, null caption and cross-attention q / kv keep
  their fresh init too;
- with micro-conditions, the size and aspect embedders' output layers start at zero, so the
  extra terms they add to t_emb vanish whatever size is passed.

So PixArt(x, t_ref, any caption) == DiT(x, t_ref, null class), provided the position embeddings
agree: the same input_size and pe_interpolation (the DiT's, 1 for DiT's own integer grid, is the
default here; another is an error).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import DiTConfig, PixArtConfig, preset
from engine.model.dit import DiT
from engine.model.pixart import PixArt

# fields a PixArt must share with the DiT for the copied weights to mean the same thing
_BACKBONE_FIELDS = ("patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "learn_sigma")


def default_pixart_config(dit_config: DiTConfig) -> PixArtConfig:
    """The DiT's backbone, latent size and position grid, PixArt-XL/2's caption settings."""
    xl2 = preset("pixart-xl2")
    backbone = {f: getattr(dit_config, f) for f in _BACKBONE_FIELDS}
    return PixArtConfig(input_size=dit_config.input_size, caption_channels=xl2.caption_channels,
                        text_len=xl2.text_len, pe_interpolation=dit_config.pe_interpolation, micro_conditions=False,
                        **backbone)


@torch.no_grad()
def dit_to_pixart(dit: DiT, pixart_config: PixArtConfig | None = None, t_ref: float = 500,
                  into: PixArt | None = None) -> PixArt:
    """A PixArt that reproduces ``dit`` at timestep ``t_ref`` with the null class, for any caption.

    pixart_config: None uses default_pixart_config(dit.config) (or ``into``'s config); a given one
    must match the DiT's backbone fields. The tables are computed in float64 and stored in the
    DiT's dtype; the result is on the DiT's device. ``into``: a PixArt to write into (its own
    fresh weights stay where the DiT has no counterpart) instead of a newly built one.
    """
    if not isinstance(dit, DiT):
        raise TypeError(f"expected an engine DiT, got {type(dit).__name__}")
    if pixart_config is None:
        pixart_config = into.config if into is not None else default_pixart_config(dit.config)
    config = pixart_config
    if into is not None and into.config != config:
        raise ValueError(f"into's config {into.config} differs from pixart_config {config}")
    for field in _BACKBONE_FIELDS:
        if getattr(config, field) != getattr(dit.config, field):
            raise ValueError(f"pixart_config.{field}={getattr(config, field)} differs from the DiT's "
                             f"{getattr(dit.config, field)}")
    if (config.input_size, config.pe_interpolation) != (dit.config.input_size, dit.config.pe_interpolation):
        raise ValueError(f"pixart_config has input_size={config.input_size}, pe_interpolation={config.pe_interpolation:g} "
                         f"and the DiT {dit.config.input_size}, {dit.config.pe_interpolation:g}: the position "
                         f"embeddings differ, so the PixArt would not start equal to the DiT")
    reference = dit.patch_embed.weight
    pixart = (into if into is not None else PixArt(config)).to(device=reference.device, dtype=reference.dtype)

    # patch_embed, time_embed, blocks.i.attn / .mlp and final.linear: the keys the two models share
    shared = {k: v for k, v in dit.state_dict().items() if k in pixart.state_dict()}
    pixart.load_state_dict(shared, strict=False)
    for block in pixart.blocks:
        nn.init.zeros_(block.cross_attn.proj.weight)
        nn.init.zeros_(block.cross_attn.proj.bias)
    if config.micro_conditions:
        for embedder in (pixart.size_embed, pixart.aspect_embed):
            nn.init.zeros_(embedder.fc2.weight)
            nn.init.zeros_(embedder.fc2.bias)

    D = config.hidden_size
    t = torch.tensor([float(t_ref)], device=reference.device)
    t_emb = copy.deepcopy(dit.time_embed).double()(t)  # (1, D)
    c_null = t_emb + dit.label_embed.weight[dit.null_class].double()  # (1, D)
    shared_mod = _linear64(pixart.time_modulation, F.silu(t_emb)).view(6, D)  # what adaLN-single adds at t_ref
    for dit_block, block in zip(dit.blocks, pixart.blocks):
        dit_mod = _linear64(dit_block.adaln, F.silu(c_null)).view(6, D)  # DiT block's modulation at (t_ref, null)
        block.modulation.copy_(dit_mod - shared_mod)
    final_mod = _linear64(dit.final.adaln, F.silu(c_null)).view(2, D)  # (shift, scale)
    pixart.final.modulation.copy_(final_mod - t_emb)
    return pixart


def _linear64(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.double(), layer.bias.double())

