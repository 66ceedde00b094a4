"""Official PixArt-α checkpoints <-> engine PixArt.

Layout of the official code (PixArt-alpha/PixArt-alpha: diffusion/model/nets/PixArt.py, PixArtMS.py,
PixArt_blocks.py; the diffusers script scripts/convert_pixart_alpha_to_diffusers.py reads the same
names). Linear layers map weight and bias alike:

    official                                  engine
    x_embedder.proj        Conv2d (D, C, p, p) patch_embed          Linear (D, C*p*p)
    t_embedder.mlp.0 / .2                     time_embed.fc1 / .fc2
    csize_embedder.mlp.0 / .2    (MS only)    size_embed.fc1 / .fc2
    ar_embedder.mlp.0 / .2       (MS only)    aspect_embed.fc1 / .fc2
    t_block.1                                 time_modulation
    y_embedder.y_proj.fc1 / .fc2              caption_proj.fc1 / .fc2
    y_embedder.y_embedding     (L, C_text)    null_caption
    blocks.i.scale_shift_table (6, D)         blocks.i.modulation
    blocks.i.attn.qkv / .proj                 blocks.i.attn.qkv / .proj      (q, k, v row blocks)
    blocks.i.cross_attn.q_linear              blocks.i.cross_attn.q
    blocks.i.cross_attn.kv_linear             blocks.i.cross_attn.kv         (k, v row blocks)
    blocks.i.cross_attn.proj                  blocks.i.cross_attn.proj
    blocks.i.mlp.fc1 / .fc2                   blocks.i.mlp.fc1 / .fc2
    final_layer.scale_shift_table (2, D)      final.modulation
    final_layer.linear  rows (i, j, c)        final.linear  rows (c, i, j)
    pos_embed (1, N, D)  fixed sin-cos        (computed; only checked on load)

Training checkpoints of the official code (diffusion/utils/checkpoint.py) are dicts with
'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'epoch'; the released weights are
{'state_dict': ...}. DistributedDataParallel's 'module.' key prefix is dropped.
"""

from __future__ import annotations

import math
import os

import torch

from engine.config import VAE_DOWNSAMPLE, PixArtConfig
from engine.interop import (block_count, check_config, from_engine, grid_side, learn_sigma, linear_keys,
                            load_converted, make_config, num_heads_for, read_checkpoint, required, strip_prefix)
from engine.model.layers import sincos_pos_embed
from engine.model.pixart import PixArt


