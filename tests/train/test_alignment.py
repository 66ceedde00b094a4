"""The demo's alignment analyser (train/alignment.py) on real demo images and on hand-drawn ones."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from engine.data import demo
from train.alignment import Analysis, alignment, analyse


def _fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"demo seed {seed}")
    return seed


def _chance(records: list[dict], attribute: str) -> float:
    """Share of caption pairs (i, j != i) whose dominant objects agree: what a perfect analyser
    scores when the captions are shuffled."""
    values = [r["objects"][0][attribute] for r in records]
    n = len(values)
    same = sum(a == b for i, a in enumerate(values) for j, b in enumerate(values) if i != j)
    return same / (n * (n - 1))


@pytest.mark.parametrize("subset,resolution,n", [("main", 32, 60), ("aesthetic", 64, 40), ("main", 64, 30)])
def test_ground_truth_images_score_full_marks_and_chance_when_shuffled(tmp_path, subset, resolution, n):
    records = demo.generate(tmp_path, n, resolution, seed=_fresh_seed(), subset=subset)
    analyses = [analyse(Image.open(tmp_path / r["file"])) for r in records]
    scores = alignment(analyses, records)
    assert scores["colour"] >= 0.97 and scores["position"] >= 0.97, scores
    for attribute in ("colour", "position"):
        chance = _chance(records, attribute)
        assert abs(scores[f"{attribute}_shuffled"] - chance) < 0.03, (attribute, scores, chance)
        assert scores[f"{attribute}_shuffled"] < 0.3
    assert [a.background for a in analyses] == [r["background"] for r in records]


def _disc_image(side: int, background: str, discs: list[tuple[str, float, float, float]], blur: float = 0.0):
    """A background with discs (colour, centre x, centre y, radius: fractions of the side), drawn
    with numpy at 4x and averaged down (anti-aliased rims), optionally Gaussian-blurred."""
    big = side * 4
    yy, xx = np.mgrid[0:big, 0:big] + 0.5  # (big, big) pixel centres
    pixels = np.broadcast_to(np.array(demo.BACKGROUNDS[background], np.float64), (big, big, 3)).copy()
    for colour, cx, cy, r in discs:
        inside = (xx - cx * big) ** 2 + (yy - cy * big) ** 2 <= (r * big) ** 2
        pixels[inside] = demo.COLOURS[colour]
    small = pixels.reshape(side, 4, side, 4, 3).mean(axis=(1, 3))  # (side, side, 3)
    image = Image.fromarray(np.round(small).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(blur)) if blur else image


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_dominant_disc_colour_and_cell(blur):
    rng = np.random.default_rng(_fresh_seed())
    for _ in range(12):
        background = list(demo.BACKGROUNDS)[rng.integers(len(demo.BACKGROUNDS))]
        colours = [c for c in demo.COLOURS if np.linalg.norm(np.subtract(demo.COLOURS[c], demo.BACKGROUNDS[background]))
                   >= demo.MIN_CONTRAST]
        big_cell, small_cell = rng.permutation(9)[:2]
        big_colour, small_colour = rng.choice(colours, 2)
        discs = []
        for colour, cell, radius in ((big_colour, big_cell, 0.15), (small_colour, small_cell, 0.08)):
            row, col = divmod(int(cell), 3)
            discs.append((str(colour), (col + 0.5) / 3, (row + 0.5) / 3, radius))
        got = analyse(_disc_image(48, background, discs, blur))
        assert got == Analysis(str(big_colour), demo.POSITIONS[big_cell], background), (discs, background, got)


def test_rim_of_a_red_disc_on_grey_is_not_pink():
    # the anti-aliased rim is a red-grey blend, whose nearest palette colour would be pink
    image = _disc_image(32, "light grey", [("red", 0.5, 0.5, 0.15)])
    assert analyse(image).colour == "red"


def test_size_not_area_picks_the_dominant_object():
    # a large star covers fewer pixels than a medium circle; its circumradius is still larger
    scene = {"background": "beige", "objects": [
        {"shape": "star", "colour": "blue", "size": "large", "position": "top left", "center": [1 / 6, 1 / 6],
         "radius": demo.SIZES["large"]},
        {"shape": "circle", "colour": "red", "size": "medium", "position": "bottom right", "center": [5 / 6, 5 / 6],
         "radius": demo.SIZES["medium"]}]}
    image = demo.render(scene, 64, np.random.default_rng(0), clean=True)
    assert analyse(image) == Analysis("blue", "top left", "beige")


def test_plain_background_has_no_object():
    image = Image.new("RGB", (32, 32), demo.BACKGROUNDS["navy"])
    got = analyse(image)
    assert got == Analysis(None, None, "navy")
    records = [{"objects": [{"colour": "red", "position": "centre"}]}] * 2
    assert alignment([got, got], records) == {"n": 2, "colour": 0.0, "colour_shuffled": 0.0, "position": 0.0,
                                              "position_shuffled": 0.0, "found": 0.0}


def test_alignment_counts_matches_and_mismatched_pairs():
    analyses = [Analysis("red", "centre", "beige"), Analysis("blue", "top left", "beige"),
                Analysis("red", "top left", "beige")]
    records = [{"objects": [{"colour": c, "position": p}]} for c, p in
               (("red", "centre"), ("red", "top left"), ("green", "top left"))]
    scores = alignment(analyses, records)
    assert scores["colour"] == pytest.approx(1 / 3) and scores["position"] == pytest.approx(1.0)
    # off-diagonal pairs (i, j): colour matches (0, 1), (2, 0), (2, 1); position (1, 2), (2, 1)
    assert scores["colour_shuffled"] == pytest.approx(3 / 6) and scores["position_shuffled"] == pytest.approx(2 / 6)
    assert set(alignment(analyses, records, ("colour",))) == {"n", "colour", "colour_shuffled", "found"}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="RGB image"):
        analyse(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="one record per analysis"):
        alignment([Analysis("red", "centre", "beige")] * 2, [{"objects": [{"colour": "red"}]}] * 3)
    with pytest.raises(ValueError, match="attributes"):
        alignment([Analysis("red", "centre", "beige")] * 2, [{"objects": [{"colour": "red"}]}] * 2, ("shape",))
