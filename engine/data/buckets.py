"""Aspect-ratio buckets: the image sizes a cache resizes and crops to.

Without ``--multi-aspect`` every image goes to one square bucket of the chosen resolution.
With it, each image goes to the bucket whose aspect-ratio key is nearest to its own
height / width, as PixArt-α's multi-scale ("MS") training does, so a batch can hold
one bucket and no image is squashed.
"""

from __future__ import annotations

import math

from PIL import Image

# PixArt-α's 256px aspect-ratio bins: (aspect-ratio key as PixArt writes it, height, width).
# Source: the PixArt-α repository's ASPECT_RATIO_256 table, also shipped by diffusers as
# ASPECT_RATIO_256_BIN in pipelines/pixart_alpha/pipeline_pixart_alpha.py. PixArt's 512 and
# 1024 tables are exactly these sizes times 2 and times 4 (tests/data/test_buckets.py checks
# all three against diffusers), so only the 256 table is kept here.
_PIXART_256_BINS = (
    ("0.25", 128, 512), ("0.28", 128, 464), ("0.32", 144, 448), ("0.33", 144, 432),
    ("0.35", 144, 416), ("0.4", 160, 400), ("0.42", 160, 384), ("0.48", 176, 368),
    ("0.5", 176, 352), ("0.52", 176, 336), ("0.57", 192, 336), ("0.6", 192, 320),
    ("0.68", 208, 304), ("0.72", 208, 288), ("0.78", 224, 288), ("0.82", 224, 272),
    ("0.88", 240, 272), ("0.94", 240, 256), ("1.0", 256, 256), ("1.07", 256, 240),
    ("1.13", 272, 240), ("1.21", 272, 224), ("1.29", 288, 224), ("1.38", 288, 208),
    ("1.46", 304, 208), ("1.67", 320, 192), ("1.75", 336, 192), ("2.0", 352, 176),
    ("2.09", 368, 176), ("2.4", 384, 160), ("2.5", 400, 160), ("3.0", 432, 144),
    ("4.0", 512, 128),
)
MULTI_ASPECT_RESOLUTIONS = (256, 512, 1024)


def bucket_table(resolution: int, multi_aspect: bool) -> list[tuple[float, int, int]]:
    """The buckets of a cache as (aspect-ratio key, image height, image width), in a fixed order.

    The position in this list is the bucket id stored in the cache.
    """
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")
    if not multi_aspect:
        return [(1.0, resolution, resolution)]
    if resolution not in MULTI_ASPECT_RESOLUTIONS:
        raise ValueError(f"multi-aspect buckets exist for resolution {MULTI_ASPECT_RESOLUTIONS} "
                         f"(PixArt-α's tables), got {resolution}")
    scale = resolution // 256
    return [(float(key), height * scale, width * scale) for key, height, width in _PIXART_256_BINS]


def nearest_bucket(height: int, width: int, table: list[tuple[float, int, int]]) -> int:
    """Id of the bucket whose aspect-ratio key is closest to height / width (first one on a tie)."""
    ratio = height / width
    return min(range(len(table)), key=lambda b: abs(table[b][0] - ratio))


def resize_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` so it covers height x width (small images are upscaled), then centre-crop.

    An image already of the target size is returned untouched (no resampling).
    """
    src_width, src_height = image.size
    if (src_height, src_width) == (height, width):
        return image
    scale = max(height / src_height, width / src_width)
    # ceil, so rounding never leaves the scaled image a pixel short of the bucket
    new_width = max(width, math.ceil(src_width * scale - 1e-6))
    new_height = max(height, math.ceil(src_height * scale - 1e-6))
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = (new_width - width) // 2
    top = (new_height - height) // 2
    return image.crop((left, top, left + width, top + height))
