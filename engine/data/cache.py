"""The latent cache on disk: shard writing, the index, checksums, and reading it back.

Layout (docs/data.md has the full description)::

    CACHE/
      index.json          metadata, class names, shard list with per-file sizes and sha256
      skipped.jsonl       one line per input that was not encoded: {"source", "reason"}
      prepare.json        the settings the cache is being built with (checked on re-runs)
      shards/s000000/     one shard = a folder of .npy files, renamed into place when complete
        latent_mean_<b>.npy, latent_std_<b>.npy   (n_b, C, h, w) fp16 for each bucket b present
        text.npy          (total tokens, text width) fp16: every caption's tokens, packed
        records.npy       (n, 5) int64: text offset, text length, label, original height, width
        samples.json      captions and source names
        shard.json        this shard's index entry: counts per bucket, file sizes and sha256

Within a shard, samples are ordered by bucket id then source order, so the bucket of every
sample follows from the per-shard bucket counts in index.json: opening a cache reads no array,
only the .npy headers, to check the index against the shards (``check_index``).
A sample's id is its position in the cache (shards in index order, then position in the shard).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "engine-latent-cache"
VERSION = 1
INDEX_FILE = "index.json"
SKIPPED_FILE = "skipped.jsonl"
SETTINGS_FILE = "prepare.json"
SHARDS_DIR = "shards"
SHARD_ENTRY_FILE = "shard.json"
RECORD_COLUMNS = ("text_offset", "text_length", "label", "orig_height", "orig_width")
VERIFY_MODES = ("open", "lazy", "none")


class CacheCorruptError(RuntimeError):
    """A shard file does not match the size or checksum its index entry records."""


class CacheIndexError(ValueError):
    """index.json disagrees with itself or with the shard files it lists (edited, or mixed from
    two builds); the message names the shard, the file and the field, and the fix."""


@dataclass
class Sample:
    """One encoded sample, as the writer takes it."""

    mean: np.ndarray        # (C, h, w) fp16
    std: np.ndarray         # (C, h, w) fp16
    text: np.ndarray        # (L, text width) fp16, L = true token count (0 allowed)
    label: int              # class id, -1 without labels
    orig_size: tuple[int, int]  # original image (height, width)
    bucket: int
    caption: str
    source: str


# ---------------------------------------------------------------- atomic writes, checksums

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so a reader sees either the old file or the complete new one."""
    path = Path(path)
    # unique per writer: ranks on different hosts may share a pid and write the same index
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    _write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------- writing

def shard_name(number: int) -> str:
    return f"s{number:06d}"