def key_table(config: PixArtConfig) -> dict[str, tuple[str, ...]]:
    """engine key -> official key (each a 1-tuple: the official layout fuses exactly as the engine does)."""
    linears = {"patch_embed": "x_embedder.proj", "time_embed.fc1": "t_embedder.mlp.0",
               "time_embed.fc2": "t_embedder.mlp.2", "time_modulation": "t_block.1",
               "caption_proj.fc1": "y_embedder.y_proj.fc1", "caption_proj.fc2": "y_embedder.y_proj.fc2",
               "final.linear": "final_layer.linear"}
    if config.micro_conditions:
        linears |= {"size_embed.fc1": "csize_embedder.mlp.0", "size_embed.fc2": "csize_embedder.mlp.2",
                    "aspect_embed.fc1": "ar_embedder.mlp.0", "aspect_embed.fc2": "ar_embedder.mlp.2"}
    for i in range(config.depth):
        b = f"blocks.{i}."
        for engine_name, official in [("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                                      ("cross_attn.q", "cross_attn.q_linear"),
                                      ("cross_attn.kv", "cross_attn.kv_linear"),
                                      ("cross_attn.proj", "cross_attn.proj"), ("mlp.fc1", "mlp.fc1"),
                                      ("mlp.fc2", "mlp.fc2")]:
            linears[b + engine_name] = b + official
    table = linear_keys(linears)
    table["null_caption"] = ("y_embedder.y_embedding",)
    table["final.modulation"] = ("final_layer.scale_shift_table",)
    for i in range(config.depth):
        table[f"blocks.{i}.modulation"] = (f"blocks.{i}.scale_shift_table",)
    return table


def infer_config(state_dict: dict, source: str = "checkpoint", **overrides) -> PixArtConfig:
    """The PixArtConfig an official state dict was trained with, from its tensors.

    From shapes: width, channels and patch size (x_embedder), depth (block count), MLP ratio, caption
    channels and text length (y_embedding), learned variance (head rows), micro-conditions (whether
    csize_embedder exists), latent size (pos_embed's token count). From values: the position
    interpolation scale (pos_embed token 1 holds sin and cos of 1 / scale at frequency 1).
    Head count: the published one for the width (16 for PixArt-XL/2's 1152). Fields a checkpoint
    cannot tell (input_size without pos_embed, num_heads of unpublished widths) come from
    ``overrides``, which also win over anything inferred. Without pos_embed the scale follows the
    official configs' rule resolution / 512 = input_size * 8 / 512.
    """
    sd = state_dict
    D, C, p, _ = required(sd, "x_embedder.proj.weight", source).shape
    text_len, caption_channels = required(sd, "y_embedder.y_embedding", source).shape
    inferred = dict(patch_size=p, in_channels=C, hidden_size=D, depth=block_count(sd, "blocks."),
                    mlp_ratio=required(sd, "blocks.0.mlp.fc1.weight", source).shape[0] / D,
                    caption_channels=caption_channels, text_len=text_len,
                    learn_sigma=learn_sigma(required(sd, "final_layer.linear.weight", source).shape[0], p, C, source),
                    micro_conditions="csize_embedder.mlp.0.weight" in sd)
    if "num_heads" not in overrides:
        inferred["num_heads"] = num_heads_for(D, source)
    pos_embed = sd.get("pos_embed")
    if pos_embed is not None:
        inferred["input_size"] = grid_side(pos_embed, p, source)
        scale = _read_interpolation(pos_embed)
        if scale is not None:
            inferred["pe_interpolation"] = scale
    elif "input_size" not in overrides:
        raise ValueError(f"{source} has no pos_embed to read the latent size from: pass input_size=")
    input_size = overrides.get("input_size", inferred.get("input_size"))
    inferred.setdefault("pe_interpolation", max(1.0, input_size * VAE_DOWNSAMPLE / 512))  # the official configs' rule
    return make_config(PixArtConfig, inferred, overrides, source)


def _read_interpolation(pos_embed: torch.Tensor) -> float | None:
    """The interpolation scale a square official pos_embed was built with, or None if unreadable.

    Token 1 sits at row 0, column 1, i.e. at column coordinate 1 / (grid / base) / scale = 1 / scale
    (the table is stored at training size, grid = base). Its first D/4 channels are sines and the
    next D/4 cosines of that coordinate at frequencies 10000^(-k / (D/4)). The lowest frequency
    gives the coordinate without phase wrapping; each higher one refines it after unwrapping. The
    answer is the estimate with the fewest decimals that rebuilds the stored first row to the
    stored dtype's precision (0.5, not 0.49999997 from a float32 table).
    """
    N, D = pos_embed.shape[-2:]
    side = math.isqrt(N)
    if side < 2:
        return None
    table = pos_embed.reshape(N, D).double()
    quarter = D // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.atan2(table[1, :quarter], table[1, quarter:2 * quarter])  # wrapped to (-pi, pi]
    coordinate = angles[-1] / omega[-1]
    for k in range(quarter - 2, -1, -1):
        turns = torch.round((coordinate * omega[k] - angles[k]) / (2 * math.pi))
        coordinate = (angles[k] + 2 * math.pi * turns) / omega[k]
    if not coordinate > 0:
        return None
    estimate = 1.0 / coordinate.item()
    tolerance = max(1e-4, 8 * torch.finfo(pos_embed.dtype).eps)
    for scale in [round(estimate, digits) for digits in range(1, 7)] + [estimate]:  # simplest first
        first_row = sincos_pos_embed(D, 1, side, side, scale)  # (side, D): row 0 of the grid
        if scale > 0 and (first_row - table[:side]).abs().max() < tolerance:
            return scale
    return None


def _pos_embed_shape(config: PixArtConfig) -> dict:
    side = config.input_size // config.patch_size
    return {"pos_embed": torch.Size([1, side * side, config.hidden_size])}


def _select(checkpoint: dict, use_ema: bool, source: str) -> dict:
    if "state_dict" in checkpoint or "state_dict_ema" in checkpoint:
        key = "state_dict_ema" if use_ema else "state_dict"
        if key not in checkpoint:
            raise ValueError(f"{source} has no {key!r} (top-level keys: {sorted(checkpoint)})")
        return checkpoint[key]
    if use_ema:
        raise ValueError(f"{source} is a bare state dict with no 'state_dict_ema': load it with use_ema=False")
    return checkpoint


def load(path, config: PixArtConfig | None = None, *, use_ema: bool = False, **overrides) -> PixArt:
    """An official PixArt-α checkpoint (.pth / .pt via torch.load(weights_only=True), or .safetensors) -> PixArt.

    use_ema: take 'state_dict_ema' instead of 'state_dict' from a training checkpoint. The default
    False matches the official loader (load_checkpoint(load_ema=False)) and the released files,
    which hold only 'state_dict'. config: None infers it (see infer_config; ``overrides`` are
    PixArtConfig fields, e.g. input_size=64 or num_heads=12). A given pos_embed must fit the
    config's grid. The model is returned in the checkpoint's dtype, on the CPU.
    """
    source = os.fspath(path)
    weights = strip_prefix(_select(read_checkpoint(path), use_ema, source))
    if config is None:
        config = infer_config(weights, source, **overrides)
    elif overrides:
        raise ValueError(f"pass either config or config fields {sorted(overrides)}, not both")
    check_config(config, PixArtConfig)
    return load_converted(PixArt, config, weights, key_table(config), source,
                          optional_shapes=_pos_embed_shape(config))


def to_official(model: PixArt) -> dict:
    """The model's weights in the official layout, with the pos_embed table the official model stores."""
    if not isinstance(model, PixArt):
        raise TypeError(f"expected an engine PixArt, got {type(model).__name__}")
    c = model.config
    out = from_engine(model.state_dict(), key_table(c), c.patch_size, c.in_channels, c.out_channels)
    side = c.input_size // c.patch_size
    table = sincos_pos_embed(c.hidden_size, side, side, side, c.pe_interpolation)  # (N, D) float64
    out["pos_embed"] = table[None].to(model.patch_embed.weight.dtype)  # (1, N, D)
    return out


def save(model: PixArt, path) -> None:
    """Write ``model`` as an official checkpoint: {'state_dict': ...} with torch.save, or a flat
    .safetensors file when ``path`` ends so. The official loader finds the 'pos_embed' it deletes."""
    weights = {k: v.cpu().contiguous() for k, v in to_official(model).items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(weights, path)
    else:
        torch.save({"state_dict": weights}, path)
