"""Official MicroDiT checkpoints (SonyResearch/micro_diffusion, the ``DiT`` module's state dict) <-> engine MicroDiT.

Layout (weight and bias alike; Linears in attention, FFNs, experts and mixer projections have no bias):

    official                                   engine
    x_embedder.proj   Conv2d (D, C, p, p)      patch_embed            Linear (D, C*p*p)
    t_embedder.mlp.0 / .2                      time_embed.fc1 / .fc2
    y_embedder.y_proj.{fc1,norm,fc2}           caption_embed.{fc1,norm,fc2}
    y_emb_preprocess.*                         caption_block.*
    pooled_y_emb_process.*                     pooled_caption_embed.*
    patch_mixer_map_{xin,y,xout}.0 / .1        mixer_{in,caption,out}.norm / .linear
                                               (both absent when the mixer has the backbone's width)
    patch_mixer.i.* / blocks.i.*               mixer.i.* / blocks.i.*, where
        cross_attn.q_linear / .kv_linear           cross_attn.q / .kv
        adaLN_modulation.1                         adaln
        (norm1-3, attn.qkv, attn.proj, cross_attn.proj, mlp.w1-3 / mlp.gate, mlp.w1, mlp.w2: same names)
    final_layer.norm_final / .adaLN_modulation.1  final.norm / final.adaln
    final_layer.linear   rows (i, j, c)        final.linear           rows (c, i, j)
    pos_embed (1, T, D)  fixed sin-cos         (computed; checked on load)
    mask_token (1, 1, p*p*C)  zeros            (masked positions are zero; checked on load)

The experts' w1 (E, D, H) and w2 (E, H, D) are the engine's layout too (engine.ops.moe).

What the tensors do not tell comes from keyword arguments, whose defaults are MicroDiT_XL_2's: the
head dim (64; MicroDiT_Tiny_2 has 32), the expert capacity (2.0), the caption length (77), the
rounding multiple of the FFN sizes (256) and the mixer's FFN ratio (4.0). The position
interpolation scale defaults to the official configs' (1 at 256 px, 2 at 512 px) and is checked
against the stored table.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from engine.config import VAE_DOWNSAMPLE, MicroDiTConfig
from engine.interop import (block_count, check_config, from_engine, grid_side, load_converted, make_config,
                            read_checkpoint, required, strip_prefix)
from engine.model.layers import sincos_pos_embed
from engine.model.microdit import MicroDiT, block_shapes, is_moe

# engine key prefix -> official key prefix (the first that matches)
_PREFIXES = (
    ("patch_embed.", "x_embedder.proj."),
    ("time_embed.fc1.", "t_embedder.mlp.0."),
    ("time_embed.fc2.", "t_embedder.mlp.2."),
    ("caption_embed.", "y_embedder.y_proj."),
    ("caption_block.", "y_emb_preprocess."),
    ("pooled_caption_embed.", "pooled_y_emb_process."),
    ("mixer_in.norm.", "patch_mixer_map_xin.0."),
    ("mixer_in.linear.", "patch_mixer_map_xin.1."),
    ("mixer_caption.norm.", "patch_mixer_map_y.0."),
    ("mixer_caption.linear.", "patch_mixer_map_y.1."),
    ("mixer_out.norm.", "patch_mixer_map_xout.0."),
    ("mixer_out.linear.", "patch_mixer_map_xout.1."),
    ("mixer.", "patch_mixer."),
    ("blocks.", "blocks."),
    ("final.norm.", "final_layer.norm_final."),
    ("final.adaln.", "final_layer.adaLN_modulation.1."),
    ("final.linear.", "final_layer.linear."),
)
# inside a mixer or backbone block
_BLOCK_PARTS = ((".cross_attn.q.", ".cross_attn.q_linear."), (".cross_attn.kv.", ".cross_attn.kv_linear."),
                (".adaln.", ".adaLN_modulation.1."))


def official_key(key: str) -> str:
    """The official name of an engine state-dict key."""
    for engine, official in _PREFIXES:
        if key.startswith(engine):
            key = official + key[len(engine):]
            break
    else:
        raise KeyError(f"engine key {key!r} has no official counterpart")
    if key.startswith(("blocks.", "patch_mixer.")):
        for engine, official in _BLOCK_PARTS:
            key = key.replace(engine, official)
    return key


def key_table(config: MicroDiTConfig) -> dict[str, tuple[str, ...]]:
    """engine key -> (official key,) for every tensor of the model ``config`` describes."""
    with torch.device("meta"):
        keys = MicroDiT(config).state_dict().keys()
    return {key: (official_key(key),) for key in keys}


def default_interpolation(input_size: int) -> float:
    """The official configs' position interpolation: 1 at 256 px, 2 at 512 px (resolution / 256)."""
    return input_size * VAE_DOWNSAMPLE / 256