def write_shard(shards_dir: Path, name: str, samples: list[Sample], skipped: list[dict],
                text_width: int) -> dict:
    """Write one shard atomically and return its index entry (also saved as its shard.json).

    Files go to a hidden temporary folder, each fsynced; shard.json is written last; then the
    folder is renamed to ``name``. A shard folder that exists is therefore complete (and a
    stale one from an older run is replaced).
    """
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(samples)), key=lambda i: samples[i].bucket)  # stable: keeps source order
    samples = [samples[i] for i in order]

    files: dict[str, bytes] = {}
    buckets: list[list[int]] = []  # [bucket id, count], ascending bucket id
    for sample in samples:
        if buckets and buckets[-1][0] == sample.bucket:
            buckets[-1][1] += 1
        else:
            buckets.append([sample.bucket, 1])
    start = 0
    for bucket, count in buckets:
        group = samples[start:start + count]
        files[f"latent_mean_{bucket}.npy"] = _npy_bytes(np.stack([s.mean for s in group]).astype(np.float16))
        files[f"latent_std_{bucket}.npy"] = _npy_bytes(np.stack([s.std for s in group]).astype(np.float16))
        start += count
    lengths = np.array([s.text.shape[0] for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if samples else lengths
    text = (np.concatenate([s.text for s in samples]) if samples
            else np.zeros((0, text_width))).astype(np.float16)  # (total tokens, Ct)
    if text.shape[1:] != (text_width,):
        raise ValueError(f"shard {name}: text features have width {text.shape[1:]}, the cache has {text_width}")
    records = np.array([[offsets[i], lengths[i], s.label, *s.orig_size] for i, s in enumerate(samples)],
                       dtype=np.int64).reshape(len(samples), len(RECORD_COLUMNS))
    files["text.npy"] = _npy_bytes(text)
    files["records.npy"] = _npy_bytes(records)
    files["samples.json"] = json.dumps([{"caption": s.caption, "source": s.source} for s in samples],
                                       ensure_ascii=False).encode("utf-8")

    entry = {
        "name": name,
        "num_samples": len(samples),
        "buckets": buckets,
        "files": {fname: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for fname, data in files.items()},
        "skipped": skipped,
    }
    for stale in shards_dir.glob(f".{name}.tmp-*"):  # left by an interrupted writer of this shard
        shutil.rmtree(stale)
    tmp = shards_dir / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir()
    for fname, data in files.items():
        _write_synced(tmp / fname, data)
    _write_synced(tmp / SHARD_ENTRY_FILE, (json.dumps(entry, indent=1) + "\n").encode("utf-8"))
    fsync_dir(tmp)
    final = shards_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(shards_dir)
    return entry


def read_shard_entry(shard_dir: Path) -> dict | None:
    """The shard's own index entry, or None when the shard is missing or its entry unreadable."""
    try:
        with open(Path(shard_dir) / SHARD_ENTRY_FILE, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_problem(shard_dir: Path, entry: dict, check_hash: bool = True) -> str | None:
    """Why the shard's files do not match ``entry`` (naming the file), or None when they all do."""
    for fname, expected in entry["files"].items():
        path = Path(shard_dir) / fname
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, the index records {expected['bytes']}"
        if check_hash and sha256_file(path) != expected["sha256"]:
            return f"{path} does not match its sha256 checksum in the index (the file is corrupt)"
    return None


def npy_shape(path: Path) -> tuple[int, ...]:
    """The shape of the array in a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return tuple(shape)


def _stored_shape(path: Path, shard: str) -> tuple[int, ...]:
    try:
        return npy_shape(path)
    except (OSError, ValueError) as error:
        raise CacheCorruptError(f"latent cache shard {shard}: {path} is not a readable .npy file ({error})") from error


def _index_fix(cache_dir: Path) -> str:
    return (f"re-run the `python -m train prepare` command that built the cache, with the same --out: it keeps the "
            f"intact shards, encodes missing or damaged ones again and rewrites {INDEX_FILE} from the shards' own "
            f"{SHARD_ENTRY_FILE}; when only {INDEX_FILE} is wrong, `python -m train prepare --out {cache_dir} "
            f"--merge` rewrites it alone")


def _index_error(cache_dir: Path, field: str, problem: str, shard: str | None = None) -> CacheIndexError:
    where = f"shard {shard}: " if shard is not None else ""
    return CacheIndexError(f"latent cache {cache_dir}: {where}{INDEX_FILE} field {field} {problem}. "
                           f"Fix: {_index_fix(cache_dir)}")


def check_index(cache_dir: Path, meta: dict) -> None:
    """Check index.json (``meta``) against itself and against the shard files, reading only
    the .npy headers: raise CacheIndexError naming the shard, the file and the field.

    Checked: per shard, bucket ids distinct, ascending and within the bucket table, bucket
    counts summing to the shard's num_samples, every file a reader needs listed, every listed
    file present, and the array shapes: latent_mean/std_<b> (count of b, C, h, w), records.npy
    (num_samples, 5), text.npy (tokens, text_width); and the shards' counts summing to
    num_samples. Text offsets live in records.npy, not in the index: ``records_problem``
    checks them when a shard's contents are verified.
    """
    cache_dir = Path(cache_dir)
    try:
        _check_counts(cache_dir, meta)
        for number, shard in enumerate(meta["shards"]):
            _check_shard_files(cache_dir, meta, number, shard)
    except CacheIndexError:
        raise
    except (KeyError, TypeError, ValueError) as error:  # a field missing or of the wrong type
        raise CacheIndexError(f"latent cache {cache_dir}: {INDEX_FILE} is malformed ({type(error).__name__}: "
                              f"{error}). Fix: {_index_fix(cache_dir)}") from error


def _check_counts(cache_dir: Path, meta: dict) -> None:
    """The index against itself: bucket ids and counts per shard, and their total."""
    num_buckets = len(meta["buckets"])
    total = 0
    for number, shard in enumerate(meta["shards"]):
        ids = [int(bucket) for bucket, _ in shard["buckets"]]
        counts = [int(count) for _, count in shard["buckets"]]
        if any(not 0 <= bucket < num_buckets for bucket in ids):
            raise _index_error(cache_dir, f"shards[{number}].buckets", f"has bucket ids {ids}, but the bucket "
                               f"table (field buckets) has ids 0..{num_buckets - 1}", shard["name"])
        if ids != sorted(set(ids)) or min(counts, default=1) < 1:
            raise _index_error(cache_dir, f"shards[{number}].buckets", f"is {shard['buckets']}, not distinct "
                               f"ascending bucket ids with positive counts", shard["name"])
        if sum(counts) != shard["num_samples"]:
            raise _index_error(cache_dir, f"shards[{number}].num_samples", f"is {shard['num_samples']}, but the "
                               f"shard's buckets count {sum(counts)} samples", shard["name"])
        total += sum(counts)
    if total != meta["num_samples"]:
        raise _index_error(cache_dir, "num_samples", f"is {meta['num_samples']}, but the shards hold {total} samples")


def _check_shard_files(cache_dir: Path, meta: dict, number: int, shard: dict) -> None:
    """One shard's entry against its files: listed, present, and of the shapes the index implies."""
    name, field = shard["name"], f"shards[{number}]"
    folder = cache_dir / SHARDS_DIR / name
    down = meta["latent_downsample"]
    shapes = {"records.npy": (shard["num_samples"], len(RECORD_COLUMNS))}  # the first dimension of each is a count
    for bucket, count in shard["buckets"]:
        height, width = meta["buckets"][bucket]
        shapes[f"latent_mean_{bucket}.npy"] = shapes[f"latent_std_{bucket}.npy"] = (
            count, meta["latent_channels"], height // down, width // down)
    if not folder.is_dir():
        raise _index_error(cache_dir, f"{field}.name", f"is {name}, but the shard folder {folder} is missing", name)
    for fname in [*shapes, "text.npy", "samples.json"]:
        if fname not in shard["files"]:
            raise _index_error(cache_dir, f"{field}.files", f"lists no {fname}, which a reader needs", name)
    for fname in shard["files"]:
        if not (folder / fname).is_file():
            raise _index_error(cache_dir, f"{field}.files", f"lists {fname}, but {folder / fname} is missing", name)
    for fname, shape in shapes.items():
        actual = _stored_shape(folder / fname, name)
        if actual[:1] != shape[:1]:
            what = "num_samples" if fname == "records.npy" else "buckets"
            raise _index_error(cache_dir, f"{field}.{what}", f"counts {shape[0]} samples for {folder / fname}, "
                               f"which holds {actual[0] if actual else 'no'} rows", name)
        if actual != shape and fname == "records.npy":
            raise _index_error(cache_dir, "version", f"is {VERSION}, whose records.npy has the shape {shape}, but "
                               f"{folder / fname} has {actual}", name)
        if actual != shape:
            raise _index_error(cache_dir, "latent_channels, latent_downsample and buckets", f"give "
                               f"{folder / fname} the shape {shape}, the file has {actual}", name)
    text_shape = _stored_shape(folder / "text.npy", name)
    if len(text_shape) != 2 or text_shape[1] != meta["text_width"]:
        raise _index_error(cache_dir, "text_width", f"is {meta['text_width']}, but {folder / 'text.npy'} holds "
                           f"features of shape {text_shape} (tokens, width)", name)


def records_problem(records: np.ndarray, text_rows: int) -> str | None:
    """Why a shard's records (n, 5) do not fit its text array of ``text_rows`` tokens, or None."""
    offsets, lengths = records[:, 0], records[:, 1]
    bad = np.flatnonzero((offsets < 0) | (lengths < 0) | (offsets + lengths > text_rows))
    if bad.size == 0:
        return None
    row = int(bad[0])
    return (f"sample {row} has text_offset {int(offsets[row])} and text_length {int(lengths[row])}, outside the "
            f"{text_rows} token rows of text.npy ({bad.size} samples are)")


def write_index(cache_dir: Path, meta: dict, entries: list[dict]) -> dict:
    """Write index.json and skipped.jsonl from the cache metadata and all shard entries."""
    cache_dir = Path(cache_dir)
    skipped = [record for entry in entries for record in entry["skipped"]]
    index = dict(meta)
    index.update(
        format=FORMAT,
        version=VERSION,
        num_samples=sum(entry["num_samples"] for entry in entries),
        num_skipped=len(skipped),
        shards=[{key: entry[key] for key in ("name", "num_samples", "buckets", "files")} for entry in entries],
    )
    atomic_write_bytes(cache_dir / SKIPPED_FILE,
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped).encode("utf-8"))
    atomic_write_json(cache_dir / INDEX_FILE, index)
    return index


# ---------------------------------------------------------------- reading

class LatentCache:
    """A built cache, opened for reading. ``open_cache(path)`` makes one.

    Metadata for the trainer: ``resolution``, ``latent_channels``, ``latent_sizes``
    (``latent_size`` for a single-bucket cache), ``text_width``, ``max_tokens``,
    ``num_samples``, ``has_labels``, ``classes``, ``buckets``; ``require(...)`` rejects a cache
    built for other settings with an error naming the field.

    ``verify`` says when shard files are checked against their sha256 in the index:
    ``"open"`` all of them now, ``"lazy"`` each shard the first time this process reads it,
    ``"none"`` never (sizes are still checked). A mismatch raises CacheCorruptError naming the file.

    Opening checks index.json against the shards from the .npy headers (``check_index``), and
    verifying a shard also checks its text offsets against its text array; a disagreement
    raises CacheIndexError (a ValueError) naming the shard, the file and the field, with the fix.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "lazy", max_open_shards: int = 64):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"latent cache {self.path} does not exist "
                                    f"(build it with `python -m train prepare --out {self.path} ...`)")
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            hint = (" prepare has started there but the index is not written yet: finish every rank, "
                    "or run `python -m train prepare --merge`") if (self.path / SETTINGS_FILE).exists() else ""
            raise FileNotFoundError(f"latent cache {self.path} has no {INDEX_FILE}: not a finished cache.{hint}")
        with open(index_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(f"{index_path} is not a {FORMAT} version {VERSION} index "
                             f"(format {self.meta.get('format')!r}, version {self.meta.get('version')!r})")
        check_index(self.path, self.meta)  # a damaged index fails here, not as an IndexError mid-run
        self.verify = verify
        self.max_open_shards = max_open_shards
        self.shards = self.meta["shards"]
        self.buckets = [tuple(b) for b in self.meta["buckets"]]  # (image height, image width) per bucket id

        counts = np.array([shard["num_samples"] for shard in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])  # (S + 1,) first sample id of each shard
        # bucket of every sample, and its row in its shard's latent array of that bucket
        bucket_ids, rows = [], []
        for shard in self.shards:
            for bucket, count in shard["buckets"]:
                bucket_ids.append(np.full(count, bucket, dtype=np.int32))
                rows.append(np.arange(count, dtype=np.int64))
        self.sample_buckets = np.concatenate(bucket_ids) if bucket_ids else np.zeros(0, np.int32)  # (N,)
        self.bucket_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)  # (N,)

        self._verified: set[int] = set()
        self._open: OrderedDict[int, dict] = OrderedDict()
        if verify == "open":
            for number in range(len(self.shards)):
                self._verify(number)

    # metadata -----------------------------------------------------------------------------
    resolution = property(lambda self: self.meta["resolution"])
    latent_channels = property(lambda self: self.meta["latent_channels"])
    text_width = property(lambda self: self.meta["text_width"])
    max_tokens = property(lambda self: self.meta["max_tokens"])
    num_samples = property(lambda self: self.meta["num_samples"])
    has_labels = property(lambda self: self.meta["labels"])
    classes = property(lambda self: list(self.meta["classes"]))
    multi_aspect = property(lambda self: self.meta["multi_aspect"])

    @property
    def latent_sizes(self) -> list[tuple[int, int]]:
        """Latent (h, w) of each bucket id."""
        down = self.meta["latent_downsample"]
        return [(height // down, width // down) for height, width in self.buckets]

    @property
    def latent_size(self) -> tuple[int, int]:
        sizes = self.latent_sizes
        if len(sizes) != 1:
            raise ValueError(f"cache {self.path} is multi-aspect with {len(sizes)} latent sizes: use latent_sizes")
        return sizes[0]

    def require(self, **expected) -> None:
        """Raise ValueError unless every given field (e.g. resolution=256, text_width=4096) matches."""
        for field, value in expected.items():
            actual = getattr(self, field)
            if actual != value:
                raise ValueError(f"latent cache {self.path} was built with {field}={actual!r}, "
                                 f"this run needs {field}={value!r}: prepare a cache for these settings")

    def __len__(self) -> int:
        return self.num_samples

    # samples ------------------------------------------------------------------------------
    def caption(self, sample: int) -> str:
        return self._samples_json(sample)["caption"]

    def source(self, sample: int) -> str:
        return self._samples_json(sample)["source"]

    def read(self, ids: np.ndarray, text_len: int) -> dict[str, np.ndarray | list[np.ndarray]]:
        """Gather samples of one bucket from the shards.

        Returns numpy arrays: ``latent_mean``/``latent_std`` (B, C, h, w) fp16, ``text`` a list of
        (L_i, Ct) fp16 arrays with L_i = min(true length, text_len), ``caption_lens`` (B,) int64,
        ``label`` (B,) int64, ``resolution`` (B, 2) float32 original (h, w), ``aspect_ratio``
        (B, 1) float32 bucket h / w, ``index`` (B,) int64.
        """
        ids = np.asarray(ids, dtype=np.int64)
        bucket = int(self.sample_buckets[ids[0]])
        if np.any(self.sample_buckets[ids] != bucket):
            raise ValueError("a batch must hold samples of one bucket")
        shard_of = np.searchsorted(self.shard_starts, ids, side="right") - 1  # (B,)
        means, stds, texts, records = [], [], [], []
        for sample, number in zip(ids.tolist(), shard_of.tolist(), strict=True):
            arrays = self._shard(number)
            row = int(self.bucket_rows[sample])
            position = sample - int(self.shard_starts[number])
            offset, length = arrays["records"][position, :2]
            means.append(arrays[f"latent_mean_{bucket}"][row])
            stds.append(arrays[f"latent_std_{bucket}"][row])
            texts.append(np.asarray(arrays["text"][offset:offset + min(int(length), text_len)]))
            records.append(arrays["records"][position])
        records = np.stack(records)  # (B, 5)
        height, width = self.buckets[bucket]
        return {
            "latent_mean": np.stack(means),
            "latent_std": np.stack(stds),
            "text": texts,
            "caption_lens": np.array([t.shape[0] for t in texts], dtype=np.int64),
            "label": records[:, 2].copy(),
            "resolution": records[:, 3:5].astype(np.float32),
            "aspect_ratio": np.full((len(ids), 1), height / width, dtype=np.float32),
            "index": ids,
        }

    # shard access -------------------------------------------------------------------------
    def _verify(self, number: int) -> None:
        if number in self._verified:
            return
        shard = self.shards[number]
        folder = self.path / SHARDS_DIR / shard["name"]
        problem = shard_problem(folder, shard, check_hash=self.verify != "none")
        if problem is not None:
            raise CacheCorruptError(f"latent cache shard {shard['name']}: {problem}")
        problem = records_problem(np.load(folder / "records.npy"), npy_shape(folder / "text.npy")[0])
        if problem is not None:
            raise CacheIndexError(f"latent cache {self.path}: shard {shard['name']}: {folder / 'records.npy'} "
                                  f"field text_offset/text_length: {problem}. Fix: {_index_fix(self.path)}")
        self._verified.add(number)

    def _shard(self, number: int) -> dict:
        arrays = self._open.get(number)
        if arrays is not None:
            self._open.move_to_end(number)
            return arrays
        self._verify(number)
        folder = self.path / SHARDS_DIR / self.shards[number]["name"]
        arrays = {fname[:-4]: np.load(folder / fname, mmap_mode="r")
                  for fname in self.shards[number]["files"] if fname.endswith(".npy")}
        self._open[number] = arrays
        if len(self._open) > self.max_open_shards:  # each memory map holds a file descriptor
            self._open.popitem(last=False)
        return arrays

    def _samples_json(self, sample: int) -> dict:
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} is out of range for a cache of {self.num_samples}")
        number = int(np.searchsorted(self.shard_starts, sample, side="right") - 1)
        self._verify(number)
        with open(self.path / SHARDS_DIR / self.shards[number]["name"] / "samples.json", encoding="utf-8") as f:
            return json.load(f)[sample - int(self.shard_starts[number])]

    def __getstate__(self):  # memory maps stay behind when a loader worker process gets a copy
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def open_cache(path: str | os.PathLike, verify: str = "lazy") -> LatentCache:
    """Open a built latent cache (see LatentCache)."""
    return LatentCache(path, verify=verify)
