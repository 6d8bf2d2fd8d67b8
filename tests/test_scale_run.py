"""benchmarks/scale_run.sh (issue 6's 1-GPU vs 2-GPU timing) end to end at a tiny size on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_run_smoke_times_both_runs_and_compares_their_reports(tmp_path):
    env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(REPO))
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "scale_run.sh")], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "6 previews at 64x64, 2 steps" in out and "reports agree (6/6 previews)" in out
    assert "ratio " in out and "  one: [rank 0] load: " in out and "  two: [rank 1] replays " in out
    # a second call reuses the job and times the runs alone
    again = subprocess.run(["bash", str(REPO / "benchmarks" / "scale_run.sh")], capture_output=True, text=True,
                           env=env, timeout=900)
    assert again.returncode == 0 and "reusing the job" in again.stdout
