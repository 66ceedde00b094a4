"""facebookresearch/DiT checkpoints <-> engine DiT.

Layout of facebookresearch/DiT models.py (Linear layers map weight and bias alike):

    DiT                                        engine
    x_embedder.proj        Conv2d (D, C, p, p) patch_embed         Linear (D, C*p*p)
    t_embedder.mlp.0 / .2                      time_embed.fc1 / .fc2
    y_embedder.embedding_table (classes+1, D)  label_embed           (last row: the null class)
    blocks.i.attn.qkv / .proj                  blocks.i.attn.qkv / .proj   (q, k, v row blocks)
    blocks.i.mlp.fc1 / .fc2                    blocks.i.mlp.fc1 / .fc2
    blocks.i.adaLN_modulation.1                blocks.i.adaln
    final_layer.adaLN_modulation.1             final.adaln
    final_layer.linear   rows (i, j, c)        final.linear  rows (c, i, j)
    pos_embed (1, N, D)  fixed sin-cos         (computed; only checked on load)

The released files (DiT-XL-2-256x256.pt, ...) are bare state dicts of EMA weights; train.py writes
{'model', 'ema', 'opt', 'args'}, with 'args' an argparse.Namespace.
"""

from __future__ import annotations

import os

import torch

from engine.config import DiTConfig
from engine.interop import (block_count, check_config, from_engine, grid_side, learn_sigma, linear_keys,
                            load_converted, make_config, num_heads_for, read_checkpoint, required, strip_prefix)
from engine.model.dit import DiT
from engine.model.layers import sincos_pos_embed


def key_table(config: DiTConfig) -> dict[str, tuple[str, ...]]:
    """engine key -> DiT key (each a 1-tuple: DiT fuses QKV as the engine does)."""
    linears = {"patch_embed": "x_embedder.proj", "time_embed.fc1": "t_embedder.mlp.0",
               "time_embed.fc2": "t_embedder.mlp.2", "final.linear": "final_layer.linear",
               "final.adaln": "final_layer.adaLN_modulation.1"}
    for i in range(config.depth):
        b = f"blocks.{i}."
        linears |= {b + name: b + name for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
        linears[b + "adaln"] = b + "adaLN_modulation.1"
    table = linear_keys(linears)
    table["label_embed.weight"] = ("y_embedder.embedding_table.weight",)
    return table


def infer_config(state_dict: dict, source: str = "checkpoint", **overrides) -> DiTConfig:
    """The DiTConfig of a DiT state dict, from its shapes: width, channels, patch (x_embedder), depth,
    MLP ratio, classes (embedding rows - 1: DiT trains with label dropout, so the table has a null
    row), learned variance (head rows), latent size (pos_embed). Heads: DiT's published count for
    the width (S 6, B 12, L 16, XL 16). ``overrides`` (DiTConfig fields) win and supply what the
    tensors cannot (input_size without pos_embed, num_heads of other widths)."""
    sd = state_dict
    D, C, p, _ = required(sd, "x_embedder.proj.weight", source).shape
    inferred = dict(patch_size=p, in_channels=C, hidden_size=D, depth=block_count(sd, "blocks."),
                    mlp_ratio=required(sd, "blocks.0.mlp.fc1.weight", source).shape[0] / D,
                    num_classes=required(sd, "y_embedder.embedding_table.weight", source).shape[0] - 1,
                    learn_sigma=learn_sigma(required(sd, "final_layer.linear.weight", source).shape[0], p, C, source))
    if "num_heads" not in overrides:
        inferred["num_heads"] = num_heads_for(D, source)
    if "pos_embed" in sd:
        inferred["input_size"] = grid_side(sd["pos_embed"], p, source)
    elif "input_size" not in overrides:
        raise ValueError(f"{source} has no pos_embed to read the latent size from: pass input_size=")
    return make_config(DiTConfig, inferred, overrides, source)


def _select(checkpoint: dict, use_ema: bool, source: str) -> dict:
    if "model" in checkpoint or "ema" in checkpoint:
        key = "ema" if use_ema else "model"
        if key not in checkpoint:
            raise ValueError(f"{source} has no {key!r} (top-level keys: {sorted(checkpoint)})")
        return checkpoint[key]
    return checkpoint


def load(path, config: DiTConfig | None = None, *, use_ema: bool = True, **overrides) -> DiT:
    """A facebookresearch/DiT checkpoint -> engine DiT, in the checkpoint's dtype, on the CPU.

    A bare state dict (the released EMA weights) is used as is. From a training checkpoint,
    use_ema=True (default, as DiT's own download.find_model) takes 'ema', False takes 'model'.
    config: None infers it (see infer_config; ``overrides`` are DiTConfig fields).
    """
    source = os.fspath(path)
    weights = strip_prefix(_select(read_checkpoint(path), use_ema, source))
    if config is None:
        config = infer_config(weights, source, **overrides)
    elif overrides:
        raise ValueError(f"pass either config or config fields {sorted(overrides)}, not both")
    check_config(config, DiTConfig)
    side = config.input_size // config.patch_size
    return load_converted(DiT, config, weights, key_table(config), source,
                          optional_shapes={"pos_embed": torch.Size([1, side * side, config.hidden_size])})


def to_dit(model: DiT) -> dict:
    """The model's weights in DiT's layout, with the pos_embed table DiT's model stores."""
    if not isinstance(model, DiT):
        raise TypeError(f"expected an engine DiT, got {type(model).__name__}")
    c = model.config
    out = from_engine(model.state_dict(), key_table(c), c.patch_size, c.in_channels, c.out_channels)
    side = c.input_size // c.patch_size
    # DiT's table: integer coordinates, i.e. base = grid side and interpolation 1
    out["pos_embed"] = sincos_pos_embed(c.hidden_size, side, side, side, 1.0)[None].to(model.patch_embed.weight.dtype)
    return out


def save(model: DiT, path) -> None:
    """Write ``model`` as DiT's released files are: a bare state dict (torch.save), or flat
    .safetensors when ``path`` ends so."""
    weights = {k: v.cpu().contiguous() for k, v in to_dit(model).items()}
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(weights, path)
    else:
        torch.save(weights, path)
