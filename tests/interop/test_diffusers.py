"""engine PixArt <-> diffusers PixArtTransformer2DModel: forwards agree in float64, round trips are exact."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from engine.config import preset
from engine.interop.diffusers import config_from_diffusers, diffusers_kwargs, from_diffusers, to_diffusers
from engine.model.pixart import PixArt

TEXT_LEN, CAPTION_CHANNELS = 7, 32


def randomize_(module: torch.nn.Module) -> None:
    """Every parameter random, the zero-initialised ones included, so no term hides behind a zero."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.normal_(0.0, fan_in**-0.5)


def tiny_diffusers(micro: bool, interpolation_scale=None) -> PixArtTransformer2DModel:
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, cross_attention_dim=96,
                                     caption_channels=CAPTION_CHANNELS, use_additional_conditions=micro,
                                     interpolation_scale=interpolation_scale)
    randomize_(model)
    return model.double().eval()


def random_inputs(B, H, W, micro):
    lens = torch.tensor([1, TEXT_LEN, 3])[:B]  # shortest and longest caption included
    inputs = dict(x=torch.randn(B, 4, H, W, dtype=torch.float64),
                  t=torch.tensor([0, 999, 421])[:B],
                  caption=torch.randn(B, TEXT_LEN, CAPTION_CHANNELS, dtype=torch.float64),
                  caption_lens=lens)
    if micro:
        inputs["resolution"] = torch.rand(B, 2, dtype=torch.float64) * 1024
        inputs["aspect_ratio"] = torch.rand(B, 1, dtype=torch.float64) * 2
    return inputs


def diffusers_forward(model, inputs):
    mask = torch.arange(inputs["caption"].shape[1])[None] < inputs["caption_lens"][:, None]  # (B, L)
    added = {k: inputs[k] for k in ("resolution", "aspect_ratio") if k in inputs}
    with torch.no_grad():
        return model(inputs["x"], encoder_hidden_states=inputs["caption"], timestep=inputs["t"],
                     encoder_attention_mask=mask, added_cond_kwargs=added, return_dict=False)[0]


def engine_forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# Latent shapes: square, and non-square with a grid that is a power-of-two multiple of the base
# grid, where diffusers' float32 position arithmetic is exact (so fp64 agreement is meaningful).
SHAPES = [(8, 8), (8, 16), (16, 8)]


@pytest.mark.parametrize("micro, scale", [(False, None), (True, 0.5)])
def test_from_diffusers_forward_matches(micro, scale):
    reference = tiny_diffusers(micro, scale)
    model = from_diffusers(reference)
    assert model.config.micro_conditions == micro
    assert model.config.pe_interpolation == (1.0 if scale is None else scale)  # diffusers' default rule at 8
    for H, W in SHAPES:
        inputs = random_inputs(3, H, W, micro)
        expected = diffusers_forward(reference, inputs)
        assert relative_error(engine_forward(model, inputs), expected) < 1e-10, (H, W)


@pytest.mark.parametrize("name", ["tiny", "tiny-ms"])
def test_to_diffusers_forward_matches(name):
    model = PixArt(preset(name, caption_channels=CAPTION_CHANNELS, text_len=TEXT_LEN))
    randomize_(model)
    model = model.double().eval()
    converted = to_diffusers(model)
    for H, W in SHAPES:
        inputs = random_inputs(3, H, W, model.config.micro_conditions)
        expected = engine_forward(model, inputs)
        assert relative_error(diffusers_forward(converted, inputs), expected) < 1e-10, (H, W)


def test_round_trips_are_exact_and_share_no_storage():
    model = PixArt(preset("tiny-ms", caption_channels=CAPTION_CHANNELS, text_len=TEXT_LEN))
    randomize_(model)
    back = from_diffusers(to_diffusers(model), null_caption=model.null_caption)
    assert back.config == model.config  # text_len comes from the null caption's length
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    reference = tiny_diffusers(micro=False)
    engine = from_diffusers(reference)
    again = to_diffusers(engine).state_dict()
    assert again.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(again[key], value), key
    with torch.no_grad():
        engine.blocks[0].attn.proj.weight.zero_()
    assert reference.transformer_blocks[0].attn1.to_out[0].weight.abs().sum() > 0


def test_diffusers_kwargs_give_the_same_architecture():
    for name in ("tiny", "tiny-ms", "pixart-xl2-ms"):
        config = preset(name)
        with torch.device("meta"):
            built = PixArtTransformer2DModel(**diffusers_kwargs(config))
        # text_len is not a diffusers setting: it falls back to PixArt-α's 120
        assert config_from_diffusers(built, text_len=config.text_len) == config, name
    with pytest.raises(ValueError, match="mlp_ratio"):
        diffusers_kwargs(preset("tiny", mlp_ratio=2.0))


def test_from_state_dict():
    reference = tiny_diffusers(micro=True, interpolation_scale=0.5)
    weights = reference.state_dict()
    model = from_diffusers(weights, input_size=8, num_heads=4, pe_interpolation=0.5, text_len=TEXT_LEN)
    inputs = random_inputs(3, 8, 16, micro=True)
    assert relative_error(engine_forward(model, inputs), diffusers_forward(reference, inputs)) < 1e-10
    with pytest.raises(ValueError, match="input_size"):
        from_diffusers(weights, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):  # width 96 is no published model's: heads unknown
        from_diffusers(weights, input_size=8)


def test_bad_state_dict_names_the_key():
    reference = tiny_diffusers(micro=False)
    config = config_from_diffusers(reference)
    weights = reference.state_dict()
    del weights["transformer_blocks.1.attn2.to_k.bias"]
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn2\.to_k\.bias"):
        from_diffusers(weights, config)
    weights = reference.state_dict()
    weights["caption_projection.linear_2.weight"] = torch.zeros(96, 95)
    with pytest.raises(ValueError, match=r"caption_projection\.linear_2\.weight: \(96, 95\)"):
        from_diffusers(weights, config)
    with pytest.raises(ValueError, match="null_caption"):
        from_diffusers(reference, null_caption=torch.zeros(5, CAPTION_CHANNELS + 1))
