"""`python -m train caption`: dense captions for a source `prepare` reads, written by a
vision-language model, resumable and split over ranks (docs/caption.md).

State lives in OUT/.caption/:

- ``settings.json``: what the captions are made from: the source (kind, item count, fingerprint
  of its item list), the model (folder fingerprint), prompt, token limit and decoding. A re-run
  with other settings, or another corpus, is refused before any image is read;
- ``journal-r<rank>-w<world>.jsonl``: one line per item a process has finished, appended and
  fsynced after every batch: ``{"source", "caption"}``, or ``{"source", "reason"}`` for an image
  that could not be captioned. The journals are the truth: an item with a line is done, by any
  rank of any earlier run; a crash loses at most the batch in flight, whose line was never
  written (a torn last line is cut off when its writer reopens the journal);
- ``COMPLETE``: written last by the merge.

Work split, as `prepare` splits shards: the source's item list is cut into chunks of
``shard_size`` items and chunk ``j`` belongs to rank ``j % world``; a rank captions the items of
its chunks that no journal holds. The assignment does not depend on what is done, so ranks
started at different times never take the same item, and a re-run may use another world size.

When a rank finds every item in some journal it merges: writes the captions where `prepare`
reads them (engine.data.caption_output), OUT/skipped.jsonl (``{"source", "reason"}`` as
`prepare` lists bad inputs), the density report OUT/density.json (engine.data.density), then
``COMPLETE``. Merging again writes nothing that is already in place.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import engine
from engine.data import caption_output, density
from engine.data.build import _bounded_map, _default_device, _resolve_rank, read_image
from engine.data.cache import SKIPPED_FILE, atomic_write_bytes, atomic_write_json, fsync_dir
from engine.data.sources import Source, SourceItem, open_source
from engine.data.vlm import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT, Captioner, Sampling, inspect_vlm

FORMAT = "engine-captions"
VERSION = 1
STATE_DIR = ".caption"
SETTINGS_FILE = "settings.json"
COMPLETE_FILE = "COMPLETE"
DENSITY_FILE = "density.json"
DENSITY_LIMIT = 100_000  # captions per row counted by default: minutes of tagging on one core (docs/caption.md)
EMPTY_CAPTION = "the model generated an empty caption"


# ------------------------------------------------------------------------------ settings

def _comparable(settings: dict) -> dict:
    """Settings without paths or versions: the same corpus and model mounted elsewhere are the same."""
    out = json.loads(json.dumps(settings))
    out.pop("engine_version", None)
    out["source"].pop("path", None)
    out["vlm"].pop("path", None)
    return out


def _check_out(out: Path, src_root: Path) -> None:
    """OUT must not be SRC or overlap it: captions are written beside links to the source images."""
    out_r, src_r = out.resolve(), src_root.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise ValueError(f"--out {out} overlaps the image source {src_root}; caption writes a new folder "
                         f"that links to the images (the source's own captions stay as they are)")


def _read_settings(out: Path) -> dict | None:
    path = out / STATE_DIR / SETTINGS_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_claim(out: Path, settings: dict) -> None:
    """Refuse an OUT that holds another corpus's captions, captions made with other settings, or
    files `caption` did not write; create nothing."""
    existing = _read_settings(out)
    if existing is None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"--out {out} is not empty and holds no caption state ({STATE_DIR}/{SETTINGS_FILE}); "
                             f"it may be another corpus or another tool's output: pass a new or empty folder")
        return
    old, new = _comparable(existing), _comparable(settings)
    if old["source"] != new["source"]:
        raise ValueError(f"--out {out} holds the captions of another corpus: it was started on "
                         f"{existing['source']['path']} "
                         f"({existing['source']['kind']}, {existing['source']['num_items']} items), this run lists "
                         f"{settings['source']['path']} ({settings['source']['kind']}, "
                         f"{settings['source']['num_items']} items) with a different item list; use another --out")
    for key in [*new, *(key for key in old if key not in new)]:
        if old.get(key) != new.get(key):
            raise ValueError(f"--out {out} was captioned with other settings: {key} was "
                             f"{json.dumps(old.get(key))[:200]}, this run has {json.dumps(new.get(key))[:200]}; "
                             f"use another --out, or the same settings to resume")


def _claim(out: Path, settings: dict) -> None:
    state = out / STATE_DIR
    if (state / SETTINGS_FILE).is_file():
        return
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state / SETTINGS_FILE, settings)


def _check_caption_files(source: Source) -> None:
    """Two images of one folder with the same stem would need the same side-car .txt file."""
    clashes = [name for name, count in Counter(caption_output.planned_files(source)).items() if count > 1]
    if clashes:
        raise ValueError(f"images under {source.root} share a caption file name, e.g. {clashes[0]} (images of one "
                         f"folder with the same name and different extensions); rename them, then caption")


# ------------------------------------------------------------------------------ journals

def journal_path(out: Path, rank: int, world: int) -> Path:
    return out / STATE_DIR / f"journal-r{rank:05d}-w{world:05d}.jsonl"


def _complete_lines(data: bytes, path: Path) -> tuple[list[dict], int]:
    """The records of a journal's complete lines, and the byte length they span (a torn last
    line, still being written or cut by a crash, is not counted)."""
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {number} is not JSON: the journal is damaged; delete the line "
                             f"(its image is captioned again) and re-run") from None
        records.append(record)
    return records, end


def read_journals(out: Path) -> dict[str, dict]:
    """Every finished item (source key -> its record) in all journals under OUT."""
    done: dict[str, dict] = {}
    for path in sorted((out / STATE_DIR).glob("journal-*.jsonl")):
        records, _ = _complete_lines(path.read_bytes(), path)
        for record in records:
            done.setdefault(record["source"], record)
    return done


class Journal:
    """This process's journal, opened for appending; a torn last line left by a crash is cut off."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            _, end = _complete_lines(path.read_bytes(), path)
            if end != path.stat().st_size:
                os.truncate(path, end)
        self._file = open(path, "ab")
        fsync_dir(path.parent)

    def append(self, records: list[dict]) -> None:
        """Append ``records`` and make them durable before returning."""
        if not records:
            return
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------ captioning

