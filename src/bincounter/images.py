"""Decoding and resizing bin photos: one implementation for prepare, training and serving.

The served model must see exactly what training saw, so `decode_and_resize` is the only way an
image becomes pixels in this project.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bincounter.errors import first_line

# Bilinear with antialiasing (Pillow's resize filters always antialias when shrinking).
RESAMPLE = Image.BILINEAR


class BadImage(ValueError):
    """Bytes that are not a decodable image; the message says why in a few words."""


def open_image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: truncated or corrupt files fail here, not later
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt image ({first_line(exc)})") from None
    return image


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


def decode_and_resize(data: bytes, size: int) -> np.ndarray:
    """Bytes of a JPEG/PNG of any size -> (size, size, 3) uint8 RGB, the whole photo squashed to a square.

    Squashing (not cropping) keeps items at the edges of the bin in view. JPEG draft mode lets libjpeg
    decode at 1/2, 1/4 or 1/8 scale when the target is small, which is most of the decode cost.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        image = image.convert("RGB")
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(f"corrupt image ({first_line(exc)})") from None
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLE)
    return np.asarray(image, dtype=np.uint8)


def read_count(metadata_path: Path) -> int:
    """EXPECTED_QUANTITY of an ABID metadata file; ValueError with a short reason otherwise."""
    try:
        meta = json.loads(Path(metadata_path).read_text())
    except FileNotFoundError:
        raise ValueError("missing metadata") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("malformed metadata JSON") from None
    return count_from_metadata(meta)


def count_from_metadata(meta: object) -> int:
    if not isinstance(meta, dict) or "EXPECTED_QUANTITY" not in meta:
        raise ValueError("metadata has no EXPECTED_QUANTITY")
    count = meta["EXPECTED_QUANTITY"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"EXPECTED_QUANTITY is not a non-negative integer ({count!r})")
    return count
