"""Decoding and resizing bin photos: one implementation for prepare, training and serving.

The served model must see exactly what training saw, so `decode_and_resize` is the only way an
image becomes pixels in this project.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bincounter.errors import first_line

# Bilinear with antialiasing (Pillow's resize filters always antialias when shrinking).
RESAMPLE = Image.BILINEAR


class BadImage(ValueError):
    """Bytes that are not a decodable image; the message says why in a few words."""


def verify_jpeg(data: bytes) -> tuple[int, int]:
    """Fully decode (at reduced DCT scale, which is fast) and return (width, height); BadImage otherwise."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG":
            raise BadImage(f"not a JPEG ({image.format})")
        size = image.size
        image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt JPEG ({first_line(exc)})") from None
    return size


FORMATS = ("JPEG", "PNG")  # what bin photos are; never hand other formats to Pillow's plugins (EPS runs Ghostscript)


def image_header(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone: nothing is decoded. BadImage for anything else."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            return image.format, image.size[0], image.size[1]
    except UnidentifiedImageError:
        raise BadImage("not an image (JPEG or PNG)") from None
    except Image.DecompressionBombError:
        raise BadImage("image has too many pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"corrupt image ({first_line(exc)})") from None


def decode_and_resize(data: bytes, size: int) -> np.ndarray:
    """Bytes of a JPEG/PNG of any size -> (size, size, 3) uint8 RGB, the whole photo squashed to a square.

    Squashing (not cropping) keeps items at the edges of the bin in view. JPEG draft mode lets libjpeg
    decode at 1/2, 1/4 or 1/8 scale when the target is small, which is most of the decode cost. The EXIF
    orientation is applied, so a photo looks the same whether it was stored rotated or tagged as rotated.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise BadImage("not an image (JPEG or PNG)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt image ({first_line(exc)})") from None
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    return np.asarray(image, dtype=np.uint8)


MAX_METADATA_BYTES = 1 << 20  # ABID metadata files are a few kB


def read_count(metadata_path: Path) -> int:
    """EXPECTED_QUANTITY of an ABID metadata file; ValueError with a short reason otherwise."""
    try:
        with open(metadata_path, "rb") as handle:
            data = handle.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        raise ValueError("missing metadata") from None
    except OSError as exc:
        raise ValueError(f"unreadable metadata ({type(exc).__name__})") from None
    return count_from_metadata(parse_metadata(data))


def parse_metadata(data: bytes) -> object:
    """An ABID metadata document; ValueError with a short reason for anything a JSON parser chokes on."""
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata larger than {MAX_METADATA_BYTES // 1024} kB")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("metadata is not UTF-8") from None
    except json.JSONDecodeError:
        raise ValueError("malformed metadata JSON") from None
    except RecursionError:
        raise ValueError("metadata JSON nested too deeply") from None


def count_from_metadata(meta: object) -> int:
    if not isinstance(meta, dict) or "EXPECTED_QUANTITY" not in meta:
        raise ValueError("metadata has no EXPECTED_QUANTITY")
    count = meta["EXPECTED_QUANTITY"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        shown = repr(count)[:40] if isinstance(count, (int, float, str)) else f"a {type(count).__name__}"
        raise ValueError(f"EXPECTED_QUANTITY is not a non-negative integer ({shown})")
    return count
