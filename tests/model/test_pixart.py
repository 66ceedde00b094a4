import pytest
import torch
import torch.nn as nn

from engine.config import PixArtConfig, preset
from engine.model import PixArt
from engine.model.layers import CrossAttention, Mlp, SelfAttention, sincos_pos_embed, timestep_frequencies
from engine import recompute
from tests.model.helpers import pixart_inputs, randomize


@pytest.mark.parametrize("grid_h,grid_w,base,scale", [(16, 16, 16, 0.5), (6, 10, 8, 1.0), (12, 7, 16, 2.0)])
def test_pos_embed_matches_diffusers(grid_h, grid_w, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(96, (grid_h, grid_w), base_size=base, interpolation_scale=scale, output_type="pt")
    ours = sincos_pos_embed(96, grid_h, grid_w, base, scale)
    torch.testing.assert_close(ours, ref.to(torch.float64), rtol=0, atol=1e-6)


def test_timestep_features_match_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.rand(7) * 1000
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_frequencies(t, 256), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-ms"])
def test_forward_shapes_non_square(name):
    cfg = preset(name)
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, kw = pixart_inputs(cfg, height=6, width=10)
    out = model(x, t, caption, lens, **kw)
    assert out.shape == (3, cfg.out_channels, 6, 10)
    assert torch.isfinite(out).all()


def test_micro_conditions_are_required_and_used():
    cfg = preset("tiny-ms")
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, kw = pixart_inputs(cfg)
    with pytest.raises(ValueError, match="micro_conditions"):
        model(x, t, caption, lens)
    out = model(x, t, caption, lens, **kw)
    kw["aspect_ratio"] = kw["aspect_ratio"] * 2
    assert not torch.allclose(out, model(x, t, caption, lens, **kw))


def test_padded_caption_tokens_are_ignored():
    cfg = preset("tiny")
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, kw = pixart_inputs(cfg, lens=[8, 3, 1])
    out = model(x, t, caption, lens)
    noisy = caption.clone()
    for b, n in enumerate(lens.tolist()):
        noisy[b, n:] = torch.randn_like(noisy[b, n:]) * 10
    torch.testing.assert_close(model(x, t, noisy, lens), out, rtol=0, atol=1e-12)
    # and the valid tokens do matter
    noisy[1, 0] += 1.0
    assert not torch.allclose(model(x, t, noisy, lens)[1], out[1])


def test_empty_caption_is_finite_with_finite_grads():
    cfg = preset("tiny")
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, kw = pixart_inputs(cfg, lens=[0, 4, 8])
    out = model(x, t, caption, lens)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_drop_captions_uses_null_caption():
    cfg = preset("tiny")
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, _ = pixart_inputs(cfg, lens=[2, 3, 4])
    drop = torch.tensor([True, False, True])
    dropped, dropped_lens = model.drop_captions(caption, lens, drop)
    assert torch.equal(dropped[0], model.null_caption.detach()) and torch.equal(dropped[1], caption[1])
    assert dropped_lens.tolist() == [8, 3, 8]


def _count_macs(model, run):
    """Multiply-adds of every Linear plus full attention, counted by hooks while the model runs.
    An Mlp runs its two Linears as one op (their own hooks do not fire), so it counts both."""
    macs = [0]

    def linear_hook(module, inputs, output):
        macs[0] += inputs[0].numel() * module.out_features

    def mlp_hook(module, inputs, output):
        tokens = inputs[0].numel() // module.fc1.in_features
        macs[0] += tokens * (module.fc1.in_features * module.fc1.out_features
                             + module.fc2.in_features * module.fc2.out_features)

    def self_attn_hook(module, inputs, output):
        B, N, D = inputs[0].shape
        macs[0] += 2 * B * N * N * D

    def cross_attn_hook(module, inputs, output):
        B, N, D = inputs[0].shape
        macs[0] += 2 * B * N * inputs[1].shape[1] * D

    hooks = []
    for module in model.modules():
        hook = linear_hook if isinstance(module, nn.Linear) else \
            {SelfAttention: self_attn_hook, CrossAttention: cross_attn_hook, Mlp: mlp_hook}.get(type(module))
        if hook:
            hooks.append(module.register_forward_hook(hook))
    run()
    for h in hooks:
        h.remove()
    return macs[0]


@pytest.mark.parametrize("name,height,width", [("tiny", 64, 64), ("tiny-ms", 48, 80)])
def test_flops_per_sample_matches_counted_macs(name, height, width):
    cfg = preset(name)
    model = PixArt(cfg).double()
    x, t, caption, lens, kw = pixart_inputs(cfg, batch=2, height=height // 8, width=width // 8)
    macs = _count_macs(model, lambda: model(x, t, caption, lens, **kw))
    assert model.flops_per_sample(height, width, cfg.text_len) == pytest.approx(3 * 2 * macs / 2, rel=1e-12)


def test_flops_per_sample_pixart_xl2_256():
    with torch.device("meta"):
        model = PixArt(preset("pixart-xl2", 256))
    # docs/design.md §10: about 0.894 TFLOP per training sample at 256px with 120 tokens
    assert model.flops_per_sample(256, 256, 120) == pytest.approx(0.894e12, rel=1e-3)


def test_activation_checkpointing_same_grads_and_recomputes():
    cfg = preset("tiny")
    model = randomize(PixArt(cfg).double())
    x, t, caption, lens, _ = pixart_inputs(cfg)

    def grads():
        model.zero_grad()
        model(x, t, caption, lens).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference = grads()
    calls = [0]
    model.blocks[0].attn.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    keys = set(model.state_dict())
    recompute.apply(model, recompute.Recompute.parse(1))
    assert set(model.state_dict()) == keys
    for g, ref in zip(grads(), reference):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)
    assert calls[0] == 2  # forward, then the recompute in backward


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        PixArtConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="divisible by 3"):
        PixArtConfig(hidden_size=64, num_heads=4, micro_conditions=True)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("pixart-xxl")
    with pytest.raises(ValueError, match="unknown PixArtConfig field"):
        preset("tiny", depht=3)
