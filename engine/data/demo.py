"""A deterministic synthetic captioned dataset: coloured shapes on plain backgrounds.

Every image holds one to three objects (a shape, a colour, a size, a place on a 3 x 3 grid;
``max_objects`` lowers the limit); its caption names each of them, largest first, and the
background, e.g. "a large red circle in the top left and a small blue square in the bottom
right on a light grey background". The largest object is unique and is the image's class
("red_circle"), so the same images serve stage 1 (class-conditional), stage 2 (captions) and,
with ``subset="aesthetic"`` (anti-aliased, no noise, at most two objects, usually rendered at
a higher resolution), stage 3.

``generate`` writes PNG + .txt caption pairs and ``objects.jsonl``, a record per image of its
objects (dominant first: colour, shape, size, grid position, centre and radius as fractions
of the image side) for scoring generated images later. Output depends only on (seed, subset,
image number, resolution, max_objects): numpy RNG and PIL drawing, no global state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (240, 210, 40),
    "purple": (135, 60, 175), "orange": (245, 135, 30), "pink": (240, 130, 185), "black": (25, 25, 25),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "light grey": (200, 200, 200), "dark grey": (75, 75, 75), "beige": (225, 210, 180),
    "light blue": (175, 205, 235), "pale green": (190, 225, 190), "navy": (25, 35, 80),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
SIZES = {"small": 0.07, "medium": 0.11, "large": 0.15}  # radius as a fraction of the image side
# 3 x 3 grid: rows top to bottom, columns left to right
POSITIONS = ("top left", "top centre", "top right", "middle left", "centre", "middle right",
             "bottom left", "bottom centre", "bottom right")
CLASSES = tuple(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)
SUBSETS = {"main": 0, "aesthetic": 1}
MAX_OBJECTS = {"main": 3, "aesthetic": 2}  # per image, by default
LAYOUTS = ("folder", "imagenet")
MIN_CONTRAST = 110  # RGB distance below which an object would blend into the background
SUPERSAMPLE = 4     # aesthetic images are drawn this much larger, then downsampled (anti-aliasing)


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def _scene(rng: np.random.Generator, max_objects: int) -> dict:
    """Pick background and objects; the first object is the largest and the only one of its size."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in COLOURS if _contrast(COLOURS[c], BACKGROUNDS[background]) >= MIN_CONTRAST]
    count = int(rng.integers(1, max_objects + 1))
    sizes = list(SIZES)
    dominant_size = int(rng.integers(1, 3))  # medium or large, so smaller ones exist
    cells = rng.permutation(len(POSITIONS))[:count]
    objects = []
    for k, cell in enumerate(cells.tolist()):
        size = sizes[dominant_size] if k == 0 else sizes[int(rng.integers(0, dominant_size))]
        objects.append({
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": colours[rng.integers(len(colours))],
            "size": size,
            "position": POSITIONS[cell],
            "cell": cell,
        })
    return {"background": background, "objects": objects}


def _place(rng: np.random.Generator, obj: dict, jitter: bool) -> None:
    """Centre and radius (fractions of the side) inside the object's grid cell."""
    radius = SIZES[obj["size"]]
    row, col = divmod(obj.pop("cell"), 3)
    slack = (1 / 6 - radius) * 0.8 if jitter else 0.0  # keeps the shape inside its cell
    obj["center"] = [round((col + 0.5) / 3 + float(rng.uniform(-slack, slack)), 4),
                     round((row + 0.5) / 3 + float(rng.uniform(-slack, slack)), 4)]
    obj["radius"] = radius


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "star":  # five points, inner radius 0.45 r
        corners = [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + turn + k * math.pi / 5) for k in range(10)]
    else:
        sides, start = {"square": (4, math.pi / 4), "triangle": (3, -math.pi / 2),
                        "diamond": (4, 0.0), "hexagon": (6, 0.0)}[shape]
        corners = [(r, start + turn + 2 * math.pi * k / sides) for k in range(sides)]
    return [(cx + d * math.cos(a), cy + d * math.sin(a)) for d, a in corners]


def render(scene: dict, resolution: int, rng: np.random.Generator, clean: bool) -> Image.Image:
    scale = SUPERSAMPLE if clean else 1
    side = resolution * scale
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.float32)
    shade = np.linspace(1.04, 0.96, side, dtype=np.float32)[:, None, None]  # soft top-to-bottom gradient
    pixels = np.broadcast_to(base * shade, (side, side, 3)).copy()  # (H, W, 3)
    if not clean:
        pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        cx, cy = obj["center"][0] * side, obj["center"][1] * side
        r = obj["radius"] * side
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            turn = 0.0 if clean else float(rng.uniform(-0.2, 0.2))
            draw.polygon(_polygon(obj["shape"], cx, cy, r, turn), fill=fill)
    if scale > 1:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def caption(scene: dict) -> str:
    parts = [f"a {o['size']} {o['colour']} {o['shape']} in the {o['position']}" for o in scene["objects"]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {scene['background']} background"


def generate(out_dir: str | Path, n: int, resolution: int = 64, seed: int = 0, subset: str = "main",
             layout: str = "folder", max_objects: int | None = None) -> list[dict]:
    """Write ``n`` images with captions under ``out_dir``; return (and write as objects.jsonl)
    one record per image: file, caption, class_name, class_id (in CLASSES), background, objects.

    ``layout="folder"``: ``out_dir/000000.png`` + ``000000.txt``; ``layout="imagenet"``: the same
    inside a folder named after the image's class (``out_dir/red_circle/000000.png``).
    ``max_objects``: at most this many objects per image (1 to 3; default 3 for "main", 2 for
    "aesthetic").
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {tuple(SUBSETS)}, got {subset!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    max_objects = MAX_OBJECTS[subset] if max_objects is None else max_objects
    if not 1 <= max_objects <= 3:  # a dominant size and up to two smaller ones
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    if n < 0 or resolution < 16:
        raise ValueError(f"need n >= 0 and resolution >= 16, got n={n}, resolution={resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = subset == "aesthetic"
    records = []
    for number in range(n):
        rng = np.random.default_rng([seed, SUBSETS[subset], number])
        scene = _scene(rng, max_objects)
        for obj in scene["objects"]:
            _place(rng, obj, jitter=not clean)
        dominant = scene["objects"][0]
        class_name = f"{dominant['colour']}_{dominant['shape']}"
        folder = out / class_name if layout == "imagenet" else out
        folder.mkdir(exist_ok=True)
        stem = f"{number:06d}"
        text = caption(scene)
        render(scene, resolution, rng, clean).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        records.append({
            "file": (folder / f"{stem}.png").relative_to(out).as_posix(),
            "caption": text,
            "class_name": class_name,
            "class_id": CLASSES.index(class_name),
            "background": scene["background"],
            "objects": scene["objects"],
        })
    with open(out / "objects.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return records