def _batches(todo: list[SourceItem], pool: ThreadPoolExecutor, batch_size: int):
    """(items, images, skipped records) per batch of ``batch_size`` decodable images, in order."""
    items, images, skipped = [], [], []
    for item, image in zip(todo, _bounded_map(pool, read_image, todo, 2 * batch_size)):
        if isinstance(image, str):
            skipped.append({"source": item.key, "reason": image})
        else:
            items.append(item)
            images.append(image)
        if len(items) == batch_size:
            yield items, images, skipped
            items, images, skipped = [], [], []
    if items or skipped:
        yield items, images, skipped


def caption_items(todo: list[SourceItem], captioner: Captioner, journal: Journal, *, batch_size: int,
                   workers: int, bar, after_batch: Callable[[int], None] | None) -> tuple[int, int]:
    """Caption ``todo`` in batches, each batch's records appended to the journal before the next
    starts; return (captioned, skipped). Decoding runs on ``workers`` threads and the processor
    prepares batch k + 1 on another while the model generates batch k."""
    captioned = skipped_count = 0
    with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as prepare:
        batches = _batches(todo, pool, batch_size)
        current = next(batches, None)
        pending = prepare.submit(captioner.inputs, current[1]) if current and current[1] else None
        number = 0
        while current is not None:
            items, _, skipped = current
            inputs = pending.result() if items else None
            current = next(batches, None)
            pending = prepare.submit(captioner.inputs, current[1]) if current and current[1] else None
            records = list(skipped)
            if items:
                for item, caption in zip(items, captioner.generate(inputs, items[0].key), strict=True):
                    records.append({"source": item.key, "caption": caption} if caption
                                   else {"source": item.key, "reason": EMPTY_CAPTION})
            journal.append(records)
            captioned += sum("caption" in r for r in records)
            skipped_count += sum("reason" in r for r in records)
            bar.update(len(records))
            number += 1
            if after_batch is not None:
                after_batch(number)
    return captioned, skipped_count


def _settings(source: Source, vlm_identity: dict, prompt: str, max_new_tokens: int, sampling: Sampling) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "engine_version": engine.__version__,
        "source": {"path": str(Path(source.root).resolve()), "kind": source.kind, "num_items": len(source.items),
                   "fingerprint": source.fingerprint()},
        "vlm": vlm_identity,
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "decoding": sampling.as_dict(),
    }


