"""Single-device model code: the PixArt-α transformer and the class-conditional DiT."""

from engine.config import DiTConfig, PixArtConfig
from engine.model.dit import DiT
from engine.model.pixart import PixArt


def build_model(config: PixArtConfig | DiTConfig):
    if isinstance(config, PixArtConfig):
        return PixArt(config)
    if isinstance(config, DiTConfig):
        return DiT(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


__all__ = ["DiT", "PixArt", "build_model"]
