"""Aspect buckets against diffusers' PixArt tables, and the resize + centre crop geometry;
multi-aspect `prepare` + loader end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.data import demo, make_loader, open_cache
from engine.data.buckets import bucket_table, nearest_bucket, resize_crop
from engine.data.build import build_cache


def _diffusers_tables():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN,
                                                                        ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)
    return {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}


def test_tables_equal_pixart_tables_in_diffusers():
    for resolution, theirs in _diffusers_tables().items():
        ours = bucket_table(resolution, multi_aspect=True)
        assert [(key, h, w) for key, h, w in ours] == [(float(k), int(h), int(w)) for k, (h, w) in theirs.items()]
    assert bucket_table(64, multi_aspect=False) == [(1.0, 64, 64)]
    with pytest.raises(ValueError, match="multi-aspect"):
        bucket_table(768, multi_aspect=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        bucket_table(100, multi_aspect=False)


def test_nearest_bucket_agrees_with_diffusers_classifier():
    from diffusers.image_processor import PixArtImageProcessor

    rng = np.random.default_rng(0)
    for resolution, theirs in _diffusers_tables().items():
        table = bucket_table(resolution, multi_aspect=True)
        for height, width in rng.integers(16, 3000, size=(200, 2)).tolist():
            _, h, w = table[nearest_bucket(height, width, table)]
            assert (h, w) == PixArtImageProcessor.classify_height_width_bin(height, width, theirs)


def test_resize_crop_covers_the_bucket_and_keeps_the_centre():
    columns = np.tile(np.arange(300, dtype=np.uint8), (100, 1))  # pixel value = column index
    wide = Image.fromarray(columns)  # 300 wide, 100 high
    cropped = np.asarray(resize_crop(wide, 100, 100))
    assert cropped.shape == (100, 100)
    assert cropped[0, 0] == 100 and cropped[0, -1] == 199  # the middle third, unresampled (scale 1)
    small = resize_crop(Image.new("RGB", (20, 30), "red"), 64, 48)
    assert small.size == (48, 64)  # upscaled to cover, then cropped
    assert np.all(np.asarray(small) == (255, 0, 0))


def test_multi_aspect_cache_batches_hold_one_bucket(tiny_vae, tiny_text_encoder, tmp_path):
    src = tmp_path / "src"
    records = demo.generate(src, 12, 96, seed=3)
    sizes = [(96, 40), (40, 96), (96, 96), (60, 90)]  # (w, h) crops: wide, tall, square, portrait
    expected = {}
    table = bucket_table(256, multi_aspect=True)
    for number, record in enumerate(records):
        w, h = sizes[number % len(sizes)]
        Image.open(src / record["file"]).crop((0, 0, w, h)).save(src / record["file"])
        expected[record["file"]] = nearest_bucket(h, w, table)
    build_cache(src, tmp_path / "c", tiny_vae, tiny_text_encoder, resolution=256, multi_aspect=True,
                shard_size=5, batch_size=3, device="cpu", progress=False)
    cache = open_cache(tmp_path / "c", verify="open")
    assert cache.multi_aspect and cache.num_samples == 12
    for i in range(cache.num_samples):
        assert cache.sample_buckets[i] == expected[cache.source(i)]
    batches = list(make_loader(cache, 2, backend="dali", workers=0, drop_last=False))
    assert sum(len(b["index"]) for b in batches) == 12
    for batch in batches:
        buckets = {int(cache.sample_buckets[i]) for i in batch["index"].tolist()}
        assert len(buckets) == 1
        _, height, width = table[buckets.pop()]
        assert batch["latent"].shape[1:] == (4, height // 4, width // 4)  # the tiny VAE downsamples 4x
        assert batch["aspect_ratio"].flatten().tolist() == pytest.approx([height / width] * len(batch["index"]))
