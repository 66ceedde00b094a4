"""DiT -> PixArt re-parameterisation: at t_ref the converted model reproduces the DiT's null-class output."""

import dataclasses

import pytest
import torch

from engine.config import preset
from engine.interop.reparam import default_pixart_config, dit_to_pixart
from engine.model.dit import DiT

CAPTION_CHANNELS, TEXT_LEN = 32, 6


def randomize_(module: torch.nn.Module) -> None:
    """Every parameter random, the zero-initialised ones included, so no term hides behind a zero."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 10
            p.normal_(0.0, fan_in**-0.5)


def random_dit(**overrides) -> DiT:
    model = DiT(preset("tiny-dit", **overrides))
    randomize_(model)
    return model.double().eval()


def pixart_output(pixart, x, t, micro=False):
    B = x.shape[0]
    caption = torch.randn(B, TEXT_LEN, CAPTION_CHANNELS, dtype=torch.float64)
    lens = torch.tensor([1, TEXT_LEN, 3])[:B]
    extra = {}
    if micro:
        extra = dict(resolution=torch.rand(B, 2, dtype=torch.float64) * 1024,
                     aspect_ratio=torch.rand(B, 1, dtype=torch.float64) * 2)
    with torch.no_grad():
        return pixart(x, torch.full((B,), float(t)), caption, lens, **extra)


def dit_output(dit, x, t):
    B = x.shape[0]
    with torch.no_grad():
        return dit(x, torch.full((B,), float(t)), torch.full((B,), dit.null_class))


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("t_ref", [500, 123])
def test_reproduces_dit_at_t_ref_for_any_caption(t_ref):
    dit = random_dit()
    config = default_pixart_config(dit.config)
    assert config.caption_channels == 4096 and config.pe_interpolation == 1.0
    config = dataclasses.replace(config, caption_channels=CAPTION_CHANNELS, text_len=TEXT_LEN)
    pixart = dit_to_pixart(dit, config, t_ref=t_ref)
    randomize_(pixart.caption_proj)  # the caption path carries signal, yet adds nothing
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    expected = dit_output(dit, x, t_ref)
    assert relative_error(pixart_output(pixart, x, t_ref), expected) < 1e-12
    assert relative_error(pixart_output(pixart, x, t_ref), expected) < 1e-12  # a second random caption
    # away from t_ref the per-block DiT modulation and the shared adaLN-single differ
    assert relative_error(pixart_output(pixart, x, t_ref + 100), dit_output(dit, x, t_ref + 100)) > 1e-3


def test_micro_conditions_add_nothing_at_first():
    dit = random_dit()
    config = preset("tiny-ms", input_size=8, pe_interpolation=1.0, caption_channels=CAPTION_CHANNELS,
                    text_len=TEXT_LEN)
    pixart = dit_to_pixart(dit, config)
    x = torch.randn(2, 4, 8, 16, dtype=torch.float64)  # non-square: positions still agree
    assert relative_error(pixart_output(pixart, x, 500, micro=True), dit_output(dit, x, 500)) < 1e-12


def test_copies_shared_weights_and_checks_the_backbone():
    dit = random_dit()
    pixart = dit_to_pixart(dit, preset("tiny", input_size=8, caption_channels=CAPTION_CHANNELS, text_len=TEXT_LEN))
    for key in ("patch_embed.weight", "time_embed.fc2.bias", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.weight",
                "final.linear.weight"):
        assert torch.equal(pixart.state_dict()[key], dit.state_dict()[key]), key
    assert not pixart.blocks[1].cross_attn.proj.weight.any()
    with pytest.raises(ValueError, match="hidden_size"):
        dit_to_pixart(dit, preset("tiny", hidden_size=192, input_size=8))


def test_a_dit_with_another_position_scale_carries_it_over():
    dit = random_dit(pe_interpolation=0.25)
    config = dataclasses.replace(default_pixart_config(dit.config), caption_channels=CAPTION_CHANNELS,
                                 text_len=TEXT_LEN)
    assert config.pe_interpolation == 0.25
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert relative_error(pixart_output(dit_to_pixart(dit, config), x, 500), dit_output(dit, x, 500)) < 1e-12
    with pytest.raises(ValueError, match="pe_interpolation=1 and the DiT 8, 0.25"):
        dit_to_pixart(dit, dataclasses.replace(config, pe_interpolation=1.0))
