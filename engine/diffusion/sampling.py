"""Sampling with diffusers' schedulers and classifier-free guidance.

The solvers are diffusers' own: for IDDPM-trained models DPM-Solver++ 2M (as PixArt-α samples)
or DDIM, configured with the training schedule; for EDM-trained models DPM-Solver++ in the EDM
parametrisation. This file only drives them and combines the conditional and unconditional
predictions; the one exception is Karras et al.'s deterministic Heun sampler for EDM models
(``sample_edm_heun``, MicroDiT's), which diffusers has no scheduler for in the EDM
parametrisation: a few lines, tested against the probability flow's closed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from engine.diffusion.iddpm import GaussianDiffusion

SCHEDULERS = ("dpm", "ddim")


def make_scheduler(name: str = "dpm", diffusion: GaussianDiffusion | None = None):
    """A diffusers scheduler over the same linear β schedule as ``diffusion`` (default IDDPM)."""
    diffusion = GaussianDiffusion() if diffusion is None else diffusion
    schedule = dict(
        num_train_timesteps=diffusion.num_timesteps,
        beta_start=diffusion.beta_start,
        beta_end=diffusion.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
    )
    if name == "dpm":
        return DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        # Latents are not confined to [-1, 1], so DDIM's default x0 clipping is turned off;
        # "trailing" spacing makes the first step start from the last training timestep, where
        # the pure-noise start matches the forward process best.
        return DDIMScheduler(**schedule, clip_sample=False, timestep_spacing="trailing")
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


def _merge_halves(cond_kwargs: dict, uncond_kwargs: dict) -> dict:
    """Model kwargs for [cond; uncond] stacked along the batch.

    Keys absent from uncond_kwargs are shared with the conditional half (e.g. PixArt's
    resolution / aspect-ratio micro-conditions). Sequence tensors (B, L, ...) whose lengths
    differ, such as a padded caption against the full-length null caption, are zero-padded to
    the longer length; the model masks padding through its length tensor.
    """
    unknown = uncond_kwargs.keys() - cond_kwargs.keys()
    if unknown:
        raise ValueError(f"uncond_kwargs has keys missing from cond_kwargs: {sorted(unknown)}")
    merged = {}
    for key, cond in cond_kwargs.items():
        uncond = uncond_kwargs.get(key, cond)
        if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
            if cond.dim() >= 3 and cond.dim() == uncond.dim() and cond.shape[2:] == uncond.shape[2:]:
                length = max(cond.shape[1], uncond.shape[1])
                cond, uncond = (_pad_length(v, length) for v in (cond, uncond))
            if cond.shape[1:] != uncond.shape[1:]:
                raise ValueError(
                    f"{key}: conditional {tuple(cond.shape)} and unconditional {tuple(uncond.shape)} "
                    "shapes cannot be stacked along the batch"
                )
            merged[key] = torch.cat([cond, uncond])
        elif isinstance(cond, torch.Tensor) or isinstance(uncond, torch.Tensor) or cond != uncond:
            raise ValueError(f"{key}: conditional and unconditional values must both be tensors or be equal")
        else:
            merged[key] = cond
    return merged


def _pad_length(x: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - x.shape[1]
    if missing == 0:
        return x
    # F.pad lists (before, after) pairs from the last dim backwards; only dim 1 grows.
    return F.pad(x, [0, 0] * (x.dim() - 2) + [0, missing])


def guided_eps(model, x: torch.Tensor, t: torch.Tensor, cond_kwargs: dict, uncond_kwargs: dict,
               guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided ε̂ = ε̂_u + s (ε̂_c - ε̂_u), (B, C, H, W).

    Both halves go through one batched forward; learned-variance channels are dropped.
    At s = 1 the guided value is ε̂_c, so the unconditional half is skipped.
    """
    batch, channels = x.shape[:2]
    t = torch.as_tensor(t, device=x.device)
    t = t.reshape(1).expand(batch) if t.numel() == 1 else t
    if guidance_scale == 1:
        return model(x, t, **cond_kwargs)[:, :channels]
    kwargs = _merge_halves(cond_kwargs, uncond_kwargs)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), **kwargs)[:, :channels]  # (2B, C, H, W)
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def sample(model, shape, cond_kwargs: dict, uncond_kwargs: dict, guidance_scale: float = 4.5,
           steps: int = 20, scheduler: str = "dpm", generator: torch.Generator | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           diffusion: GaussianDiffusion | None = None) -> torch.Tensor:
    """Draw x0 latents of ``shape`` (B, C, H, W) from pure noise in ``steps`` solver steps.

    ``device`` defaults to the model's; ``generator`` (on any device) seeds the initial noise.
    """
    solver = make_scheduler(scheduler, diffusion)
    max_steps = solver.config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise ValueError(f"steps must be an integer in [1, {max_steps}], got {steps!r}")
    device = torch.device(device) if device is not None else _first_parameter_device(model)
    solver.set_timesteps(steps, device=device)
    draw_on = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)  # (B, C, H, W)
    x = x * solver.init_noise_sigma
    for t in solver.timesteps:
        model_input = solver.scale_model_input(x, t)
        eps = guided_eps(model, model_input, t, cond_kwargs, uncond_kwargs, guidance_scale)
        x = solver.step(eps, t, x).prev_sample
    return x


