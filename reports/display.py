"""The pictures a report page shows: display size and compressed, because the page holds four per preview.

Four lossless PNGs of a 1024 px preview are 3-6 MB of base64, so a 100-preview job made a page of hundreds of
megabytes that browsers open slowly or not at all. A card now shows each image reduced by a whole factor to at most
``DISPLAY_SIDE`` px on its longest side, as WebP quality ``WEBP_QUALITY`` (tens of KB), and links the
full-resolution replay in ``OUT/replays/``. An image that already fits is left as it is, as lossless PNG: the
tiny previews' pixels are shown exactly (enlarged, with hard pixel edges).

The photos are box-averaged over each factor x factor block; the heatmaps keep each block's worst value instead
(largest difference, lowest SSIM), so a single differing pixel of a 1024 px replay still lights up its block at
display size. All four images of a card share the block grid, so they line up pixel for pixel.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image

DISPLAY_SIDE = 384  # px, longest side of a card's images: four side by side fill a 1280 px page
THUMB_SIDE = 96  # px, longest side of a thumbnail in the step x prompt overview
WEBP_QUALITY = 80  # visually clean at display size; about 20-40 KB for a 342 px photo
THUMB_QUALITY = 70


def reduction(size: tuple[int, int], side: int = DISPLAY_SIDE) -> int:
    """The whole factor that brings an image of ``size`` (width, height) to at most ``side`` px: 1 if it fits."""
    return max(1, math.ceil(max(size) / side))


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) after reducing by ``factor``: a partial block at an edge still makes a pixel."""
    return math.ceil(size[0] / factor), math.ceil(size[1] / factor)


def average_blocks(rgb: np.ndarray, factor: int) -> np.ndarray:
    """A photo reduced by ``factor``: the mean of each block (Pillow's reduce; edge blocks are partial)."""
    if factor == 1:
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).reduce(factor))


def worst_of_blocks(values: np.ndarray, factor: int, worst: str) -> np.ndarray:
    """A per-pixel map (H x W) reduced by ``factor`` to each block's ``worst`` value: "max" (a difference) or
    "min" (an SSIM). Edge blocks are padded with their own edge values, which changes no block's worst."""
    if factor == 1:
        return values
    h, w = values.shape
    th, tw = reduced_size((w, h), factor)[::-1]
    padded = np.pad(values, ((0, th * factor - h), (0, tw * factor - w)), mode="edge")
    blocks = padded.reshape(th, factor, tw, factor)
    return blocks.max(axis=(1, 3)) if worst == "max" else blocks.min(axis=(1, 3))


def data_uri(rgb: np.ndarray, lossy: bool, quality: int = WEBP_QUALITY) -> str:
    """An image as a data: URI: WebP at ``quality`` when ``lossy``, else PNG (every pixel kept)."""
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if lossy:
        image.save(buf, "WEBP", quality=quality, method=4)
        kind = "webp"
    else:
        image.save(buf, "PNG")
        kind = "png"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_uri(rgb: np.ndarray) -> str:
    """The overview's thumbnail of a preview: at most ``THUMB_SIDE`` px (Pillow's antialiased thumbnail)."""
    h, w = rgb.shape[:2]
    if max(w, h) <= THUMB_SIDE:
        return data_uri(rgb, lossy=False)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    image.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
    return data_uri(np.asarray(image), lossy=True, quality=THUMB_QUALITY)
