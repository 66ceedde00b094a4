"""Opening a cache checks index.json against the shards: an edited or mismatched index fails
at open with an error naming the shard, the file and the field, not later as an IndexError."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine.data import CacheIndexError, demo, open_cache
from engine.data.build import build_cache
from train.__main__ import main as train_main

RES = 32
SHARD = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_text_encoder):
    """A pixels cache of 10 demo images in shards of 4, 4 and 2, and the source it came from."""
    root = tmp_path_factory.mktemp("index")
    demo.generate(root / "src", 10, RES, seed=3)
    build_cache(root / "src", root / "cache", "pixels", tiny_text_encoder, resolution=RES, shard_size=SHARD,
                device="cpu", progress=False)
    return root / "src", root / "cache"


@pytest.fixture
def cache(built, tmp_path):
    """A private copy of the built cache, to damage."""
    shutil.copytree(built[1], tmp_path / "cache")
    return tmp_path / "cache"


def _edit_index(cache, edit) -> None:
    path = cache / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _past_the_end(index):  # a consistent index that counts a sample shard 1 does not hold
    index["shards"][1]["buckets"][0][1] += 1
    index["shards"][1]["num_samples"] += 1
    index["num_samples"] += 1


def _drop_listed(index):
    del index["shards"][1]["files"]["latent_std_0.npy"]


# (edit of index.json, what the message must name, in order: shard and field, then what is wrong)
INDEX_EDITS = {
    "shard count past its end": (_past_the_end, r"shard s000001: .*shards\[1\]\.num_samples counts 5 samples for "
                                                r".*s000001/records.npy, which holds 4 rows"),
    "shard count against its buckets": (lambda index: index["shards"][1].update(num_samples=5),
                                        r"shard s000001: .*shards\[1\]\.num_samples is 5, but the shard's buckets "
                                        r"count 4"),
    "bucket count against its array": (lambda index: index["shards"][2]["buckets"][0].__setitem__(1, 1),
                                       r"shard s000002: .*shards\[2\]\.num_samples is 2, but the shard's buckets "
                                       r"count 1"),
    "total num_samples": (lambda index: index.update(num_samples=11),
                          r"field num_samples is 11, but the shards hold 10 samples"),
    "bucket id outside the table": (lambda index: index["shards"][0]["buckets"][0].__setitem__(0, 3),
                                    r"shard s000000: .*shards\[0\]\.buckets has bucket ids \[3\], but the bucket "
                                    r"table \(field buckets\) has ids 0..0"),
    "shard renamed": (lambda index: index["shards"][2].update(name="s000007"),
                      r"shard s000007: .*shards\[2\]\.name is s000007, but the shard folder "
                      r".*shards/s000007 is missing"),
    "file not listed": (_drop_listed, r"shard s000001: .*shards\[1\]\.files lists no latent_std_0.npy"),
    "text width": (lambda index: index.update(text_width=32),
                   r"shard s000000: .*field text_width is 32, but .*s000000/text.npy holds features of shape "
                   r"\(\d+, 16\)"),
    "latent channels": (lambda index: index.update(latent_channels=4),
                        r"shard s000000: .*latent_channels, latent_downsample and buckets give "
                        r".*s000000/latent_mean_0.npy the shape \(4, 4, 32, 32\), the file has \(4, 3, 32, 32\)"),
    "field missing": (lambda index: index["shards"][0].pop("buckets"), r"index.json is malformed \(KeyError"),
}


@pytest.mark.parametrize("edit, message", INDEX_EDITS.values(), ids=INDEX_EDITS.keys())
@pytest.mark.parametrize("verify", ["lazy", "none"])
def test_edited_index_fails_at_open_naming_shard_and_field(cache, edit, message, verify):
    _edit_index(cache, edit)
    with pytest.raises(CacheIndexError, match=message) as caught:
        open_cache(cache, verify=verify)
    assert str(cache) in str(caught.value) and "python -m train prepare" in str(caught.value)  # the fix
    assert isinstance(caught.value, ValueError)


def test_missing_shard_file_fails_at_open(cache):
    (cache / "shards" / "s000001" / "latent_mean_0.npy").unlink()
    with pytest.raises(CacheIndexError, match=r"shard s000001: .*shards\[1\]\.files lists latent_mean_0.npy, but "
                                              r".*s000001/latent_mean_0.npy is missing"):
        open_cache(cache, verify="none")


def test_text_offsets_beyond_the_text_array_fail_at_the_shards_first_read(cache):
    """Offsets live in records.npy, which a checksum covers; with verify="none" the records
    check itself catches them, before a read silently returns fewer tokens."""
    path = cache / "shards" / "s000001" / "records.npy"
    records = np.load(path)
    text_rows = np.load(cache / "shards" / "s000001" / "text.npy", mmap_mode="r").shape[0]
    records[2, 0] = text_rows  # same size on disk: only the values differ
    np.save(path, records)
    opened = open_cache(cache, verify="none")
    opened.read(np.array([0]), 8)  # shard 0 is intact
    with pytest.raises(CacheIndexError, match=rf"shard s000001: .*s000001/records.npy field "
                                              rf"text_offset/text_length: sample 2 has text_offset {text_rows}"):
        opened.read(np.array([SHARD]), 8)


@pytest.mark.parametrize("verify", ["open", "lazy", "none"])
def test_unedited_cache_opens_and_reads_every_sample(built, verify):
    cache = open_cache(built[1], verify=verify)
    assert cache.num_samples == 10 and len(cache.shards) == 3
    for i in range(cache.num_samples):
        assert cache.read(np.array([i]), 8)["latent_mean"].shape == (1, 3, RES, RES)


def test_the_fixes_the_message_gives_work(built, cache, tiny_text_encoder):
    """`prepare --merge` rewrites an edited index.json; re-running prepare re-encodes a shard
    that lost a file."""
    _edit_index(cache, _past_the_end)
    with pytest.raises(CacheIndexError, match="--merge"):
        open_cache(cache)
    assert train_main(["prepare", "--out", str(cache), "--merge"]) == 0
    assert open_cache(cache, verify="open").num_samples == 10
    (cache / "shards" / "s000002" / "text.npy").unlink()
    with pytest.raises(CacheIndexError, match="s000002/text.npy is missing"):
        open_cache(cache)
    build_cache(built[0], cache, "pixels", tiny_text_encoder, resolution=RES, shard_size=SHARD, device="cpu",
                progress=False)
    assert open_cache(cache, verify="open").num_samples == 10
