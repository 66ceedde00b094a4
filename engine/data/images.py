"""Image files to the 8-bit RGB pixels `prepare` encodes, whatever their mode and bit depth.

Pillow's ``convert("RGB")`` clips the values of the high-range modes to 0..255 instead of
scaling them: a 16-bit greyscale PNG at 50% grey (32768) comes out white and a float32 TIFF
at 0.5 comes out black. ``to_rgb`` scales every mode by its real range instead.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = 255  # transparent pixels are composited over white
MAX_16BIT = 65535

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_PREMULTIPLIED_MODES = frozenset({"La", "RGBa"})
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})  # by mode, not band name: LAB's "A" band is a colour
# modes Pillow's own conversion turns into RGB correctly (colour modes, 8 bits per channel)
_CONVERTED_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB", "LA", "PA", "RGBA"})


class UndecodableImage(ValueError):
    """An image whose file or pixels cannot be turned into RGB; the message is the reason."""


def decode_image(data: bytes) -> Image.Image:
    """An image file's bytes as an 8-bit RGB image, EXIF rotation applied (see ``to_rgb``).

    Raises UndecodableImage with the reason: a truncated or corrupt file, not an image, or
    pixels ``to_rgb`` cannot place in 0..255.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)  # camera photos store rotation in EXIF
            image.load()
    except Exception as error:  # noqa: BLE001 -- any decoder failure is a property of this file
        raise UndecodableImage(f"undecodable image: {type(error).__name__}: {error}") from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit "RGB" image, each mode scaled from its real range.

    ============================  ===============================================================
    mode                          rule
    ============================  ===============================================================
    "1", "L", "RGB", "RGBX"       as they are (bilevel 0/1 becomes 0/255; X is padding, dropped)
    "P"                           the palette's colours
    "CMYK"                        Pillow's conversion: R = (255 - C)(255 - K) / 255, and so on
    "YCbCr", "HSV"                Pillow's conversion
    "LAB"                         Pillow's conversion (CIE L*a*b* to sRGB, as ImageCms gives it)
    "I;16", "I;16B", "I;16L",     0..65535 scaled to 0..255 (fp32, rounded): 32768 -> 128
    "I;16N"
    "I" (32-bit integer)          as 16-bit (0..65535) when every value lies in 0..65535 (Pillow
                                  opens 16-bit greyscale PNGs as "I" in some versions); other
                                  values have no known scale: UndecodableImage
    "F" (32-bit float)            [0, 1] scaled to 0..255 when the maximum is at most 1, else the
                                  values are taken as 0..255; values beyond the range are
                                  clipped; NaN or infinity: UndecodableImage
    "LA", "PA", "RGBA"            composited over white (BACKGROUND)
    "La", "RGBa" (premultiplied)  composited over white: colour + (255 - alpha)
    any mode with a               pixels of the transparent value or palette index are
    "transparency" key            composited over white (for 16-bit and "I" images the key is
                                  compared to the raw value, before scaling)
    anything else                 UndecodableImage naming the mode
    ============================  ===============================================================

    16-bit RGB and RGBA PNGs need no rule of their own: Pillow opens them as 8-bit "RGB" and
    "RGBA".
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        image = _scaled_grey(image)
    elif mode in _PREMULTIPLIED_MODES:
        values = np.asarray(image, dtype=np.int16)  # (H, W, C + 1), colour already times alpha
        colour = np.clip(values[..., :-1] + (BACKGROUND - values[..., -1:]), 0, 255).astype(np.uint8)
        return Image.fromarray(colour[..., 0] if mode == "La" else colour).convert("RGB")  # premultiplied "over"
    elif mode not in _CONVERTED_MODES:
        raise UndecodableImage(f"unsupported image mode {mode!r}")
    try:
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            background = Image.new("RGBA", image.size, (BACKGROUND,) * 3)
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as error:  # a conversion this Pillow lacks ("conversion from X to Y not supported")
        raise UndecodableImage(f"image mode {mode!r}: {error}") from error


def _scaled_grey(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as 8-bit "L", or "LA" when a transparent value
    is set (its pixels get alpha 0)."""
    raw = np.asarray(image)  # (H, W): uint16 (either byte order), int32 or float32
    values = raw.astype(np.float32)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise UndecodableImage("float image with NaN or infinite pixels")
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0  # [0, 1] floats, else 0..255
    else:
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if low < 0 or high > MAX_16BIT:
            raise UndecodableImage(f"32-bit integer image with values {low}..{high}: only 0..{MAX_16BIT} "
                                   f"(16-bit) has a known scale")
        scale = np.float32(255.0 / MAX_16BIT)
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)  # (H, W)
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)):
        alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1))  # (H, W, 2): "LA"
    return Image.fromarray(grey)

