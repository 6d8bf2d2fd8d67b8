"""Compression-matched scoring: encodings read from preview files, metrics, and each verdict path."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parity.errors import InputError
from parity.scores import (
    SSIM_CONVENTION,
    Encoding,
    Score,
    Thresholds,
    Verdict,
    compute_metrics,
    encode_like,
    identify_encoding,
    load_rgb,
    score_replay,
)


def scene(width: int = 128, height: int = 96, seed: int = 0) -> np.ndarray:
    """A picture-like test image: smooth gradients, a few discs and mild texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack(
        [
            255 * x / width,
            128 + 90 * np.sin(x / 9 + y / 13),
            255 * (1 - y / height),
        ],
        axis=2,
    )
    for _ in range(6):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(6, max(7, width // 4))
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        img[disc] = rng.integers(0, 256, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def save(rgb: np.ndarray, path: Path, **options) -> Path:
    Image.fromarray(rgb, "RGB").save(path, **options)
    return path


def smooth_residual(rgb: np.ndarray, mean_abs: float, seed: int) -> np.ndarray:
    """A replay that differs by a smooth field (the kind of residual weight rounding leaves)."""
    h, w = rgb.shape[:2]
    coarse = np.random.default_rng(seed).standard_normal((h // 8, w // 8, 3)).astype(np.float32)
    field = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c], "F").resize((w, h), Image.BILINEAR)) for c in range(3)], 2
    )
    field *= mean_abs / np.abs(field).mean()
    return np.clip(np.round(rgb + field), 0, 255).astype(np.uint8)


# --- identifying the preview's encoding ------------------------------------------------------------------


def test_pillow_default_jpeg_is_identified_as_aitoolkit_default(tmp_path):
    path = save(scene(), tmp_path / "p.jpg")  # exactly ai-toolkit's image.save(path)
    enc = identify_encoding(path)
    assert (enc.format, enc.lossy, enc.quality, enc.subsampling) == ("JPEG", True, 75, "4:2:0")
    assert enc.matches_aitoolkit_default and enc.exact and enc.qtables is None


@pytest.mark.parametrize("quality", [50, 75, 90, 95])
@pytest.mark.parametrize(("subsampling", "name"), [(2, "4:2:0"), (0, "4:4:4")])
def test_jpeg_quality_and_subsampling_are_read_from_the_file(tmp_path, quality, subsampling, name):
    path = save(scene(), tmp_path / "p.jpg", quality=quality, subsampling=subsampling)
    enc = identify_encoding(path)
    assert enc.quality == quality
    assert enc.subsampling == name
    assert enc.matches_aitoolkit_default == (quality == 75 and name == "4:2:0")


@pytest.mark.parametrize(
    "options",
    [{}, {"quality": 50}, {"quality": 90, "subsampling": 0}, {"quality": 95, "subsampling": 1}],
    ids=["default", "q50", "q90-444", "q95-422"],
)
def test_encode_like_reproduces_the_preview_pixels(tmp_path, options):
    replay = scene(seed=3)
    preview = save(replay, tmp_path / "p.jpg", **options)
    matched = encode_like(replay, identify_encoding(preview))
    assert np.array_equal(matched, load_rgb(preview))
    assert not np.array_equal(matched, replay)  # the JPEG did change the pixels


def test_custom_quantisation_tables_are_reused(tmp_path):
    replay = scene(seed=4)
    tables = [[3 + (i % 7) for i in range(64)], [5 + (i % 11) for i in range(64)]]
    preview = save(replay, tmp_path / "p.jpg", qtables=tables, subsampling=0)
    enc = identify_encoding(preview)
    assert enc.quality is None and enc.qtables is not None and not enc.matches_aitoolkit_default
    assert np.array_equal(encode_like(replay, enc), load_rgb(preview))


def test_png_preview_is_compared_without_reencoding(tmp_path):
    replay = scene()
    enc = identify_encoding(save(replay, tmp_path / "p.png"))
    assert (enc.format, enc.lossy) == ("PNG", False)
    assert np.array_equal(encode_like(replay, enc), replay)


