"""The synthetic demo dataset: deterministic, captions and records describe what is drawn."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from engine.data import demo


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    demo.generate(tmp_path / "a", 6, 48, seed=4)
    demo.generate(tmp_path / "b", 6, 48, seed=4)
    demo.generate(tmp_path / "c", 6, 48, seed=5)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 13  # 6 images, 6 captions, objects.jsonl
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "000000.png").read_bytes() != (tmp_path / "c" / "000000.png").read_bytes()


def test_captions_and_records_describe_the_drawn_objects(tmp_path):
    for subset, resolution in (("main", 64), ("aesthetic", 128)):
        records = demo.generate(tmp_path / subset, 40, resolution, seed=0, subset=subset)
        for record in records:
            objects = record["objects"]
            caption = (tmp_path / subset / record["file"]).with_suffix(".txt").read_text().strip()
            assert caption == record["caption"]
            assert caption.endswith(f"on a {record['background']} background")
            for obj in objects:
                assert f"{obj['size']} {obj['colour']} {obj['shape']} in the {obj['position']}" in caption
            sizes = [demo.SIZES[o["size"]] for o in objects]
            assert sizes[0] > max(sizes[1:], default=0)  # the dominant object is the unique largest
            assert record["class_name"] == f"{objects[0]['colour']}_{objects[0]['shape']}"
            assert (subset == "main" or len(objects) <= 2) and 1 <= len(objects) <= 3
            pixels = np.asarray(Image.open(tmp_path / subset / record["file"]), dtype=np.int64)
            assert pixels.shape == (resolution, resolution, 3)
            for obj in objects:  # the object's colour is at its centre
                x, y = (int(c * resolution) for c in obj["center"])
                assert np.abs(pixels[y, x] - demo.COLOURS[obj["colour"]]).max() <= 30, (record["file"], obj)


def test_imagenet_layout_puts_images_in_class_folders(tmp_path):
    records = demo.generate(tmp_path, 12, 32, seed=1, layout="imagenet")
    for record in records:
        folder, name = record["file"].split("/")
        assert folder == record["class_name"] and record["class_id"] == demo.CLASSES.index(folder)
        assert (tmp_path / folder / name).is_file() and (tmp_path / folder / name).with_suffix(".txt").is_file()


def test_hundreds_of_small_images_in_seconds(tmp_path):
    start = time.perf_counter()
    demo.generate(tmp_path, 300, 64, seed=0)
    assert time.perf_counter() - start < 20  # about 1 s on one CPU core; loose for shared CI machines


def test_max_objects_limits_the_objects_per_image(tmp_path):
    records = demo.generate(tmp_path / "one", 30, 32, seed=2, max_objects=1)
    assert all(len(r["objects"]) == 1 for r in records)
    assert all(r["objects"][0]["size"] in ("medium", "large") for r in records)  # the dominant sizes
    assert all(" and " not in r["caption"] and "," not in r["caption"] for r in records)
    counts = {len(r["objects"]) for r in demo.generate(tmp_path / "two", 40, 32, seed=2, max_objects=2)}
    assert counts == {1, 2}


def test_bad_max_objects_is_named(tmp_path):
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"max_objects must be 1, 2 or 3, got {bad}"):
            demo.generate(tmp_path, 2, 32, max_objects=bad)
