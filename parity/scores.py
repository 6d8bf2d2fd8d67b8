"""Compression-matched scoring of a replay against its preview.

ai-toolkit saves a preview with ``image.save(path)`` (FACTS §3 "Output"): for the default ``jpg`` format that is
Pillow's JPEG at quality 75 with 4:2:0 chroma subsampling. The preview is lossy, so comparing it with the raw
replay would measure the JPEG, not the replay (q75 alone caps SSIM at about 0.90-0.94 on photos, FACTS §8).
Instead the replay is encoded exactly the way the preview was saved -- format, quality and subsampling read from
the preview file itself -- and the *decoded* pixels are compared. Identical replay pixels then give identical
decoded pixels, which is the EXACT verdict.

Metrics (all on uint8 RGB, 0-255):

- ``ssim``: scikit-image ``structural_similarity`` with the convention of Wang et al. 2004 as recorded in
  :data:`SSIM_CONVENTION` (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255``,
  ``channel_axis=2``). The window is the 11-tap Gaussian unless the image is smaller: then the largest odd
  ``win_size`` that fits the shorter side is used and recorded.
- ``ssim_eighth``: the same SSIM after box-averaging both images to 1/8 of their size ("same composition?").
- ``psnr_db`` (``inf`` when identical), ``mean_abs_diff``, ``max_abs_diff``, ``share_off_by_more_than_8`` (share
  of pixels where any channel differs by more than 8 levels).

Verdicts, first match wins (defaults in :class:`Thresholds`):

- EXACT: the decoded pixels are identical.
- PASS: ``ssim >= 0.97`` and ``psnr_db >= 32``: the difference is at rounding level. Rounding-level residuals
  (a float16-rounded LoRA, bf16 merge drift, another machine's kernels: raw mean 0.6-1.0 of 255, max <= 15,
  FACTS §9) grow when both images go through q75 JPEG, because a small change flips quantised coefficients:
  simulated on the oracle's tiny-model previews and on smooth 512-1024 px images, a raw mean difference of 0.4-1.5
  gave 35-45 dB and SSIM 0.969-0.995 after compression matching. The smallest visible difference FACTS §8
  measured -- the same seed through another attention kernel at 1024², SSIM ~0.97, PSNR ~28 dB -- must not pass:
  32 dB lies between 28 and 35 with about 4 and 3 dB margin (2.5x and 2x in squared error). SSIM alone cannot
  separate the two (both ~0.97-0.98); PSNR measures the error energy. The SSIM bound keeps out differences with
  little energy but changed structure (a 1-pixel shift of a smooth image: SSIM 0.95-0.97 at 33-35 dB).
- DRIFT: ``ssim >= 0.90``. The same picture with visibly different detail (kernel or precision drift). 0.90 lies
  half way between kernel drift (~0.97) and a 1-pixel shift of a real image (0.76-0.83, FACTS §8), 0.07 from
  each.
- FAIL: anything else: a misaligned (shifted) replay, a different image (unrelated images score ~0.2, ~9 dB) or
  a different composition. A FAIL whose 1/8-resolution SSIM is still >= 0.90 gets a ``same_composition``
  finding: the picture agrees at a glance, so look for a shift or a resize rather than wrong weights or noise.

The thresholds and the SSIM convention are recorded in every output.
"""

from __future__ import annotations

import enum
import io
import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, JpegImagePlugin
from skimage.metrics import structural_similarity

from parity.errors import InputError
from parity.safe_io import open_image

SSIM_CONVENTION: dict[str, Any] = {
    "function": "skimage.metrics.structural_similarity",
    "channel_axis": 2,
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
    "data_range": 255,
    "win_size": "11 (Gaussian, truncate 3.5); the largest odd size <= the shorter side for smaller images",
    "reduction": "mean over the map after cropping (win_size - 1) / 2 pixels at each border, over channels",
}

# ai-toolkit's `image.save(path)` for a .jpg: Pillow's defaults (libjpeg quality 75, 4:2:0).
PILLOW_DEFAULT_JPEG_QUALITY = 75
PILLOW_DEFAULT_JPEG_SUBSAMPLING = "4:2:0"
# Pillow's `image.save(path)` for a .webp: lossy at quality 80. The quality is not stored in a WebP file.
PILLOW_DEFAULT_WEBP_QUALITY = 80

_SUBSAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
_SUBSAMPLING_CODES = {name: code for code, name in _SUBSAMPLING_NAMES.items()}
_GAUSSIAN_WIN_SIZE = 11  # what skimage uses for sigma 1.5, truncate 3.5
_EIGHTH = 8
_OFF_LEVELS = 8


class Verdict(enum.StrEnum):
    """How a replay compares with its preview, best first."""

    EXACT = "EXACT"
    PASS = "PASS"
    DRIFT = "DRIFT"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Thresholds:
    """Verdict boundaries; see the module docstring for where each default comes from."""

    pass_min_ssim: float = 0.97
    pass_min_psnr_db: float = 32.0
    drift_min_ssim: float = 0.90
    same_composition_min_ssim_eighth: float = 0.90

    def __post_init__(self):
        for f in fields(self):
            if not math.isfinite(getattr(self, f.name)):
                raise InputError(None, f"threshold {f.name} must be a finite number, got {getattr(self, f.name)}")
        for name in ("pass_min_ssim", "drift_min_ssim", "same_composition_min_ssim_eighth"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(None, f"threshold {name} must be within [0, 1], got {value}")
        if self.pass_min_psnr_db < 0:
            raise InputError(None, f"threshold pass_min_psnr_db must be >= 0, got {self.pass_min_psnr_db}")
        if self.drift_min_ssim > self.pass_min_ssim:
            raise InputError(
                None,
                f"drift_min_ssim ({self.drift_min_ssim}) must not exceed pass_min_ssim ({self.pass_min_ssim})",
            )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Thresholds:
        return cls(**{f.name: float(data[f.name]) for f in fields(cls) if f.name in data})


@dataclass(frozen=True)
class Encoding:
    """How a preview file was saved, as far as it affects its decoded pixels.

    ``lossy`` False means the replay is compared as is. ``exact`` False means the settings could not be read
    from the file completely (``note`` says what was assumed), so EXACT may be out of reach for a true match.
    """

    format: str  # "JPEG", "PNG", "WEBP", ...
    lossy: bool
    mode: str = "RGB"
    quality: int | None = None
    subsampling: str | None = None
    progressive: bool = False
    qtables: tuple[tuple[int, ...], ...] | None = None  # only when no Pillow quality reproduces them
    matches_aitoolkit_default: bool = False
    exact: bool = True
    note: str = ""

    def describe(self) -> str:
        if not self.lossy:
            return f"{self.format} (lossless: compared without re-encoding)"
        parts = [self.format]
        if self.quality is not None:
            parts.append(f"quality {self.quality}")
        elif self.qtables is not None:
            parts.append("custom quantisation tables")
        if self.subsampling:
            parts.append(self.subsampling)
        if self.progressive:
            parts.append("progressive")
        text = " ".join(parts)
        if self.matches_aitoolkit_default:
            text += " (ai-toolkit's default: Pillow image.save(path))"
        return text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["qtables"] = [list(t) for t in self.qtables] if self.qtables is not None else None
        data["description"] = self.describe()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Encoding:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if values.get("qtables") is not None:
            values["qtables"] = tuple(tuple(int(v) for v in t) for t in values["qtables"])
        return cls(**values)


@dataclass(frozen=True)
class Metrics:
    """Pixel metrics of one preview against its compression-matched replay (uint8 RGB, 0-255)."""

    ssim: float
    psnr_db: float  # math.inf when identical
    mean_abs_diff: float
    max_abs_diff: int
    share_off_by_more_than_8: float
    ssim_eighth: float
    ssim_win_size: int
    ssim_eighth_win_size: int
    eighth_size: tuple[int, int]  # (width, height) of the 1/8 images

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # JSON has no infinity: null means identical pixels.
        data["psnr_db"] = None if math.isinf(self.psnr_db) else self.psnr_db
        data["eighth_size"] = list(self.eighth_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Metrics:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if values.get("psnr_db") is None:
            values["psnr_db"] = math.inf
        values["eighth_size"] = tuple(values["eighth_size"])
        return cls(**values)


@dataclass(frozen=True)
class Finding:
    """Something the scorer noticed that a reader needs to interpret the numbers."""

    code: str  # size_mismatch, replay_resized, same_composition, encoding_assumed, not_aitoolkit_default, ...
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(code=data["code"], message=data["message"], data=dict(data.get("data") or {}))


@dataclass
class Score:
    """The result of scoring one replay.

    ``ssim_map`` is the per-pixel SSIM averaged over channels (H x W float); ``diff_map`` the per-pixel maximum
    absolute difference over channels (H x W uint8). Both are None when the score was read back from JSON.
    """

    encoding: Encoding
    metrics: Metrics
    verdict: Verdict
    thresholds: Thresholds
    findings: list[Finding] = field(default_factory=list)
    ssim_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    diff_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "encoding": self.encoding.to_dict(),
            "metrics": self.metrics.to_dict(),
            "thresholds": self.thresholds.to_dict(),
            "ssim_convention": dict(SSIM_CONVENTION),
            "findings": [f.to_dict() for f in self.findings],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Score:
        return cls(
            encoding=Encoding.from_dict(data["encoding"]),
            metrics=Metrics.from_dict(data["metrics"]),
            verdict=Verdict(data["verdict"]),
            thresholds=Thresholds.from_dict(data.get("thresholds") or {}),
            findings=[Finding.from_dict(f) for f in data.get("findings") or []],
        )


# --- identifying how a preview was saved ------------------------------------------------------------------


@lru_cache(maxsize=1)
def _pillow_jpeg_tables() -> dict[int, tuple[tuple[int, ...], ...]]:
    """The quantisation tables this Pillow writes for quality 1..100 (luma, chroma)."""
    probe = Image.new("RGB", (16, 16))
    tables = {}
    for quality in range(1, 101):
        buf = io.BytesIO()
        probe.save(buf, "JPEG", quality=quality)
        with Image.open(buf) as im:
            tables[quality] = _tables_of(im)
    return tables


def _tables_of(im: Image.Image) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in im.quantization[k]) for k in sorted(im.quantization))


