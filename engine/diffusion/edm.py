"""EDM objective (Karras et al. 2022) with the preconditioning MicroDiT trains with.

The network F sees a unit-variance input and its output is mixed with the noisy input so
that the denoiser is

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, c_noise(σ))

and the loss λ(σ) |D(x0 + σ n; σ) - x0|² with σ log-normal. The weight λ = 1 / c_out² makes
the effective target of F unit-variance at every σ.

MicroDiT's released code uses sigma_data = 0.9 and p_mean = -0.6 for SD-XL latents; the
defaults here are the EDM paper's. Set them from the config.
"""

from __future__ import annotations

import math

import torch

from engine.diffusion.loss_mask import per_sample_mean


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class EDM:
    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if not p_std > 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.sigma_data = sigma_data
        self.p_mean = p_mean
        self.p_std = p_std

    def sample_noise_level(self, batch: int, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> torch.Tensor:
        """σ = exp(p_mean + p_std · n), n ~ N(0, 1): (batch,) float32 on ``device``."""
        draw_on = generator.device if generator is not None else device
        normal = torch.randn(batch, generator=generator, device=draw_on)
        sigma = torch.exp(self.p_mean + self.p_std * normal)
        return sigma.to(device) if device is not None else sigma

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise), each with sigma's shape."""
        var_total = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / var_total
        c_out = sigma * self.sigma_data / torch.sqrt(var_total)
        c_in = 1.0 / torch.sqrt(var_total)
        c_noise = torch.log(sigma) / 4.0
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_d²) / (σ σ_d)², i.e. 1 / c_out(σ)²."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, model, x_noisy: torch.Tensor, sigma: torch.Tensor | float,
                model_kwargs: dict | None = None) -> torch.Tensor:
        """D(x_noisy; σ) for σ of shape (B,) or a scalar; the result has x_noisy's shape.

        The model gets c_noise = ln(σ)/4 as its timestep, a (B,) float tensor: the engine's
        timestep embedder is a sinusoidal embedding of a real number, so it accepts it as is.
        A model with learned variance (2C output channels) contributes its first C channels.
        """
        dtype = _compute_dtype(x_noisy)
        x_noisy = x_noisy.to(dtype)
        batch, channels = x_noisy.shape[:2]
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x_noisy.device)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(batch)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(sigma.shape)}")
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)  # each (B,)
        to_x = (batch,) + (1,) * (x_noisy.dim() - 1)
        model_output = model(x_noisy * c_in.view(to_x), c_noise, **(model_kwargs or {}))  # (B, C or 2C, ...)
        if model_output.shape[1] not in (channels, 2 * channels) or model_output.shape[2:] != x_noisy.shape[2:]:
            raise ValueError(
                f"model returned shape {tuple(model_output.shape)}; expected {channels} or {2 * channels} "
                f"channels and spatial shape {tuple(x_noisy.shape[2:])}"
            )
        network_output = model_output[:, :channels].to(dtype)  # (B, C, ...)
        return c_skip.view(to_x) * x_noisy + c_out.view(to_x) * network_output

    def midpoint_timestep(self) -> float:
        """The model's timestep input at σ = σ_data, the middle of the training noise range:
        c_noise(σ_data) = ln(σ_data) / 4."""
        return math.log(self.sigma_data) / 4.0

    def training_losses(self, model, x0: torch.Tensor, level: torch.Tensor | None = None,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> dict:
        """Per-sample EDM loss, dict(loss=(B,)).

        x0: (B, C, H, W); level: σ (B,), drawn by sample_noise_level when None. mask: which
        elements count (engine.diffusion.loss_mask), e.g. the patch tokens MicroDiT's backbone kept.
        """
        dtype = _compute_dtype(x0)
        x0 = x0.to(dtype)
        batch = x0.shape[0]
        sigma = self.sample_noise_level(batch, device=x0.device) if level is None else level
        sigma = sigma.to(device=x0.device, dtype=dtype)
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
        noise = torch.randn_like(x0) if noise is None else noise.to(dtype)
        to_x = (batch,) + (1,) * (x0.dim() - 1)
        x_noisy = x0 + sigma.view(to_x) * noise  # (B, C, H, W)
        denoised = self.denoise(model, x_noisy, sigma, model_kwargs)  # (B, C, H, W)
        weighted_error = self.loss_weight(sigma).view(to_x) * (denoised - x0) ** 2  # (B, C, H, W)
        return dict(loss=per_sample_mean(weighted_error, mask))
