"""`python -m train export --to diffusers`: the exported transformer computes what the checkpoint's
EMA (or raw) model computes, and runs in diffusers' PixArtAlphaPipeline with a VAE, T5 and scheduler."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import CAPTIONED, TEXT_WIDTH, run_in_process
from train.checkpoint import load_model


@pytest.fixture(scope="module")
def trained(captioned_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert run_in_process("run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--out", out,
                          "--max-steps", 3, *CAPTIONED) == 0
    return out


@pytest.mark.parametrize("raw", [False, True])
def test_exported_transformer_matches_the_checkpoint(trained, tmp_path, raw):
    from diffusers import PixArtTransformer2DModel

    target = tmp_path / "transformer"
    assert run_in_process("export", "--ckpt", trained, "--to", "diffusers", target, *(["--raw"] if raw else [])) == 0
    exported = PixArtTransformer2DModel.from_pretrained(target).double().eval()
    engine_model = load_model(trained, ema=not raw).double().eval()
    other = load_model(trained, ema=raw).double().eval()  # the weights that were NOT asked for

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([3.0, 700.0], dtype=torch.float64)
    caption = torch.randn(2, 8, TEXT_WIDTH, dtype=torch.float64)
    lens = torch.tensor([8, 2])
    mask = (torch.arange(8)[None] < lens[:, None]).long()  # (B, L) diffusers' encoder_attention_mask
    with torch.no_grad():
        theirs = exported(x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask,
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        torch.testing.assert_close(theirs, engine_model(x, t, caption, lens), rtol=1e-8, atol=1e-10)
        assert not torch.allclose(theirs, other(x, t, caption, lens), rtol=1e-8, atol=1e-10)


def test_export_runs_in_the_pixart_pipeline(trained, text_encoder, tmp_path):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    target = tmp_path / "transformer"
    assert run_in_process("export", "--ckpt", trained, "--to", "diffusers", target) == 0
    # a tiny random VAE with 3 latent channels (the tiny model was trained on 3-channel pixels), 2x downsampling
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    pipe = PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(text_encoder),
                               text_encoder=T5EncoderModel.from_pretrained(text_encoder), vae=vae,
                               transformer=PixArtTransformer2DModel.from_pretrained(target),
                               scheduler=DPMSolverMultistepScheduler())
    image = pipe("a large red circle in the top left", num_inference_steps=2, height=32, width=32,
                 use_resolution_binning=False, clean_caption=False, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
