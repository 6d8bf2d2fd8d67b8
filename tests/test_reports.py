"""The report files: parity.json against its schema, junit.xml, and a safe, self-contained report.html."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from junitparser import Error, Failure, JUnitXml, Skipped
from PIL import Image

from parity.errors import InputError
from parity.results import EXIT_CODES, Cause, CheckReport, Outcome, PreviewResult, exit_code_for
from parity.scores import Thresholds, score_replay
from reports import write_reports
from reports.heatmap import colormap, diff_heatmap
from reports.json_report import load_schema, render_json

XSS_PROMPT = '<script>alert("xss")</script> a cat "><img src=x onerror=alert(1)> --n blurry'
JOB = "cat_lora"


def _scene(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([255 * x / width, 128 + 90 * np.sin(x / 7 + y / 11), 255 * (1 - y / height)], axis=2)
    for _ in range(5):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(5, width // 3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.integers(0, 256, 3)
    img += rng.normal(0, 5, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _residual(rgb: np.ndarray, mean_abs: float, seed: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    coarse = np.random.default_rng(seed).standard_normal((h // 8, w // 8, 3)).astype(np.float32)
    field = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c], "F").resize((w, h), Image.BILINEAR)) for c in range(3)], 2
    )
    return np.clip(np.round(rgb + field * (mean_abs / np.abs(field).mean())), 0, 255).astype(np.uint8)


FP16_CAUSE = Cause(
    code="lora_saved_fp16",
    severity="info",
    title="LoRA checkpoint saved in float16",
    explanation="Previews used the fp32 LoRA in memory; the file holds it rounded to float16.",
    fix="Set save.dtype: float32 to make later checkpoints replay exactly.",
    evidence={"save.dtype": "float16"},
)


def sample_report(root: Path, fail_on: str = "fail") -> tuple[CheckReport, Path]:
    """A report over constructed images (no model): every outcome, an XSS prompt, two prompts over 3 steps.

    Returns the report and the folder to write it to (outside the job folder).
    """
    job = root / JOB
    samples = job / "samples"
    out = root / "out"
    (out / "replays").mkdir(parents=True)
    samples.mkdir(parents=True)
    t = 1_700_000_000_000
    items = []
    # (prompt index, step, how the replay differs, prompt)
    plan = [
        (0, 0, "same", "a red fox in the snow"),
        (0, 250, "residual", "a red fox in the snow"),
        (0, 500, "drift", "a red fox in the snow"),
        (1, 0, "same", XSS_PROMPT),
        (1, 250, "shift", XSS_PROMPT),
        (1, 500, "unrelated", XSS_PROMPT),
        (2, 250, "crash", "a lighthouse at dusk"),
        (2, 500, "deleted", "a lighthouse at dusk"),
    ]
    for n, (index, step, kind, prompt) in enumerate(plan):
        name = f"{t + n}__{step:09d}_{index}.jpg"
        truth = _scene(96, 64, seed=10 * index + 1)
        Image.fromarray(truth).save(samples / name)  # ai-toolkit's image.save(path)
        settings = {
            "prompt": prompt,
            "negative_prompt": "",
            "seed": 42 + index,
            "width": 96,
            "height": 64,
            "gen_width": 96,
            "gen_height": 64,
            "num_inference_steps": 20,
            "guidance_scale": 4.0,
            "network_multiplier": 1.0,
            "checkpoint": None if step == 0 else f"{JOB}_{step:09d}.safetensors",
            "lora_merged": step > 0,
        }
        item = PreviewResult(preview_file=name, step=step, prompt_index=index, settings=settings)
        item.preview_path = samples / name
        if kind == "deleted":
            item.replayable = False
            item.reason = f"checkpoint {JOB}_{step:09d}.safetensors was deleted (max_step_saves_to_keep)"
            item.causes = [
                Cause(
                    code="checkpoint_deleted",
                    severity="error",
                    title="The checkpoint of this preview was deleted",
                    explanation="ai-toolkit keeps only the newest checkpoints.",
                    fix="Set save.max_step_saves_to_keep: 0 to keep all checkpoints.",
                    evidence={"checkpoint": settings["checkpoint"], "note": '<b>"bold"</b>'},
                )
            ]
        elif kind == "crash":
            item.error = "RuntimeError: out of memory <while decoding>"
        else:
            replay = {
                "same": truth,
                "residual": _residual(truth, 0.8, seed=step),
                "drift": _residual(truth, 3.0, seed=step),
                "shift": np.roll(truth, 1, axis=1),
                "unrelated": _scene(96, 64, seed=99)[::-1].copy(),
            }[kind]
            item.replay_png = out / "replays" / f"{Path(name).stem}.png"
            Image.fromarray(replay).save(item.replay_png)
            item.score = score_replay(item.preview_path, replay)
            if step > 0:
                item.causes = [FP16_CAUSE]
        items.append(item)
    report = CheckReport(
        tool_version="0.1.0",
        job_dir=str(job),
        job_name=JOB,
        base_model="OmniGen2/OmniGen2",
        device="cpu",
        dtype="bfloat16",
        pipeline_profile="aitoolkit-omnigen2",
        noise_algorithm="torch-2.11-cpu-bf16",
        noise_algorithm_reason="default: most jobs were trained on torch < 2.13",
        thresholds=Thresholds(),
        fail_on=fail_on,
        items=items,
        warnings=["sample prompt 3 has an unknown flag --zz that ai-toolkit drops"],
    )
    return report, out


EXPECTED = {"EXACT": 2, "PASS": 1, "DRIFT": 1, "FAIL": 2, "SKIPPED": 1, "ERROR": 1}


@pytest.fixture
def written(tmp_path):
    report, out = sample_report(tmp_path)
    return report, write_reports(report, out)


def test_constructed_pairs_give_every_outcome(tmp_path):
    report, _ = sample_report(tmp_path)
    assert report.counts == EXPECTED
    assert report.exit_code == 1
    assert [i.outcome for i in report.worst(3)] == [Outcome.ERROR, Outcome.FAIL, Outcome.FAIL]


def test_write_reports_writes_every_file_and_no_temporary_files(written):
    _, paths = written
    assert set(paths) == {"html", "json", "schema", "junit"}
    out = paths["html"].parent
    assert sorted(p.name for p in out.iterdir()) == [
        "junit.xml",
        "parity.json",
        "parity.schema.json",
        "replays",
        "report.html",
    ]


def test_card_images_made_ahead_give_the_same_page_and_a_damaged_card_file_none_unsafe(tmp_path):
    """Every card's images made ahead (as ``parity check`` does on its worker thread): report.html is byte for
    byte the page made without them; the card files are consumed. A card file altered since is never copied
    unescaped into the page, and one that cannot be read is made again."""
    from reports.html import CARDS_FOLDER, render_html, save_card_images

    report, out = sample_report(tmp_path)
    expected = render_html(report, out)
    for item in report.items:
        item.card_file = save_card_images(item, out)
    assert render_html(report, out) == expected
    assert write_reports(report, out)["html"].read_text(encoding="utf-8") == expected
    assert not (out / CARDS_FOLDER).exists()

    for item in report.items:
        item.card_file = save_card_images(item, out)
    scored = [i for i in report.items if i.score is not None]
    tampered, damaged = scored[0].card_file, scored[1].card_file
    tampered.write_bytes(tampered.read_bytes().replace(b"\nreplay data:image/png;base64,",
                                                       b'\nreplay data:image/png;base64,"><script>alert(1)</script>'))
    damaged.write_bytes(damaged.read_bytes() + "\u00e9".encode())
    page = write_reports(report, out)["html"].read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "&#34;&gt;&lt;script&gt;alert(1)" in page
    assert page.replace('&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;', "") == expected


def test_out_dir_inside_the_job_folder_is_refused(tmp_path):
    report, _ = sample_report(tmp_path)
    for inside in (Path(report.job_dir), Path(report.job_dir) / "parity-report"):
        with pytest.raises(InputError, match="inside the job folder"):
            write_reports(report, inside)
    assert not (Path(report.job_dir) / "parity-report").exists()


def test_rewriting_replaces_files_atomically(written, monkeypatch):
    report, paths = written
    before = paths["json"].read_bytes()
    import reports

    def broken(*args, **kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(reports, "render_junit", broken)
    with pytest.raises(RuntimeError):
        write_reports(report, paths["json"].parent)
    assert paths["json"].read_bytes() == before  # nothing was half-written or replaced
    assert not list(paths["json"].parent.glob(".*.tmp"))


# --- parity.json ---------------------------------------------------------------------------------------------


def test_parity_json_validates_against_its_schema(written):
    _, paths = written
    data = json.loads(paths["json"].read_text())
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    assert data["counts"] == EXPECTED
    assert data["exit_code"] == 1 and data["exit_codes"]["3"] == EXIT_CODES[3]
    assert data["thresholds"] == Thresholds().to_dict()
    assert data["ssim_convention"]["sigma"] == 1.5 and data["ssim_convention"]["gaussian_weights"] is True
    exact = next(p for p in data["previews"] if p["outcome"] == "EXACT")
    assert exact["score"]["metrics"]["psnr_db"] is None  # infinite
    assert exact["replay_png"].startswith("replays/")  # relative to parity.json


def test_schema_documents_every_field(written):
    def walk(node, where):
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                assert "description" in sub or "$ref" in sub, f"{where}.{name} has no description"
            for key, sub in node.items():
                walk(sub, f"{where}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(load_schema(), "schema")


def test_schema_rejects_a_wrong_verdict(written):
    _, paths = written
    data = json.loads(paths["json"].read_text())
    data["previews"][0]["score"]["verdict"] = "MAYBE"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, load_schema(), cls=jsonschema.Draft202012Validator)


def test_report_reads_back_from_parity_json(written):
    report, paths = written
    back = CheckReport.from_dict(json.loads(paths["json"].read_text()))
    assert back.counts == report.counts and back.exit_code == report.exit_code
    assert [i.preview_file for i in back.items] == [i.preview_file for i in report.items]
    assert back.items[1].score.metrics == report.items[1].score.metrics
    assert back.items[-1].causes == report.items[-1].causes


def test_json_has_no_nan_or_infinity(tmp_path):
    report, out = sample_report(tmp_path)
    text = render_json(report, out)
    assert "Infinity" not in text and "NaN" not in text


# --- junit.xml -----------------------------------------------------------------------------------------------


def _cases(path: Path):
    xml = JUnitXml.fromfile(str(path))
    return [case for suite in xml for case in suite]


def test_junit_has_one_case_per_preview_with_the_right_result(written):
    report, paths = written
    cases = _cases(paths["junit"])
    assert [c.name for c in cases] == [i.preview_file for i in report.items]
    by_name = {c.name: c for c in cases}
    for item in report.items:
        case = by_name[item.preview_file]
        assert case.classname == f"{JOB}.step_{item.step:09d}"
        kinds = {type(r) for r in case.result}
        expected = {
            Outcome.EXACT: set(),
            Outcome.PASS: set(),
            Outcome.DRIFT: set(),
            Outcome.FAIL: {Failure},
            Outcome.SKIPPED: {Skipped},
            Outcome.ERROR: {Error},
        }[item.outcome]
        assert kinds == expected, (item.preview_file, item.outcome)
    failure = next(r for c in cases for r in c.result if isinstance(r, Failure))
    assert "ssim" in failure.message and "PASS needs ssim >= 0.97" in failure.message
    skipped = next(r for c in cases for r in c.result if isinstance(r, Skipped))
    assert "deleted" in skipped.message


def test_junit_drift_fails_only_with_fail_on_drift(tmp_path):
    report, out = sample_report(tmp_path, fail_on="drift")
    paths = write_reports(report, out)
    drift = next(i for i in report.items if i.outcome is Outcome.DRIFT)
    case = next(c for c in _cases(paths["junit"]) if c.name == drift.preview_file)
    assert [type(r) for r in case.result] == [Failure]
    assert report.exit_code == 1
    xml = JUnitXml.fromfile(str(paths["junit"]))
    suite = next(iter(xml))
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (8, 3, 1, 1)


def test_junit_times_are_each_previews_seconds_and_a_skip_says_why_once(tmp_path):
    report, out = sample_report(tmp_path)
    for n, item in enumerate(report.items):
        item.seconds = None if item.outcome is Outcome.SKIPPED else 1.25 * (n + 1)
    skipped = next(i for i in report.items if i.outcome is Outcome.SKIPPED)
    skipped.reason = "not replayable: checkpoint og2_000000500.safetensors deleted"  # as the plan words it
    paths = write_reports(report, out)
    cases = _cases(paths["junit"])
    assert [c.time for c in cases] == [i.seconds or 0 for i in report.items]
    suite = next(iter(JUnitXml.fromfile(str(paths["junit"]))))
    assert suite.time == pytest.approx(sum(i.seconds or 0 for i in report.items))
    skip = next(r for c in cases for r in c.result if isinstance(r, Skipped))
    assert skip.message == "not replayable: checkpoint og2_000000500.safetensors deleted"
    back = CheckReport.from_dict(json.loads(paths["json"].read_text()))
    assert [i.seconds for i in back.items] == [i.seconds for i in report.items]


def test_exit_code_follows_fail_on():
    assert exit_code_for({"DRIFT": 2, "PASS": 3}, "fail") == 0
    assert exit_code_for({"DRIFT": 2, "PASS": 3}, "drift") == 1
    assert exit_code_for({"FAIL": 1}, "fail") == 1
    assert exit_code_for({"ERROR": 1}, "fail") == 1
    assert exit_code_for({"SKIPPED": 4, "EXACT": 1}, "drift") == 0


# --- report.html ---------------------------------------------------------------------------------------------


def test_user_text_is_escaped_in_the_html(written):
    _, paths = written
    html = paths["html"].read_text()
    assert html.count("<script") == 1  # only the page's own script
    assert "<img src=x" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(&#34;xss&#34;)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;&#34;bold&#34;&lt;/b&gt;" in html  # cause evidence
    assert "out of memory &lt;while decoding&gt;" in html


def test_html_is_self_contained(written):
    _, paths = written
    html = paths["html"].read_text()
    assert not re.search(r"""(?:src|href|action|srcset)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "url(http" not in html and "@import" not in html
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "default-src &#39;none&#39;" in html  # Content-Security-Policy (attribute-escaped)


