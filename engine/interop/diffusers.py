"""diffusers ``PixArtTransformer2DModel`` <-> engine PixArt.

Names of diffusers (models/transformers/pixart_transformer_2d.py, models/attention.py
BasicTransformerBlock, models/normalization.py AdaLayerNormSingle, models/embeddings.py
PixArtAlphaCombinedTimestepSizeEmbeddings / PixArtAlphaTextProjection). Linear layers map weight
and bias alike; a tuple is concatenated along the output rows in the engine:

    diffusers                                            engine
    pos_embed.proj       Conv2d (D, C, p, p)             patch_embed        Linear (D, C*p*p)
    adaln_single.emb.timestep_embedder.linear_1 / _2     time_embed.fc1 / .fc2
    adaln_single.emb.resolution_embedder.linear_1 / _2   size_embed.fc1 / .fc2    (micro-conditions)
    adaln_single.emb.aspect_ratio_embedder.linear_1 / _2 aspect_embed.fc1 / .fc2
    adaln_single.linear                                  time_modulation
    caption_projection.linear_1 / _2                     caption_proj.fc1 / .fc2
    transformer_blocks.i.scale_shift_table (6, D)        blocks.i.modulation
    transformer_blocks.i.attn1.(to_q, to_k, to_v)        blocks.i.attn.qkv
    transformer_blocks.i.attn1.to_out.0                  blocks.i.attn.proj
    transformer_blocks.i.attn2.to_q                      blocks.i.cross_attn.q
    transformer_blocks.i.attn2.(to_k, to_v)              blocks.i.cross_attn.kv
    transformer_blocks.i.attn2.to_out.0                  blocks.i.cross_attn.proj
    transformer_blocks.i.ff.net.0.proj / ff.net.2        blocks.i.mlp.fc1 / .fc2
    scale_shift_table (2, D)                             final.modulation
    proj_out             rows (i, j, c)                  final.linear  rows (c, i, j)
    (none)                                               null_caption

diffusers keeps no learned null caption (its pipelines encode the empty prompt instead), so
``null_caption`` is lost by to_diffusers and comes from the ``null_caption=`` argument, or a fresh
random init, in from_diffusers.

The caption padding mask: the engine's ``caption_lens`` (B,) is diffusers'
``encoder_attention_mask = arange(L)[None] < caption_lens[:, None]`` (B, L).
"""

from __future__ import annotations

import torch

from engine.config import PixArtConfig, preset
from engine.interop import (block_count, check_config, from_engine, learn_sigma, linear_keys,
                            load_converted, make_config, num_heads_for, required)
from engine.model.pixart import PixArt

# Fixed by diffusers' PixArt: FeedForward's default width multiplier (BasicTransformerBlock passes no
# ff_inner_dim), the timestep-embedding table size it requires to be set, and PixArt's norm epsilon.
_DIFFUSERS_MLP_RATIO = 4.0
_NUM_EMBEDS_ADA_NORM = 1000
_NORM_EPS = 1e-6


def diffusers_kwargs(config: PixArtConfig) -> dict:
    """Constructor kwargs of diffusers' PixArtTransformer2DModel with the architecture of ``config``."""
    check_config(config, PixArtConfig)
    if config.mlp_ratio != _DIFFUSERS_MLP_RATIO:
        raise ValueError(f"diffusers' PixArt has MLP ratio {_DIFFUSERS_MLP_RATIO}; config.mlp_ratio={config.mlp_ratio}")
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        dropout=0.0,
        cross_attention_dim=config.hidden_size,
        attention_bias=True,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=_NUM_EMBEDS_ADA_NORM,
        upcast_attention=False,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=_NORM_EPS,
        interpolation_scale=config.pe_interpolation,
        use_additional_conditions=config.micro_conditions,
        caption_channels=config.caption_channels,
        attention_type="default",
    )


