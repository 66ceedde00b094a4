"""Sampling through diffusers' schedulers: oracle convergence, guidance arithmetic, kwargs plumbing."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from engine.diffusion import (GaussianDiffusion, guided_eps, make_scheduler, null_caption_kwargs, null_class_kwargs,
                              sample)

# ᾱ in float64, computed here rather than taken from the code under test.
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def _abar(t, like):
    return torch.tensor(ALPHAS_CUMPROD[t.long().cpu().numpy()], dtype=like.dtype).view(-1, 1, 1, 1)


class PointOracle(torch.nn.Module):
    """Exact ε for data concentrated on one point x0*: ε = (x_t - sqrt(ᾱ_t) x0*) / sqrt(1 - ᾱ_t).

    Emits 2C channels (the second half garbage) like a learned-variance model.
    """

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x, t, labels):
        abar = _abar(t, x)
        target = self.target.repeat(x.shape[0] // self.target.shape[0], 1, 1, 1)  # both CFG halves
        eps = (x - abar.sqrt() * target) / (1 - abar).sqrt()
        return torch.cat([eps, torch.full_like(eps, 123.0)], dim=1)


class GaussianOracle(torch.nn.Module):
    """Exact ε = E[ε | x_t] for data x0 ~ N(mean, std²) elementwise."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels):
        abar = _abar(t, x)
        marginal_var = abar * self.std**2 + 1 - abar
        return (1 - abar).sqrt() * (x - abar.sqrt() * self.mean) / marginal_var


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_point_oracle_converges_to_its_point(scheduler, guidance_scale):
    target = torch.randn(3, 4, 6, 6)
    labels = dict(labels=torch.tensor([1, 2, 3]))
    null = dict(labels=torch.tensor([9, 9, 9]))
    x0 = sample(PointOracle(target), (3, 4, 6, 6), labels, null, guidance_scale=guidance_scale, steps=20,
                scheduler=scheduler)
    assert x0.shape == target.shape and x0.dtype == torch.float32
    torch.testing.assert_close(x0, target, rtol=0, atol=1e-4)  # measured 1.9e-6


GAUSSIAN_MEAN = 0.5
GAUSSIAN_SHAPE = (16, 4, 16, 16)