def test_html_reads_in_order_with_one_card_per_preview(written):
    report, paths = written
    html = paths["html"].read_text()
    assert html.count('<article class="card') == len(report.items)
    order = [html.index(marker) for marker in ('id="summary"', 'id="chart"', 'id="previews"')]
    assert order == sorted(order)
    assert "<svg" in html and "SSIM over training steps" in html
    for outcome, n in EXPECTED.items():
        assert f'data-outcome="{outcome}"' in html
        assert html.count(f'data-outcome="{outcome}"') == n
    assert "PASS ≥ 0.97" in html and "PASS ≥ 32 dB" in html  # thresholds next to the metrics
    assert "gaussian_weights=True" in html  # the SSIM convention


def _decoded(uri: str) -> Image.Image:
    import base64
    import io

    head, data = uri.split(",", 1)
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_a_large_preview_is_shown_at_display_size_with_its_full_resolution_files_linked(tmp_path):
    """1024x768: every image of the card reduced by 3 to 342x256 WebP, the difference heatmap keeping a single
    changed pixel visible in its block; the thumbnail at most 96 px; the full-size files linked relatively."""
    from reports.html import card_images

    samples, out = tmp_path / JOB / "samples", tmp_path / "out"
    samples.mkdir(parents=True)
    (out / "replays").mkdir(parents=True)
    truth = _scene(1024, 768, seed=3)
    Image.fromarray(truth).save(samples / "big.png")  # lossless: the changed pixel is the only difference
    replay = truth.copy()
    replay[500, 700] = 255 - replay[500, 700]
    item = PreviewResult("big.png", 250, 0, {"prompt": "big"}, preview_path=samples / "big.png",
                         replay_png=out / "replays" / "big-0123.png", score=score_replay(samples / "big.png", replay))
    Image.fromarray(replay).save(item.replay_png)
    card = card_images(item)
    assert card.size == (1024, 768) and card.display == (342, 256)
    for name in ("preview", "replay", "diff", "ssim"):
        image = _decoded(card.images[name])
        assert card.images[name].startswith("data:image/webp;base64,") and image.size == (342, 256)
    diff = np.asarray(_decoded(card.images["diff"]).convert("L"), dtype=float)
    assert diff[500 // 3, 700 // 3] > np.median(diff) + 100  # one pixel of 1024x768, still bright at 342x256
    assert max(_decoded(card.images["thumb"]).size) == 96

    report = CheckReport(tool_version="0.1.0", job_dir=str(tmp_path / JOB), job_name=JOB, base_model="m",
                         device="cpu", dtype="bf16", pipeline_profile="p", noise_algorithm="n",
                         noise_algorithm_reason="r", items=[item])
    html = write_reports(report, out)["html"].read_text()
    assert 'width="342" height="256"' in html and "Shown at 342×256" in html
    links = re.findall(r'<a[^>]* href="([^"#][^"]*)"', html)
    assert links and "replays/big-0123.png" in links and f"../{JOB}/samples/big.png" in links
    assert all((out / link).is_file() for link in links)


def test_small_previews_stay_lossless_png(written):
    report, paths = written
    html = paths["html"].read_text()
    assert "data:image/webp" not in html and "Shown at" not in html  # 96x64: every pixel shown as it is


# --- heatmap helper ------------------------------------------------------------------------------------------


def test_colormap_is_dark_for_zero_and_bright_for_one():
    low, high = colormap(np.array([0.0, 1.0]))
    assert low.sum() < 20 and high.sum() > 600
    ramp = colormap(np.linspace(0, 1, 50)).astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(ramp) > 0)  # lightness rises monotonically


def test_difference_heatmap_of_levels_is_the_colormap_of_each_level():
    from reports.heatmap import diff_scale

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(diff_heatmap(levels), colormap(diff_scale(levels)))
    assert np.array_equal(diff_heatmap(levels.astype(np.int16)), diff_heatmap(levels))


def test_a_heatmap_shown_as_it_is_round_trips_losslessly():
    from reports.display import data_uri

    diff = np.array([[0, 1, 8], [32, 128, 255]], dtype=np.uint8)
    rgb = diff_heatmap(diff)
    with _decoded(data_uri(rgb, lossy=False)) as im:
        assert im.format == "PNG" and im.size == (3, 2)
        assert np.array_equal(np.asarray(im), rgb)
    assert not math.isclose(rgb[0, 1].sum(), rgb[0, 0].sum())  # a 1-level difference is visible
