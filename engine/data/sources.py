"""Where `prepare` finds images and captions.

Three input formats, detected from what SRC contains:

- **folder**: images anywhere under SRC, each captioned by a file of the same name with
  ``.txt`` (the caption text) or ``.json`` (its "caption", "text" or "prompt" field);
- **metadata.jsonl** at the top of SRC (Hugging Face imagefolder style): one JSON object a
  line with ``file_name`` (relative to SRC) and the caption in ``text`` (or ``caption``);
- **webdataset**: SRC is a ``.tar`` file or a folder of them; members sharing a key (the
  member path up to the first dot of its file name) form a sample, the image from an image
  extension, the caption from ``.txt`` or ``.json``.

With ``labels=True`` the class of an image is the name of its top-level folder
(ImageNet layout ``SRC/<class>/<image>``); class ids are positions in the sorted class names.

Listing is cheap (no image or caption is opened), so every rank lists the whole source and
gets the same ordered item list; bytes are read later, by the rank that encodes the item.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_FIELDS = ("caption", "text", "prompt")


@dataclass(frozen=True)
class Blob:
    """A byte range of a file: the whole file when ``size`` is -1."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class SourceItem:
    key: str                       # names the input in messages and skipped.jsonl
    image: Blob
    caption: str | Blob | None     # None: the item has no caption
    caption_is_json: bool = False
    class_name: str | None = None  # labels mode only; None: not inside a class folder

    def read_caption(self) -> str | None:
        """The caption text, or None when there is none (a missing field counts as none)."""
        if self.caption is None or isinstance(self.caption, str):
            return self.caption
        raw = self.caption.read().decode("utf-8")
        if not self.caption_is_json:
            return raw.strip()
        record = json.loads(raw)
        if not isinstance(record, dict):
            return None
        for field in CAPTION_FIELDS:
            if isinstance(record.get(field), str):
                return record[field].strip()
        return None


@dataclass
class Source:
    kind: str                 # "folder", "metadata.jsonl" or "webdataset"
    root: str
    items: list[SourceItem]
    classes: list[str]        # sorted class names in labels mode, else empty

    def fingerprint(self) -> str:
        """Hash of the ordered item keys: a re-run must see the same list to reuse shards."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.key.encode("utf-8") + b"\n")
        return digest.hexdigest()

    def __post_init__(self):
        self._class_ids = {name: i for i, name in enumerate(self.classes)}

    def class_id(self, item: SourceItem) -> int:
        return self._class_ids[item.class_name] if item.class_name is not None else -1


def open_source(src: str | os.PathLike, labels: bool = False) -> Source:
    root = Path(src)
    if not root.exists():
        raise FileNotFoundError(f"image source {root} does not exist")
    if root.is_file():
        if root.suffix != ".tar":
            raise ValueError(f"image source {root} is a file but not a .tar shard; pass a folder or a .tar")
        kind, items = "webdataset", _tar_items([root])
    elif (root / "metadata.jsonl").is_file():
        kind, items = "metadata.jsonl", _metadata_items(root)
    elif any(root.glob("*.tar")):
        kind, items = "webdataset", _tar_items(sorted(root.glob("*.tar")))
    else:
        kind, items = "folder", _folder_items(root)
    if not items:
        raise ValueError(f"image source {root} holds no images (looked for {sorted(IMAGE_EXTENSIONS)})")
    classes: list[str] = []
    if labels:
        if kind != "folder":
            raise ValueError(f"--labels takes class names from folders (SRC/<class>/<image>); "
                             f"{root} is a {kind} source")
        items = [_with_class(item) for item in items]
        classes = sorted({item.class_name for item in items if item.class_name is not None})
    return Source(kind, str(root), items, classes)


def _with_class(item: SourceItem) -> SourceItem:
    parts = item.key.split("/")
    class_name = parts[0] if len(parts) > 1 else None
    return SourceItem(item.key, item.image, item.caption, item.caption_is_json, class_name)


def _folder_items(root: Path) -> list[SourceItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = set(filenames)
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            caption, is_json = None, False
            if stem + ".txt" in names:
                caption = Blob(os.path.join(dirpath, stem + ".txt"))
            elif stem + ".json" in names:
                caption, is_json = Blob(os.path.join(dirpath, stem + ".json")), True
            path = os.path.join(dirpath, name)
            key = Path(path).relative_to(root).as_posix()
            items.append(SourceItem(key, Blob(path), caption, is_json))
    items.sort(key=lambda item: item.key)
    return items


def _metadata_items(root: Path) -> list[SourceItem]:
    items = []
    metadata = root / "metadata.jsonl"
    with open(metadata, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                file_name = record["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{metadata} line {line_no}: expected a JSON object with a "
                                 f"'file_name' field, got {line.strip()[:80]!r}") from None
            caption = next((record[f] for f in ("text", "caption") if isinstance(record.get(f), str)), None)
            items.append(SourceItem(Path(file_name).as_posix(), Blob(str(root / file_name)),
                                    caption.strip() if caption is not None else None))
    return items


def _tar_items(tars: list[Path]) -> list[SourceItem]:
    items = []
    for tar_path in tars:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(tar_path, "r:") as tar:  # uncompressed only: members are read by byte range
            for member in tar:
                if not member.isfile():
                    continue
                directory, name = os.path.split(member.name)
                stem, dot, ext = name.partition(".")
                if not dot:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                groups.setdefault(key, {})["." + ext.lower()] = member
        for members in groups.values():  # insertion order = order in the tar
            image = next((m for ext, m in members.items() if ext in IMAGE_EXTENSIONS), None)
            if image is None:
                continue
            caption_member = members.get(".txt") or members.get(".json")
            caption = None if caption_member is None else Blob(str(tar_path), caption_member.offset_data,
                                                                caption_member.size)
            items.append(SourceItem(f"{tar_path.name}:{image.name}",
                                    Blob(str(tar_path), image.offset_data, image.size),
                                    caption, caption_member is not None and ".txt" not in members))
    return items