def _jpeg_quality(tables: tuple[tuple[int, ...], ...]) -> int | None:
    """The Pillow quality whose tables equal the file's (the luma table alone for grayscale files)."""
    matches = [q for q, known in _pillow_jpeg_tables().items() if known[: len(tables)] == tables]
    if not matches:
        return None
    # Equal tables give equal pixels; prefer Pillow's default, else the highest equivalent quality.
    return PILLOW_DEFAULT_JPEG_QUALITY if PILLOW_DEFAULT_JPEG_QUALITY in matches else max(matches)


def _webp_is_lossless(path: Path) -> bool:
    data = path.read_bytes()
    pos = 12  # after "RIFF" <size> "WEBP"
    while pos + 8 <= len(data):
        tag = data[pos : pos + 4]
        if tag == b"VP8L":
            return True
        if tag == b"VP8 ":
            return False
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8 + size + (size & 1)
    raise InputError(path, "WebP file has neither a VP8 nor a VP8L image chunk")


def identify_encoding(preview_path: str | Path) -> Encoding:
    """Read from the preview file how it was saved: format, and for JPEG the quality and chroma subsampling.

    The JPEG quality is found by comparing the file's quantisation tables with the ones this Pillow writes for
    every quality 1-100; tables no Pillow quality produces are kept as they are and reused when encoding.
    """
    path = Path(preview_path)
    try:
        with open_image(path, "preview image") as im:
            fmt = (im.format or "").upper()
            mode = im.mode
            if fmt == "JPEG":
                tables = _tables_of(im)
                sampling = JpegImagePlugin.get_sampling(im)
                progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    except (OSError, SyntaxError) as exc:
        raise InputError(path, f"cannot read the preview image: {exc}") from exc

    if fmt == "JPEG":
        quality = _jpeg_quality(tables)
        subsampling = _SUBSAMPLING_NAMES.get(sampling)
        notes = []
        if mode not in ("L", "RGB"):
            raise InputError(path, f"JPEG in {mode} mode: only grayscale and RGB previews can be matched")
        if mode == "RGB" and subsampling is None:
            notes.append("chroma subsampling not one Pillow writes; 4:2:0 assumed")
        if quality is None:
            notes.append("quantisation tables match no Pillow quality; the file's own tables are reused")
        matches_default = (
            quality == PILLOW_DEFAULT_JPEG_QUALITY
            and (subsampling == PILLOW_DEFAULT_JPEG_SUBSAMPLING or mode == "L")
            and not progressive
        )
        return Encoding(
            format="JPEG",
            lossy=True,
            mode=mode,
            quality=quality,
            subsampling=(subsampling or PILLOW_DEFAULT_JPEG_SUBSAMPLING) if mode == "RGB" else None,
            progressive=progressive,
            qtables=tables if quality is None else None,
            matches_aitoolkit_default=matches_default,
            exact=subsampling is not None or mode == "L",
            note="; ".join(notes),
        )
    if fmt == "WEBP" and not _webp_is_lossless(path):
        return Encoding(
            format="WEBP",
            lossy=True,
            mode="RGB",
            quality=PILLOW_DEFAULT_WEBP_QUALITY,
            matches_aitoolkit_default=True,
            exact=False,
            note=f"a WebP file does not store its quality; Pillow's default {PILLOW_DEFAULT_WEBP_QUALITY} "
            "(what ai-toolkit's image.save(path) uses) assumed",
        )
    if fmt in ("PNG", "WEBP", "BMP", "TIFF", "PPM"):
        return Encoding(format=fmt, lossy=False, mode=mode)
    raise InputError(path, f"unsupported preview format {fmt or 'unknown'}: expected JPEG, PNG or WebP")


