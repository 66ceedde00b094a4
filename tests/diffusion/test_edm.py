"""EDM preconditioning and loss against the formulas of Karras et al. 2022, computed here in float64."""

import math

import pytest
import torch

from engine.diffusion import EDM

SIGMA_DATA = 0.5


class Recorder(torch.nn.Module):
    """Returns fn(x, t); records the inputs it saw."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, **kwargs):
        self.seen_x, self.seen_t, self.seen_kwargs = x, t, kwargs
        return self.fn(x, t)


def test_preconditioning_coefficients_and_identities():
    edm = EDM(sigma_data=SIGMA_DATA)
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), rel=1e-14)
        assert c_out[i].item() == pytest.approx(s * SIGMA_DATA / math.sqrt(s**2 + SIGMA_DATA**2), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + SIGMA_DATA**2), rel=1e-14)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-14)
    # λ c_out² = 1: the network's effective target has unit weight at every σ.
    torch.testing.assert_close(edm.loss_weight(sigma) * c_out**2, torch.ones_like(sigma), rtol=1e-13, atol=0)
    # c_skip minimises the variance of the target (x0 - c_skip x_noisy) / c_out, which is then 1.
    target_var = ((1 - c_skip) ** 2 * SIGMA_DATA**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(sigma), rtol=1e-12, atol=0)


def test_network_input_has_unit_variance():
    edm = EDM(sigma_data=SIGMA_DATA)
    x0 = torch.randn(4, 20000, 1, 1, dtype=torch.float64) * SIGMA_DATA
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)
    x_noisy = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, dtype=torch.float64)
    model = Recorder(lambda x, t: torch.zeros_like(x))
    edm.denoise(model, x_noisy, sigma, dict(labels=1))
    assert model.seen_kwargs == dict(labels=1)
    torch.testing.assert_close(model.seen_t, torch.log(sigma) / 4, rtol=1e-14, atol=0)
    stds = model.seen_x.std(dim=(1, 2, 3))
    torch.testing.assert_close(stds, torch.ones_like(stds), rtol=0.03, atol=0)


def test_oracle_network_gives_zero_loss():
    edm = EDM(sigma_data=SIGMA_DATA)
    x0 = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    noise = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.3, 20.0], dtype=torch.float64)

    def exact_network(x_in, c_noise):
        s = torch.exp(4 * c_noise).view(-1, 1, 1, 1)
        x_noisy = x_in * torch.sqrt(s**2 + SIGMA_DATA**2)
        c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
        c_out = s * SIGMA_DATA / torch.sqrt(s**2 + SIGMA_DATA**2)
        return (x0 - c_skip * x_noisy) / c_out

    loss = edm.training_losses(Recorder(exact_network), x0, noise=noise, level=sigma)["loss"]
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=1e-20)


def test_loss_weighting_with_zero_network():
    edm = EDM(sigma_data=SIGMA_DATA)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.9, 7.0], dtype=torch.float64)
    loss = edm.training_losses(Recorder(lambda x, t: torch.zeros_like(x)), x0, noise=noise, level=sigma)["loss"]
    for i, s in enumerate(sigma.tolist()):
        # F = 0 leaves D = c_skip x_noisy; λ(σ) = (σ² + σ_d²) / (σ σ_d)².
        denoised = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2) * (x0[i] + s * noise[i])
        expected = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2 * ((denoised - x0[i]) ** 2).mean()
        assert loss[i].item() == pytest.approx(expected.item(), rel=1e-12)


def test_learned_variance_channels_are_ignored():
    edm = EDM()
    x0 = torch.randn(2, 3, 4, 4)
    noise, sigma = torch.randn(2, 3, 4, 4), torch.tensor([0.4, 2.0])
    eps_part = torch.randn(2, 3, 4, 4)
    losses = [
        edm.training_losses(Recorder(lambda x, t, extra=extra: torch.cat([eps_part, extra], 1)), x0,
                            noise=noise, level=sigma)["loss"]
        for extra in (torch.zeros(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    ]
    assert torch.equal(losses[0], losses[1])
    c_only = edm.training_losses(Recorder(lambda x, t: eps_part), x0, noise=noise, level=sigma)["loss"]
    assert torch.equal(losses[0], c_only)
    with pytest.raises(ValueError, match="channels"):
        edm.training_losses(Recorder(lambda x, t: torch.zeros(2, 5, 4, 4)), x0, noise=noise, level=sigma)


def _loss_with(edm, network_output, x0, noise, sigma, mask):
    return edm.training_losses(Recorder(lambda x, t: network_output), x0, noise=noise, level=sigma, mask=mask)["loss"]


@pytest.mark.parametrize("mask_kind", ["pixel", "channel", "token"])
def test_mask_restricts_and_normalises_the_loss(mask_kind):
    edm = EDM()
    batch, channels, size, patch = 2, 3, 8, 2
    x0 = torch.randn(batch, channels, size, size, dtype=torch.float64)
    noise = torch.randn(batch, channels, size, size, dtype=torch.float64)
    sigma = torch.tensor([0.3, 3.0], dtype=torch.float64)
    output = torch.randn(batch, channels, size, size, dtype=torch.float64)

    tokens = (size // patch) ** 2
    token_keep = (torch.rand(batch, tokens) < 0.25).double()
    token_keep[:, 0] = 1.0  # at least one kept patch per sample
    # Pixel-level view of the token mask, built independently with repeat_interleave.
    pixel_keep = token_keep.view(batch, 1, size // patch, size // patch)
    pixel_keep = pixel_keep.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    mask = dict(token=token_keep, pixel=pixel_keep, channel=pixel_keep.expand(-1, channels, -1, -1))[mask_kind]

    loss = _loss_with(edm, output, x0, noise, sigma, mask)
    # Per-element weighted error computed by hand, averaged over kept elements only.
    full = pixel_keep.expand(-1, channels, -1, -1)
    c_skip, c_out, _, _ = edm.preconditioning(sigma)
    denoised = c_skip.view(-1, 1, 1, 1) * (x0 + sigma.view(-1, 1, 1, 1) * noise) + c_out.view(-1, 1, 1, 1) * output
    error = edm.loss_weight(sigma).view(-1, 1, 1, 1) * (denoised - x0) ** 2
    expected = (error * full).sum(dim=(1, 2, 3)) / full.sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)

    changed_outside = output + 10.0 * (1 - full)
    torch.testing.assert_close(_loss_with(edm, changed_outside, x0, noise, sigma, mask), loss, rtol=0, atol=0)
    changed_inside = output + 10.0 * full
    assert (_loss_with(edm, changed_inside, x0, noise, sigma, mask) - loss).abs().min() > 1e-3


def test_bad_masks_are_rejected():
    edm = EDM()
    x0 = torch.randn(2, 3, 8, 8)
    model = Recorder(lambda x, t: torch.zeros_like(x))
    for mask in (torch.ones(2, 2, 8, 8), torch.ones(2, 15), torch.ones(3, 16), torch.ones(2, 8, 8)):
        with pytest.raises(ValueError, match="mask"):
            edm.training_losses(model, x0, mask=mask)


def test_sigma_distribution_is_log_normal():
    edm = EDM(p_mean=-1.2, p_std=1.2)
    seed = int(torch.randint(2**31, ()))
    sigma = edm.sample_noise_level(40000, torch.Generator().manual_seed(seed), "cpu")
    assert sigma.shape == (40000,) and (sigma > 0).all()
    log_sigma = sigma.double().log()
    assert abs(log_sigma.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(40000)
    assert abs(log_sigma.std().item() / 1.2 - 1) < 5 * math.sqrt(1 / (2 * 40000))
    assert torch.equal(sigma, edm.sample_noise_level(40000, torch.Generator().manual_seed(seed), "cpu"))


def test_default_draws_and_dtype():
    edm = EDM()
    model = Recorder(lambda x, t: torch.zeros_like(x).bfloat16())
    loss = edm.training_losses(model, torch.randn(4, 3, 4, 4).bfloat16())["loss"]
    assert loss.dtype == torch.float32 and loss.shape == (4,) and torch.isfinite(loss).all()
    assert model.seen_x.dtype == torch.float32 and model.seen_t.shape == (4,)


@pytest.mark.parametrize("bad", [dict(sigma_data=0.0), dict(p_std=-1.0)])
def test_bad_arguments_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EDM(**bad)
