"""IDDPM schedule, posterior, learned-range variance and training loss against independent references."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from engine.diffusion import GaussianDiffusion

T = 1000


def reference_schedule(num_timesteps=T, beta_start=1e-4, beta_end=0.02):
    """β, α and ᾱ in float64 numpy; ᾱ as exp(Σ log α), a different route than a running product."""
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.exp(np.cumsum(np.log(alphas)))
    return betas, alphas, alphas_cumprod


def bayes_posterior(x0, x_t, t):
    """q(x_{t-1} | x_t, x0) for t >= 1 from the product of the two Gaussians (precision form)."""
    betas, alphas, abar = reference_schedule()
    abar_prev = abar[t - 1]
    precision = alphas[t] / betas[t] + 1.0 / (1.0 - abar_prev)
    variance = 1.0 / precision
    mean = variance * (math.sqrt(alphas[t]) / betas[t] * x_t + math.sqrt(abar_prev) / (1.0 - abar_prev) * x0)
    return mean, variance


def test_schedule_matches_float64_closed_form():
    diffusion = GaussianDiffusion()
    betas, _, abar = reference_schedule()
    assert diffusion.betas.dtype == torch.float64
    np.testing.assert_allclose(diffusion.betas.numpy(), betas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), abar, rtol=1e-12, atol=1e-15)


def test_schedule_matches_diffusers_ddpm_to_its_float32_precision():
    # diffusers builds its β with a float32 linspace, so agreement is limited to float32 rounding:
    # measured 1.4e-9 absolute on β and 3.6e-7 relative on ᾱ.
    diffusion = GaussianDiffusion()
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    np.testing.assert_allclose(diffusion.betas.numpy(), scheduler.betas.double().numpy(), rtol=0, atol=3e-9)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), scheduler.alphas_cumprod.double().numpy(),
                               rtol=2e-6, atol=0)


def test_schedule_is_scaled_for_other_step_counts():
    diffusion = GaussianDiffusion(num_timesteps=250)
    np.testing.assert_allclose(diffusion.betas[[0, -1]].numpy(), [4e-4, 0.08], rtol=1e-12)


@pytest.mark.parametrize("bad", [dict(num_timesteps=1), dict(num_timesteps=10.0), dict(beta_start=0.0),
                                 dict(beta_start=0.03), dict(beta_end=1.5)])
def test_bad_schedule_arguments_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        GaussianDiffusion(**bad)


def test_q_sample_exact_and_statistics():
    diffusion = GaussianDiffusion()
    _, _, abar = reference_schedule()
    t = torch.tensor([0, 3, 499, 999])
    x0 = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    expected = torch.stack([math.sqrt(abar[s]) * x0[i] + math.sqrt(1 - abar[s]) * noise[i] for i, s in enumerate(t)])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected, rtol=1e-12, atol=1e-12)

    # Statistics of the internally drawn noise: x_t ~ N(sqrt(ᾱ) x0, 1 - ᾱ) per timestep.
    samples = 20000
    x0_const = torch.full((4, samples), 0.7, dtype=torch.float64)
    x_t = diffusion.q_sample(x0_const, t)  # (4, samples)
    for i, s in enumerate(t.tolist()):
        std = math.sqrt(1 - abar[s])
        assert abs(x_t[i].mean().item() - math.sqrt(abar[s]) * 0.7) < 5 * std / math.sqrt(samples)
        assert abs(x_t[i].var().item() / std**2 - 1) < 5 * math.sqrt(2 / samples)


def test_posterior_mean_variance_matches_bayes_rule():
    diffusion = GaussianDiffusion()
    t = torch.tensor([1, 2, 57, 500, 999])
    x0 = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    x_t = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    for i, s in enumerate(t.tolist()):
        ref_mean, ref_var = bayes_posterior(x0[i], x_t[i], s)
        torch.testing.assert_close(mean[i], ref_mean, rtol=1e-10, atol=1e-12)
        assert variance[i].item() == pytest.approx(ref_var, rel=1e-10)
        assert log_variance[i].item() == pytest.approx(math.log(ref_var), rel=1e-10)

    # t = 0: the posterior collapses onto x0, and the log-variance is clipped to log β̃_1.
    zero = torch.zeros(1, dtype=torch.long)
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], x_t[:1], zero)
    torch.testing.assert_close(mean0, x0[:1], rtol=1e-12, atol=1e-12)
    assert var0.item() == 0.0
    assert log_var0.item() == pytest.approx(math.log(bayes_posterior(0.0, 0.0, 1)[1]), rel=1e-10)


def _reference_learned_log_variance(v, t):
    """Learned-range log-variance from the closed form: interpolate log β_t and log β̃_t (β̃_1 at t = 0)."""
    betas, _, _ = reference_schedule()
    posterior_var = bayes_posterior(0.0, 0.0, max(t, 1))[1]
    frac = (v + 1) / 2
    return frac * math.log(betas[t]) + (1 - frac) * math.log(posterior_var)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_learned_range_variance_matches_diffusers(t):
    diffusion = GaussianDiffusion()
    v = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = diffusion.p_mean_variance(torch.cat([eps, v], dim=1), x_t, torch.full((2,), t))

    # diffusers' "learned_range" returns the log-variance, built from its own float32 schedule.
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", variance_type="learned_range")
    diffusers_log_var = scheduler._get_variance(t, predicted_variance=v).double()
    # 1 - ᾱ cancels in float32 at small t: measured up to 3.1e-5 relative at t = 10.
    torch.testing.assert_close(out["log_variance"], diffusers_log_var, rtol=1e-4, atol=0)

    # The same diffusers formula on a float64 ᾱ pins the interpolation itself to 1e-12.
    _, _, abar = reference_schedule()
    scheduler.alphas_cumprod = torch.from_numpy(abar)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(out["log_variance"], scheduler._get_variance(t, predicted_variance=v),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["variance"], torch.exp(out["log_variance"]))

    # Mean: DDPM's μ = (x_t - β_t / sqrt(1 - ᾱ_t) ε̂) / sqrt(α_t), a different parametrisation.
    betas, alphas, _ = reference_schedule()
    ref_mean = (x_t - betas[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(alphas[t])
    torch.testing.assert_close(out["mean"], ref_mean, rtol=1e-10, atol=1e-10)
    ref_x0 = (x_t - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
    torch.testing.assert_close(out["pred_x0"], ref_x0, rtol=1e-10, atol=1e-10)


def test_learned_range_at_t0_uses_clipped_posterior_variance():
    diffusion = GaussianDiffusion()
    v = torch.linspace(-1, 1, 8, dtype=torch.float64).view(1, 2, 2, 2)
    out = diffusion.p_mean_variance(torch.cat([torch.zeros_like(v), v], 1), torch.zeros_like(v),
                                    torch.zeros(1, dtype=torch.long))
    expected = torch.tensor([_reference_learned_log_variance(x, 0) for x in v.flatten().tolist()], dtype=torch.float64)
    torch.testing.assert_close(out["log_variance"].flatten(), expected, rtol=1e-12, atol=1e-12)


def test_fixed_variance_without_learn_sigma():
    diffusion = GaussianDiffusion(learn_sigma=False)
    betas, _, _ = reference_schedule()
    x_t = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    out = diffusion.p_mean_variance(torch.zeros_like(x_t), x_t, torch.tensor([0, 700]))
    assert out["variance"][0].flatten()[0].item() == pytest.approx(bayes_posterior(0.0, 0.0, 1)[1], rel=1e-12)
    assert out["variance"][1].flatten()[0].item() == pytest.approx(betas[700], rel=1e-12)
    with pytest.raises(ValueError, match="channels"):
        diffusion.p_mean_variance(torch.zeros(2, 2, 2, 2), x_t, torch.tensor([0, 700]))


class FixedOutput(torch.nn.Module):
    """Returns a given tensor whatever the input; records the timesteps it was called with."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t, **kwargs):
        self.seen_t = t
        self.seen_kwargs = kwargs
        return self.output