# --- encoding a replay like its preview -------------------------------------------------------------------


def _as_rgb_uint8(rgb: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(None, f"{what} must be an H x W x 3 uint8 array, got {arr.dtype} {arr.shape}")
    return arr


def encode_like(rgb_uint8: np.ndarray, encoding: Encoding) -> np.ndarray:
    """Encode an RGB image in memory exactly as the preview was saved, then decode it (H x W x 3 uint8).

    Lossless formats return the pixels unchanged: their decoded pixels are the input.
    """
    rgb = _as_rgb_uint8(rgb_uint8, "replay")
    if not encoding.lossy:
        return rgb.copy()
    image = Image.fromarray(rgb, "RGB")
    buf = io.BytesIO()
    if encoding.format == "JPEG":
        if encoding.mode == "L":
            image = image.convert("L")
        if encoding.matches_aitoolkit_default:
            image.save(buf, "JPEG")  # ai-toolkit: image.save(path), no options
        else:
            options: dict[str, Any] = {"progressive": encoding.progressive}
            if encoding.qtables is not None:
                options["qtables"] = [list(t) for t in encoding.qtables]
            else:
                options["quality"] = encoding.quality
            if encoding.mode == "RGB":
                options["subsampling"] = _SUBSAMPLING_CODES[
                    encoding.subsampling or PILLOW_DEFAULT_JPEG_SUBSAMPLING
                ]
            image.save(buf, "JPEG", **options)
    elif encoding.format == "WEBP":
        image.save(buf, "WEBP", quality=encoding.quality)
    else:
        raise InputError(None, f"cannot re-encode as lossy {encoding.format}")
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"))


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to H x W x 3 uint8 with Pillow (the decoder the comparison is defined with)."""
    try:
        with open_image(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise InputError(path, f"cannot read the image: {exc}") from exc


def comparison_images(
    preview_path: str | Path, replay_rgb: np.ndarray, encoding: Encoding | None = None
) -> tuple[np.ndarray, np.ndarray, list[Finding]]:
    """The two images that are actually compared: the decoded preview and the replay encoded like it.

    A replay of another size is resized (bilinear) to the preview's size first, with findings saying so.
    """
    encoding = encoding or identify_encoding(preview_path)
    preview = load_rgb(preview_path)
    replay = _as_rgb_uint8(replay_rgb, "replay")
    findings: list[Finding] = []
    if replay.shape[:2] != preview.shape[:2]:
        ph, pw = preview.shape[:2]
        rh, rw = replay.shape[:2]
        findings.append(
            Finding(
                "size_mismatch",
                f"preview is {pw}x{ph} but the replay is {rw}x{rh}",
                {"preview_size": [pw, ph], "replay_size": [rw, rh]},
            )
        )
        findings.append(
            Finding(
                "replay_resized",
                f"the replay was resized (bilinear) to {pw}x{ph} before scoring; metrics include that resize",
                {"method": "PIL.Image.BILINEAR"},
            )
        )
        replay = np.asarray(Image.fromarray(replay, "RGB").resize((pw, ph), Image.BILINEAR))
    return preview, encode_like(replay, encoding), findings


# --- metrics ----------------------------------------------------------------------------------------------


def _win_size(height: int, width: int) -> int:
    side = min(height, width, _GAUSSIAN_WIN_SIZE)
    return side if side % 2 == 1 else side - 1


def _ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, int]:
    win = _win_size(*a.shape[:2])
    value, full = structural_similarity(
        a,
        b,
        win_size=win,
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        full=True,
    )
    return float(value), full.mean(axis=2), win


def _box_eighth(rgb: np.ndarray) -> np.ndarray:
    """Area average down to 1/8 of the size (float, so no rounding before SSIM)."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w / _EIGHTH)), max(1, round(h / _EIGHTH)))
    channels = [
        np.asarray(Image.fromarray(rgb[..., c].astype(np.float32), "F").resize(size, Image.BOX))
        for c in range(rgb.shape[2])
    ]
    return np.stack(channels, axis=2).astype(np.float64)


def compute_metrics(preview: np.ndarray, replay: np.ndarray) -> tuple[Metrics, np.ndarray, np.ndarray]:
    """Metrics of two same-size uint8 RGB images, plus the SSIM map and the per-pixel max abs difference."""
    preview = _as_rgb_uint8(preview, "preview")
    replay = _as_rgb_uint8(replay, "replay")
    if preview.shape != replay.shape:
        raise InputError(None, f"images to compare differ in shape: {preview.shape} vs {replay.shape}")
    diff = np.abs(preview.astype(np.int16) - replay.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)
    ssim, ssim_map, win = _ssim(preview, replay)
    small_preview, small_replay = _box_eighth(preview), _box_eighth(replay)
    ssim_eighth, _, win_eighth = _ssim(small_preview, small_replay)
    metrics = Metrics(
        ssim=ssim,
        psnr_db=psnr,
        mean_abs_diff=float(diff.mean()),
        max_abs_diff=int(diff.max()),
        share_off_by_more_than_8=float((diff > _OFF_LEVELS).any(axis=2).mean()),
        ssim_eighth=ssim_eighth,
        ssim_win_size=win,
        ssim_eighth_win_size=win_eighth,
        eighth_size=(small_preview.shape[1], small_preview.shape[0]),
    )
    return metrics, ssim_map, diff.max(axis=2).astype(np.uint8)


def verdict_for(metrics: Metrics, identical: bool, thresholds: Thresholds) -> Verdict:
    """EXACT, PASS, DRIFT or FAIL: the first that holds (see the module docstring)."""
    if identical:
        return Verdict.EXACT
    if metrics.ssim >= thresholds.pass_min_ssim and metrics.psnr_db >= thresholds.pass_min_psnr_db:
        return Verdict.PASS
    if metrics.ssim >= thresholds.drift_min_ssim:
        return Verdict.DRIFT
    return Verdict.FAIL


def score_replay(
    preview_path: str | Path, replay_rgb: np.ndarray, thresholds: Thresholds | None = None
) -> Score:
    """Score a replay (H x W x 3 uint8, as generated) against the preview file it replays."""
    thresholds = thresholds or Thresholds()
    encoding = identify_encoding(preview_path)
    preview, replay, findings = comparison_images(preview_path, replay_rgb, encoding)
    metrics, ssim_map, diff_map = compute_metrics(preview, replay)
    identical = metrics.max_abs_diff == 0
    verdict = verdict_for(metrics, identical, thresholds)

    if encoding.note:
        findings.append(Finding("encoding_assumed", encoding.note, {"encoding": encoding.describe()}))
    if encoding.lossy and not encoding.matches_aitoolkit_default:
        findings.append(
            Finding(
                "not_aitoolkit_default",
                f"the preview was not saved with ai-toolkit's default (Pillow JPEG q75 4:2:0) but as "
                f"{encoding.describe()}; the replay was encoded the same way",
                {"encoding": encoding.describe()},
            )
        )
    if verdict is Verdict.FAIL and metrics.ssim_eighth >= thresholds.same_composition_min_ssim_eighth:
        findings.append(
            Finding(
                "same_composition",
                f"at 1/8 resolution the images agree (SSIM {metrics.ssim_eighth:.3f}): the same picture, "
                "misaligned or resized, rather than a different image",
                {"ssim_eighth": metrics.ssim_eighth},
            )
        )
    return Score(
        encoding=encoding,
        metrics=metrics,
        verdict=verdict,
        thresholds=thresholds,
        findings=findings,
        ssim_map=ssim_map,
        diff_map=diff_map,
    )
