"""Diffusion objectives (IDDPM for PixArt-α, EDM for MicroDiT) and sampling through diffusers."""

from engine.diffusion.edm import EDM
from engine.diffusion.iddpm import GaussianDiffusion
from engine.diffusion.sampling import guided_eps, make_scheduler, null_caption_kwargs, null_class_kwargs, sample

__all__ = [
    "EDM",
    "GaussianDiffusion",
    "guided_eps",
    "make_scheduler",
    "null_caption_kwargs",
    "null_class_kwargs",
    "sample",
]
