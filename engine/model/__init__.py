"""Single-device model code: the PixArt-α transformer, the class-conditional DiT and MicroDiT."""

from engine.model.dit import DiT
from engine.model.microdit import MicroDiT
from engine.model.pixart import PixArt


def build_model(config):
    """The model of ``config``, built by the family that owns the config's class (engine.family)."""
    from engine import family

    return family.of_config(config).build(config)


__all__ = ["DiT", "MicroDiT", "PixArt", "build_model"]
