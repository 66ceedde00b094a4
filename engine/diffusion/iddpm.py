"""IDDPM: the Gaussian diffusion PixArt-α trains with (Nichol & Dhariwal 2021, "improved DDPM").

1000 steps of a linear β schedule, ε-prediction, and a learned-range variance: the model's
extra output channels v ∈ [-1, 1] interpolate the log-variance of each reverse step between
log β_t (upper bound) and log β̃_t, the true posterior variance (lower bound). The loss is
MSE(ε, ε̂) plus the variational bound in bits, with the predicted mean detached in the bound
so that only the variance learns from it.

Schedule tables are built in float64 (the ᾱ_t cumulative product loses ~1e-6 relative in
float32 over 1000 steps); losses are computed in float32 even when the model emits bf16,
or in float64 when the inputs are float64 (which is how the tests check them).
"""

from __future__ import annotations

import math

import torch

from engine.diffusion.loss_mask import per_sample_mean

_LN2 = math.log(2.0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 / fp16 inputs are lifted to fp32; fp64 stays fp64.
    return torch.promote_types(x.dtype, torch.float32)


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) in nats."""
    return 0.5 * (
        log_var2 - log_var1 - 1.0 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Φ that ADM (after PixelCNN++) uses for the decoder; kept so the
    # t = 0 term matches the official PixArt loss. Its absolute error is below 2e-4.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x0, mean, log_scale) -> torch.Tensor:
    """Elementwise log-probability of x0 under N(mean, e^(2 log_scale)) discretised to 256 bins on [-1, 1].

    The outermost bins extend to ±infinity. This is the decoder term of the bound at t = 0; it
    assumes pixel-like data in [-1, 1] and the official code applies it to latents unchanged.
    """
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scale)
    centred = x0 - mean
    cdf_upper = _approx_standard_normal_cdf(inv_std * (centred + half_bin))
    cdf_lower = _approx_standard_normal_cdf(inv_std * (centred - half_bin))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(
        x0 < -0.999, log_cdf_upper, torch.where(x0 > 0.999, log_one_minus_cdf_lower, log_bin_mass)
    )


class GaussianDiffusion:
    """IDDPM with a linear β schedule, ε-prediction and (optionally) a learned-range variance.

    ``beta_start`` / ``beta_end`` are the values for 1000 steps; other step counts scale them by
    1000 / num_timesteps, as ADM's ``get_named_beta_schedule("linear")`` does, so the total noise
    stays comparable. The scaled values are kept in ``self.beta_start`` / ``self.beta_end``.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 learn_sigma: bool = True):
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        scale = 1000.0 / num_timesteps
        if not 0.0 < beta_start * scale <= beta_end * scale < 1.0:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1 after scaling by 1000/num_timesteps = {scale}; "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        self.num_timesteps = num_timesteps
        self.beta_start = beta_start * scale
        self.beta_end = beta_end * scale
        self.learn_sigma = learn_sigma
        # ADM's RESCALED_MSE factor on the bound; 1.0 at 1000 steps (PixArt), written out so a
        # different step count does not silently change the balance between the two terms.
        self.vlb_scale = num_timesteps / 1000.0

        f64 = torch.float64
        betas = torch.linspace(self.beta_start, self.beta_end, num_timesteps, dtype=f64)  # (T,)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=f64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.log_betas = torch.log(betas)
        self.sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1.0)
        self.posterior_variance = posterior_variance
        # β̃_0 = 0; its log is replaced by log β̃_1 so the learned range stays finite at t = 0.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        )
        self.posterior_mean_coef_x0 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef_xt = (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)
        # ADM's "fixed large" variance for models without a learned one: β_t, with β̃_1 at t = 0.
        self.fixed_log_variance = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))
        self._tables_on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps t (B,), shaped (B, 1, ..., 1) to broadcast against x, in x's dtype."""
        key = (name, t.device)
        table = self._tables_on_device.get(key)
        if table is None:  # one host-to-device copy per table and device, not one per step
            table = self._tables_on_device[key] = getattr(self, name).to(t.device)
        return table[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def _check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"t must be an int32/int64 tensor of timestep indices, got {got}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}")

    def sample_noise_level(self, batch: int, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform timesteps in [0, num_timesteps), (batch,) int64 on ``device``."""
        draw_on = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=draw_on)
        return t.to(device) if device is not None else t

    def midpoint_timestep(self) -> int:
        """The timestep in the middle of the schedule (500 of 1000)."""
        return self.num_timesteps // 2

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
        self._check_timesteps(t, x0)
        x0 = x0.to(_compute_dtype(x0))
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.dtype)
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0).

        The mean has x0's shape; variance and log-variance are (B, 1, ..., 1) and broadcast.
        """
        self._check_timesteps(t, x_t)
        dtype = torch.promote_types(_compute_dtype(x0), _compute_dtype(x_t))
        x0, x_t = x0.to(dtype), x_t.to(dtype)
        mean = self._at("posterior_mean_coef_x0", t, x0) * x0 + self._at("posterior_mean_coef_xt", t, x0) * x_t
        variance = self._at("posterior_variance", t, x0)
        log_variance = self._at("posterior_log_variance_clipped", t, x0)
        return mean, variance, log_variance

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """Reverse step p(x_{t-1} | x_t) from the raw model output.

        model_output: (B, 2C, ...) = [ε̂, v] with learn_sigma, else (B, C, ...) = ε̂.
        Returns mean, variance, log_variance (x_t's shape) and pred_x0.
        """
        self._check_timesteps(t, x_t)
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != expected:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)}; expected {expected} channels for "
                f"x_t of shape {tuple(x_t.shape)} with learn_sigma={self.learn_sigma}"
            )
        dtype = torch.promote_types(_compute_dtype(model_output), _compute_dtype(x_t))
        x_t = x_t.to(dtype)
        model_output = model_output.to(dtype)
        eps = model_output[:, :channels]  # (B, C, ...)
        if self.learn_sigma:
            frac = (model_output[:, channels:] + 1.0) / 2.0  # (B, C, ...)
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("log_betas", t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            log_variance = self._at("fixed_log_variance", t, x_t).expand_as(x_t)
        pred_x0 = (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                   - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_x0=pred_x0)

    def _vlb_bits(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One term of the variational bound per sample, in bits per (counted) dimension, (B,)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        pred = self.p_mean_variance(model_output, x_t, t)
        kl = per_sample_mean(normal_kl(true_mean, true_log_variance, pred["mean"], pred["log_variance"]), mask) / _LN2
        decoder_nll = -per_sample_mean(
            discretized_gaussian_log_likelihood(x0, pred["mean"], 0.5 * pred["log_variance"]), mask
        ) / _LN2
        return torch.where(t == 0, decoder_nll, kl)  # (B,)

    def training_losses(self, model, x0: torch.Tensor, level: torch.Tensor | None = None,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> dict:
        """Per-sample losses: ``loss`` = ``mse`` (+ ``vb`` when the variance is learned), each (B,).

        level: timesteps t (B,) int, drawn by sample_noise_level when None. The model is called as
        ``model(x_t, t, **model_kwargs)`` with x_t in fp32 (fp64 for fp64 x0). mask: which elements
        count (engine.diffusion.loss_mask); both terms average over those only.
        """
        t = self.sample_noise_level(x0.shape[0], device=x0.device) if level is None else level
        self._check_timesteps(t, x0)
        x0 = x0.to(_compute_dtype(x0))
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.dtype)
        x_t = self.q_sample(x0, t, noise)  # (B, C, H, W)
        model_output = model(x_t, t, **(model_kwargs or {}))  # (B, 2C or C, H, W)
        channels = x0.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[:2] != (x0.shape[0], expected) or model_output.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"model returned shape {tuple(model_output.shape)}; expected "
                f"{(x0.shape[0], expected, *x0.shape[2:])} (learn_sigma={self.learn_sigma})"
            )
        model_output = model_output.to(x0.dtype)
        eps_pred = model_output[:, :channels]  # (B, C, H, W)
        mse = per_sample_mean((noise - eps_pred) ** 2, mask)  # (B,)
        if not self.learn_sigma:
            return dict(loss=mse, mse=mse)
        # The bound sees the mean through a detached ε̂: the mean is trained by the MSE alone and
        # the bound only shapes the variance (improved DDPM's L_hybrid).
        frozen_mean_output = torch.cat([eps_pred.detach(), model_output[:, channels:]], dim=1)
        vb = self._vlb_bits(frozen_mean_output, x0, x_t, t, mask) * self.vlb_scale  # (B,)
        return dict(loss=mse + vb, mse=mse, vb=vb)