@torch.no_grad()
def sample_edm(model, shape, cond_kwargs: dict, uncond_kwargs: dict, guidance_scale: float = 4.5,
               steps: int = 20, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, sigma_data: float = 0.5) -> torch.Tensor:
    """Draw x0 of ``shape`` from an EDM-trained network F (engine.diffusion.EDM's preconditioning)
    with diffusers' EDM DPM-Solver++, σ from 80 down to 0.002. diffusers' scheduler applies the
    same c_in, c_noise = ln(σ)/4, c_skip and c_out as EDM trains with, so F's output is what the
    scheduler expects."""
    from diffusers import EDMDPMSolverMultistepScheduler

    device = torch.device(device) if device is not None else _first_parameter_device(model)
    scheduler = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=sigma_data)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma  # (B, C, H, W)
    for t in scheduler.timesteps:  # t = c_noise(σ)
        network = guided_eps(model, scheduler.scale_model_input(x, t), t, cond_kwargs, uncond_kwargs, guidance_scale)
        x = scheduler.step(network, t, x).prev_sample
    return x


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Karras et al.'s noise levels (their eq. 5): ``steps`` values from sigma_max down to
    sigma_min, evenly spaced in σ^(1/ρ), then 0: (steps + 1,) float64."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64, device=device) if steps > 1 else torch.zeros(
        1, dtype=torch.float64, device=device)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def sample_edm_heun(model, shape, cond_kwargs: dict, uncond_kwargs: dict, guidance_scale: float = 5.0,
                    steps: int = 30, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, sigma_data: float = 0.5, sigma_min: float = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Draw x0 of ``shape`` from an EDM-trained network F by Karras et al.'s deterministic
    sampler (their Algorithm 1: Heun's second-order steps between ``karras_sigmas``, Euler into
    σ = 0), the denoiser D = c_skip x + c_out F(c_in x, ln σ / 4) of engine.diffusion.EDM guided
    as D_u + s (D_c - D_u). MicroDiT samples this way (30 steps, ρ = 7, σ 80 -> 0.002, guidance
    5 against a zero caption)."""
    from engine.diffusion.edm import EDM

    device = torch.device(device) if device is not None else _first_parameter_device(model)
    edm = EDM(sigma_data=sigma_data)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, device).tolist()
    kwargs = cond_kwargs if guidance_scale == 1 else _merge_halves(cond_kwargs, uncond_kwargs)

    def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if guidance_scale == 1:
            return edm.denoise(model, x, sigma, kwargs).float()
        cond, uncond = edm.denoise(model, torch.cat([x, x]), sigma, kwargs).float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    x = torch.randn(shape, generator=generator, device=device) * sigmas[0]  # (B, C, H, W)
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - denoised(x, sigma)) / sigma
        moved = x + (following - sigma) * slope
        if following > 0:  # Heun's correction, with the slope at the end of the step
            moved = x + (following - sigma) * 0.5 * (slope + (moved - denoised(moved, following)) / following)
        x = moved
    return x


def _first_parameter_device(model) -> torch.device:
    return next(model.parameters()).device


def null_caption_kwargs(model, batch: int) -> dict:
    """PixArt's unconditional kwargs: the learned null caption, all of its L tokens valid."""
    null_caption = getattr(model, "null_caption", None)
    if not isinstance(null_caption, torch.Tensor) or null_caption.dim() != 2:
        raise ValueError("model has no null_caption (L, caption_channels) tensor: not a text-conditioned model")
    length = null_caption.shape[0]
    return dict(
        caption=null_caption.unsqueeze(0).expand(batch, -1, -1),  # (B, L, caption_channels)
        caption_lens=torch.full((batch,), length, dtype=torch.int64, device=null_caption.device),  # (B,)
    )


def null_class_kwargs(model, batch: int) -> dict:
    """DiT's unconditional kwargs: the extra "null" class id, num_classes."""
    config = getattr(model, "config", None)
    num_classes = getattr(config, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ValueError("model has no config.num_classes: not a class-conditional model")
    device = _first_parameter_device(model)
    return dict(labels=torch.full((batch,), num_classes, dtype=torch.int64, device=device))
