"""Typed model configs and named presets.

Sources of the numbers:
- PixArt-XL/2: PixArt-α paper (arXiv 2310.00426) and its official code: DiT-XL/2 backbone
  (28 blocks, width 1152, 16 heads, patch 2, MLP ratio 4), T5-XXL features (4096 wide,
  120 tokens), position-embedding interpolation scale ("lewei_scale") 1.0 in the base config
  (256 and 512 px) and 2.0 in the 1024 px configs.
- DiT-XL/2: Peebles & Xie, "Scalable Diffusion Models with Transformers" (arXiv 2212.09748).
"""

from __future__ import annotations

import dataclasses
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


_XL2 = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0)

# name -> (config class, fixed fields, default resolution in pixels)
_PRESETS = {
    # tests: every code path (micro-conditions included) in a model that runs in milliseconds on a CPU
    "tiny": (PixArtConfig, dict(patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4,
                                caption_channels=32, text_len=8), 64),
    "tiny-ms": (PixArtConfig, dict(patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4,
                                   caption_channels=32, text_len=8, micro_conditions=True), 64),
    "tiny-dit": (DiTConfig, dict(patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4,
                                 num_classes=10), 64),
    "pixart-xl2": (PixArtConfig, dict(_XL2, caption_channels=4096, text_len=120), 256),
    "pixart-xl2-ms": (PixArtConfig, dict(_XL2, caption_channels=4096, text_len=120, micro_conditions=True), 1024),
    "dit-xl2": (DiTConfig, dict(_XL2, num_classes=1000), 256),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, resolution: int | None = None, **overrides):
    """A named config at ``resolution`` pixels (the preset's own default when None).

    PixArt presets set the position-embedding interpolation scale as the official PixArt-α
    configs do: 1 at 256 and 512 px, 2 at 1024 px, i.e. max(1, resolution / 512).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()}")
    cls, fields, default_res = _PRESETS[name]
    resolution = default_res if resolution is None else resolution
    fields = dict(fields, input_size=latent_size(resolution))
    if cls is PixArtConfig:
        fields["pe_interpolation"] = max(1.0, resolution / 512)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
    return cls(**{**fields, **overrides})