def _log_normal_cdf_bin(x0, mean, log_var):
    """Exact discretised Gaussian log-likelihood on 256 bins of [-1, 1] (edge bins open), float64."""
    std = torch.exp(0.5 * log_var)
    upper = torch.special.ndtr((x0 - mean + 1 / 255) / std)
    lower = torch.special.ndtr((x0 - mean - 1 / 255) / std)
    mass = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    return torch.log(mass.clamp(min=1e-12))


def test_training_losses_match_independent_mse_and_bound():
    diffusion = GaussianDiffusion()
    betas, alphas, abar = reference_schedule()
    batch, channels = 5, 3
    t = torch.tensor([1, 7, 250, 999, 0])
    x0 = torch.rand(batch, channels, 4, 4, dtype=torch.float64) * 1.8 - 0.9
    x0[4, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # edge bins of the decoder
    noise = torch.randn(batch, channels, 4, 4, dtype=torch.float64)
    eps_pred = noise + 0.1 * torch.randn(batch, channels, 4, 4, dtype=torch.float64)
    v = torch.rand(batch, channels, 4, 4, dtype=torch.float64) * 2 - 1
    model = FixedOutput(torch.cat([eps_pred, v], dim=1))
    terms = diffusion.training_losses(model, x0, t, model_kwargs=dict(caption="c"), noise=noise)
    assert torch.equal(model.seen_t, t) and model.seen_kwargs == dict(caption="c")

    torch.testing.assert_close(terms["mse"], ((noise - eps_pred) ** 2).mean(dim=(1, 2, 3)), rtol=1e-12, atol=1e-12)
    for i, s in enumerate(t.tolist()):
        x_t = math.sqrt(abar[s]) * x0[i] + math.sqrt(1 - abar[s]) * noise[i]
        pred_mean = (x_t - betas[s] / math.sqrt(1 - abar[s]) * eps_pred[i]) / math.sqrt(alphas[s])
        pred_log_var = torch.tensor([_reference_learned_log_variance(x, s) for x in v[i].flatten().tolist()],
                                    dtype=torch.float64).view_as(v[i])
        if s == 0:
            nll = -_log_normal_cdf_bin(x0[i], pred_mean, pred_log_var).mean() / math.log(2)
            # The implementation uses ADM's tanh approximation of Φ (abs. error < 2e-4).
            assert terms["vb"][i].item() == pytest.approx(nll.item(), rel=5e-3)
        else:
            true_mean, true_var = bayes_posterior(x0[i], x_t, s)
            pred_var = torch.exp(pred_log_var)
            kl = 0.5 * (torch.log(pred_var / true_var) + (true_var + (true_mean - pred_mean) ** 2) / pred_var - 1)
            assert terms["vb"][i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-9)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"], rtol=0, atol=0)


def test_exact_prediction_gives_zero_mse_and_zero_kl():
    diffusion = GaussianDiffusion()
    _, _, abar = reference_schedule()
    t = torch.tensor([3, 600])
    x0 = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn(2, 2, 3, 3, dtype=torch.float64)

    def oracle(x_t, t_in):
        sqrt_abar = torch.tensor(np.sqrt(abar[t_in.numpy()])).view(-1, 1, 1, 1)
        eps = (x_t - sqrt_abar * x0) / torch.sqrt(1 - sqrt_abar**2)
        # v = -1 selects the lower end of the range, the true posterior variance β̃_t (t >= 1).
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    terms = diffusion.training_losses(oracle, x0, t, noise=noise)
    torch.testing.assert_close(terms["mse"], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-20)
    torch.testing.assert_close(terms["vb"], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [0, 321])
def test_bound_trains_only_the_variance_channels(t):
    diffusion = GaussianDiffusion()
    x0 = torch.randn(2, 3, 4, 4)
    output = (torch.randn(2, 6, 4, 4) * 0.5).requires_grad_()
    terms = diffusion.training_losses(FixedOutput(output), x0, torch.full((2,), t))
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.count_nonzero(vb_grad[:, :3]) == 0
    assert torch.count_nonzero(vb_grad[:, 3:]) == vb_grad[:, 3:].numel()
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert torch.count_nonzero(mse_grad[:, 3:]) == 0
    assert torch.count_nonzero(mse_grad[:, :3]) > 0


def test_bf16_model_output_gives_fp32_loss():
    diffusion = GaussianDiffusion()
    x0 = (torch.rand(3, 4, 4, 4) * 1.8 - 0.9).bfloat16()
    noise = torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 10, 900])
    # A realistic prediction (ε̂ near ε): far-off means at t = 0 put x0 in the decoder's tail, where
    # the bin mass is a difference of two CDFs near 1 and float32 keeps only a few digits of it.
    eps_pred = noise + 0.1 * torch.randn(3, 4, 4, 4)
    output_bf16 = torch.cat([eps_pred, torch.rand(3, 4, 4, 4) * 2 - 1], dim=1).bfloat16()
    terms = diffusion.training_losses(FixedOutput(output_bf16), x0, t, noise=noise)
    assert all(value.dtype == torch.float32 for value in terms.values())
    reference = diffusion.training_losses(FixedOutput(output_bf16.double()), x0.double(), t, noise=noise.double())
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(terms[key].double(), reference[key], rtol=1e-5, atol=1e-5)


