"""parity check in CI: plain progress lines and an unclipped summary without a terminal, GitHub Actions' step summary
and error annotations."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_reports import XSS_PROMPT, sample_report

from fixtures import ORACLE_DIR
from parity.ci import annotations, escape_data, escape_property, github_wanted, report_to_github, step_summary
from parity.progress import ProgressLines, clock_text

JOB = ORACLE_DIR / "jobs" / "og2_basic"
TINY = ORACLE_DIR / "tiny_omnigen2"
STEP0 = ["1795681192170__000000000_0.jpg", "1795681192746__000000000_1.jpg", "1795681193240__000000000_2.jpg"]


def images_made_elsewhere(folder: Path) -> Path:
    """--images for og2_basic's step 0: preview 0 itself (PASS), preview 2's picture named as preview 1 (FAIL), none
    for preview 2 (SKIPPED). Scoring outside images replays nothing but the noise choice: a few seconds."""
    folder.mkdir()
    shutil.copy(JOB / "samples" / STEP0[0], folder / STEP0[0])
    shutil.copy(JOB / "samples" / STEP0[2], folder / STEP0[1])
    return folder


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """`parity check --github` with stdout and stderr piped (as in CI), a narrow COLUMNS and a step summary file."""
    tmp = tmp_path_factory.mktemp("ci")
    summary = tmp / "step_summary.md"
    summary.write_text("earlier step\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    env.update(COLUMNS="80", GITHUB_STEP_SUMMARY=str(summary), GITHUB_WORKSPACE=str(ORACLE_DIR))
    result = subprocess.run(
        [sys.executable, "-m", "parity", "check", str(JOB), "--base-model", str(TINY), "--cpu-profile", "avx2",
         "--steps", "0", "--no-diagnose", "--images", str(images_made_elsewhere(tmp / "elsewhere")),
         "--out", str(tmp / "out"), "--github"],
        capture_output=True, text=True, env=env, timeout=600)
    return result, summary


def test_without_a_terminal_each_replay_is_a_plain_line_with_its_count(piped_run):
    result, _ = piped_run
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    replays = [line for line in lines if " replay " in line]
    assert [re.sub(r"^\[\d+:\d\d\] ", "", line).split(" (")[0] for line in replays] == [
        f"replay {n}/3 {name}" for n, name in enumerate(STEP0, 1)]
    assert all(re.fullmatch(r"\[\d+:\d\d\] replay \d/3 \S+\.jpg( \(about \d+:\d\d left\))?", line) for line in replays)
    assert "[" not in result.stderr.replace("[0:", "").replace("[1:", "")  # no bar, no markup
    assert "\x1b[" not in result.stderr + result.stdout and "\r" not in result.stderr


def test_without_a_terminal_the_summary_is_never_clipped(piped_run):
    result, _ = piped_run
    table = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(table) == 3 and "…" not in result.stdout
    for name, line in zip(STEP0, table, strict=True):
        assert name in line
    assert re.search(r"noise \S+ \(chosen from .*\)$", result.stdout, re.M)  # one line, not wrapped at 80


def test_github_annotates_each_failing_preview_on_stdout(piped_run):
    result, _ = piped_run
    errors = [line for line in result.stdout.splitlines() if line.startswith("::")]
    assert len(errors) == 1
    props, message = errors[0].removeprefix("::error ").split("::", 1)
    assert props == f"file=jobs/og2_basic/samples/{STEP0[1]},title=parity FAIL%3A {STEP0[1]}"
    assert message.startswith("FAIL: SSIM 0.0") and "%0Astep 0, prompt 1: " in message and "\n" not in message


def test_github_step_summary_is_appended(piped_run):
    _, summary = piped_run
    text = summary.read_text()
    assert text.startswith("earlier step\n## ❌ Parity failed: `og2_basic`")
    assert "0 exact, 1 pass, 0 drift, 1 fail of 3 previews, 1 skipped" in text
    assert f"| 🔴 | FAIL (fails the run) | `{STEP0[1]}` | 0 | 1 |" in text
    assert f"| ⚪ | SKIPPED | `{STEP0[2]}` |" in text and f"`{STEP0[0]}`" not in text  # PASS needs no attention


def test_github_is_on_under_actions_unless_turned_off():
    assert github_wanted(None, {"GITHUB_ACTIONS": "true"}) is True
    assert github_wanted(None, {}) is False
    assert github_wanted(False, {"GITHUB_ACTIONS": "true"}) is False
    assert github_wanted(True, {}) is True


def test_workflow_command_escaping_follows_githubs_rules():
    assert escape_data("50% off\r\nnext: a, b") == "50%25 off%0D%0Anext: a, b"
    assert escape_property("50% off\r\nnext: a, b") == "50%25 off%0D%0Anext%3A a%2C b"


def test_annotations_are_worst_first_and_one_line_each(tmp_path):
    report, _ = sample_report(tmp_path)
    lines = annotations(report, tmp_path)
    failing = [i for i in report.items if report.is_failure(i)]
    assert len(lines) == len(failing) == 3
    assert [line.split("title=parity ")[1].split("%3A")[0] for line in lines] == ["ERROR", "FAIL", "FAIL"]
    assert all(line.startswith("::error file=cat_lora/samples/") and "\n" not in line for line in lines)
    unescaped = lines[1].split("::", 2)[2].replace("%0A", "\n").replace("%0D", "\r").replace("%25", "%")
    assert XSS_PROMPT in unescaped  # the prompt goes through whole; GitHub shows it as text


def test_step_summary_shows_user_text_as_text(tmp_path):
    report, out = sample_report(tmp_path)
    text = step_summary(report, {"html": out / "report.html"})
    assert "<script" not in text and "<img" not in text
    assert text.count("| 🔴 |") == 2 and "| 🟡 | DRIFT |" in text and "| 🟣 | ERROR (fails the run) |" in text
    assert "**error** The checkpoint of this preview was deleted (`checkpoint_deleted`, 1 preview(s))" in text


def test_without_a_summary_file_the_annotations_still_come(tmp_path):
    report, out = sample_report(tmp_path)
    stdout = io.StringIO()
    problem = report_to_github(report, {"html": out / "report.html"}, stdout, env={"GITHUB_WORKSPACE": str(tmp_path)})
    assert "GITHUB_STEP_SUMMARY is not set" in problem and stdout.getvalue().count("::error ") == 3


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_count_replays_estimate_the_time_left_and_repeat_a_long_phase():
    clock, stream = Clock(), io.StringIO()
    lines = ProgressLines(total=4, stream=stream, heartbeat=10, clock=clock)
    clock.now += 9
    lines.beat()
    assert stream.getvalue() == ""  # nothing before the first event or heartbeat: an early error stays alone
    clock.now += 3
    lines.beat()
    lines("choosing the noise algorithm")
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        lines(name)
        clock.now += 6
    clock.now += 5
    lines.beat()
    lines("diagnosing c.jpg")  # a phase that names a preview is not a replay
    assert stream.getvalue().splitlines() == [
        "[0:12] still loading the base model: 0:12 so far",
        "[0:12] choosing the noise algorithm",
        "[0:12] replay 1/4 a.jpg",
        "[0:18] replay 2/4 b.jpg (about 0:18 left)",  # 6 s a replay, this one and two more
        "[0:24] replay 3/4 c.jpg (about 0:12 left)",
        "[0:35] still replaying c.jpg: 0:11 so far (3/4 started, about 0:01 left)",
        "[0:35] diagnosing c.jpg",
    ]
    assert clock_text(3725) == "1:02:05"
