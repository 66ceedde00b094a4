"""Decoding images of every Pillow mode and bit depth to the 8-bit RGB that `prepare` encodes.

Each case writes a file (or, for modes no format stores, builds the image in memory) with
known pixel values and decodes it as `prepare` does (``decode_image`` on the file's bytes);
the 16-bit case also goes end to end through ``build_cache`` with ``--vae pixels``.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.data import open_cache
from engine.data.build import BadInputError, build_cache
from engine.data.images import UndecodableImage, decode_image, to_rgb

HALF_RED_OVER_WHITE = (255, 127, 127)  # (255, 0, 0) at alpha 128/255 over (255, 255, 255)


def _file(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png16(values: np.ndarray, colour_type: int, transparent: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit greyscale only): ``values`` (H, W) for
    greyscale (colour type 0) or (H, W, 3) for RGB (colour type 2); ``transparent``: a tRNS grey value."""
    height, width = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    trns = chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + trns + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _row(values, dtype) -> np.ndarray:
    return np.array([values], dtype=dtype)  # (1, W)


def _palette_with_transparent_index() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255, 10, 200, 30] + [0] * 762)  # index 0 blue (made transparent), 1 green
    image.putpixel((1, 0), 1)
    return image


def _lab_pair() -> Image.Image:
    """A magenta-red (a* = +72) and a mid grey: LAB's second band is a colour, not alpha."""
    image = Image.new("LAB", (2, 1), (128, 200, 128))
    image.putpixel((1, 0), (128, 128, 128))
    return image


