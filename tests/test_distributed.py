"""parity check under torchrun (issue 6): sharding, and a 2-process CPU run giving the same report as one process."""

import json
import os
import re
import subprocess
import sys

from fixtures import ORACLE_DIR
from parity.distributed import Dist, from_env, shard

TINY = ORACLE_DIR / "tiny_omnigen2"


def test_shard_is_contiguous_balanced_and_complete():
    costs = [1.0] * 10
    assert shard(costs, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert shard(costs, 3) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    assert shard([4.0, 1.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3, 4]]
    assert shard([], 4) == [[], [], [], []]
    assert shard([0.0, 0.0, 0.0], 2) == [[0], [1, 2]]
    for world in (1, 2, 3, 7, 12):
        parts = shard([float(i % 3 + 1) for i in range(11)], world)
        assert sorted(i for p in parts for i in p) == list(range(11))
        assert all(p == list(range(p[0], p[-1] + 1)) for p in parts if p)


def test_one_process_is_a_world_of_one():
    dist = from_env({})
    assert (dist.rank, dist.world, dist.is_main) == (0, 1, True)
    assert dist.all_gather("x") == ["x"] and dist.gather(3) == [3] and dist.broadcast(5) == 5
    assert Dist().world == 1


def comparable(report: dict) -> dict:
    """What must not depend on how many processes replayed: everything but times and folder names."""
    previews = []
    for p in report["previews"]:
        p = dict(p)
        p["replay_png"] = os.path.basename(p["replay_png"]) if p.get("replay_png") else None
        p.pop("seconds", None)
        previews.append(p)
    keep = {k: v for k, v in report.items() if k not in ("previews", "created", "generated", "report_dir")}
    return {"run": keep, "previews": previews}


def run(args, env):
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=1200)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_and_two_processes(job, base_model, tmp_path, *extra) -> tuple[dict, dict]:
    """``parity check`` of ``job`` on the CPU as one process (``tmp_path/one``) and under a 2-process torchrun
    (``tmp_path/two``): both parity.json."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the same CPU kernels in both runs (torchrun sets 1 otherwise)
    common = [
        "check",
        str(job),
        "--base-model",
        str(base_model),
        "--device",
        "cpu",
        "--cpu-profile",
        "avx2",
        "--no-diagnose",
        *extra,
    ]
    one = run([sys.executable, "-m", "parity", *common, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),  # not a fixed one: another run on this machine may hold it
    ]
    two = run([*torchrun, "-m", "parity", *common, "--out", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-3000:]
    first = json.loads((tmp_path / "one" / "parity.json").read_text())
    second = json.loads((tmp_path / "two" / "parity.json").read_text())
    return first, second


def test_torchrun_two_processes_give_the_one_process_report(tmp_path):
    job = ORACLE_DIR / "jobs" / "og2_basic"
    first, second = one_and_two_processes(job, TINY, tmp_path)
    assert comparable(second) == comparable(first)
    assert len(first["previews"]) == 12
    # report.html too: rank 1's card images came through the shared folder, byte for byte the same page
    pages = [
        re.sub(r"<dt>created</dt><dd>[^<]*</dd>", "", (tmp_path / name / "report.html").read_text(encoding="utf-8"))
        .replace(str(tmp_path / name), "OUT")
        for name in ("one", "two")
    ]
    assert pages[0] == pages[1]
    assert not (tmp_path / "two" / ".parity-cards").exists()
    # every replay was written by one of the ranks into the shared cache, byte-identical to the one-process run;
    # beside them only the other draw that rank 1 screened on the first step-0 preview while rank 0 replayed the
    # one that reproduced it (one process never needed it)
    names = sorted(p.name for p in (tmp_path / "one" / "replays").glob("*.png"))
    extra = sorted({p.name for p in (tmp_path / "two" / "replays").glob("*.png")} - set(names))
    assert len(extra) == 1 and extra[0].startswith(first["previews"][0]["preview_file"].rsplit(".", 1)[0] + "-")
    assert set(names) <= {p.name for p in (tmp_path / "two" / "replays").glob("*.png")}
    for name in names:
        assert (tmp_path / "one" / "replays" / name).read_bytes() == (
            tmp_path / "two" / "replays" / name
        ).read_bytes()


def test_torchrun_two_processes_give_the_one_process_report_for_flux(tmp_path):
    """FLUX.1 under torchrun: flux_odd's step-0 round (the base) and its final round (LoRA by hooks, multipliers
    0.7/1/1.3) shared between two processes give the one-process report: every verdict EXACT, the same metrics,
    the same replay files."""
    job = ORACLE_DIR / "jobs" / "flux_odd"
    first, second = one_and_two_processes(job, ORACLE_DIR / "tiny_flux", tmp_path, "--steps", "0,6")
    assert comparable(second) == comparable(first)
    assert [(p["step"], p["outcome"]) for p in first["previews"]] == [(s, "EXACT") for s in (0, 6) for _ in range(5)]
    assert [p["score"]["metrics"] for p in second["previews"]] == [p["score"]["metrics"] for p in first["previews"]]
    assert {p["settings"]["replayed_with"] for p in second["previews"] if p["step"] == 6} == {
        f"flux_odd.safetensors (checkpoint, unmerged side branch x{m}, 20 layers)" for m in ("0.7", "1", "1.3")}
    names = sorted(p.name for p in (tmp_path / "one" / "replays").glob("*.png"))
    assert len(names) == 10
    for name in names:
        assert (tmp_path / "one" / "replays" / name).read_bytes() == (tmp_path / "two" / "replays" / name).read_bytes()
