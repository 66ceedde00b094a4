"""Loaders: DALI (CPU pipeline) and plain torch give the same batches; rank sharding, buckets,
saved positions; batch contents checked against the arrays the cache was written from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data import make_loader, open_cache
from engine.data.cache import Sample, shard_name, write_index, write_shard
from engine.data.loader import noise_seed

BUCKETS = [(32, 32), (16, 48), (48, 16)]  # image (h, w); latents are 8x smaller
TEXT_WIDTH = 6
TEXT_LEN = 8  # shorter than some captions, so truncation is exercised
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _write_cache(root, shards: int = 3, per_shard: int = 13, seed: int = 0) -> dict[str, Sample]:
    """A cache of random samples over three buckets; returns the samples by source name."""
    rng = np.random.default_rng(seed)
    written, entries = {}, []
    for number in range(shards):
        samples = []
        for i in range(per_shard):
            bucket = int(rng.integers(len(BUCKETS)))
            h, w = BUCKETS[bucket][0] // 8, BUCKETS[bucket][1] // 8
            sample = Sample(mean=rng.standard_normal((4, h, w)).astype(np.float16),
                            std=rng.uniform(0.0, 1.0, (4, h, w)).astype(np.float16),
                            text=rng.standard_normal((int(rng.integers(0, 12)), TEXT_WIDTH)).astype(np.float16),
                            label=int(rng.integers(5)),
                            orig_size=(int(rng.integers(10, 900)), int(rng.integers(10, 900))),
                            bucket=bucket, caption=f"caption {number}-{i}", source=f"img-{number}-{i}")
            samples.append(sample)
            written[sample.source] = sample
        entries.append(write_shard(root / "shards", shard_name(number), samples, [], TEXT_WIDTH))
    meta = {"resolution": 32, "multi_aspect": True, "buckets": [list(b) for b in BUCKETS], "latent_channels": 4,
            "latent_downsample": 8, "vae": None, "text_encoder": None, "text_width": TEXT_WIDTH, "max_tokens": 12,
            "labels": True, "classes": list("abcde")}
    write_index(root, meta, entries)
    return written


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_cache")
    written = _write_cache(root)
    return root, written


def _epoch(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(batch) for batch in loader]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2)])
def test_dali_and_torch_give_identical_batches(cache, rank, world, device):
    kwargs = dict(batch_size=4, rank=rank, world=world, seed=3, text_len=TEXT_LEN, drop_last=False, workers=0,
                  device=device)
    torch_batches = _epoch(make_loader(cache[0], backend="torch", **kwargs))
    dali_batches = _epoch(make_loader(cache[0], backend="dali", **kwargs))  # on CPU: device_id=None pipeline
    _assert_same_batches(torch_batches, dali_batches)
    first = torch_batches[0]
    assert set(first) == {"latent", "caption", "caption_lens", "label", "resolution", "aspect_ratio", "index"}
    assert all(t.device.type == device for t in first.values())
    assert first["latent"].dtype == torch.float32 and first["caption"].dtype == torch.float16
    assert first["resolution"].dtype == torch.float32 and first["aspect_ratio"].shape[1:] == (1,)


def _two_epochs(loader) -> list[dict[str, torch.Tensor]]:
    return _epoch(loader) + _epoch(loader)


def test_worker_processes_give_the_same_batches(cache):
    kwargs = dict(batch_size=5, rank=0, world=1, seed=1, text_len=TEXT_LEN, drop_last=True)
    reference = _two_epochs(make_loader(cache[0], backend="torch", workers=0, **kwargs))
    _assert_same_batches(reference, _two_epochs(make_loader(cache[0], backend="torch", workers=2, **kwargs)))
    # one DALI pipeline with a worker process serves both epochs
    _assert_same_batches(reference, _two_epochs(make_loader(cache[0], backend="dali", workers=1, **kwargs)))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_contents_match_the_written_samples(cache, device):
    root, written = cache
    opened = open_cache(root)
    seed, rank, world = 7, 1, 2
    loader = make_loader(opened, batch_size=4, rank=rank, world=world, seed=seed, backend="torch",
                         text_len=TEXT_LEN, drop_last=False, workers=0, device=device)
    for k, batch in enumerate(loader):
        batch = {key: value.cpu() for key, value in batch.items()}
        samples = [written[opened.source(i)] for i in batch["index"].tolist()]
        buckets = {s.bucket for s in samples}
        assert len(buckets) == 1  # one aspect bucket per batch
        bucket = buckets.pop()
        height, width = BUCKETS[bucket]
        mean = torch.from_numpy(np.stack([s.mean for s in samples])).float()  # (B, 4, h, w)
        std = torch.from_numpy(np.stack([s.std for s in samples])).float()
        generator = torch.Generator(device).manual_seed(noise_seed(seed, 0, k, rank))
        noise = torch.randn(mean.shape, generator=generator, device=device).cpu()
        torch.testing.assert_close(batch["latent"], mean + std * noise, rtol=1e-6, atol=1e-6)
        assert batch["latent"].shape[2:] == (height // 8, width // 8)
        torch.testing.assert_close(batch["aspect_ratio"], torch.full((len(samples), 1), height / width))
        for row, sample in enumerate(samples):
            length = min(len(sample.text), TEXT_LEN)
            assert batch["caption_lens"][row] == length
            assert torch.equal(batch["caption"][row, :length], torch.from_numpy(sample.text[:length]))
            assert not batch["caption"][row, length:].any()
            assert batch["label"][row] == sample.label
            assert batch["resolution"][row].tolist() == [float(v) for v in sample.orig_size]


def test_ranks_are_disjoint_and_cover_the_epoch(cache):
    num_samples = len(cache[1])
    per_rank = [[b["index"] for b in make_loader(cache[0], 4, rank=r, world=3, seed=2, backend="torch",
                                                  drop_last=False, workers=0)] for r in range(3)]
    seen = torch.cat([i for batches in per_rank for i in batches]).tolist()
    assert sorted(seen) == list(range(num_samples))  # disjoint and complete
    loaders = [make_loader(cache[0], 4, rank=r, world=3, seed=2, backend="torch", drop_last=True, workers=0)
               for r in range(3)]
    assert len({len(loader) for loader in loaders}) == 1  # equal step counts for DDP
    full = [b["index"] for loader in loaders for b in loader]
    assert all(len(i) == 4 for i in full)
    flat = torch.cat(full).tolist()
    assert len(flat) == len(set(flat))


def test_each_epoch_is_reshuffled_by_the_seed(cache):
    loader = make_loader(cache[0], 4, seed=0, backend="torch", workers=0)
    first, second = [b["index"] for b in loader], [b["index"] for b in loader]
    assert loader.state_dict()["epoch"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    other_seed = [b["index"] for b in make_loader(cache[0], 4, seed=1, backend="torch", workers=0)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_restored_position_continues_with_the_same_batches(cache, backend):
    kwargs = dict(batch_size=4, rank=0, world=1, seed=5, backend=backend, text_len=TEXT_LEN, workers=0)
    reference = _two_epochs(make_loader(cache[0], **kwargs))
    interrupted = make_loader(cache[0], **kwargs)
    for k, _ in enumerate(interrupted):
        if k == 2:
            state = interrupted.state_dict()  # saved after three batches were consumed
            break
    assert (state["epoch"], state["batch"]) == (0, 3)
    resumed = make_loader(cache[0], **kwargs)
    resumed.load_state_dict(state)
    _assert_same_batches(reference[3:], _two_epochs(resumed))
    # the broken-off loader itself also carries on from its position
    _assert_same_batches(reference[3:], _two_epochs(interrupted))


def test_state_from_another_configuration_is_refused(cache):
    state = make_loader(cache[0], 4, world=1, backend="torch", workers=0).state_dict()
    with pytest.raises(ValueError, match="world=1"):
        make_loader(cache[0], 4, rank=0, world=2, backend="torch", workers=0).load_state_dict(state)
    with pytest.raises(ValueError, match="backend"):
        make_loader(cache[0], 4, backend="jax")
    with pytest.raises(ValueError, match="rank"):
        make_loader(cache[0], 4, rank=2, world=2)