def _sample_gaussian(scheduler):
    """Sample the unit-variance Gaussian oracle; also return the initial noise x_T that sample() drew."""
    seed = int(torch.randint(2**31, ()))
    labels = dict(labels=torch.zeros(GAUSSIAN_SHAPE[0], dtype=torch.long))
    x0 = sample(GaussianOracle(GAUSSIAN_MEAN, 1.0), GAUSSIAN_SHAPE, labels, labels, guidance_scale=1.0, steps=20,
                scheduler=scheduler, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_T = torch.randn(GAUSSIAN_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x0, x_T


def test_dpm_follows_the_exact_probability_flow_of_gaussian_data():
    # For x0 ~ N(m, 1) every marginal has unit variance and the probability-flow ODE only moves
    # the mean: x_t - sqrt(ᾱ_t) m is conserved, so x0 = m + x_T - sqrt(ᾱ_999) m exactly.
    # DPM-Solver++ 2M in 20 steps tracks it (measured max error 1.7e-3).
    x0, x_T = _sample_gaussian("dpm")
    exact = GAUSSIAN_MEAN + x_T - math.sqrt(ALPHAS_CUMPROD[999]) * GAUSSIAN_MEAN
    torch.testing.assert_close(x0, exact, rtol=0, atol=5e-3)


def test_ddim_matches_its_closed_form_on_gaussian_data():
    # With ᾱ = cos²θ, one DDIM step from t to t' multiplies x_t - sqrt(ᾱ_t) m by cos(θ_t - θ_t')
    # for this data (first-order error: it contracts where the exact flow conserves).
    # Trailing spacing, 20 steps: t = 999, 949, ..., 49, and the last step lands on ᾱ = 1.
    x0, x_T = _sample_gaussian("ddim")
    abars = [ALPHAS_CUMPROD[t] for t in range(999, 0, -50)] + [1.0]
    thetas = np.arccos(np.sqrt(abars))
    contraction = np.prod(np.cos(thetas[:-1] - thetas[1:]))
    expected = GAUSSIAN_MEAN + contraction * (x_T - math.sqrt(ALPHAS_CUMPROD[999]) * GAUSSIAN_MEAN)
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-5)


class ConstantPerLabel(torch.nn.Module):
    """DiT-like stand-in: ε̂ = label value everywhere; second half of the channels is garbage."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"num_classes": 10})()
        self.batch_sizes = []

    def forward(self, x, t, labels):
        self.batch_sizes.append(x.shape[0])
        self.seen_t = t
        eps = labels.to(x.dtype).view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, torch.full_like(x, -77.0)], dim=1)


@pytest.mark.parametrize("scale", [0.0, 1.0, 4.5])
def test_guidance_combines_cond_and_uncond(scale):
    model = ConstantPerLabel()
    x = torch.randn(3, 2, 4, 4)
    cond = dict(labels=torch.tensor([3, 5, 7]))
    eps = guided_eps(model, x, torch.tensor(500), cond, null_class_kwargs(model, 3), scale)
    expected = 10 + scale * (torch.tensor([3.0, 5.0, 7.0]) - 10)
    torch.testing.assert_close(eps, expected.view(3, 1, 1, 1).expand(3, 2, 4, 4), rtol=1e-6, atol=1e-6)
    assert model.batch_sizes == ([3] if scale == 1.0 else [6])  # one forward, both halves batched
    assert torch.equal(model.seen_t, torch.full((model.batch_sizes[0],), 500))


class CaptionEcho(torch.nn.Module):
    """PixArt-like stand-in that records its kwargs and returns ε̂ = sum of the valid caption tokens."""

    def __init__(self, null_length=7, channels=3):
        super().__init__()
        self.null_caption = torch.nn.Parameter(torch.randn(null_length, channels))

    def forward(self, x, t, caption, caption_lens, resolution=None, aspect_ratio=None):
        self.seen = dict(caption=caption, caption_lens=caption_lens, resolution=resolution)
        valid = torch.arange(caption.shape[1]) < caption_lens[:, None]  # (B, L)
        total = (caption * valid[..., None]).sum(dim=(1, 2))  # (B,)
        return total.view(-1, 1, 1, 1).expand_as(x)


def test_null_caption_is_padded_against_and_micro_conditions_shared():
    model = CaptionEcho()
    cond = dict(caption=torch.randn(2, 5, 3), caption_lens=torch.tensor([5, 2]),
                resolution=torch.tensor([[256.0, 256.0], [512.0, 256.0]]))
    uncond = null_caption_kwargs(model, 2)
    assert uncond["caption"].shape == (2, 7, 3) and uncond["caption_lens"].tolist() == [7, 7]
    eps = guided_eps(model, torch.zeros(2, 1, 2, 2), torch.tensor([10, 20]), cond, uncond, 3.0)

    seen = model.seen
    assert seen["caption"].shape == (4, 7, 3)
    assert torch.equal(seen["caption"][:2, :5], cond["caption"]) and not seen["caption"][:2, 5:].any()
    assert torch.equal(seen["caption"][2:], model.null_caption.detach().expand(2, 7, 3))
    assert seen["caption_lens"].tolist() == [5, 2, 7, 7]
    assert torch.equal(seen["resolution"], cond["resolution"].repeat(2, 1))
    cond_total = torch.stack([cond["caption"][0].sum(), cond["caption"][1, :2].sum()])
    null_total = model.null_caption.detach().sum()
    torch.testing.assert_close(eps[:, 0, 0, 0], null_total + 3.0 * (cond_total - null_total))


def test_unconditional_kwargs_errors():
    with pytest.raises(ValueError, match="null_caption"):
        null_caption_kwargs(ConstantPerLabel(), 2)
    with pytest.raises(ValueError, match="num_classes"):
        null_class_kwargs(CaptionEcho(), 2)
    with pytest.raises(ValueError, match="missing from cond_kwargs"):
        guided_eps(ConstantPerLabel(), torch.zeros(1, 1, 2, 2), torch.tensor(1), dict(labels=torch.tensor([1])),
                   dict(labels=torch.tensor([10]), extra=torch.zeros(1)), 2.0)


def test_sample_with_text_model_is_reproducible():
    model = CaptionEcho(channels=4)
    cond = dict(caption=torch.randn(2, 3, 4) * 0.01, caption_lens=torch.tensor([3, 1]))
    seed = int(torch.randint(2**31, ()))
    draws = [sample(model, (2, 4, 4, 4), cond, null_caption_kwargs(model, 2), steps=3,
                    generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert draws[0].shape == (2, 4, 4, 4) and torch.isfinite(draws[0]).all()
    assert torch.equal(draws[0], draws[1])


def test_make_scheduler_uses_the_training_schedule():
    dpm = make_scheduler("dpm")
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    ddim = make_scheduler("ddim")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.clip_sample is False
    for solver in (dpm, ddim):
        assert solver.config.prediction_type == "epsilon" and solver.config.num_train_timesteps == 1000
        np.testing.assert_allclose(solver.alphas_cumprod.double().numpy(), ALPHAS_CUMPROD, rtol=2e-6)
    scaled = make_scheduler("dpm", GaussianDiffusion(num_timesteps=250))
    assert scaled.config.num_train_timesteps == 250
    assert math.isclose(scaled.config.beta_end, 0.08) and math.isclose(scaled.config.beta_start, 4e-4)


@pytest.mark.parametrize("steps", [0, 1001, 2.5, True])
def test_bad_steps_are_rejected(steps):
    with pytest.raises(ValueError, match="steps"):
        sample(ConstantPerLabel(), (1, 1, 2, 2), dict(labels=torch.tensor([1])), {}, steps=steps)


def test_bad_scheduler_name_is_rejected():
    with pytest.raises(ValueError, match="'euler'"):
        make_scheduler("euler")
    with pytest.raises(ValueError, match="scheduler"):
        sample(ConstantPerLabel(), (1, 1, 2, 2), dict(labels=torch.tensor([1])), {}, scheduler="unipc")


def test_karras_sigmas_are_the_papers_schedule():
    """Karras et al.'s eq. 5 by hand: σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, then 0."""
    from engine.diffusion import karras_sigmas

    sigmas = karras_sigmas(30).tolist()
    want = [(80 ** (1 / 7) + i / 29 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(30)] + [0.0]
    assert len(sigmas) == 31 and sigmas[0] == pytest.approx(80) and sigmas[29] == pytest.approx(0.002)
    assert sigmas == pytest.approx(want, rel=1e-12)


def test_edm_heun_follows_the_exact_probability_flow_of_gaussian_data():
    """Data x0 ~ N(0, s²) per element: the ideal denoiser is D(x; σ) = x s² / (σ² + s²), and the
    probability-flow ODE dx/dσ = (x - D) / σ carries x(σ_max) to x(0) = x(σ_max) s / sqrt(σ_max² + s²)
    exactly. The network returns the F that makes EDM's preconditioned D that denoiser. The sampler
    takes Heun's steps (the scalar recurrence, written out here, at 30 steps), and its error
    against the closed form falls as a second-order method's (steps^-2: 100 -> 300 steps); guidance
    between two equal predictions changes nothing."""
    from engine.diffusion import EDM, karras_sigmas, sample_edm_heun

    s, sigma_data = 0.7, 0.9
    edm = EDM(sigma_data=sigma_data)

    class IdealNetwork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the sampler a device

        def forward(self, x_in, c_noise, **kwargs):
            sigma = torch.exp(4 * c_noise.double()).view(-1, 1, 1, 1)
            c_skip, c_out, c_in, _ = edm.preconditioning(sigma)
            x = x_in.double() / c_in
            return ((x * s**2 / (sigma**2 + s**2) - c_skip * x) / c_out).to(x_in.dtype)

    def heun_by_hand(x, steps):  # Karras et al.'s Algorithm 1 on this D, in float64
        sigmas = karras_sigmas(steps).tolist()
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            slope = x * a / (a**2 + s**2)  # (x - D(x; a)) / a
            moved = x + (b - a) * slope
            if b > 0:
                moved = x + (b - a) * 0.5 * (slope + moved * b / (b**2 + s**2))
            x = moved
        return x

    shape = (3, 4, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7)).double() * 80.0
    exact = x_T * s / math.sqrt(80.0**2 + s**2)
    errors = {}
    for steps, guidance in ((30, 1.0), (30, 5.0), (100, 1.0), (300, 1.0)):
        x0 = sample_edm_heun(IdealNetwork(), shape, {}, {}, guidance_scale=guidance, steps=steps,
                             generator=torch.Generator().manual_seed(7), device="cpu", sigma_data=sigma_data)
        if steps == 30:
            torch.testing.assert_close(x0.double(), heun_by_hand(x_T, 30), rtol=1e-4, atol=1e-5)
        errors[steps] = ((x0.double() - exact).abs().max() / exact.abs().max()).item()
    assert errors[300] < 3e-4 and errors[100] / errors[300] > 7, errors
