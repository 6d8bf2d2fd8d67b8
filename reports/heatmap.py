"""Heatmaps as RGB arrays, with a colormap of our own (dark purple -> red -> yellow, no matplotlib)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# (position, R, G, B): dark for "no difference", bright for "large"; monotonic in lightness, so it also
# reads in grey scale.
_ANCHORS = np.array(
    [
        (0.00, 0, 0, 4),
        (0.15, 40, 11, 84),
        (0.35, 120, 28, 109),
        (0.55, 187, 55, 84),
        (0.75, 237, 105, 37),
        (0.90, 251, 180, 26),
        (1.00, 252, 255, 164),
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to RGB uint8, shape (..., 3)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def diff_scale(levels: np.ndarray | float) -> np.ndarray:
    """Absolute difference in 0-255 levels to [0, 1] on a square-root scale.

    Fixed, not per image, so heatmaps compare across previews; the square root keeps a 1-level difference
    visible (0.06) while 255 stays the top.
    """
    return np.sqrt(np.clip(np.asarray(levels, dtype=np.float64), 0, 255) / 255.0)


def diff_heatmap(diff_map: np.ndarray) -> np.ndarray:
    """RGB heatmap of a per-pixel absolute difference map (H x W, 0-255)."""
    diff_map = np.asarray(diff_map)
    if diff_map.dtype == np.uint8:  # every pixel is one of 256 levels: look their colours up (same values)
        return _diff_colours()[diff_map]
    return colormap(diff_scale(diff_map))


@lru_cache(maxsize=1)
def _diff_colours() -> np.ndarray:
    return colormap(diff_scale(np.arange(256)))


def ssim_heatmap(ssim_map: np.ndarray) -> np.ndarray:
    """RGB heatmap of a per-pixel SSIM map: 1 (same) is dark, 0 or below is bright."""
    return colormap(1.0 - np.asarray(ssim_map, dtype=np.float64))


def css_gradient(stops: int = 16) -> str:
    """The colormap as a CSS linear-gradient, for the legend."""
    colors = colormap(np.linspace(0.0, 1.0, stops))
    parts = [f"rgb({r},{g},{b}) {100 * i / (stops - 1):.1f}%" for i, (r, g, b) in enumerate(colors)]
    return "linear-gradient(to right, " + ", ".join(parts) + ")"
