"""The pytest plugin: ``pytest --parity JOB_DIR`` runs one check and gives one test per preview."""

from __future__ import annotations

import json
import re

import pytest
from test_ci_output import JOB, STEP0, TINY, images_made_elsewhere

pytest_plugins = ["pytester"]
PLUGIN = ("-p", "parity.pytest_plugin")


def test_without_parity_the_plugin_adds_nothing(pytester):
    pytester.makepyfile("def test_one():\n    pass\n")
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1)
    assert "parity::" not in result.stdout.str() and "collected 1 item" in result.stdout.str()


def test_previews_are_collected_from_the_plan_without_running_anything(pytester):
    result = pytester.runpytest(*PLUGIN, "--parity", str(JOB), "--collect-only", "-q")
    assert [line for line in result.stdout.lines if line.startswith("parity::")] == [
        f"parity::og2_basic/{p.name}" for p in sorted((JOB / "samples").glob("*.jpg"))]
    assert "12 tests collected" in result.stdout.str()
    assert not (pytester.path / "parity-report").exists()


def test_one_test_per_preview_passes_fails_or_skips_by_its_verdict(pytester):
    images = images_made_elsewhere(pytester.path / "elsewhere")
    out = pytester.path / "report"
    result = pytester.runpytest(
        *PLUGIN, "--parity", str(JOB), "--parity-base-model", str(TINY), "-rfs",
        "--parity-args", f"--cpu-profile avx2 --steps 0 --no-diagnose --images {images} --out {out}")
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    text = result.stdout.str()
    assert re.search(f"FAILED .*parity::og2_basic/{STEP0[1]}", text)  # the node id, relative to the rootdir
    assert f"{STEP0[1]}: FAIL (--fail-on fail): SSIM 0.0" in text and "Traceback" not in text
    assert re.search(f"SKIPPED \\[1\\] .*: no image named like {STEP0[2][:-4]}", text)
    assert [p["outcome"] for p in json.loads((out / "parity.json").read_text())["previews"]] == [
        "PASS", "FAIL", "SKIPPED"]


def test_a_check_that_cannot_run_fails_every_preview_with_its_error(pytester):
    result = pytester.runpytest(*PLUGIN, "--parity", str(JOB), "--parity-base-model", str(pytester.path / "none"),
                                "--parity-args", "--steps latest")
    result.assert_outcomes(failed=3)
    text = result.stdout.str()
    # each failure says it (pytest's -ra summary may repeat the line, depending on the width it prints at)
    assert text.count("exited 3 without a report") >= 3 and "base model not found" in text


def test_an_unreadable_job_folder_is_a_usage_error(pytester):
    result = pytester.runpytest(*PLUGIN, "--parity", str(pytester.path / "missing"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--parity: " in result.stderr.str()
