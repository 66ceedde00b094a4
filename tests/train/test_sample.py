"""train.sample's grids: tiles where they belong, and labelled tiles that carry their caption."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from train.sample import LABELLED_TILE, save_grid


def _tiles(count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng()
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def test_grid_places_each_image_row_by_row(tmp_path):
    images = _tiles(5, 8)  # 3 columns, 2 rows
    save_grid(images, tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (16, 24, 3)
    for i, image in enumerate(images):
        row, col = divmod(i, 3)
        np.testing.assert_array_equal(grid[row * 8:(row + 1) * 8, col * 8:(col + 1) * 8], np.asarray(image))


def test_labelled_grid_enlarges_each_image_and_writes_its_label_under_it(tmp_path):
    images = _tiles(4, 32)
    labels = ["a large red circle in the top left on a light grey background", "x", "a small blue star", "y z"]
    save_grid(images, tmp_path / "grid.png", labels)
    grid = np.asarray(Image.open(tmp_path / "grid.png")).astype(int)
    scale = LABELLED_TILE // 32
    tile_w, tile_h = grid.shape[1] // 2, grid.shape[0] // 2
    for i, image in enumerate(images):
        top, left = (i // 2) * tile_h, (i % 2) * tile_w
        enlarged = np.asarray(image).repeat(scale, 0).repeat(scale, 1)
        np.testing.assert_array_equal(grid[top:top + LABELLED_TILE, left:left + LABELLED_TILE], enlarged)
        text = grid[top + LABELLED_TILE:top + tile_h, left:left + tile_w]  # the label area: dark text on white
        assert (text.sum(-1) < 200).any() and (text == 255).all(-1).mean() > 0.5
    # the long caption wraps onto more lines than the one-word label needs
    first = grid[LABELLED_TILE:tile_h, :tile_w]
    second = grid[LABELLED_TILE:tile_h, tile_w:]
    inked_rows = [int((area.sum(-1) < 200).any(1).sum()) for area in (first, second)]
    assert inked_rows[0] > 2 * inked_rows[1]


def test_labels_must_match_the_images(tmp_path):
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        save_grid(_tiles(3, 8), tmp_path / "grid.png", ["a", "b"])