def test_without_learned_sigma_there_is_no_bound():
    diffusion = GaussianDiffusion(learn_sigma=False)
    x0 = torch.randn(2, 3, 4, 4)
    terms = diffusion.training_losses(FixedOutput(torch.zeros(2, 3, 4, 4)), x0, torch.tensor([1, 2]))
    assert set(terms) == {"loss", "mse"}
    with pytest.raises(ValueError, match="learn_sigma=False"):
        diffusion.training_losses(FixedOutput(torch.zeros(2, 6, 4, 4)), x0, torch.tensor([1, 2]))


def test_timestep_validation():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="t must be"):
        diffusion.q_sample(x0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        diffusion.q_sample(x0, torch.tensor([1, 2, 3]))


def test_sample_noise_level_uniform_and_reproducible():
    diffusion = GaussianDiffusion()
    seed = int(torch.randint(2**31, ()))
    t = diffusion.sample_noise_level(50000, torch.Generator().manual_seed(seed), "cpu")
    assert t.dtype == torch.int64 and t.shape == (50000,)
    assert t.min() >= 0 and t.max() <= T - 1
    counts = torch.bincount(t // 100, minlength=10).double()  # 10 bins of 100 timesteps
    chi2 = ((counts - 5000) ** 2 / 5000).sum().item()
    assert chi2 < 45  # 9 degrees of freedom: P(chi2 > 45) ≈ 1e-6
    again = diffusion.sample_noise_level(50000, torch.Generator().manual_seed(seed), "cpu")
    assert torch.equal(t, again)


def _kept_patches(x: torch.Tensor, keep: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) and a (N,) 0/1 token mask -> (1, C, patch, patch * kept) with the kept patches side by side."""
    cols = x.shape[2] // patch
    pieces = [x[:, (n // cols) * patch:(n // cols + 1) * patch, (n % cols) * patch:(n % cols + 1) * patch]
              for n in torch.nonzero(keep).flatten().tolist()]
    return torch.cat(pieces, dim=2).unsqueeze(0)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_token_mask_counts_only_kept_patches(learn_sigma):
    """The masked loss of each sample equals the unmasked loss of its kept patches alone (every
    term is a mean of per-element values), for the decoder term (t = 0) and the KL (t > 0)."""
    diffusion = GaussianDiffusion(learn_sigma=learn_sigma)
    batch, channels, size, patch = 2, 3, 8, 2
    t = torch.tensor([0, 321])
    x0 = torch.rand(batch, channels, size, size, dtype=torch.float64) * 1.8 - 0.9
    noise = torch.randn(batch, channels, size, size, dtype=torch.float64)
    output = torch.randn(batch, channels * (2 if learn_sigma else 1), size, size, dtype=torch.float64).clamp(-1, 1)
    keep = (torch.rand(batch, (size // patch) ** 2) < 0.4).double()
    keep[:, 3] = 1.0  # at least one kept patch per sample
    terms = diffusion.training_losses(FixedOutput(output), x0, t, noise=noise, mask=keep)
    for i in range(batch):
        alone = diffusion.training_losses(FixedOutput(_kept_patches(output[i], keep[i], patch)),
                                          _kept_patches(x0[i], keep[i], patch), t[i:i + 1],
                                          noise=_kept_patches(noise[i], keep[i], patch))
        for name in terms:
            torch.testing.assert_close(terms[name][i:i + 1], alone[name], rtol=1e-12, atol=1e-12, msg=name)
    unmasked = diffusion.training_losses(FixedOutput(output), x0, t, noise=noise)["loss"]
    assert (unmasked - terms["loss"]).abs().min() > 1e-6  # the mask changes the loss


def test_midpoint_timestep_and_default_levels():
    assert GaussianDiffusion().midpoint_timestep() == 500
    assert GaussianDiffusion(num_timesteps=100).midpoint_timestep() == 50
    terms = GaussianDiffusion().training_losses(FixedOutput(torch.zeros(3, 4, 2, 2)), torch.zeros(3, 2, 2, 2))
    assert terms["loss"].shape == (3,)  # timesteps drawn when not given
