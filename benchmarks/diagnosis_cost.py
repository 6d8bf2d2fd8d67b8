"""What diagnosis costs (issue 12): the seed-fault copy of og2_basic (config seed 42 -> 43) against a clean run.

Each case is one ``parity check`` in a fresh process with a fresh ``--out`` (nothing cached), on the CPU, the tiny
oracle model: wall seconds, new replays written to ``OUT/replays/`` and, for the fault, replays per failing preview
and the job-level causes. A re-run of the fault into the same folder shows what the replay cache saves. Prints a
table and writes ``diagnosis_cost.json``.

    python benchmarks/diagnosis_cost.py --out /tmp/diag   # about 3 minutes on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ROOT / "fixtures" / "oracle"


def seed_fault(folder: Path) -> Path:
    job = folder / "og2_basic_seed43"
    shutil.copytree(ORACLE / "jobs" / "og2_basic", job)
    config = yaml.safe_load((job / "config.yaml").read_text())
    config["config"]["process"][0]["sample"]["seed"] = 43
    (job / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return job


def check(job: Path, out: Path, steps: str) -> dict:
    command = [sys.executable, "-m", "parity", "check", str(job), "--base-model", str(ORACLE / "tiny_omnigen2"),
               "--cpu-profile", "avx2", "--steps", steps, "--out", str(out)]
    before = set((out / "replays").rglob("*.png")) if (out / "replays").is_dir() else set()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    report = json.loads((out / "parity.json").read_text())
    failing = [p for p in report["previews"] if p["outcome"] not in ("EXACT", "PASS")]
    new = len(set((out / "replays").rglob("*.png")) - before)  # experiments/ (diagnosis, LoRA effect) included
    return {"exit": done.returncode, "seconds": round(seconds, 1), "previews": len(report["previews"]),
            "failing": len(failing), "new_replays": new,
            # beyond one replay per preview and one LoRA-off replay per round (a clean run has those too)
            "replays_per_failing": round((new - len(report["previews"]) - len(report.get("lora_effects", [])))
                                         / len(failing), 1) if failing and new else 0,
            "job_causes": [(c["code"], c["evidence"].get("explains"), c["evidence"].get("of"))
                           for c in report.get("job_causes", [])],
            "diagnosis": report.get("diagnosis")}  # the report's own count: experiments, replayed vs cached


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", default="all", help="--steps for both runs (all: the whole demo job)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    faulty = seed_fault(args.out)
    rows = {
        "clean": check(ORACLE / "jobs" / "og2_basic", args.out / "clean", args.steps),
        "seed fault": check(faulty, args.out / "fault", args.steps),
        "seed fault, re-run": check(faulty, args.out / "fault", args.steps),
    }
    ratio = rows["seed fault"]["seconds"] / rows["clean"]["seconds"]
    for name, row in rows.items():
        print(f"{name:20s} {row['seconds']:7.1f} s  exit {row['exit']}  {row['failing']}/{row['previews']} failing  "
              f"{row['new_replays']} new replays ({row['replays_per_failing']} per failing preview)  "
              f"causes {row['job_causes']}")
        if cost := row["diagnosis"]:
            print(f"{'':20s} diagnosis: {cost['experiments']} experiments for {cost['previews']} previews "
                  f"({cost['per_preview']:g} each; {cost['replays']} replayed, {cost['cached']} cached), "
                  f"{cost['seconds']:.1f} s")
    print(f"fault / clean: {ratio:.2f}x (target: at most 2x)")
    (args.out / "diagnosis_cost.json").write_text(json.dumps({"rows": rows, "ratio": round(ratio, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
