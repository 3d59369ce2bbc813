"""Checked inputs: images and questions, with errors that name what is wrong.

Image modes are converted, never refused, as follows:
  * RGB: as is.   L / 1 (grey, bilevel), P (palette), CMYK, YCbCr, LAB, HSV: converted to RGB.
  * RGBA, LA, PA and palette images with transparency: composited on white, then RGB
    (what a viewer shows; dropping alpha would turn transparent pixels black).
  * I;16 / I / F (16-bit and 32-bit greyscale): linearly rescaled from their own
    min..max to 0..255 (PIL's plain convert would clip them), then RGB.
Refused: files that cannot be opened or are truncated, images smaller than 2x2,
images larger than 100 megapixels (decompression bombs), animated files are read
at their first frame. An image may also be given as the bytes of an encoded file
(e.g. MMBench's base64 images, decoded).

Questions must be non-empty text of at most 4000 characters, valid Unicode (no lone
surrogates, which no tokenizer can encode) and without LLaVA's image placeholder
``<image>`` (the processor would count it as a second image).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .methods.base import VTCError

MAX_PIXELS = 100_000_000
MIN_SIDE = 2
MAX_QUESTION_CHARS = 4000
IMAGE_PLACEHOLDER = "<image>"
_SURROGATE = re.compile("[\ud800-\udfff]")


def load_image(image: "str | Path | bytes | Image.Image", name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, the bytes of an image file or a PIL image, converted as the module docstring says."""
    label = name or (str(image) if isinstance(image, (str, Path)) else "image")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise VTCError(f"image '{label}': no such file")
        image = _decode(path, label)
    elif isinstance(image, (bytes, bytearray)):
        image = _decode(io.BytesIO(image), label)
    if not isinstance(image, Image.Image):
        raise VTCError(f"{label}: expected a file path or a PIL image, got {type(image).__name__}")
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise VTCError(f"image '{label}' is {image.width}x{image.height}; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if image.width * image.height > MAX_PIXELS:
        raise VTCError(f"image '{label}': {image.width}x{image.height} is over {MAX_PIXELS:,} pixels")
    return to_rgb(image)


def _decode(source, label: str) -> Image.Image:
    """Open and fully decode an image file (a path or a binary stream), refusing bombs and truncated files."""
    try:
        with Image.open(source) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise VTCError(f"image '{label}': {opened.width}x{opened.height} is over {MAX_PIXELS:,} pixels")
            opened.load()  # decode now so truncation is caught here, not later
            return opened.copy()
    except VTCError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise VTCError(f"image '{label}' cannot be read (not an image, or truncated): {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = np.zeros_like(values) if high == low else (values - low) / (high - low) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def check_question(question: object, index: int | str = 0) -> str:
    if not isinstance(question, str):
        raise VTCError(f"question {index}: expected text, got {type(question).__name__}")
    surrogate = _SURROGATE.search(question)
    if surrogate:
        raise VTCError(f"question {index} is not valid Unicode text: a lone surrogate {surrogate.group()!r} at character {surrogate.start()}")
    if IMAGE_PLACEHOLDER in question:
        raise VTCError(
            f"question {index} contains '{IMAGE_PLACEHOLDER}', a special token (the model's image placeholder); remove it"
        )
    text = question.strip()
    if not text:
        raise VTCError(f"question {index} is empty")
    if len(text) > MAX_QUESTION_CHARS:
        raise VTCError(f"question {index} has {len(text)} characters; at most {MAX_QUESTION_CHARS} are accepted")
    return text