def test_webp_lossless_and_lossy_are_told_apart(tmp_path):
    replay = scene()
    lossless = identify_encoding(save(replay, tmp_path / "l.webp", lossless=True))
    lossy = identify_encoding(save(replay, tmp_path / "d.webp"))
    assert not lossless.lossy
    assert lossy.lossy and lossy.quality == 80 and not lossy.exact and "quality" in lossy.note
    assert np.array_equal(encode_like(replay, lossy), load_rgb(tmp_path / "d.webp"))


def test_unreadable_preview_is_an_input_error(tmp_path):
    bad = tmp_path / "p.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        identify_encoding(bad)


# --- verdict paths ------------------------------------------------------------------------------------------


def test_identical_pixels_are_exact(tmp_path):
    replay = scene()
    score = score_replay(save(replay, tmp_path / "p.png"), replay)
    assert score.verdict is Verdict.EXACT
    assert score.metrics.ssim == pytest.approx(1.0)
    assert math.isinf(score.metrics.psnr_db)
    assert score.metrics.max_abs_diff == 0 and score.metrics.share_off_by_more_than_8 == 0


def test_jpeg_round_trip_of_the_same_replay_is_exact_after_compression_matching(tmp_path):
    replay = scene()
    preview = save(replay, tmp_path / "p.jpg")
    raw, _, _ = compute_metrics(load_rgb(preview), replay)
    assert raw.max_abs_diff > 8  # unmatched, the JPEG alone looks like a difference
    score = score_replay(preview, replay)
    assert score.verdict is Verdict.EXACT
    assert score.encoding.matches_aitoolkit_default


def test_rounding_level_residual_passes(tmp_path):
    replay = scene(256, 192)
    preview = save(replay, tmp_path / "p.jpg")
    score = score_replay(preview, smooth_residual(replay, 0.9, seed=1))
    assert score.verdict is Verdict.PASS, score.metrics
    assert score.metrics.psnr_db >= 32 and score.metrics.max_abs_diff > 0


def test_visible_noise_is_drift(tmp_path):
    replay = scene(256, 192)
    preview = save(replay, tmp_path / "p.jpg")
    score = score_replay(preview, smooth_residual(replay, 3.0, seed=2))
    assert score.verdict is Verdict.DRIFT, score.metrics
    assert 0.90 <= score.metrics.ssim < 0.97 or score.metrics.psnr_db < 32


def test_one_pixel_shift_fails_with_same_composition_finding(tmp_path):
    replay = scene()
    preview = save(replay, tmp_path / "p.jpg")
    score = score_replay(preview, np.roll(replay, 1, axis=1))
    assert score.verdict is Verdict.FAIL, score.metrics
    assert score.metrics.ssim < 0.90
    assert score.metrics.ssim_eighth >= 0.90
    assert "same_composition" in [f.code for f in score.findings]


def test_unrelated_image_fails(tmp_path):
    preview = save(scene(seed=0), tmp_path / "p.jpg")
    score = score_replay(preview, scene(seed=9)[:, ::-1].copy())
    assert score.verdict is Verdict.FAIL
    assert score.metrics.ssim < 0.6 and score.metrics.psnr_db < 20
    assert "same_composition" not in [f.code for f in score.findings]


def test_thresholds_decide_between_drift_and_fail(tmp_path):
    replay = scene()
    preview = save(replay, tmp_path / "p.jpg")
    shifted = np.roll(replay, 1, axis=1)
    lenient = Thresholds(drift_min_ssim=0.3)
    assert score_replay(preview, shifted, lenient).verdict is Verdict.DRIFT
    assert score_replay(preview, shifted).verdict is Verdict.FAIL


def test_different_size_is_a_finding_not_a_crash(tmp_path):
    preview = save(scene(128, 96), tmp_path / "p.jpg")
    replay = scene(120, 96)
    score = score_replay(preview, replay)
    codes = {f.code: f for f in score.findings}
    assert codes["size_mismatch"].data == {"preview_size": [128, 96], "replay_size": [120, 96]}
    assert "replay_resized" in codes
    assert score.ssim_map.shape == (96, 128)
    assert 0.0 <= score.metrics.ssim <= 1.0


