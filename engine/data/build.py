"""Building a latent cache: decode, bucket, encode, write shards, merge the index.

The ordered item list of the source is cut into shards of ``shard_size`` items; shard ``j``
belongs to rank ``j % world``. A rank skips shards that already exist and match their own
checksums (a re-run resumes), encodes the rest and writes each atomically. The first rank
to find every shard complete writes index.json and skipped.jsonl (``merge_cache``); the
shard plan does not depend on ``world``, so a re-run may use a different number of ranks.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import engine
from engine.data.buckets import bucket_table, nearest_bucket, resize_crop
from engine.data.cache import (SETTINGS_FILE, SHARDS_DIR, Sample, atomic_write_json, read_shard_entry,
                               shard_name, shard_problem, write_index, write_shard)
from engine.data.encode import TextEncoder, load_vae
from engine.data.images import UndecodableImage, decode_image
from engine.data.sources import Source, SourceItem, open_source


class BadInputError(ValueError):
    """An input image or caption that cannot be used (raised with ``strict=True``)."""


@dataclass
class _Decoded:
    pixels: np.ndarray          # (H, W, 3) uint8, already the bucket's size
    orig_size: tuple[int, int]  # (height, width) before resizing
    bucket: int
    caption: str
    label: int


def read_image(item: SourceItem):
    """The item's image as 8-bit RGB (each mode by its real range, transparency over white), or
    the reason it cannot be used: what `prepare` and `caption` list in skipped.jsonl."""
    try:
        data = item.image.read()
    except FileNotFoundError:
        return "missing file"
    if not data:
        return "empty file"
    try:
        return decode_image(data)
    except UndecodableImage as error:
        return str(error)


def _decode(item: SourceItem, source: Source, table: list, labels: bool) -> _Decoded | str:
    """The item ready to encode, or the reason it is bad."""
    try:
        caption = item.read_caption()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"unreadable caption: {error}"
    if labels:
        if item.class_name is None:
            return "not inside a class folder (--labels expects SRC/<class>/<image>)"
        caption = caption or ""  # class-conditional data needs no caption
    elif caption is None:
        return "no caption"
    elif not caption:
        return "empty caption"
    image = read_image(item)
    if isinstance(image, str):
        return image
    bucket = nearest_bucket(image.height, image.width, table)
    _, height, width = table[bucket]
    pixels = np.asarray(resize_crop(image, height, width))  # (H, W, 3)
    return _Decoded(pixels, (image.height, image.width), bucket, caption, source.class_id(item))


def _bounded_map(pool: ThreadPoolExecutor, fn, items: list, depth: int):
    """pool.map with at most ``depth`` results waiting, so decoded images cannot pile up."""
    todo = iter(items)
    futures = deque(pool.submit(fn, item) for item in itertools.islice(todo, depth))
    while futures:
        result = futures.popleft().result()
        for item in itertools.islice(todo, 1):
            futures.append(pool.submit(fn, item))
        yield result


def _encode_shard(items: list[SourceItem], pool: ThreadPoolExecutor, decode, image_encoder,
                  text: TextEncoder | None, batch_size: int, strict: bool, root: str, bar) -> tuple[list, list]:
    """Encode one shard's items: (samples in source order, skipped records).

    Decoded images wait per bucket until ``batch_size`` of them fill an encoder batch.
    """
    pending: dict[int, list[tuple[int, _Decoded]]] = {}  # bucket -> [(position in shard, decoded)]
    samples: dict[int, Sample] = {}
    skipped = []

    def flush(bucket: int) -> None:
        group = pending.pop(bucket)
        means, stds = image_encoder.encode(np.stack([d.pixels for _, d in group]))  # (B, C, h, w) each
        if text is not None:
            texts = text.encode([d.caption for _, d in group])  # [(L_i, Ct)]
        else:
            texts = [np.zeros((0, 0), np.float16)] * len(group)
        for (position, d), mean, std, features in zip(group, means, stds, texts, strict=True):
            samples[position] = Sample(mean, std, features, d.label, d.orig_size, bucket, d.caption,
                                       items[position].key)

    for position, decoded in enumerate(_bounded_map(pool, decode, items, 2 * batch_size)):
        if isinstance(decoded, str):
            if strict:
                raise BadInputError(f"bad input {items[position].key} (under {root}): {decoded}")
            skipped.append({"source": items[position].key, "reason": decoded})
        else:
            pending.setdefault(decoded.bucket, []).append((position, decoded))
            if len(pending[decoded.bucket]) == batch_size:
                flush(decoded.bucket)
        bar.update(1)
    for bucket in list(pending):
        flush(bucket)
    return [samples[p] for p in sorted(samples)], skipped


def _resolve_rank(rank: int | None, world: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _comparable(settings: dict) -> dict:
    """Settings without paths: the same model or data mounted elsewhere is the same."""
    out = json.loads(json.dumps(settings))
    out["source"].pop("path")
    for model in ("vae", "text_encoder"):
        if out[model] is not None:
            out[model].pop("path")
    return out


def _claim_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.exists():
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
        old, new = _comparable(existing), _comparable(settings)
        for key in [*new, *(key for key in old if key not in new)]:
            if old.get(key) != new.get(key):
                raise ValueError(f"{out} is a cache started with different settings: {key} was "
                                 f"{json.dumps(old.get(key))[:200]}, this run has {json.dumps(new.get(key))[:200]}; "
                                 f"use another --out or delete {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def merge_cache(out: str | os.PathLike) -> dict | None:
    """Write index.json and skipped.jsonl if every planned shard is complete; return the index,
    or None (with the missing shards printed) when some rank has not finished."""
    out = Path(out)
    settings_path = out / SETTINGS_FILE
    if not settings_path.exists():
        raise FileNotFoundError(f"{out} has no {SETTINGS_FILE}: `prepare` has not run there")
    with open(settings_path, encoding="utf-8") as f:
        settings = json.load(f)
    entries, missing = [], []
    for number in range(settings["num_shards"]):
        entry = read_shard_entry(out / SHARDS_DIR / shard_name(number))
        if entry is None:
            missing.append(shard_name(number))
        else:
            entries.append(entry)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"index not written yet: {len(missing)} of {settings['num_shards']} shards missing ({shown}); "
              f"the last rank to finish writes it, or run `python -m train prepare --merge`", file=sys.stderr)
        return None
    meta = {key: value for key, value in settings.items() if key not in ("num_shards",)}
    return write_index(out, meta, entries)


def _load_encoders(vae: str, text_encoder: str | None, device: torch.device, max_tokens: int,
                   text_dtype: torch.dtype | None, table: list, pad_captions: bool = False) -> tuple:
    """(image encoder, text encoder or None), checked to divide every bucket into whole latents."""
    image_encoder = load_vae(vae, device)
    text = (TextEncoder(text_encoder, device, max_tokens, text_dtype, padded=pad_captions)
            if text_encoder is not None else None)
    for _, height, width in table:
        if height % image_encoder.downsample or width % image_encoder.downsample:
            raise ValueError(f"bucket {height}x{width} is not divisible by the VAE's downsampling "
                             f"factor {image_encoder.downsample}")
    return image_encoder, text


def _settings(src: str | os.PathLike, source: Source, table: list, image_encoder, text: TextEncoder | None, *,
              resolution: int, multi_aspect: bool, max_tokens: int, labels: bool, shard_size: int) -> dict:
    """What the cache is built from and how (settings.json): every rank of every run must agree on it."""
    return {
        "engine_version": engine.__version__,
        "source": {"path": str(Path(src).resolve()), "kind": source.kind, "num_items": len(source.items),
                   "fingerprint": source.fingerprint()},
        "resolution": resolution,
        "multi_aspect": multi_aspect,
        "buckets": [[height, width] for _, height, width in table],
        "latent_channels": image_encoder.channels,
        "latent_downsample": image_encoder.downsample,
        "vae": image_encoder.identity,
        "text_encoder": text.identity if text is not None else None,
        "text_width": text.width if text is not None else 0,
        "max_tokens": max_tokens,
        "padded_captions": bool(text is not None and text.padded),
        "labels": labels,
        "classes": source.classes,
        "shard_size": shard_size,
        "num_shards": -(-len(source.items) // shard_size),
    }


def _shard_is_done(folder: Path, bar) -> bool:
    """Whether the shard in ``folder`` is complete and matches its checksums (a re-run reuses
    it); a damaged shard is named on ``bar`` with what is wrong."""
    entry = read_shard_entry(folder)
    if entry is None:
        return False
    problem = shard_problem(folder, entry)
    if problem is not None:
        bar.write(f"shard {folder.name}: {problem}; encoding it again")
    return problem is None


def _encode_shards(shards_dir: Path, shards: dict[int, list[SourceItem]], decode, image_encoder,
                   text: TextEncoder | None, text_width: int, *, batch_size: int, strict: bool, root: str,
                   workers: int | None, bar) -> tuple[int, int, int]:
    """Encode and write the shards (number -> items) not already done: (images encoded, inputs
    skipped, shards reused)."""
    encoded = skipped_count = reused = 0
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for number, items in shards.items():
            folder = shards_dir / shard_name(number)
            if _shard_is_done(folder, bar):
                reused += 1
                bar.update(len(items))
                continue
            samples, skipped = _encode_shard(items, pool, decode, image_encoder, text, batch_size, strict, root, bar)
            write_shard(shards_dir, folder.name, samples, skipped, text_width)
            encoded += len(samples)
            skipped_count += len(skipped)
    return encoded, skipped_count, reused


def build_cache(src: str | os.PathLike, out: str | os.PathLike, vae: str, text_encoder: str | None = None, *,
                resolution: int = 256, multi_aspect: bool = False, labels: bool = False, max_tokens: int = 120,
                device: str | torch.device | None = None, batch_size: int = 32, shard_size: int = 512,
                rank: int | None = None, world: int | None = None, strict: bool = False, workers: int | None = None,
                text_dtype: torch.dtype | None = None, progress: bool = True,
                pad_captions: bool = False) -> dict | None:
    """Encode ``src`` into the cache ``out`` (this rank's shards); return the index once merged.

    ``vae``: a diffusers AutoencoderKL folder or "pixels"; ``text_encoder``: a transformers
    folder, optional only with ``labels``. ``rank``/``world`` default to torchrun's RANK and
    WORLD_SIZE. ``strict``: the first bad input raises BadInputError naming it, instead of
    being skipped and listed in skipped.jsonl. ``pad_captions``: every caption's features at
    ``max_tokens`` positions, padding included (TextEncoder's ``padded``).
    """
    from tqdm import tqdm

    out = Path(out)
    rank, world = _resolve_rank(rank, world)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if text_encoder is None and not labels:
        raise ValueError("a text encoder is needed for captioned data (--text-encoder); only --labels data may omit it")
    table = bucket_table(resolution, multi_aspect)
    source = open_source(src, labels=labels)
    device = _default_device() if device is None else torch.device(device)
    image_encoder, text = _load_encoders(vae, text_encoder, device, max_tokens, text_dtype, table, pad_captions)
    settings = _settings(src, source, table, image_encoder, text, resolution=resolution, multi_aspect=multi_aspect,
                         max_tokens=max_tokens, labels=labels, shard_size=shard_size)
    _claim_settings(out, settings)

    mine = {number: source.items[number * shard_size:(number + 1) * shard_size]
            for number in range(rank, settings["num_shards"], world)}  # shard number -> items
    bar = tqdm(total=sum(map(len, mine.values())), desc=f"prepare rank {rank}/{world}", unit="img",
               disable=not progress)
    start = time.perf_counter()
    encoded, skipped_count, reused = _encode_shards(
        out / SHARDS_DIR, mine, lambda item: _decode(item, source, table, labels), image_encoder, text,
        settings["text_width"], batch_size=batch_size, strict=strict, root=source.root, workers=workers, bar=bar)
    bar.close()
    seconds = time.perf_counter() - start
    print(f"rank {rank}/{world}: encoded {encoded} images into {len(mine) - reused} shards, reused {reused} "
          f"finished shards, skipped {skipped_count} bad inputs, {seconds:.1f} s "
          f"({encoded / max(seconds, 1e-9):.1f} img/s on {device})", file=sys.stderr)
    index = merge_cache(out)
    if index is not None:
        print(f"wrote {out / 'index.json'}: {index['num_samples']} samples, {index['num_skipped']} skipped "
              f"(listed in {out / 'skipped.jsonl'})", file=sys.stderr)
    return index