def caption_source(src: str | os.PathLike, out: str | os.PathLike, vlm: str | os.PathLike, *,
                   prompt: str = DEFAULT_PROMPT, batch_size: int = 16, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   sampling: Sampling = Sampling(), device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, rank: int | None = None, world: int | None = None,
                   shard_size: int = 512, workers: int | None = None, progress: bool = True,
                   tagger: str = "pattern", density_limit: int = DENSITY_LIMIT,
                   after_batch: Callable[[int], None] | None = None) -> dict:
    """Caption this rank's share of ``src`` into ``out``; merge once every item is done.

    Every check (source, OUT, model folder) runs before the first image is read. Returns
    {"captioned", "skipped", "already_done", "merged", "seconds"} for this process.
    ``after_batch(n)`` is called after the n-th batch is journaled (a test hook).
    """
    from tqdm import tqdm

    out = Path(out)
    rank, world = _resolve_rank(rank, world)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"--batch and --shard-size must be >= 1, got {batch_size} and {shard_size}")
    if not prompt.strip():
        raise ValueError("--prompt is empty")
    source = open_source(src)
    _check_out(out, Path(source.root))
    _check_caption_files(source)
    folder = inspect_vlm(vlm)
    settings = _settings(source, folder.identity, prompt, max_new_tokens, sampling)
    _check_claim(out, settings)
    _claim(out, settings)

    done = read_journals(out)
    chunks = range(rank, -(-len(source.items) // shard_size), world)
    mine = [item for j in chunks for item in source.items[j * shard_size:(j + 1) * shard_size]]
    todo = [item for item in mine if item.key not in done]
    summary = {"captioned": 0, "skipped": 0, "already_done": len(mine) - len(todo), "merged": False, "seconds": 0.0}
    if not todo and (out / STATE_DIR / COMPLETE_FILE).is_file():
        print(f"caption rank {rank}/{world}: nothing to caption ({len(mine)} items already done); "
              f"{out} is complete", file=sys.stderr)
        return summary
    if todo:
        device = _default_device() if device is None else torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        captioner = Captioner(folder, device=device, dtype=dtype, prompt=prompt, max_new_tokens=max_new_tokens,
                              sampling=sampling)
        journal = Journal(journal_path(out, rank, world))
        bar = tqdm(total=len(todo), desc=f"caption rank {rank}/{world}", unit="img", disable=not progress)
        start = time.perf_counter()
        try:
            summary["captioned"], summary["skipped"] = caption_items(
                todo, captioner, journal, batch_size=batch_size, workers=workers or min(8, os.cpu_count() or 1),
                bar=bar, after_batch=after_batch)
        finally:
            journal.close()
            bar.close()
        summary["seconds"] = time.perf_counter() - start
        print(f"caption rank {rank}/{world}: captioned {summary['captioned']} images, skipped {summary['skipped']} "
              f"(listed in {out / SKIPPED_FILE} at the merge), {summary['already_done']} already done, "
              f"{summary['seconds']:.1f} s ({len(todo) / max(summary['seconds'], 1e-9):.2f} img/s on {device})",
              file=sys.stderr)
    summary["merged"] = merge_captions(out, source, tagger=tagger, density_limit=density_limit) is not None
    return summary


# ------------------------------------------------------------------------------ merge and report

def _open_settings_source(out: Path, source: Source | None) -> tuple[dict, Source]:
    settings = _read_settings(out)
    if settings is None:
        raise FileNotFoundError(f"{out} has no {STATE_DIR}/{SETTINGS_FILE}: `caption` has not run there")
    if source is None:
        source = open_source(settings["source"]["path"])
    if source.fingerprint() != settings["source"]["fingerprint"]:
        raise ValueError(f"the source {source.root} no longer lists the items {out} was captioned from "
                         f"(its item list changed); caption it into a new --out")
    return settings, source


def merge_captions(out: str | os.PathLike, source: Source | None = None, *, tagger: str = "pattern",
                   density_limit: int = DENSITY_LIMIT) -> dict | None:
    """Write the outputs when every item of the source is in a journal; return the totals, or None
    (with what is missing printed) while some rank has not finished. ``source`` defaults to the
    path in the settings."""
    out = Path(out)
    settings, source = _open_settings_source(out, source)
    done = read_journals(out)
    missing = [item.key for item in source.items if item.key not in done]
    if missing:
        print(f"caption: not merged yet: {len(missing)} of {len(source.items)} items have no caption record "
              f"(e.g. {missing[0]}); the last rank to finish merges, or run `python -m train caption --merge`",
              file=sys.stderr)
        return None
    captioned = [(item, done[item.key]["caption"]) for item in source.items if "caption" in done[item.key]]
    skipped = [{"source": item.key, "reason": done[item.key]["reason"]}
               for item in source.items if "reason" in done[item.key]]
    written = caption_output.write_captions(out, source, captioned)
    skipped_bytes = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped).encode("utf-8")
    if not ((out / SKIPPED_FILE).is_file() and (out / SKIPPED_FILE).read_bytes() == skipped_bytes):
        atomic_write_bytes(out / SKIPPED_FILE, skipped_bytes)
    totals = {"items": len(source.items), "captioned": len(captioned), "skipped": len(skipped),
              "files_written": written}
    if not (out / DENSITY_FILE).is_file():
        write_density_report(out, source, [c for _, c in captioned], tagger=tagger, limit=density_limit,
                             required=False)
    atomic_write_json(out / STATE_DIR / COMPLETE_FILE, {key: totals[key] for key in ("items", "captioned", "skipped")})
    print(f"caption: {out} complete: {len(captioned)} captioned, {len(skipped)} skipped "
          f"(listed in {out / SKIPPED_FILE}); `python -m train prepare --images {out}` reads it", file=sys.stderr)
    return totals


def density_report(out: str | os.PathLike, source: Source | None = None, *, tagger: str = "pattern",
                   limit: int = DENSITY_LIMIT) -> dict:
    """(Re)write OUT/density.json for a complete OUT (`caption --density`)."""
    out = Path(out)
    _, source = _open_settings_source(out, source)
    if not (out / STATE_DIR / COMPLETE_FILE).is_file():
        raise ValueError(f"{out} is not complete yet: finish the captioning (or `caption --merge`) first")
    done = read_journals(out)
    new = [done[item.key]["caption"] for item in source.items if "caption" in done.get(item.key, {})]
    return write_density_report(out, source, new, tagger=tagger, limit=limit)


def _sample(values: list, limit: int) -> tuple[list, bool]:
    """At most ``limit`` of ``values`` (a fixed-seed uniform sample, in order); 0 means all."""
    if limit <= 0 or len(values) <= limit:
        return values, False
    keep = sorted(random.Random(0).sample(range(len(values)), limit))
    return [values[i] for i in keep], True


def _original_captions(items: list[SourceItem]) -> list[str]:
    captions = []
    for item in items:
        try:
            caption = item.read_caption()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            caption = None
        if caption:
            captions.append(caption)
    return captions


def write_density_report(out: Path, source: Source, new_captions: list[str], *, tagger: str = "pattern",
                         limit: int = DENSITY_LIMIT, required: bool = True) -> dict | None:
    """Noun statistics of the source's own captions and of the new ones, to OUT/density.json and
    stderr. With ``required=False`` a missing tagger package is reported and skipped, not raised."""
    try:
        tag = density.make_tagger(tagger)
    except (ImportError, ValueError) as error:
        if required:
            raise
        print(f"caption: no density report: {error}", file=sys.stderr)
        return None
    original_items, original_sampled = _sample(source.items, limit)
    new, new_sampled = _sample(new_captions, limit)
    rows = {"original": density.noun_statistics(_original_captions(original_items), tag),
            "captioned": density.noun_statistics(new, tag)}
    report = {"valid_above": density.VALID_ABOVE, "tagger": tag.name,
              "noun_tags": sorted(density.NOUN_TAGS),
              "sample": {"limit": limit, "original_items_read": len(original_items),
                         "original_sampled": original_sampled, "captioned_sampled": new_sampled},
              **{label: stats.as_dict() for label, stats in rows.items()}}
    atomic_write_json(out / DENSITY_FILE, report)
    print(density.format_table(rows), file=sys.stderr)
    return report