# --- metric conventions -------------------------------------------------------------------------------------


def test_ssim_uses_the_recorded_convention_and_maps_are_per_pixel(tmp_path):
    replay = scene()
    score = score_replay(save(replay, tmp_path / "p.png"), smooth_residual(replay, 3.0, seed=5))
    assert SSIM_CONVENTION["gaussian_weights"] is True and SSIM_CONVENTION["sigma"] == 1.5
    assert SSIM_CONVENTION["use_sample_covariance"] is False and SSIM_CONVENTION["data_range"] == 255
    assert score.metrics.ssim_win_size == 11
    assert score.ssim_map.shape == (96, 128) and score.ssim_map.dtype.kind == "f"
    assert score.diff_map.shape == (96, 128) and score.diff_map.max() == score.metrics.max_abs_diff
    assert score.to_dict()["ssim_convention"] == SSIM_CONVENTION


@pytest.mark.parametrize(
    ("size", "win", "eighth", "eighth_win"), [(16, 11, 2, 1), (40, 11, 5, 5), (9, 9, 1, 1)]
)
def test_window_fits_tiny_images_and_is_recorded(size, win, eighth, eighth_win):
    a = scene(size, size, seed=1)
    b = smooth_residual(a, 2.0, seed=2) if size >= 16 else np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    metrics, _, _ = compute_metrics(a, b)
    assert metrics.ssim_win_size == win
    assert metrics.eighth_size == (eighth, eighth)
    assert metrics.ssim_eighth_win_size == eighth_win
    assert np.isfinite(metrics.ssim_eighth)


def test_share_off_by_more_than_8_counts_pixels_with_any_channel_off():
    a = np.full((10, 10, 3), 100, np.uint8)
    b = a.copy()
    b[0, :5, 2] = 109  # 5 pixels off by 9 in one channel
    b[1, :5, 0] = 108  # off by exactly 8: not counted
    metrics, _, diff_map = compute_metrics(a, b)
    assert metrics.share_off_by_more_than_8 == pytest.approx(0.05)
    assert metrics.max_abs_diff == 9 and diff_map[0, 0] == 9


def test_score_round_trips_through_json_with_infinite_psnr(tmp_path):
    replay = scene()
    score = score_replay(save(replay, tmp_path / "p.jpg"), replay)
    data = score.to_dict()
    assert data["metrics"]["psnr_db"] is None
    back = Score.from_dict(data)
    assert back.verdict is Verdict.EXACT and math.isinf(back.metrics.psnr_db)
    assert back.encoding == score.encoding and back.thresholds == score.thresholds


def test_thresholds_are_validated():
    with pytest.raises(InputError):
        Thresholds(pass_min_ssim=1.5)
    with pytest.raises(InputError):
        Thresholds(pass_min_ssim=0.9, drift_min_ssim=0.95)


def test_encoding_round_trips_custom_tables():
    enc = Encoding("JPEG", True, qtables=((1,) * 64, (2,) * 64), subsampling="4:4:4")
    assert Encoding.from_dict(enc.to_dict()) == enc


# --- the oracle: previews saved by ai-toolkit itself ----------------------------------------------------------


def test_aitoolkit_previews_are_exact_against_their_unencoded_pixels(oracle_dir):
    truth = oracle_dir / "ground_truth" / "og2_odd"
    pngs = sorted((truth / "png").glob("*.png"))
    assert pngs
    for png in pngs:
        preview = next((oracle_dir / "jobs" / "og2_odd" / "samples").glob(png.stem + ".*"))
        score = score_replay(preview, load_rgb(png))
        assert score.encoding.matches_aitoolkit_default, preview.name
        assert score.verdict is Verdict.EXACT, preview.name


def test_encode_like_works_in_memory_without_touching_disk(tmp_path):
    replay = scene()
    buf = io.BytesIO()
    Image.fromarray(replay).save(buf, "JPEG")
    path = tmp_path / "p.jpg"
    path.write_bytes(buf.getvalue())
    before = sorted(tmp_path.iterdir())
    encode_like(replay, identify_encoding(path))
    assert sorted(tmp_path.iterdir()) == before