def _experts_every(mixer: list[bool], backbone: list[bool], source: str) -> int:
    """The smallest n for which MicroDiT's placement rule gives these MoE blocks."""
    for every in range(1, max(len(mixer), len(backbone)) + 2):
        if (mixer == [is_moe(i, len(mixer), every, backbone=False) for i in range(len(mixer))]
                and backbone == [is_moe(i, len(backbone), every, backbone=True) for i in range(len(backbone))]):
            return every
    raise ValueError(f"{source}: MoE blocks at mixer {[i for i, m in enumerate(mixer) if m]} and backbone "
                     f"{[i for i, m in enumerate(backbone) if m]} follow no every-n-th placement")


def infer_config(state_dict: dict, source: str = "checkpoint", **overrides) -> MicroDiTConfig:
    """The MicroDiTConfig of an official state dict, from its shapes: width, channels, patch, depth,
    mixer depth and width, caption channels, experts and their placement, each block's attention
    width and FFN size (kept as the layer-wise rule when they follow it, else listed), latent size
    (pos_embed). ``overrides`` (MicroDiTConfig fields) win and supply what the tensors cannot."""
    sd = state_dict
    D, C, p, _ = required(sd, "x_embedder.proj.weight", source).shape
    depth, mixer_depth = block_count(sd, "blocks."), block_count(sd, "patch_mixer.")
    if depth == 0 or mixer_depth == 0:
        raise ValueError(f"{source} has {depth} blocks and {mixer_depth} patch-mixer blocks: not a MicroDiT")
    mixer_moe = [f"patch_mixer.{i}.mlp.gate.weight" in sd for i in range(mixer_depth)]
    backbone_moe = [f"blocks.{i}.mlp.gate.weight" in sd for i in range(depth)]
    gates = [sd[k] for k in sd if k.endswith(".mlp.gate.weight")]
    ffn = [required(sd, f"blocks.{i}.mlp.w1", source).shape[2] if moe else
           required(sd, f"blocks.{i}.mlp.w1.weight", source).shape[0] for i, moe in enumerate(backbone_moe)]
    inferred = dict(
        patch_size=p, in_channels=C, hidden_size=D, depth=depth, mixer_depth=mixer_depth,
        mixer_dim=required(sd, "patch_mixer.0.norm1.weight", source).shape[0],
        caption_channels=required(sd, "y_embedder.y_proj.fc1.weight", source).shape[1],
        experts_every=_experts_every(mixer_moe, backbone_moe, source),
        attn_widths=tuple(required(sd, f"blocks.{i}.attn.qkv.weight", source).shape[0] // 3 for i in range(depth)),
        ffn_widths=tuple(ffn))
    if gates:
        inferred["num_experts"] = gates[0].shape[0]
    if "pos_embed" in sd:
        inferred["input_size"] = grid_side(sd["pos_embed"], p, source)
    elif "input_size" not in overrides:
        raise ValueError(f"{source} has no pos_embed to read the latent size from: pass input_size=")
    size = overrides.get("input_size", inferred.get("input_size"))
    inferred["pe_interpolation"] = default_interpolation(size)
    config = make_config(MicroDiTConfig, inferred, overrides, source)
    _, rule = block_shapes(dataclasses.replace(config, attn_widths=None, ffn_widths=None))
    if "attn_widths" not in overrides and config.attn_widths == tuple(s.attn_width for s in rule):
        config = dataclasses.replace(config, attn_widths=None)
    if "ffn_widths" not in overrides and config.ffn_widths == tuple(s.ffn_hidden for s in rule):
        config = dataclasses.replace(config, ffn_widths=None)
    return config


def _dit_weights(checkpoint: dict) -> dict:
    """The DiT module's state dict: the file's own, DDP's "module." dropped, or the "dit." part of
    the whole latent-diffusion model's."""
    weights = strip_prefix(checkpoint)
    if "dit.x_embedder.proj.weight" in weights:
        return {k[len("dit."):]: v for k, v in weights.items() if k.startswith("dit.")}
    return weights


def _check_buffers(weights: dict, config: MicroDiTConfig, source: str) -> None:
    """The stored position table must be the one the model computes, the mask token zero."""
    if "pos_embed" in weights:
        stored = weights["pos_embed"]
        side = config.input_size // config.patch_size
        table = sincos_pos_embed(config.hidden_size, side, side, side, config.pe_interpolation)[None]
        difference = (stored.double() - table).abs().max().item()
        if difference > max(1e-5, 2 * torch.finfo(stored.dtype).eps):
            raise ValueError(f"{source}: pos_embed is not the sin-cos table of a {side}x{side} grid at "
                             f"pe_interpolation = {config.pe_interpolation:g} (differs by {difference:.3g}): "
                             f"pass the checkpoint's pe_interpolation=")
    if "mask_token" in weights and weights["mask_token"].abs().max().item() != 0:
        raise ValueError(f"{source}: mask_token is not zero; the engine fills masked positions with zeros")


def load(path, config: MicroDiTConfig | None = None, **overrides) -> MicroDiT:
    """An official MicroDiT checkpoint -> engine MicroDiT, in the checkpoint's dtype, on the CPU.
    config: None infers it (infer_config; ``overrides`` are MicroDiTConfig fields, e.g. head_dim=32
    for MicroDiT_Tiny_2)."""
    source = os.fspath(path)
    weights = _dit_weights(read_checkpoint(path))
    if config is None:
        config = infer_config(weights, source, **overrides)
    elif overrides:
        raise ValueError(f"pass either config or config fields {sorted(overrides)}, not both")
    check_config(config, MicroDiTConfig)
    _check_buffers(weights, config, source)
    p, side = config.patch_size, config.input_size // config.patch_size
    buffers = {"pos_embed": torch.Size([1, side * side, config.hidden_size]),
               "mask_token": torch.Size([1, 1, p * p * config.out_channels])}
    return load_converted(MicroDiT, config, weights, key_table(config), source, optional_shapes=buffers)


def to_official(model: MicroDiT) -> dict:
    """The model's weights in the official layout, with the position table and zero mask token
    the official module stores as buffers."""
    if not isinstance(model, MicroDiT):
        raise TypeError(f"expected an engine MicroDiT, got {type(model).__name__}")
    c = model.config
    out = from_engine(model.state_dict(), key_table(c), c.patch_size, c.in_channels, c.out_channels)
    side, dtype = c.input_size // c.patch_size, model.patch_embed.weight.dtype
    # computed in float64 and stored in float32, as the official buffer (and the engine's table) is
    table = sincos_pos_embed(c.hidden_size, side, side, side, c.pe_interpolation).float()
    out["pos_embed"] = table[None].to(dtype)
    out["mask_token"] = torch.zeros(1, 1, c.patch_size**2 * c.out_channels, dtype=dtype)
    return out


def save(model: MicroDiT, path) -> None:
    """Write ``model`` as an official checkpoint: the DiT state dict (torch.save), or flat
    .safetensors when ``path`` ends so."""
    weights = {k: v.cpu().contiguous() for k, v in to_official(model).items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(weights, path)
    else:
        torch.save(weights, path)