def key_table(config: PixArtConfig) -> dict[str, tuple[str, ...]]:
    """engine key -> diffusers key(s)."""
    emb = "adaln_single.emb."
    linears = {"patch_embed": "pos_embed.proj", "time_embed.fc1": emb + "timestep_embedder.linear_1",
               "time_embed.fc2": emb + "timestep_embedder.linear_2", "time_modulation": "adaln_single.linear",
               "caption_proj.fc1": "caption_projection.linear_1", "caption_proj.fc2": "caption_projection.linear_2",
               "final.linear": "proj_out"}
    if config.micro_conditions:
        linears |= {"size_embed.fc1": emb + "resolution_embedder.linear_1",
                    "size_embed.fc2": emb + "resolution_embedder.linear_2",
                    "aspect_embed.fc1": emb + "aspect_ratio_embedder.linear_1",
                    "aspect_embed.fc2": emb + "aspect_ratio_embedder.linear_2"}
    for i in range(config.depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        linears |= {b + "attn.qkv": (d + "attn1.to_q", d + "attn1.to_k", d + "attn1.to_v"),
                    b + "attn.proj": d + "attn1.to_out.0",
                    b + "cross_attn.q": d + "attn2.to_q",
                    b + "cross_attn.kv": (d + "attn2.to_k", d + "attn2.to_v"),
                    b + "cross_attn.proj": d + "attn2.to_out.0",
                    b + "mlp.fc1": d + "ff.net.0.proj",
                    b + "mlp.fc2": d + "ff.net.2"}
    table = linear_keys(linears)
    table["final.modulation"] = ("scale_shift_table",)
    for i in range(config.depth):
        table[f"blocks.{i}.modulation"] = (f"transformer_blocks.{i}.scale_shift_table",)
    return table


def _default_interpolation(sample_size: int) -> float:
    # diffusers' own default when its config leaves interpolation_scale None
    return float(max(sample_size // 64, 1))


def config_from_diffusers(model, **overrides) -> PixArtConfig:
    """The PixArtConfig of a diffusers PixArtTransformer2DModel (its registered config).

    diffusers records no caption length: text_len is PixArt-α's 120 unless overridden.
    """
    cfg = model.config
    fixed = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True,
                 norm_elementwise_affine=False, norm_eps=_NORM_EPS, attention_type="default")
    for field, value in fixed.items():
        if cfg.get(field) != value:
            raise ValueError(f"diffusers config {field}={cfg.get(field)!r}: the engine's PixArt needs {value!r}")
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.caption_channels is None or cfg.cross_attention_dim != hidden:
        raise ValueError(f"diffusers config caption_channels={cfg.caption_channels}, cross_attention_dim="
                         f"{cfg.cross_attention_dim}: PixArt projects captions to the width {hidden}")
    out_channels = cfg.in_channels if cfg.out_channels is None else cfg.out_channels
    scale = cfg.interpolation_scale
    inferred = dict(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                    hidden_size=hidden, depth=cfg.num_layers, num_heads=cfg.num_attention_heads,
                    mlp_ratio=_DIFFUSERS_MLP_RATIO, caption_channels=cfg.caption_channels,
                    text_len=preset("pixart-xl2").text_len,
                    learn_sigma=learn_sigma(cfg.patch_size ** 2 * out_channels, cfg.patch_size, cfg.in_channels,
                                            "diffusers config"),
                    pe_interpolation=float(scale) if scale is not None else _default_interpolation(cfg.sample_size),
                    micro_conditions=bool(model.use_additional_conditions))
    return make_config(PixArtConfig, inferred, overrides, "diffusers config")


def infer_config(state_dict: dict, **overrides) -> PixArtConfig:
    """The PixArtConfig of a diffusers state dict, from its shapes.

    A state dict does not record the latent size (pos_embed is not saved): pass input_size=.
    Heads: the published count for the width unless num_heads= is given; text_len: 120 unless given;
    pe_interpolation: diffusers' default for the size unless given.
    """
    source = "diffusers state dict"
    if "input_size" not in overrides:
        raise ValueError("a diffusers state dict does not record the latent size: pass input_size= (or config=)")
    D, C, p, _ = required(state_dict, "pos_embed.proj.weight", source).shape
    inferred = dict(patch_size=p, in_channels=C, hidden_size=D,
                    depth=block_count(state_dict, "transformer_blocks."),
                    mlp_ratio=required(state_dict, "transformer_blocks.0.ff.net.0.proj.weight", source).shape[0] / D,
                    caption_channels=required(state_dict, "caption_projection.linear_1.weight", source).shape[1],
                    text_len=preset("pixart-xl2").text_len,
                    learn_sigma=learn_sigma(required(state_dict, "proj_out.weight", source).shape[0], p, C, source),
                    pe_interpolation=_default_interpolation(overrides["input_size"]),
                    micro_conditions="adaln_single.emb.resolution_embedder.linear_1.weight" in state_dict)
    if "num_heads" not in overrides:
        inferred["num_heads"] = num_heads_for(D, source)
    return make_config(PixArtConfig, inferred, overrides, source)


def from_diffusers(model_or_state_dict, config: PixArtConfig | None = None, *,
                   null_caption: torch.Tensor | None = None, **overrides) -> PixArt:
    """A diffusers PixArtTransformer2DModel (or its state dict) -> engine PixArt, same numbers.

    config: None reads it from the model's config, or infers it from a state dict's shapes (then
    input_size= is required); ``overrides`` are PixArtConfig fields over the inferred ones.
    null_caption: (text_len, caption_channels) learned null caption to use (diffusers has none);
    None keeps a fresh random one, initialised as PixArt's constructor does. The engine model gets
    its own copy of the weights, on their device, in their dtype.
    """
    if config is not None and overrides:
        raise ValueError(f"pass either config or config fields {sorted(overrides)}, not both")
    if config is None and null_caption is not None:
        overrides.setdefault("text_len", null_caption.shape[0])
    if isinstance(model_or_state_dict, dict):
        weights, source = model_or_state_dict, "diffusers state dict"
        config = config or infer_config(weights, **overrides)
    else:
        weights, source = model_or_state_dict.state_dict(), f"diffusers {type(model_or_state_dict).__name__}"
        config = config or config_from_diffusers(model_or_state_dict, **overrides)
    check_config(config, PixArtConfig)
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    null_shape = (config.text_len, config.caption_channels)
    if null_caption is None:
        null_caption = torch.randn(null_shape, device=device) / config.caption_channels**0.5
    elif tuple(null_caption.shape) != null_shape:
        raise ValueError(f"null_caption must be (text_len, caption_channels) = {null_shape}, "
                         f"got {tuple(null_caption.shape)}")
    weights = {k: v.detach().clone() for k, v in weights.items()}  # never share storage with the source model
    return load_converted(PixArt, config, weights, key_table(config), source,
                          fill={"null_caption": null_caption.detach().clone().to(device)})


def to_diffusers(model: PixArt):
    """Engine PixArt -> diffusers PixArtTransformer2DModel (same device and dtype; null_caption is dropped)."""
    from diffusers import PixArtTransformer2DModel

    if not isinstance(model, PixArt):
        raise TypeError(f"expected an engine PixArt, got {type(model).__name__}")
    c = model.config
    weights = from_engine(model.state_dict(), key_table(c), c.patch_size, c.in_channels, c.out_channels)
    reference = model.patch_embed.weight
    with torch.device(reference.device):  # initialising on the GPU, when there, is far faster than on the CPU
        target = PixArtTransformer2DModel(**diffusers_kwargs(c)).to(reference.dtype)
    target.load_state_dict(weights, strict=True)
    return target.eval()
