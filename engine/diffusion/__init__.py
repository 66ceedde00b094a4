"""Diffusion objectives and sampling through diffusers.

The objectives (IDDPM, as PixArt-α trains; EDM, as MicroDiT does) share one interface:
``sample_noise_level(batch, generator, device)`` draws a training noise level per sample (IDDPM's
timestep t, EDM's σ), ``training_losses(model, x0, level, model_kwargs, noise, mask)`` returns
per-sample losses (``loss``, (B,)) with an optional loss mask (engine.diffusion.loss_mask), and
``midpoint_timestep()`` is the model's timestep input in the middle of the noise range.
"""

from engine.diffusion.edm import EDM
from engine.diffusion.iddpm import GaussianDiffusion
from engine.diffusion.sampling import (guided_eps, karras_sigmas, make_scheduler, null_caption_kwargs,
                                      null_class_kwargs, sample, sample_edm, sample_edm_heun)

__all__ = [
    "EDM",
    "GaussianDiffusion",
    "guided_eps",
    "karras_sigmas",
    "make_scheduler",
    "null_caption_kwargs",
    "null_class_kwargs",
    "sample",
    "sample_edm",
    "sample_edm_heun",
]