# (name, file bytes, expected RGB (see _expected), tolerance); "1", "L" and "RGB" decode as they always have
FILES = [
    ("I;16 png", lambda: _file(Image.fromarray(_row([0, 16384, 32768, 65535], np.uint16)), "PNG"),
     [[0, 64, 128, 255]], 1),
    ("I;16 png, tRNS", lambda: _png16(_row([32768, 0], np.uint16), 0, transparent=0),
     [[128, 255]], 1),
    ("I;16 tiff", lambda: _file(Image.fromarray(_row([32768, 65535], np.uint16)), "TIFF"), [[128, 255]], 1),
    ("I;16B tiff", lambda: _file(Image.frombytes("I;16B", (2, 1), _row([32768, 16384], ">u2").tobytes()), "TIFF"),
     [[128, 64]], 1),
    ("RGB 16-bit png", lambda: _png16(np.array([[[65535, 32768, 0]]], np.uint16), 2), [[[255, 128, 0]]], 1),
    ("I tiff", lambda: _file(Image.fromarray(_row([32768, 65535, 0], np.int32)), "TIFF"), [[128, 255, 0]], 1),
    ("F tiff, [0, 1]", lambda: _file(Image.fromarray(_row([0.5, 0.25, 1.0, 0.0], np.float32), mode="F"), "TIFF"),
     [[128, 64, 255, 0]], 1),
    ("F tiff, 0..255", lambda: _file(Image.fromarray(_row([128.0, 64.0, 300.0, -5.0], np.float32), mode="F"),
                                     "TIFF"), [[128, 64, 255, 0]], 1),
    ("RGBA png", lambda: _file(Image.new("RGBA", (2, 2), (255, 0, 0, 128)), "PNG"), HALF_RED_OVER_WHITE, 1),
    ("LA png", lambda: _file(Image.new("LA", (2, 2), (0, 128)), "PNG"), 127, 1),
    ("PA tiff", lambda: _file(Image.new("PA", (2, 2), (0, 0)), "TIFF"), 255, 0),
    ("P png, transparent index", lambda: _file(_palette_with_transparent_index(), "PNG", transparency=0),
     [[[255, 255, 255], [10, 200, 30]]], 0),
    ("P gif, transparent index", lambda: _file(_palette_with_transparent_index(), "GIF", transparency=0),
     [[[255, 255, 255], [10, 200, 30]]], 0),
    ("CMYK tiff", lambda: _file(Image.new("CMYK", (2, 2), (255, 0, 0, 0)), "TIFF"), (0, 255, 255), 0),
    ("CMYK jpeg", lambda: _file(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", quality=95), (0, 255, 255), 3),
    ("YCbCr tiff", lambda: _file(Image.new("YCbCr", (2, 2), (128, 128, 128)), "TIFF"), 128, 1),
    ("LAB tiff", lambda: _file(_lab_pair(), "TIFF"), [[[222, 34, 123], [119, 119, 119]]], 2),  # as LittleCMS has it
    ("1 png", lambda: _file(Image.fromarray(_row([True, False], bool)), "PNG"), [[255, 0]], 0),
    ("L png", lambda: _file(Image.fromarray(_row([7, 200], np.uint8)), "PNG"), [[7, 200]], 0),
    ("RGB png", lambda: _file(Image.new("RGB", (2, 2), (1, 2, 3)), "PNG"), (1, 2, 3), 0),
]


def _expected(want, shape: tuple[int, int]) -> np.ndarray:
    """``want`` as (H, W, 3): a grey (H, W) table, or a grey level or (R, G, B) colour everywhere."""
    want = np.asarray(want, dtype=np.float64)
    if want.ndim < 2:
        return np.broadcast_to(want, (*shape, 3))
    return want if want.ndim == 3 else np.repeat(want[..., None], 3, axis=-1)


@pytest.mark.parametrize("name, make, want, tolerance", FILES, ids=[case[0] for case in FILES])
def test_file_decodes_to_its_values_in_0_255(name, make, want, tolerance):
    image = decode_image(make())
    assert image.mode == "RGB"
    got = np.asarray(image, dtype=np.float64)  # (H, W, 3)
    np.testing.assert_allclose(got, _expected(want, got.shape[:2]), atol=tolerance, rtol=0, err_msg=name)


def test_pillow_opens_16bit_greyscale_as_a_16bit_mode():
    """The cases above are the modes this Pillow produces: 16-bit greyscale PNG as "I;16" (or
    "I" on some Pillow versions), 16-bit RGB PNG already reduced to 8-bit "RGB"."""
    grey = Image.open(io.BytesIO(_png16(_row([32768], np.uint16), 0)))
    assert grey.mode in ("I;16", "I")
    assert Image.open(io.BytesIO(_png16(np.zeros((1, 1, 3), np.uint16), 2))).mode == "RGB"


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_every_16bit_mode_scales_from_0_65535(mode):
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}[mode]
    image = Image.frombytes(mode, (4, 1), _row([0, 16384, 32768, 65535], dtype).tobytes())
    got = np.asarray(to_rgb(image), dtype=np.float64)
    np.testing.assert_allclose(got, _expected([[0, 64, 128, 255]], (1, 4)), atol=1, rtol=0)


@pytest.mark.parametrize("mode, colour, want", [("La", (64, 128), (191, 191, 191)),
                                                ("RGBa", (128, 0, 0, 128), HALF_RED_OVER_WHITE)])
def test_premultiplied_alpha_over_white(mode, colour, want):
    """No file format stores these modes; they are composited like their straight-alpha twins."""
    got = np.asarray(to_rgb(Image.new(mode, (2, 2), colour)), dtype=np.float64)
    np.testing.assert_allclose(got, _expected(want, (2, 2)), atol=1, rtol=0)


@pytest.mark.parametrize("values, reason", [
    (_row([0.5, np.nan], np.float32), "NaN or infinite"),
    (_row([0.5, np.inf], np.float32), "NaN or infinite"),
    (_row([0, 70000], np.int32), r"values 0\.\.70000"),
    (_row([-1, 100], np.int32), r"values -1\.\.100"),
], ids=["F nan", "F inf", "I above 16 bits", "I negative"])
def test_pixels_without_a_known_range_are_refused(values, reason):
    with pytest.raises(UndecodableImage, match=reason):
        decode_image(_file(Image.fromarray(values), "TIFF"))


@pytest.fixture(scope="module")
def deep_source(tmp_path_factory):
    """A 16-bit mid-grey PNG, a float TIFF at 0.25, and two TIFFs without a known range."""
    root = tmp_path_factory.mktemp("deep")
    files = {"grey16.png": _file(Image.fromarray(np.full((32, 32), 32768, np.uint16)), "PNG"),
             "quarter.tif": _file(Image.fromarray(np.full((32, 32), 0.25, np.float32), mode="F"), "TIFF"),
             "nan.tif": _file(Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F"), "TIFF"),
             "wide.tif": _file(Image.fromarray(np.full((32, 32), 1 << 20, np.int32)), "TIFF")}
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("a grey background")
    return root


def test_prepare_stores_16bit_and_float_images_at_their_grey(deep_source, tiny_text_encoder, tmp_path):
    """End to end: the pixels cache holds [-1, 1]; 50% grey is 128/127.5 - 1 = 0.004, a quarter -0.5."""
    build_cache(deep_source, tmp_path / "c", "pixels", tiny_text_encoder, resolution=32, device="cpu",
                progress=False)
    cache = open_cache(tmp_path / "c", verify="open")
    ids = {cache.source(i): i for i in range(cache.num_samples)}
    assert sorted(ids) == ["grey16.png", "quarter.tif"]
    for name, want in (("grey16.png", 128 / 127.5 - 1), ("quarter.tif", 64 / 127.5 - 1)):
        pixels = cache.read(np.array([ids[name]]), 8)["latent_mean"][0].astype(np.float64)  # (3, 32, 32)
        np.testing.assert_allclose(pixels, want, atol=1 / 127.5, rtol=0, err_msg=name)
    skipped = {r["source"]: r["reason"] for r in map(json.loads, (tmp_path / "c" / "skipped.jsonl").open())}
    assert skipped.keys() == {"nan.tif", "wide.tif"}
    assert "NaN" in skipped["nan.tif"] and "0..65535" in skipped["wide.tif"]


def test_strict_names_the_file_without_a_known_range(deep_source, tiny_text_encoder, tmp_path):
    with pytest.raises(BadInputError, match="nan.tif.*NaN"):
        build_cache(deep_source, tmp_path / "c", "pixels", tiny_text_encoder, resolution=32, device="cpu",
                    strict=True, progress=False)


def test_a_conversion_pillow_lacks_is_a_bad_input_not_a_crash(monkeypatch):
    """Older Pillow versions cannot convert some modes (LAB, for one): the image is refused
    with the reason, so `prepare` skips and lists it."""
    def convert(image, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {image.mode} to {mode} not supported")

    data = _file(Image.new("LAB", (2, 1), (255, 128, 128)), "TIFF")
    monkeypatch.setattr(Image.Image, "convert", convert)
    with pytest.raises(UndecodableImage, match="image mode 'LAB': conversion from LAB to RGB not supported"):
        decode_image(data)
