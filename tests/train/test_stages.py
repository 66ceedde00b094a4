"""The three stages end to end on tiny pixel caches: stage 1 (class-conditional DiT) -> stage 2
(re-parameterised PixArt) -> stage 3 (micro-conditions, higher resolution); sample grids and
`python -m train sample`; the EDM objective; non-finite steps skipped, then save-and-stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import preset
from engine.data.cache import Sample, shard_name, write_index, write_shard
from engine.model import build_model
from tests.train.conftest import CAPTIONED, TEXT_WIDTH, build_pixel_cache, load_weights, run_in_process
from train.checkpoint import load_init, load_model
from train.loop import EXIT_NONFINITE


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(labelled_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    classes = len(json.loads((labelled_cache / "index.json").read_text())["classes"])
    assert run_in_process("run", "--preset", "tiny", "--stage", 1, "--data", labelled_cache, "--out", out,
                          "--max-steps", 2, "--set", f"model.fields.num_classes={classes}",
                          "--set", "log.sample_every=2", "--set", "log.every=1") == 0
    return out


@pytest.fixture(scope="module")
def stage2(stage1, captioned_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "run"
    assert run_in_process("run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--out", out,
                          "--init", stage1, "--max-steps", 2, *CAPTIONED, "--set", "log.sample_every=2") == 0
    return out


def test_stage1_logs_and_grid(stage1):
    records = _records(stage1)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["img_per_s"] > 0 and r["tflops_per_gpu"] > 0
        assert r["mfu"] is None and r["mem_gib"] is None and 0 <= r["data_wait"] <= 1 and r["skipped"] == 0
    grid = Image.open(stage1 / "samples" / "step-0000002.png")
    assert grid.size == (2 * 16, 2 * 16)  # 4 samples of 16px in a 2 x 2 grid
    assert (stage1 / "samples" / "prompts.txt").read_text().splitlines()[0] == "class 0"


def test_stage2_init_is_the_reparameterised_stage1_ema(stage1):
    """PixArt initialised from the stage-1 run equals the run's EMA DiT at t = 500, null class."""
    dit = load_model(stage1, ema=True).double()
    pixart = build_model(preset("tiny", 16, input_size=16, in_channels=3, caption_channels=TEXT_WIDTH,
                                pe_interpolation=1.0))
    line = load_init(pixart, stage1)
    assert "re-parameterised" in line
    pixart.double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    caption = torch.randn(3, 8, TEXT_WIDTH, dtype=torch.float64)
    lens = torch.tensor([8, 1, 5])
    t = torch.full((3,), 500.0, dtype=torch.float64)
    null = torch.full((3,), dit.null_class)
    with torch.no_grad():
        torch.testing.assert_close(pixart(x, t, caption, lens), dit(x, t, null), rtol=1e-9, atol=1e-9)
        # the match is special to t = 500: elsewhere the two differ by far more than the tolerance
        assert (pixart(x, t - 200, caption, lens) - dit(x, t - 200, null)).abs().max() > 1e-7


