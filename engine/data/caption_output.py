"""Captions written where `prepare` reads them, one layout per source kind (docs/caption.md).

- **folder**: OUT mirrors SRC: each captioned image appears at its relative path as a symbolic
  link to the source file, beside it ``<stem>.txt`` with the caption, so ``prepare --images OUT``
  reads a folder source with side-car captions and the cache names the same sources as SRC;
- **metadata.jsonl**: OUT/metadata.jsonl with ``{"file_name", "text"}`` per captioned image, in
  source order; ``file_name`` is the source's own, linked into OUT like a folder's images (an
  absolute name, or one that leaves SRC through "..", is written as the absolute path instead);
- **webdataset**: OUT/<name>.tar for each source tar that has a captioned image: the image
  members copied byte for byte, each followed by ``<key>.txt`` holding the caption (the source
  tar's other members stay behind: a second caption member would be read before ours).

Every file is replaced atomically (a temporary name, then a rename): a reader sees the old file
or the new one. Writing is idempotent: a file that already holds the right content is left alone,
so a second merge of the same captions writes nothing.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

from engine.data.cache import atomic_write_bytes
from engine.data.sources import Source, SourceItem

METADATA_FILE = "metadata.jsonl"


def _replace_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file and a rename, unless it already holds
    exactly that; return whether it wrote. Not fsynced one by one: the caller syncs once at the end."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _link(path: Path, target: Path) -> bool:
    """Make ``path`` a symbolic link to ``target`` (atomically replacing anything else there)."""
    if path.is_symlink() and os.readlink(path) == str(target):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return True


def _inside(name: str) -> bool:
    """Whether a relative source name stays inside its folder when joined to it."""
    parts = Path(name).parts
    return not Path(name).is_absolute() and ".." not in parts and bool(parts)


def _write_folder(out: Path, captioned: list[tuple[SourceItem, str]]) -> int:
    written = 0
    for item, caption in captioned:
        image = out / item.key
        written += _link(image, Path(item.image.path).resolve())
        stem, _ = os.path.splitext(image.name)  # the side-car name `prepare` looks for
        written += _replace_bytes(image.with_name(stem + ".txt"), caption.encode("utf-8"))
    return written


def _write_metadata(out: Path, captioned: list[tuple[SourceItem, str]]) -> int:
    written = 0
    lines = []
    for item, caption in captioned:
        target = Path(item.image.path).resolve()
        if _inside(item.key):
            written += _link(out / item.key, target)
            file_name = item.key
        else:
            file_name = str(target)
        lines.append(json.dumps({"file_name": file_name, "text": caption}, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    metadata = out / METADATA_FILE
    if not (metadata.is_file() and metadata.read_bytes() == data):
        atomic_write_bytes(metadata, data)
        written += 1
    return written


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # the same captions give the same bytes, whenever they were written
    return info, io.BytesIO(data)


def _tar_bytes(items: list[tuple[SourceItem, str]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item, caption in items:
            member = item.key.split(":", 1)[1]  # the key is "<tar name>:<member name>"
            directory, name = os.path.split(member)
            stem = name.partition(".")[0]  # webdataset's sample key: the name up to its first dot
            tar.addfile(*_tar_member(member, item.image.read()))
            tar.addfile(*_tar_member(f"{directory}/{stem}.txt" if directory else f"{stem}.txt",
                                     caption.encode("utf-8")))
    return buffer.getvalue()


def _write_tars(out: Path, captioned: list[tuple[SourceItem, str]]) -> int:
    by_tar: dict[str, list[tuple[SourceItem, str]]] = {}
    for item, caption in captioned:
        by_tar.setdefault(item.image.path, []).append((item, caption))
    written = 0
    for tar_path, items in by_tar.items():
        written += _replace_bytes(out / Path(tar_path).name, _tar_bytes(items))
    return written


WRITERS = {"folder": _write_folder, "metadata.jsonl": _write_metadata, "webdataset": _write_tars}


def write_captions(out: Path, source: Source, captioned: list[tuple[SourceItem, str]]) -> int:
    """Write the captions of ``source`` into ``out`` in the layout its kind calls for; return how
    many files were created or replaced (0 when everything was already in place)."""
    written = WRITERS[source.kind](Path(out), captioned)
    if written:
        os.sync()  # the per-file writes above skip fsync; one flush before the caller marks the output complete
    return written


def planned_files(source: Source) -> list[str]:
    """Where ``write_captions`` puts each item's caption (relative to OUT), to check for clashes."""
    if source.kind == "folder":
        return [os.path.splitext(item.key)[0] + ".txt" for item in source.items]
    return []
