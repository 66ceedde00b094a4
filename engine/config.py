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

    def __post_init__(self):
        _check_transformer_shape(self)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


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
