"""Loaders: DALI (CPU pipeline) and plain torch give the same batches; rank sharding, buckets,
saved positions; batch contents checked against the arrays the cache was written from; worker
processes that live across epochs and stop on close()."""

from __future__ import annotations

import gc
import multiprocessing

import numpy as np
import pytest
import torch

from engine.data import make_loader, open_cache
from engine.data.cache import LatentCache, Sample, shard_name, write_index, write_shard
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


# ---------------------------------------------------------------- across epochs, with live workers

def _plan(buckets: np.ndarray, batch_size: int, rank: int, world: int, seed: int, epoch: int,
          drop_last: bool) -> list[np.ndarray]:
    """The batch plan as the loader's module docstring states it, written out again."""
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for bucket in np.unique(buckets):
        ids = rng.permutation(np.flatnonzero(buckets == bucket))
        stop = len(ids) - len(ids) % batch_size if drop_last else len(ids)
        batches += [ids[i:i + batch_size] for i in range(0, stop, batch_size)]
    total = len(batches) - len(batches) % world if drop_last else len(batches)
    order = rng.permutation(len(batches))[:total]
    return [batches[i] for i in order[rank::world]]


def _reference(cache, epochs: int, batch_size: int, rank: int, world: int, seed: int, drop_last: bool,
               device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Every batch of ``epochs`` epochs, built with numpy from the samples the cache was written
    from; the latent drawn as the loader documents it, on ``device``."""
    root, written = cache
    opened = open_cache(root)
    samples = [written[opened.source(i)] for i in range(opened.num_samples)]  # by sample id
    buckets = np.array([s.bucket for s in samples])
    out = []
    for epoch in range(epochs):
        for k, ids in enumerate(_plan(buckets, batch_size, rank, world, seed, epoch, drop_last)):
            chosen = [samples[i] for i in ids]
            caption = np.zeros((len(ids), TEXT_LEN, TEXT_WIDTH), np.float16)
            for row, sample in enumerate(chosen):
                caption[row, :len(sample.text[:TEXT_LEN])] = sample.text[:TEXT_LEN]
            height, width = BUCKETS[chosen[0].bucket]
            mean = torch.from_numpy(np.stack([s.mean for s in chosen])).to(device).float()
            std = torch.from_numpy(np.stack([s.std for s in chosen])).to(device).float()
            generator = torch.Generator(device).manual_seed(noise_seed(seed, epoch, k, rank))
            noise = torch.randn(mean.shape, generator=generator, device=device)
            batch = {
                "latent": torch.addcmul(mean, std, noise),
                "caption": torch.from_numpy(caption),
                "caption_lens": torch.tensor([min(len(s.text), TEXT_LEN) for s in chosen], dtype=torch.int64),
                "label": torch.tensor([s.label for s in chosen], dtype=torch.int64),
                "resolution": torch.tensor([s.orig_size for s in chosen], dtype=torch.float32),
                "aspect_ratio": torch.full((len(ids), 1), height / width, dtype=torch.float32),
                "index": torch.from_numpy(ids.astype(np.int64)),
            }
            out.append({key: value.to(device) for key, value in batch.items()})
    return out


def _pull(loader, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches taken the way train/loop.py takes them: ``for batch in loader``, epoch
    after epoch."""
    def forever():
        while True:
            yield from loader

    stream = forever()
    return [next(stream) for _ in range(count)]


def _children() -> set[int]:
    return {process.pid for process in multiprocessing.active_children()}


CROSSING = dict(batch_size=4, rank=1, world=2, seed=11, drop_last=False)  # 5 batches an epoch on rank 1


@pytest.mark.parametrize("stage_thread", [False, True])
@pytest.mark.parametrize("backend,workers", [("torch", 0), ("torch", 2), ("dali", 0), ("dali", 2)])
def test_batches_across_epochs_match_a_numpy_reference(cache, backend, workers, stage_thread):
    reference = _reference(cache, 3, **CROSSING)
    loader = make_loader(cache[0], backend=backend, workers=workers, text_len=TEXT_LEN, device="cpu",
                         stage_thread=stage_thread, **CROSSING)
    assert len(loader) * 3 == len(reference) == 15
    try:
        _assert_same_batches(reference, _pull(loader, len(reference)))
    finally:
        loader.close()


@pytest.mark.parametrize("backend,workers,stage_thread", [("torch", 0, False), ("torch", 2, False),
                                                         ("torch", 2, True), ("dali", 0, True)])
def test_resumed_loader_continues_with_the_batches_of_the_first(cache, backend, workers, stage_thread):
    reference = _reference(cache, 3, **CROSSING)
    kwargs = dict(backend=backend, workers=workers, text_len=TEXT_LEN, device="cpu", stage_thread=stage_thread)
    first = make_loader(cache[0], **kwargs, **CROSSING)
    resumed = make_loader(cache[0], **kwargs, **CROSSING)
    try:
        _assert_same_batches(reference[:8], _pull(first, 8))
        state = first.state_dict()  # the batch after these 8 is in flight already
        assert (state["epoch"], state["batch"]) == (1, 3)
        resumed.load_state_dict(state)
        _assert_same_batches(reference[8:], _pull(resumed, 7))  # through the end of epoch 2
        _assert_same_batches(reference[8:], _pull(first, 7))  # the first carries on as well
    finally:
        first.close()
        resumed.close()


def test_epochs_reuse_the_worker_processes_and_close_stops_them(cache):
    reference = _reference(cache, 2, **CROSSING)
    before = _children()
    loader = make_loader(cache[0], backend="torch", workers=2, text_len=TEXT_LEN, device="cpu", **CROSSING)
    _assert_same_batches(reference[:5], [dict(b) for b in loader])
    workers = _children() - before
    assert len(workers) == 2
    _assert_same_batches(reference[5:], [dict(b) for b in loader])
    assert _children() - before == workers  # the same two processes read the second epoch

    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch": 1})  # elsewhere: new workers
    _assert_same_batches(reference[1:3], _pull(loader, 2))
    restarted = _children() - before
    assert len(restarted) == 2 and not restarted & workers

    loader.close()
    assert not _children() - before
    _assert_same_batches(reference[3:5], [dict(b) for b in loader])  # iterating again starts workers anew
    loader.close()
    assert not _children() - before


def _fail_read(monkeypatch, failing: int) -> None:
    """Make the cache's ``failing``-th read (counted from 1) raise OSError, once."""
    read, calls = LatentCache.read, {"count": 0}

    def flaky(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == failing:
            raise OSError("shard unreadable")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(LatentCache, "read", flaky)


@pytest.mark.parametrize("stage_thread", [False, True])
def test_a_failed_read_raises_and_iterating_again_resumes_at_its_batch(cache, monkeypatch, stage_thread):
    reference = _reference(cache, 2, **CROSSING)
    loader = make_loader(cache[0], backend="torch", workers=0, text_len=TEXT_LEN, device="cpu",
                         stage_thread=stage_thread, **CROSSING)
    _fail_read(monkeypatch, 7)  # epoch 1, batch 1
    stream, got = iter(_pull_forever(loader)), []
    try:
        with pytest.raises(OSError, match="shard unreadable"):
            while True:
                got.append(next(stream))
        assert (loader.epoch, loader.batch) == (1, 1)  # every batch before the failed one was handed over
        _assert_same_batches(reference[:6], got)
        _assert_same_batches(reference[6:], _pull(loader, 4))
    finally:
        loader.close()


@pytest.mark.parametrize("stage_thread", [False, True])
def test_a_failed_read_of_a_batch_not_taken_is_dropped_with_it(cache, monkeypatch, stage_thread):
    reference = _reference(cache, 2, **CROSSING)
    loader = make_loader(cache[0], backend="torch", workers=0, text_len=TEXT_LEN, device="cpu",
                         stage_thread=stage_thread, **CROSSING)
    _fail_read(monkeypatch, 3)  # batch 2, staged while batch 1 is taken
    try:
        _assert_same_batches(reference[:2], _pull(loader, 2))
        loader.load_state_dict({**loader.state_dict(), "epoch": 1, "batch": 0})  # batch 2 is no longer wanted
        _assert_same_batches(reference[5:8], _pull(loader, 3))
    finally:
        loader.close()


def _pull_forever(loader):
    while True:
        yield from loader


def test_a_collected_loader_stops_its_workers(cache):
    before = _children()
    loader = make_loader(cache[0], backend="torch", workers=2, text_len=TEXT_LEN, device="cpu", **CROSSING)
    _pull(loader, 2)
    assert len(_children() - before) == 2
    del loader
    gc.collect()
    assert not _children() - before


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dali_device", [("torch", None), ("dali", "cpu"), ("dali", "gpu")])
def test_cuda_batches_on_a_consumer_stream_match_the_reference(cache, backend, dali_device):
    # The consumer works on a stream of its own: the loader's side-stream copies must be ordered
    # before its use of each batch.
    reference = _reference(cache, 2, device="cuda", **CROSSING)
    loader = make_loader(cache[0], backend=backend, workers=2, text_len=TEXT_LEN, device="cuda",
                         dali_device=dali_device, **CROSSING)
    consumer = torch.cuda.Stream()
    consumer.wait_stream(torch.cuda.current_stream())  # the reference, made on the default stream
    try:
        with torch.cuda.stream(consumer):
            batches = _pull(loader, len(reference))
            # compared on the consumer stream
            same = [all(torch.equal(batch[key], expected[key]) for key in expected)
                    for batch, expected in zip(batches, reference, strict=True)]
        assert all(same)
        assert all(t.is_cuda for batch in batches for t in batch.values())
    finally:
        loader.close()


def test_peek_reads_the_largest_bucket_and_leaves_the_position(cache):
    root, written = cache
    opened = open_cache(root)
    loader = make_loader(opened, batch_size=4, seed=3, backend="torch", text_len=TEXT_LEN, workers=0, device="cpu")
    first = dict(next(iter(loader)))
    state = loader.state_dict()
    peeked = loader.peek(5)
    assert loader.state_dict() == state
    counts = {}
    for sample in written.values():
        counts[sample.bucket] = counts.get(sample.bucket, 0) + 1
    largest = max(counts, key=counts.get)
    expected = [i for i in range(opened.num_samples) if written[opened.source(i)].bucket == largest][:5]
    assert peeked["index"].tolist() == expected
    for row, i in enumerate(expected):
        sample = written[opened.source(i)]
        length = min(len(sample.text), TEXT_LEN)
        assert torch.equal(peeked["caption"][row, :length], torch.from_numpy(sample.text[:length]))
        assert not peeked["caption"][row, length:].any()
    # the loader goes on with the batch it would have given without the peek
    again = make_loader(opened, batch_size=4, seed=3, backend="torch", text_len=TEXT_LEN, workers=0, device="cpu")
    batches = iter(again)
    next(batches)
    _assert_same_batches([dict(next(iter(loader)))], [dict(next(batches))])
    assert torch.equal(first["index"], dict(next(iter(make_loader(
        opened, batch_size=4, seed=3, backend="torch", text_len=TEXT_LEN, workers=0, device="cpu"))))["index"])
    with pytest.raises(ValueError, match="fewer than"):
        loader.peek(opened.num_samples + 1)
