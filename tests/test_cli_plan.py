"""``parity plan``: the table, ``--json``, and one clear line with exit code 2 for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_jobfolder import job_config, make_job
from test_plan import assert_plan_matches_ground_truth, ground_truth


def run_parity(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "parity", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime: the job folder must come out unchanged."""
    if not folder.exists():
        return {}
    if folder.is_file():
        stat = folder.stat()
        return {".": (stat.st_size, stat.st_mtime_ns)}
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("job", ["og2_basic", "og2_odd"])
def test_plan_json_on_stdout_agrees_with_oracle_ground_truth(oracle_dir, job):
    job_dir = oracle_dir / "jobs" / job
    before = snapshot(job_dir)
    result = run_parity("plan", job_dir, "--json", "-")
    assert result.returncode == 0, result.stderr
    assert_plan_matches_ground_truth(json.loads(result.stdout), ground_truth(oracle_dir, job))
    assert snapshot(job_dir) == before


def test_plan_prints_a_table_and_writes_json_to_a_file(oracle_dir, tmp_path):
    out = tmp_path / "plan.json"
    result = run_parity("plan", oracle_dir / "jobs" / "og2_odd", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "og2_odd (omnigen2)" in result.stdout
    assert "20 of 20 previews replayable" in result.stdout
    assert "og2_odd_000000002" in result.stdout
    assert "#3: 'a blue square'  negative: 'noise, grain'" in result.stdout
    assert json.loads(out.read_text())["job_name"] == "og2_odd"


def test_plan_lists_why_a_preview_is_not_replayable(tmp_path):
    job_dir = make_job(tmp_path, job_config(sample={"neg": "", "seed": -1, "prompts": ["a"]}))
    result = run_parity("plan", job_dir)
    assert result.returncode == 0
    assert "0 of 1 previews replayable" in result.stdout
    assert "1795681192170__000000000_0.jpg: not replayable: seed -1" in result.stdout


def test_plan_refuses_to_write_json_inside_the_job_folder(tmp_path):
    job_dir = make_job(tmp_path, job_config(sample={"neg": "", "prompts": ["a"]}))
    before = snapshot(job_dir)
    result = run_parity("plan", job_dir, "--json", job_dir / "plan.json")
    assert result.returncode == 2
    assert "refusing to write inside the job folder" in result.stderr
    assert snapshot(job_dir) == before


def _missing_dir(root: Path) -> tuple[Path, Path]:
    return root / "nowhere", root / "nowhere"


def _job_is_a_file(root: Path) -> tuple[Path, Path]:
    path = root / "job.zip"
    path.write_bytes(b"zip")
    return path, path


def _no_config(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root)
    (job_dir / "config.yaml").unlink()
    return job_dir, job_dir


def _malformed_yaml(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root)
    (job_dir / "config.yaml").write_text("config:\n  name: [unclosed\n  process: x\n")
    return job_dir, job_dir / "config.yaml"


def _malformed_job_config_json(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root, config_name=".job_config.json")
    (job_dir / ".job_config.json").write_text('{"job": "extension", "config": {')
    return job_dir, job_dir / ".job_config.json"


def _wrong_arch(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(
        root, job_config(model={"name_or_path": "stabilityai/stable-diffusion-xl-base-1.0", "arch": "sdxl"})
    )
    return job_dir, job_dir / "config.yaml"


def _no_samples_folder(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root, previews=[])
    (job_dir / "samples").rmdir()
    return job_dir, job_dir / "samples"


def _empty_samples(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root, previews=[])
    return job_dir, job_dir / "samples"


def _non_preview_file(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root)
    (job_dir / "samples" / "best_one.jpg").write_bytes(b"jpeg")
    return job_dir, job_dir / "samples" / "best_one.jpg"


def _unparseable_flag(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root, job_config(sample={"neg": "", "prompts": ["a cat --w abc"]}))
    return job_dir, job_dir / "config.yaml"


def _broken_checkpoint(root: Path) -> tuple[Path, Path]:
    job_dir = make_job(root)
    (job_dir / "job_000000002.safetensors").write_bytes(b"\xff" * 16)
    return job_dir, job_dir / "job_000000002.safetensors"


BAD_INPUTS = {
    "missing directory": (_missing_dir, "no such job folder"),
    "job folder is a file": (_job_is_a_file, "is a file, not a job folder"),
    "no config": (_no_config, "no config.yaml or .job_config.json"),
    "malformed config.yaml": (_malformed_yaml, "not valid YAML"),
    "malformed .job_config.json": (_malformed_job_config_json, "not valid JSON"),
    "arch no family serves": (_wrong_arch, "model.arch is 'sdxl'; parity supports: omnigen2, flux"),
    "no samples folder": (_no_samples_folder, "no samples folder"),
    "no previews": (_empty_samples, "no previews"),
    "non-preview image": (_non_preview_file, "not a preview"),
    "unparseable flag": (_unparseable_flag, "--w 'abc' is not an integer"),
    "broken checkpoint": (_broken_checkpoint, "not a safetensors file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file_and_exit_code_2(tmp_path, case):
    build, problem = BAD_INPUTS[case]
    job_dir, named_file = build(tmp_path)
    before = snapshot(job_dir)
    result = run_parity("plan", job_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(named_file) in lines[0]
    assert problem in lines[0]
    assert result.stdout == ""
    assert snapshot(job_dir) == before


def test_missing_assets_folder_is_an_input_error(oracle_dir, tmp_path):
    result = run_parity("plan", oracle_dir / "jobs" / "og2_basic", "--assets", tmp_path / "none")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'none'}: assets folder does not exist"
