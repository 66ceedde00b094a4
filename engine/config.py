"""Typed model configs; named presets of them come from the model families (engine.family)."""

from __future__ import annotations

from dataclasses import dataclass

VAE_DOWNSAMPLE = 8  # sd-vae-ft-ema: 8x spatial downsampling, 4 latent channels


@dataclass(frozen=True)
class PixArtConfig:
    """A PixArt-α transformer. ``input_size`` is the latent side the model was configured for."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    text_len: int = 120
    learn_sigma: bool = True
    pe_interpolation: float = 0.5
    micro_conditions: bool = False

    def __post_init__(self):
        _check_transformer_shape(self)
        if self.text_len < 1 or self.caption_channels < 1:
            raise ValueError(f"text_len and caption_channels must be positive, got {self.text_len}, {self.caption_channels}")
        if self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"micro_conditions embed size, height, width in hidden_size / 3 each: "
                             f"hidden_size={self.hidden_size} is not divisible by 3")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


@dataclass(frozen=True)
class DiTConfig:
    """A class-conditional DiT (stage 1 of PixArt-α's schedule)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    pe_interpolation: float = 1.0   # positions of the sin-cos table: token index / this (DiT's own: 1, the integer grid)

    def __post_init__(self):
        _check_transformer_shape(self)
        if not self.pe_interpolation > 0:
            raise ValueError(f"pe_interpolation must be positive, got {self.pe_interpolation}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


@dataclass(frozen=True)
class MicroDiTConfig:
    """A MicroDiT (Sehwag et al., arXiv 2407.15811): a patch-mixer on all tokens, then layer-wise
    scaled blocks on the kept ones, every ``experts_every``-th FFN an expert-choice mixture of
    experts. The defaults are the official MicroDiT_XL_2.

    Block i of ``depth`` has attention width and FFN hidden size from ratios to ``hidden_size``
    spaced linearly from the first block to the last (``qkv_ratio``, ``ffn_ratio``; the rounding
    rules are in engine.model.microdit.block_shapes), unless ``attn_widths`` / ``ffn_widths`` list
    them block by block (a checkpoint whose sizes follow no such line)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1024
    depth: int = 28
    head_dim: int = 64
    qkv_ratio: tuple[float, float] = (0.5, 1.0)
    ffn_ratio: tuple[float, float] = (0.5, 4.0)
    attn_widths: tuple[int, ...] | None = None
    ffn_widths: tuple[int, ...] | None = None
    multiple_of: int = 256          # FFN hidden sizes are rounded up to a multiple of this
    mixer_depth: int = 6
    mixer_dim: int = 768
    mixer_ffn_ratio: float = 4.0
    num_experts: int = 8
    expert_capacity: float = 2.0    # each expert takes int(capacity * tokens / num_experts) tokens
    experts_every: int = 2          # blocks i with (i + 1) % experts_every == 0 are MoE (not the last backbone block)
    caption_channels: int = 1024
    text_len: int = 77
    pe_interpolation: float = 1.0

    def __post_init__(self):
        # run.json stores tuples as lists: make them tuples again, so configs compare and hash
        for field in ("qkv_ratio", "ffn_ratio", "attn_widths", "ffn_widths"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, field, tuple(value))
        for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "head_dim", "multiple_of",
                      "mixer_depth", "mixer_dim", "num_experts", "experts_every", "caption_channels", "text_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"MicroDiTConfig.{field} must be positive, got {getattr(self, field)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"MicroDiTConfig.input_size={self.input_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        for field in ("hidden_size", "mixer_dim"):
            if getattr(self, field) % self.head_dim:
                raise ValueError(f"MicroDiTConfig.{field}={getattr(self, field)} is not divisible by "
                                 f"head_dim={self.head_dim}")
        if self.hidden_size % 4:
            raise ValueError(f"MicroDiTConfig.hidden_size={self.hidden_size} must be divisible by 4 "
                             f"(2-D sin-cos position embedding)")
        for field in ("qkv_ratio", "ffn_ratio"):
            if len(getattr(self, field)) != 2 or min(getattr(self, field)) <= 0:
                raise ValueError(f"MicroDiTConfig.{field} must be (first block, last block) ratios > 0, "
                                 f"got {getattr(self, field)}")
        for field in ("attn_widths", "ffn_widths"):
            widths = getattr(self, field)
            if widths is not None and (len(widths) != self.depth or min(widths) < 1):
                raise ValueError(f"MicroDiTConfig.{field} must list {self.depth} positive sizes (one per block), "
                                 f"got {widths}")
        if self.attn_widths is not None and any(w % self.head_dim for w in self.attn_widths):
            raise ValueError(f"MicroDiTConfig.attn_widths {self.attn_widths} must be multiples of "
                             f"head_dim={self.head_dim}")
        if not self.expert_capacity > 0 or not self.pe_interpolation > 0:
            raise ValueError(f"MicroDiTConfig.expert_capacity and pe_interpolation must be > 0, got "
                             f"{self.expert_capacity}, {self.pe_interpolation}")

    @property
    def out_channels(self) -> int:
        return self.in_channels


def _check_transformer_shape(cfg) -> None:
    name = type(cfg).__name__
    for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"{name}.{field} must be positive, got {getattr(cfg, field)}")
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"{name}.input_size={cfg.input_size} is not divisible by patch_size={cfg.patch_size}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"{name}.hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    if (cfg.hidden_size // cfg.num_heads) % 2:
        raise ValueError(f"{name}: head dim {cfg.hidden_size // cfg.num_heads} must be even")
    if cfg.hidden_size % 4:
        raise ValueError(f"{name}.hidden_size={cfg.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")


def latent_size(resolution: int) -> int:
    if resolution % VAE_DOWNSAMPLE:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling {VAE_DOWNSAMPLE}")
    return resolution // VAE_DOWNSAMPLE


def preset_names() -> list[str]:
    """Every registered family's presets (engine.family)."""
    from engine import family

    return family.preset_names()


def preset(name: str, resolution: int | None = None, **overrides):
    """A named config at ``resolution`` pixels (the preset's own default when None); the preset's
    family (engine.family) makes it, e.g. PixArt sets the position-embedding interpolation scale
    as the official PixArt-α configs do."""
    from engine import family

    owner = family.of_preset(name)
    return owner.make_config(name, owner.presets[name].resolution if resolution is None else resolution, overrides)
