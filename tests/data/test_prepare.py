"""`python -m train prepare`: sources, bad inputs, resume, checksums, and encodings checked
against the encoders run directly."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import CacheCorruptError, demo, make_loader, open_cache
from engine.data.build import BadInputError, build_cache
from tests.data.conftest import jpeg_bytes
from train.__main__ import main as train_main

RES = 64
SHARD = 6
BAD = {"trunc.jpg": "undecodable image", "empty.png": "empty file", "nocap.png": "no caption"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """16 demo images plus: a truncated JPEG, a zero-byte PNG, an image without a caption (all
    bad), and a 20 x 30 image (small, but good: it is upscaled)."""
    root = tmp_path_factory.mktemp("src")
    records = demo.generate(root, 16, RES, seed=1)
    image = Image.open(root / "000000.png").convert("RGB")
    data = jpeg_bytes(image)
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "trunc.txt").write_text("a red circle in the centre on a beige background")
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("a blue square in the centre on a beige background")
    image.save(root / "nocap.png")
    image.resize((20, 30)).save(root / "small.png")
    (root / "small.txt").write_text("a small red circle in the top left on a navy background")
    return root, records


@pytest.fixture(scope="module")
def cache_dir(source, tiny_vae, tiny_text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    rc = train_main(["prepare", "--images", str(source[0]), "--out", str(out), "--vae", tiny_vae,
                     "--text-encoder", tiny_text_encoder, "--resolution", str(RES), "--shard-size", str(SHARD),
                     "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return out


def _by_source(cache) -> dict[str, int]:
    return {cache.source(i): i for i in range(cache.num_samples)}


def _read(cache, sample: int, text_len: int = 120) -> dict:
    return cache.read(np.array([sample]), text_len)


def test_bad_inputs_are_skipped_and_listed(cache_dir, source):
    lines = [json.loads(line) for line in (cache_dir / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in lines) == sorted(BAD)
    for record in lines:
        assert record["reason"].startswith(BAD[record["source"]]), record
    cache = open_cache(cache_dir, verify="open")
    assert cache.num_samples == 17  # 16 demo images + the small one
    assert cache.meta["num_skipped"] == 3
    assert (cache.resolution, cache.latent_channels, cache.text_width, cache.latent_size) == (RES, 4, 16, (16, 16))
    assert not cache.has_labels and cache.max_tokens == 120


def test_small_image_is_upscaled_not_skipped(cache_dir):
    cache = open_cache(cache_dir)
    batch = _read(cache, _by_source(cache)["small.png"])
    assert batch["resolution"].tolist() == [[30.0, 20.0]]  # original (h, w) kept for the micro-condition
    assert batch["latent_mean"].shape == (1, 4, 16, 16)
    assert cache.caption(_by_source(cache)["small.png"]).startswith("a small red circle")


def test_latents_equal_vae_encode_mean_and_std(cache_dir, source, tiny_vae):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    cache = open_cache(cache_dir)
    ids = _by_source(cache)
    for name in ("000003.png", "000011.png"):
        pixels = np.asarray(Image.open(source[0] / name).convert("RGB"), dtype=np.float64)  # already 64 x 64
        x = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        want_mean = (dist.mean * vae.config.scaling_factor)[0]
        want_std = (dist.std * vae.config.scaling_factor)[0]
        got = _read(cache, ids[name])
        # the cache holds the fp16 rounding of the fp32 result: within half an fp16 ulp, plus slack
        # for the encoder batch differing from this batch of one
        for stored, want in ((got["latent_mean"][0], want_mean), (got["latent_std"][0], want_std)):
            assert stored.dtype == np.float16
            torch.testing.assert_close(torch.from_numpy(stored).float(), want, rtol=2 ** -10, atol=1e-5)


def test_text_features_equal_encoder_last_hidden_state(cache_dir, source, tiny_text_encoder):
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_encoder)
    encoder = T5EncoderModel.from_pretrained(tiny_text_encoder).eval()
    cache = open_cache(cache_dir)
    ids = _by_source(cache)
    for record in source[1][:2]:
        tokens = tokenizer(record["caption"], return_tensors="pt")
        with torch.no_grad():
            want = encoder(**tokens).last_hidden_state[0]  # (L, 16), no padding at all
        got = _read(cache, ids[record["file"]])
        assert got["caption_lens"].tolist() == [tokens.input_ids.shape[1]]
        assert cache.caption(ids[record["file"]]) == record["caption"]
        torch.testing.assert_close(torch.tensor(got["text"][0]).float(), want, rtol=2 ** -10, atol=1e-4)


def test_rerun_rewrites_only_the_deleted_shard(cache_dir, tmp_path, tiny_vae, tiny_text_encoder, source):
    cache = tmp_path / "c"
    shutil.copytree(cache_dir, cache)
    shards = sorted(p.name for p in (cache / "shards").iterdir())
    assert len(shards) == 4  # 21 inputs in shards of 6
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / "shards").rglob("*") if p.is_file()}
    index_before = json.loads((cache / "index.json").read_text())
    shutil.rmtree(cache / "shards" / shards[1])
    (cache / "index.json").unlink()
    build_cache(source[0], cache, tiny_vae, tiny_text_encoder, resolution=RES, shard_size=SHARD, batch_size=4,
                device="cpu", progress=False)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache / "shards").rglob("*") if p.is_file()}
    assert set(after) == set(before)
    for path, stamp in after.items():
        if path.parent.name == shards[1]:
            assert stamp != before[path], path
        else:
            assert stamp == before[path], f"{path} was rewritten"
    assert json.loads((cache / "index.json").read_text())["shards"] == index_before["shards"]


def test_flipped_byte_is_caught_and_names_the_shard(cache_dir, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(cache_dir, cache)
    target = cache / "shards" / "s000002" / "text.npy"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="s000002/text.npy"):
        open_cache(cache, verify="open")
    lazy = open_cache(cache)  # lazy: shards are checked the first time they are read
    clean = int(lazy.shard_starts[0])
    lazy.read(np.array([clean]), 8)
    with pytest.raises(CacheCorruptError, match="s000002/text.npy"):
        lazy.read(np.array([int(lazy.shard_starts[2])]), 8)
    with pytest.raises(CacheCorruptError, match="s000002"):
        for _ in make_loader(cache, 2, backend="torch", workers=0, drop_last=False):
            pass


def test_strict_stops_at_the_first_bad_input(source, tiny_vae, tiny_text_encoder, tmp_path):
    with pytest.raises(BadInputError, match="empty.png.*empty file"):
        build_cache(source[0], tmp_path / "c", tiny_vae, tiny_text_encoder, resolution=RES, shard_size=SHARD,
                    device="cpu", strict=True, progress=False)


def test_other_settings_into_the_same_cache_are_refused(cache_dir, source, tiny_vae, tiny_text_encoder, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(cache_dir, cache)
    with pytest.raises(ValueError, match="resolution"):
        build_cache(source[0], cache, tiny_vae, tiny_text_encoder, resolution=2 * RES, shard_size=SHARD,
                    device="cpu", progress=False)
    with pytest.raises(ValueError, match="text_width=16.*text_width=4096"):
        open_cache(cache).require(resolution=RES, text_width=4096)


def test_two_ranks_write_the_same_shards_and_the_last_merges(cache_dir, source, tiny_vae, tiny_text_encoder,
                                                               tmp_path, monkeypatch):
    out = tmp_path / "c"
    build_cache(source[0], out, tiny_vae, tiny_text_encoder, resolution=RES, shard_size=SHARD, batch_size=4,
                device="cpu", rank=0, world=2, progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["s000000", "s000002"]
    with pytest.raises(FileNotFoundError, match="--merge"):
        open_cache(out)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it
    monkeypatch.setenv("WORLD_SIZE", "2")
    index = build_cache(source[0], out, tiny_vae, tiny_text_encoder, resolution=RES, shard_size=SHARD,
                        batch_size=4, device="cpu", progress=False)
    single = json.loads((cache_dir / "index.json").read_text())
    assert index["shards"] == single["shards"]  # same bytes, shard by shard
    assert (out / "skipped.jsonl").read_text() == (cache_dir / "skipped.jsonl").read_text()
    assert train_main(["prepare", "--out", str(out), "--merge"]) == 0


def test_missing_cache_and_missing_index_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_cache(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="index.json"):
        open_cache(tmp_path)


def test_labels_from_imagenet_layout_without_text(tiny_vae, tmp_path):
    records = demo.generate(tmp_path / "src", 10, RES, seed=2, layout="imagenet")
    index = build_cache(tmp_path / "src", tmp_path / "c", tiny_vae, None, resolution=RES, labels=True,
                        shard_size=4, device="cpu", progress=False)
    cache = open_cache(tmp_path / "c")
    classes = sorted({r["class_name"] for r in records})
    assert cache.has_labels and cache.classes == classes and index["num_skipped"] == 0
    assert cache.text_width == 0
    for i in range(cache.num_samples):
        folder = cache.source(i).split("/")[0]
        assert _read(cache, i)["label"].tolist() == [classes.index(folder)]
    batch = next(iter(make_loader(cache, 5, backend="torch", workers=0)))
    assert batch["caption"].shape == (5, 120, 0)
    assert sorted(batch["label"].tolist()) == sorted(classes.index(cache.source(i).split("/")[0])
                                                     for i in batch["index"].tolist())


def test_pixels_vae_stores_the_scaled_image(source, tiny_text_encoder, tmp_path):
    build_cache(source[0], tmp_path / "c", "pixels", tiny_text_encoder, resolution=RES, shard_size=SHARD,
                device="cpu", progress=False)
    cache = open_cache(tmp_path / "c")
    assert (cache.latent_channels, cache.latent_size) == (3, (RES, RES))
    got = _read(cache, _by_source(cache)["000005.png"])
    pixels = np.asarray(Image.open(source[0] / "000005.png").convert("RGB"), dtype=np.float64)
    want = (pixels / 127.5 - 1.0).transpose(2, 0, 1).astype(np.float16)
    np.testing.assert_array_equal(got["latent_mean"][0], want)
    assert not got["latent_std"].any()


def test_webdataset_tar_and_metadata_jsonl_sources(source, tiny_text_encoder, tmp_path):
    root, records = source
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for record in records[:5]:
            stem = record["file"][:-4]
            tar.add(root / record["file"], arcname=f"{stem}.png")
            tar.add(root / f"{stem}.txt", arcname=f"{stem}.txt")
    meta_root = tmp_path / "meta"
    meta_root.mkdir()
    with open(meta_root / "metadata.jsonl", "w") as f:
        for record in records[5:9]:
            shutil.copy(root / record["file"], meta_root / record["file"])
            f.write(json.dumps({"file_name": record["file"], "text": record["caption"]}) + "\n")
    for src, chosen in ((tar_path, records[:5]), (meta_root, records[5:9])):
        out = tmp_path / f"cache-{src.name}"
        build_cache(src, out, "pixels", tiny_text_encoder, resolution=RES, device="cpu", progress=False)
        cache = open_cache(out)
        assert sorted(cache.caption(i) for i in range(cache.num_samples)) == sorted(r["caption"] for r in chosen)
        assert cache.meta["source"]["kind"] == ("webdataset" if src == tar_path else "metadata.jsonl")


@pytest.mark.gpu
def test_encoding_on_cuda_matches_the_cpu_cache(cache_dir, source, tiny_vae, tiny_text_encoder, tmp_path):
    build_cache(source[0], tmp_path / "c", tiny_vae, tiny_text_encoder, resolution=RES, shard_size=SHARD,
                batch_size=4, device="cuda", text_dtype=torch.float32, progress=False)
    gpu, cpu = open_cache(tmp_path / "c"), open_cache(cache_dir)
    assert gpu.num_samples == cpu.num_samples
    for i in range(gpu.num_samples):
        assert gpu.source(i) == cpu.source(i)
        a, b = _read(gpu, i), _read(cpu, i)
        # cuDNN convolutions and matmuls may run in TF32 (10-bit mantissa) on the GPU
        for key in ("latent_mean", "latent_std"):
            torch.testing.assert_close(torch.tensor(a[key]).float(), torch.tensor(b[key]).float(),
                                       rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(torch.tensor(a["text"][0]).float(), torch.tensor(b["text"][0]).float(),
                                   rtol=1e-2, atol=1e-2)


def test_padded_captions_keep_every_position_encoded_without_a_mask(source, tiny_vae, tiny_text_encoder,
                                                                    tmp_path):
    """--pad-captions: each caption's features at all --max-tokens positions, the encoder's outputs
    at the padding included, as the encoder gives them for the max-length padded ids without an
    attention mask (what a model without a caption mask reads); the cache records it."""
    from transformers import AutoTokenizer, T5EncoderModel

    max_tokens = 32  # longer than every demo caption
    out = tmp_path / "padded"
    assert train_main(["prepare", "--images", str(source[0]), "--out", str(out), "--vae", tiny_vae,
                       "--text-encoder", tiny_text_encoder, "--resolution", str(RES), "--shard-size", str(SHARD),
                       "--batch-size", "4", "--device", "cpu", "--no-progress", "--max-tokens", str(max_tokens),
                       "--pad-captions"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_encoder)
    encoder = T5EncoderModel.from_pretrained(tiny_text_encoder).eval()
    cache = open_cache(out)
    assert cache.meta["padded_captions"] is True
    ids = _by_source(cache)
    for record in source[1][:2]:
        tokens = tokenizer(record["caption"], max_length=max_tokens, padding="max_length", truncation=True,
                           return_tensors="pt")
        assert tokens.attention_mask[0, -1] == 0, "the caption fills max_tokens: the test shows no padding"
        with torch.no_grad():
            want = encoder(input_ids=tokens.input_ids).last_hidden_state[0]  # (max_tokens, 16)
        got = _read(cache, ids[record["file"]])
        assert got["caption_lens"].tolist() == [max_tokens]
        torch.testing.assert_close(torch.tensor(got["text"][0]).float(), want, rtol=2 ** -10, atol=1e-4)
        assert got["text"][0][-1].any(), "a padding position holds the encoder's output, not zeros"
