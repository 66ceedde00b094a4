"""A deterministic text-image alignment score for images of the demo dataset (engine.data.demo).

``analyse(image)`` reads the dominant object of an image without looking at any caption:

1. background: the per-channel median of the one-pixel border (objects stay inside their grid
   cells, so they can touch the border only at a few pixels);
2. foreground: pixels farther than ``FOREGROUND_DISTANCE`` (RGB) from the background. The demo
   only pairs colours with backgrounds at least ``demo.MIN_CONTRAST`` = 110 apart, while the
   background's vertical shading (±4%) and pixel noise (σ 6 per channel) stay under ~25;
3. every foreground pixel takes the palette colour of ``demo.COLOURS`` that best explains it as
   a blend of that colour and the background: the one whose segment [background, colour] in
   RGB space passes nearest to the pixel. Anti-aliased rims and blurred edges are such blends,
   so they join their object instead of forming a ring of some other colour around it (the
   nearest palette colour of a red-on-grey rim pixel is pink). Pixels of one colour that touch
   (4-neighbours) form a blob; classifying before grouping keeps differently coloured objects
   in neighbouring cells apart;
4. the dominant blob is the one with the largest circumradius, the largest distance from its
   centroid to one of its pixels. Every demo shape is drawn inside a circle of its size's
   radius with its centre at the circle's centre, so the circumradius tells the sizes apart
   whatever the shape (by area, a large star is smaller than a medium circle);
5. colour: the blob's palette colour; position: the 3 x 3 grid cell of its centroid, named as in
   the captions.

``alignment(analyses, records)`` compares them with the dominant (first) object of each record
(``objects.jsonl`` records, or records built from held-out captions) and gives the same score with
the captions shuffled: every image against every other image's caption, averaged, which is the
expected score of a random reassignment of captions, i.e. chance for these images.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.data import demo

FOREGROUND_DISTANCE = 50.0
MIN_BLOB_PIXELS = 2  # a single stray pixel is noise, not an object
_PALETTE_NAMES = tuple(demo.COLOURS)
_PALETTE = np.array([demo.COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # (K, 3)
_BACKGROUND_NAMES = tuple(demo.BACKGROUNDS)
_BACKGROUNDS = np.array([demo.BACKGROUNDS[name] for name in _BACKGROUND_NAMES], dtype=np.float32)  # (M, 3)


@dataclass(frozen=True)
class Analysis:
    """What an image shows: the dominant object's colour and grid position (None when no object
    stands out from the background) and the nearest named background colour."""

    colour: str | None
    position: str | None
    background: str


def _nearest(colours: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table row for each colour: (..., 3) -> (...)."""
    distance = ((colours[..., None, :] - table) ** 2).sum(-1)  # (..., K)
    return distance.argmin(-1)


def _blend_labels(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Palette index whose blend with the background comes nearest each pixel: (H, W, 3) -> (H, W)."""
    towards = _PALETTE - background  # (K, 3): background -> palette colour
    offset = pixels - background  # (H, W, 3)
    alpha = np.clip(offset @ towards.T / (towards * towards).sum(1), 0.0, 1.0)  # (H, W, K): blend weight
    residual = ((offset[..., None, :] - alpha[..., None] * towards) ** 2).sum(-1)  # (H, W, K)
    return residual.argmin(-1)


def _blobs(labels: np.ndarray) -> list[np.ndarray]:
    """4-connected groups of equal non-negative labels: a list of (n, 2) (row, col) arrays."""
    height, width = labels.shape
    seen = labels < 0
    blobs = []
    for start in zip(*np.nonzero(~seen)):
        if seen[start]:
            continue
        colour, members, todo = labels[start], [], deque([start])
        seen[start] = True
        while todo:
            row, col = todo.popleft()
            members.append((row, col))
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= r < height and 0 <= c < width and not seen[r, c] and labels[r, c] == colour:
                    seen[r, c] = True
                    todo.append((r, c))
        blobs.append(np.array(members))
    return blobs


def analyse(image) -> Analysis:
    """The dominant object of a PIL image or (H, W, 3) uint8 array (see the module docstring)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]  # (H, W, 3)
    if pixels.ndim != 3 or min(pixels.shape[:2]) < 3:
        raise ValueError(f"expected an RGB image of at least 3 x 3 pixels, got an array of shape {pixels.shape}")
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (2H + 2W - 4, 3)
    background = np.median(border, axis=0)  # (3,)
    background_name = _BACKGROUND_NAMES[int(_nearest(background, _BACKGROUNDS))]
    foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE  # (H, W)
    labels = np.where(foreground, _blend_labels(pixels, background), -1)  # (H, W): palette index or -1
    best, best_radius = None, -1.0
    for blob in _blobs(labels):
        if len(blob) < MIN_BLOB_PIXELS:
            continue
        centre = blob.mean(0)  # (2,) row, col
        radius = float(np.sqrt(((blob - centre) ** 2).sum(1).max()))
        if radius > best_radius:
            best, best_radius = blob, radius
    if best is None:
        return Analysis(None, None, background_name)
    row, col = best.mean(0) + 0.5  # pixel centres
    cell = min(int(3 * row / height), 2) * 3 + min(int(3 * col / width), 2)
    colour = _PALETTE_NAMES[int(labels[tuple(best[0])])]
    return Analysis(colour, demo.POSITIONS[cell], background_name)


ATTRIBUTES = ("colour", "position")


def alignment(analyses: list[Analysis], records: list[dict], attributes: tuple[str, ...] = ATTRIBUTES) -> dict:
    """Accuracy of image i against record i for each attribute (colour, position) of the dominant
    object, and the same averaged over every mismatched pair (i, j != i): the shuffled-caption
    chance level. ``found``: share of images in which some object stands out at all."""
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"attributes {sorted(unknown)}: choose from {ATTRIBUTES}")
    if len(analyses) != len(records) or len(records) < 2:
        raise ValueError(f"need one record per analysis and at least two of each, got {len(analyses)} analyses "
                         f"and {len(records)} records")
    n = len(records)
    mismatched = ~np.eye(n, dtype=bool)  # (n, n)
    out = {"n": n}
    for attribute in attributes:
        seen = np.array([getattr(a, attribute) or "" for a in analyses])  # (n,)
        wanted = np.array([r["objects"][0][attribute] for r in records])  # (n,)
        match = seen[:, None] == wanted[None, :]  # (n, n): image i against record j
        out[attribute] = float(np.diag(match).mean())
        out[f"{attribute}_shuffled"] = float(match[mismatched].mean())
    out["found"] = float(np.mean([a.colour is not None for a in analyses]))
    return out
