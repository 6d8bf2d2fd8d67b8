"""parity check end to end on the oracle job folders (CPU, tiny model)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import ORACLE_DIR
from parity.check import CheckOptions, run_check
from parity.replay import Replayer, ReplayOptions

TINY = ORACLE_DIR / "tiny_omnigen2"


def in_memory(job: str) -> dict[int, Path]:
    folder = ORACLE_DIR / "ground_truth" / job / "lora_in_memory"
    return {int(p.stem.split("_")[1]): p for p in folder.glob("step_*.safetensors") if int(p.stem.split("_")[1])}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = {}
    for job in ("og2_basic", "og2_odd"):
        options = CheckOptions(replay=ReplayOptions(base_model=str(TINY)), out_dir=tmp_path_factory.mktemp(job))
        out[job] = run_check(ORACLE_DIR / "jobs" / job, options)
    return out


def test_oracle_verdicts_exact_where_proven_and_never_fail(reports):
    basic = {(i.step, i.prompt_index): i.outcome.value for i in reports["og2_basic"].items}
    assert all(v == "EXACT" for (step, _), v in basic.items() if step == 0)
    assert all(v == "PASS" for (step, _), v in basic.items() if step > 0)
    odd = {(i.step, i.prompt_index): i.outcome.value for i in reports["og2_odd"].items}
    assert all(v == "EXACT" for (step, _), v in odd.items() if step < 6)
    assert all(v in ("EXACT", "PASS") for v in odd.values())
    for report in reports.values():
        assert report.exit_code == 0
        assert report.noise_algorithm == "torch2.13-avx2"


def test_every_non_exact_preview_names_its_residual(reports):
    for report in reports.values():
        for item in report.items:
            if item.outcome.value == "PASS":
                codes = {c.code for c in item.causes}
                assert codes & {"predicted_residual", "kernel_residual"}, (item.preview_file, codes)


def test_passing_merged_rounds_name_their_residual(reports):
    for item in reports["og2_basic"].items:
        codes = {c.code for c in item.causes}
        if item.step > 0:
            assert {"lora_saved_fp16", "predicted_residual"} <= codes, (item.preview_file, codes)
            residual = next(c for c in item.causes if c.code == "predicted_residual")
            assert "fp16-rounded LoRA" in residual.title


def test_card_images_made_as_replays_finish_give_the_same_report(reports):
    """Each preview's card images (the costly part of report.html) are made on the worker thread as its replay
    finishes; report.html and parity.json are byte for byte what the report makes by itself without them."""
    from reports import write_reports
    from reports.html import CARDS_FOLDER, render_html
    from reports.json_report import render_json

    report = reports["og2_basic"]
    scored = [i for i in report.items if i.score is not None]
    assert len(scored) == 12 and all(i.card_file is not None and i.card_file.is_file() for i in scored)
    assert all(i.score.ssim_map is None and i.score.diff_map is None for i in scored)  # small to gather
    out = scored[0].card_file.parent.parent
    assert scored[0].card_file.parent.name == CARDS_FOLDER
    precomputed = render_html(report, out), render_json(report, out)
    files = [i.card_file for i in report.items]
    try:
        for item in report.items:
            item.card_file = None
        assert (render_html(report, out), render_json(report, out)) == precomputed
    finally:
        for item, file in zip(report.items, files, strict=True):
            item.card_file = file
    write_reports(report, out)  # uses the card files, then deletes them
    assert (out / "report.html").read_text(encoding="utf-8") == precomputed[0]
    assert not (out / CARDS_FOLDER).exists()


def test_in_memory_weights_make_merged_rounds_exact(tmp_path):
    options = CheckOptions(
        replay=ReplayOptions(base_model=str(TINY), lora_overrides=in_memory("og2_basic")), out_dir=tmp_path
    )
    report = run_check(ORACLE_DIR / "jobs" / "og2_basic", options)
    outcomes = {(i.step, i.prompt_index): i.outcome.value for i in report.items}
    assert sum(v == "EXACT" for v in outcomes.values()) == 11
    assert outcomes[(4, 1)] == "PASS"


def test_rerun_reuses_cached_replays(tmp_path, monkeypatch):
    options = CheckOptions(
        replay=ReplayOptions(base_model=str(TINY), noise_algorithm="torch2.13-avx2"), steps="0,2", out_dir=tmp_path
    )
    first = run_check(ORACLE_DIR / "jobs" / "og2_odd", options)
    pngs = sorted((tmp_path / "replays").glob("*.png"))
    assert len(pngs) == 10

    def no_replay(*args, **kwargs):
        raise AssertionError("a cached replay was computed again")

    monkeypatch.setattr(Replayer, "replay", no_replay)
    second = run_check(ORACLE_DIR / "jobs" / "og2_odd", options)
    assert [i.outcome for i in second.items] == [i.outcome for i in first.items]


def test_a_changed_setting_misses_the_cache(tmp_path):
    base = dict(base_model=str(TINY), noise_algorithm="torch2.13-avx2")
    run_check(ORACLE_DIR / "jobs" / "og2_odd", CheckOptions(replay=ReplayOptions(**base), steps="0", out_dir=tmp_path))
    other = ReplayOptions(**base | {"noise_algorithm": "torch2.11-avx512"})
    report = run_check(ORACLE_DIR / "jobs" / "og2_odd", CheckOptions(replay=other, steps="0", out_dir=tmp_path))
    assert len(list((tmp_path / "replays").glob("*.png"))) == 10
    assert all(i.outcome.value == "FAIL" for i in report.items)  # the wrong noise is an unrelated picture


def run_cli(*args, cwd=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_check_writes_reports_and_leaves_the_job_folder_alone(tmp_path):
    job = tmp_path / "job"
    shutil.copytree(ORACLE_DIR / "jobs" / "og2_odd", job)
    before = snapshot(job)
    out = tmp_path / "report"
    result = run_cli("check", str(job), "--base-model", str(TINY), "--steps", "0", "--out", str(out),
                     "--cpu-profile", "avx2")
    assert result.returncode == 0, result.stderr
    assert "EXACT 5" in result.stdout
    data = json.loads((out / "parity.json").read_text())
    assert [p["outcome"] for p in data["previews"]] == ["EXACT"] * 5
    assert (out / "report.html").is_file() and (out / "junit.xml").is_file()
    assert snapshot(job) == before


def test_cli_exit_codes(tmp_path):
    job = ORACLE_DIR / "jobs" / "og2_odd"
    missing = run_cli("check", str(job), "--out", str(tmp_path / "a"))  # the config's path does not exist here
    assert missing.returncode == 3 and "base model not found" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    inside = run_cli("check", str(job), "--base-model", str(TINY), "--out", str(job / "report"))
    assert inside.returncode == 2 and "inside the job folder" in inside.stderr
    bad_steps = run_cli("check", str(job), "--base-model", str(TINY), "--steps", "3", "--out", str(tmp_path / "b"))
    assert bad_steps.returncode == 2 and "no previews at step(s) 3" in bad_steps.stderr
    bad_lora = run_cli("check", str(job), "--base-model", str(TINY), "--lora", "2", "--out", str(tmp_path / "c"))
    assert bad_lora.returncode == 2 and "STEP=FILE" in bad_lora.stderr
    import torch

    if not torch.cuda.is_available():
        cuda = run_cli("check", str(job), "--base-model", str(TINY), "--device", "cuda", "--out", str(tmp_path / "d"))
        assert cuda.returncode == 3 and "CUDA" in cuda.stderr


def test_fail_on_drift_turns_a_pass_into_exit_1(tmp_path):
    """A wrong noise algorithm gives FAIL (exit 1); --fail-on drift also gates on DRIFT."""
    job = ORACLE_DIR / "jobs" / "og2_odd"
    result = run_cli("check", str(job), "--base-model", str(TINY), "--steps", "0", "--noise", "torch2.11-avx512",
                     "--out", str(tmp_path / "r"), "--cpu-profile", "avx2")
    assert result.returncode == 1
    junit = (tmp_path / "r" / "junit.xml").read_text()
    assert junit.count("<failure") == 5


def test_a_calibration_replay_that_crashes_does_not_end_the_run(tmp_path, monkeypatch):
    """The noise choice's probe replay crashes: the run falls back to this torch's draw, says why, goes on."""
    from parity.replay import Replayer

    def crash(self, *args, **kwargs):
        raise IndexError("index 6250 is out of bounds for dimension 0 with size 1024")

    monkeypatch.setattr(Replayer, "choose_noise_algorithm", crash)
    options = CheckOptions(replay=ReplayOptions(base_model=str(TINY), noise_algorithm="auto"), steps="0",
                           out_dir=tmp_path / "out", diagnose=False)
    report = run_check(ORACLE_DIR / "jobs" / "og2_basic", options)
    assert any(w.startswith("noise choice: this torch's own draw: a step-0 replay crashed") for w in report.warnings)
    assert report.noise_algorithm != "auto" and all(i.score is not None for i in report.items)