def test_stage3_init_keeps_the_stage2_predictions(stage2):
    """Stage 3 (micro-conditions, 32px, pe_interpolation 2) from stage 2: on a 16px input its
    position embedding and, with the new embedders' zero output, its predictions are stage 2's."""
    before = load_model(stage2, ema=True).double()
    after = build_model(preset("tiny-ms", 32, input_size=32, in_channels=3, caption_channels=TEXT_WIDTH,
                               pe_interpolation=2.0))
    load_init(after, stage2)
    after.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([10.0, 900.0], dtype=torch.float64)
    caption = torch.randn(2, 8, TEXT_WIDTH, dtype=torch.float64)
    lens = torch.tensor([3, 8])
    micro = dict(resolution=torch.tensor([[20.0, 40.0], [64.0, 64.0]], dtype=torch.float64),
                 aspect_ratio=torch.tensor([[0.5], [1.0]], dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(after(x, t, caption, lens, **micro), before(x, t, caption, lens),
                                   rtol=1e-9, atol=1e-9)


def test_stage3_trains(stage2, text_encoder, tmp_path_factory, tmp_path):
    cache32 = build_pixel_cache(tmp_path_factory, "captioned32", 16, 32, text_encoder)
    out = tmp_path / "run"
    assert run_in_process("run", "--preset", "tiny", "--stage", 3, "--data", cache32, "--out", out, "--init", stage2,
                          "--max-steps", 2, *CAPTIONED) == 0
    assert all(np.isfinite(r["loss"]) for r in _records(out))
    assert load_weights(out, 2)["size_embed.fc2.weight"].abs().max() > 0  # the new embedders learn


def test_sample_command(stage1, stage2, tmp_path):
    png = tmp_path / "a.png"
    assert run_in_process("sample", "--ckpt", stage2, "--prompt", "a small red circle", "--steps", 3,
                          "--count", 4, "--out", png) == 0
    assert Image.open(png).size == (32, 32)  # a 2 x 2 grid of 16px pixel-cache images
    assert run_in_process("sample", "--ckpt", stage1, "--label", 1, "--steps", 2, "--out", png) == 0
    assert Image.open(png).size == (16, 16)
    assert run_in_process("sample", "--ckpt", stage1, "--prompt", "x", "--out", png) == 2


def test_edm_objective(captioned_cache, tmp_path, monkeypatch):
    import engine.diffusion

    made = []
    real_edm = engine.diffusion.EDM
    monkeypatch.setattr(engine.diffusion, "EDM", lambda **kw: made.append(kw) or real_edm(**kw))
    out = tmp_path / "run"
    assert run_in_process("run", "--preset", "tiny", "--stage", 2, "--data", captioned_cache, "--out", out,
                          "--max-steps", 2, "--set", 'train.objective="edm"', "--set", "train.edm_p_mean=0.3",
                          "--set", "train.edm_sigma_data=0.9", *CAPTIONED) == 0
    assert all(np.isfinite(r["loss"]) for r in _records(out))
    # the config's noise levels and data deviation reach the objective
    assert made == [{"sigma_data": 0.9, "p_mean": 0.3, "p_std": 1.2}]
    sampled = []
    real_sampler = engine.diffusion.sample_edm
    monkeypatch.setattr(engine.diffusion, "sample_edm", lambda *a, **kw: sampled.append(kw) or real_sampler(*a, **kw))
    assert run_in_process("sample", "--ckpt", out, "--prompt", "a red circle", "--steps", 2,
                          "--out", tmp_path / "a.png") == 0
    assert [kw["sigma_data"] for kw in sampled] == [0.9]  # and the sampler's preconditioning
    heun = []
    real_heun = engine.diffusion.sample_edm_heun
    monkeypatch.setattr(engine.diffusion, "sample_edm_heun", lambda *a, **kw: heun.append(kw) or real_heun(*a, **kw))
    assert run_in_process("sample", "--ckpt", out, "--prompt", "a red circle", "--solver", "heun", "--steps", 2,
                          "--out", tmp_path / "b.png") == 0
    assert [(kw["sigma_data"], kw["steps"]) for kw in heun] == [(0.9, 2)] and len(sampled) == 1


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, capsys):
    """A cache whose latents are NaN: every step is skipped (no update) until max_nonfinite_steps
    in a row, then the run saves and stops with exit code 3."""
    cache = tmp_path / "cache"
    rng = np.random.default_rng(0)
    samples = [Sample(mean=np.full((3, 16, 16), np.nan, np.float16), std=np.zeros((3, 16, 16), np.float16),
                      text=rng.standard_normal((4, TEXT_WIDTH)).astype(np.float16), label=-1, orig_size=(16, 16),
                      bucket=0, caption="nan", source=f"{i}") for i in range(16)]
    entry = write_shard(cache / "shards", shard_name(0), samples, [], TEXT_WIDTH)
    write_index(cache, {"resolution": 16, "multi_aspect": False, "buckets": [[16, 16]], "latent_channels": 3,
                        "latent_downsample": 1, "vae": {"path": "pixels"}, "text_encoder": None,
                        "text_width": TEXT_WIDTH, "max_tokens": 8, "labels": False, "classes": []}, [entry])
    out = tmp_path / "run"
    code = run_in_process("run", "--preset", "tiny", "--stage", 2, "--data", cache, "--out", out, *CAPTIONED,
                          "--set", "train.max_nonfinite_steps=3", "--set", "log.every=2")
    assert code == EXIT_NONFINITE
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().out
    records = _records(out)
    assert [r["skipped_total"] for r in records] == [2, 3] and records[0]["loss"] is None
    torch.manual_seed(0)  # the run's seed: the initial weights, which no step may have changed
    initial = build_model(preset("tiny", 16, input_size=16, in_channels=3, caption_channels=TEXT_WIDTH,
                                 pe_interpolation=1.0)).state_dict()
    saved = load_weights(out, 3)
    assert all(torch.equal(saved[k], initial[k]) for k in initial)


def test_multi_aspect_stage3(tmp_path):
    """Stage 3 on a multi-aspect cache (VAE-latent layout, 256px bucket table): batches of different
    grids (32x32, 22x44 and 44x22 latents) train one model, micro-conditions included."""
    from engine.data.buckets import bucket_table

    table = bucket_table(256, True)
    cache = tmp_path / "cache"
    rng = np.random.default_rng(0)
    samples = []
    for bucket in (8, 18, 27):  # aspect 0.5, 1 and 2: one batch of 8 each
        _, height, width = table[bucket]
        for i in range(8):
            samples.append(Sample(mean=rng.standard_normal((4, height // 8, width // 8)).astype(np.float16),
                                  std=np.full((4, height // 8, width // 8), 0.1, np.float16),
                                  text=rng.standard_normal((int(rng.integers(1, 8)), TEXT_WIDTH)).astype(np.float16),
                                  label=-1, orig_size=(int(rng.integers(100, 900)), int(rng.integers(100, 900))),
                                  bucket=bucket, caption="x", source=f"{bucket}-{i}"))
    entry = write_shard(cache / "shards", shard_name(0), samples, [], TEXT_WIDTH)
    write_index(cache, {"resolution": 256, "multi_aspect": True, "buckets": [[h, w] for _, h, w in table],
                        "latent_channels": 4, "latent_downsample": 8, "vae": {"path": str(tmp_path / "no-vae")},
                        "text_encoder": None, "text_width": TEXT_WIDTH, "max_tokens": 8, "labels": False,
                        "classes": []}, [entry])
    out = tmp_path / "run"
    assert run_in_process("run", "--preset", "tiny", "--stage", 3, "--data", cache, "--out", out, "--max-steps", 3,
                          *CAPTIONED, "--set", "model.resolution=256", "--set", "data.pixels=false",
                          "--set", "data.multi_aspect=true", "--set", "log.every=1") == 0
    records = _records(out)
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    # FLOPs follow each batch's own grid: 16x16, 11x22 and 22x11 tokens give different rates per image
    per_image = sorted(r["tflops_per_gpu"] / r["img_per_s_per_gpu"] for r in records)
    assert per_image[1] / per_image[0] == pytest.approx(1, abs=1e-3)  # the two 242-token grids
    assert per_image[2] / per_image[1] > 1.01  # the 256-token square grid costs more


def test_decoder_with_a_vae(tmp_path):
    from diffusers import AutoencoderKL

    from tests.data.conftest import save_tiny_vae
    from train.sample import Decoder

    save_tiny_vae(tmp_path / "vae")
    latents = torch.randn(2, 4, 8, 8)
    images = Decoder(str(tmp_path / "vae"), torch.device("cpu"))(latents)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)  # (2, 3, 32, 32)
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float()
    assert images[0].size == (32, 32)
    torch.testing.assert_close(pixels / 127.5 - 1, expected, rtol=0, atol=1 / 127.5)
