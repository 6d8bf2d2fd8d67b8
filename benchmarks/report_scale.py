"""report.html at scale (issue 12): a synthetic 100-preview 1024x1024 check, its page size and its render time.

    python benchmarks/report_scale.py [--out DIR] [--previews 100] [--size 1024] [--runs 3]

No torch and no model: builds a job folder of JPEG q75 previews (ai-toolkit's default save) of random-ish scenes
and, for each, a replay that differs the way real ones do (identical; a low-frequency rounding residual; a larger
one; a shifted or unrelated picture; one preview not replayable, one replay crashed), scores every pair with
``parity.scores.score_replay`` (the real SSIM and difference maps), writes the reports with
``reports.write_reports`` and opens report.html in headless Chromium (Playwright, ``/usr/bin/chromium``): the
time from navigation to the first frame after the load event, the median of ``--runs`` fresh pages. Exits 1 when
the page is 30 MB or more or renders in 3 s or more (the issue's limits). Prints the figures; with ``--json FILE``
writes them too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from parity.results import CheckReport, PreviewResult  # noqa: E402
from parity.scores import Thresholds, score_replay  # noqa: E402
from reports import write_reports  # noqa: E402

MAX_PAGE_BYTES = 30 * 1024 * 1024
MAX_RENDER_SECONDS = 3.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
JOB = "scale_lora"
PROMPTS = 10
# What the replays of a typical job look like, by share (the rest EXACT); step 0 is always EXACT.
MIX = (("residual", 0.15), ("drift", 0.08), ("shift", 0.03), ("unrelated", 0.02))


def scene(size: int, seed: int) -> np.ndarray:
    """A random-ish picture: gradients, overlapping discs, a fine texture and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.stack([255 * x / size, 128 + 90 * np.sin(x / 37 + y / 53), 255 * (1 - y / size)], axis=2)
    for _ in range(12):
        cx, cy, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 20, size // 4))]
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        img[disc] = 0.6 * img[disc] + 0.4 * rng.integers(0, 256, 3)
    img += 12 * np.sin(x / 3.1 + rng.random() * 6)[..., None] * np.cos(y / 4.3)[..., None]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def residual(rgb: np.ndarray, mean_abs: float, seed: int) -> np.ndarray:
    """``rgb`` plus a smooth random field of mean absolute value ``mean_abs`` (kernel-level differences)."""
    h, w = rgb.shape[:2]
    coarse = np.random.default_rng(seed).standard_normal((h // 16, w // 16, 3)).astype(np.float32)
    field = np.stack([np.asarray(Image.fromarray(coarse[..., c], "F").resize((w, h), Image.BILINEAR))
                      for c in range(3)], 2)
    return np.clip(np.round(rgb + field * (mean_abs / np.abs(field).mean())), 0, 255).astype(np.uint8)


def kinds(previews: int, seed: int = 0) -> list[str]:
    """How each preview's replay differs: EXACT at step 0, the MIX elsewhere, one not replayable, one crash."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(previews):
        if n < PROMPTS:
            out.append("same")
            continue
        draw, kind = rng.random(), "same"
        for name, share in MIX:
            if draw < share:
                kind = name
                break
            draw -= share
        out.append(kind)
    out[-1], out[-2] = "deleted", "crash"
    return out


def build_report(root: Path, previews: int, size: int) -> tuple[CheckReport, Path, float]:
    """The job folder, the replays and the scored CheckReport; returns it, the report folder and the seconds."""
    start = time.perf_counter()
    samples, out = root / JOB / "samples", root / "out"
    samples.mkdir(parents=True)
    (out / "replays").mkdir(parents=True)
    plan = kinds(previews)

    def make(n: int) -> PreviewResult:
        step, index = 250 * (n // PROMPTS), n % PROMPTS
        name = f"{1_700_000_000_000 + n}__{step:09d}_{index}.jpg"
        truth = scene(size, seed=index)  # one picture per prompt, as a LoRA refines it over the steps
        Image.fromarray(truth).save(samples / name)  # ai-toolkit's image.save(path): JPEG q75, 4:2:0
        settings = {"prompt": f"prompt {index}: a scene with discs, sks style", "negative_prompt": "", "seed": 42,
                    "width": size, "height": size, "gen_width": size, "gen_height": size, "num_inference_steps": 25,
                    "guidance_scale": 4.0, "network_multiplier": 1.0,
                    "checkpoint": None if step == 0 else f"{JOB}_{step:09d}.safetensors", "lora_merged": False}
        item = PreviewResult(name, step, index, settings, preview_path=samples / name, seconds=5.0)
        kind = plan[n]
        if kind == "deleted":
            item.replayable, item.reason, item.seconds = False, "not replayable: checkpoint deleted", None
            return item
        if kind == "crash":
            item.error = "RuntimeError: CUDA out of memory"
            return item
        replay = {"same": lambda: truth, "residual": lambda: residual(truth, 0.8, n),
                  "drift": lambda: residual(truth, 3.0, n), "shift": lambda: np.roll(truth, 3, axis=1),
                  "unrelated": lambda: scene(size, seed=1000 + n)}[kind]()
        item.replay_png = out / "replays" / f"{Path(name).stem}.png"
        Image.fromarray(replay).save(item.replay_png, compress_level=1)
        item.score = score_replay(item.preview_path, replay)
        return item

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        items = list(pool.map(make, range(previews)))
    report = CheckReport(tool_version="bench", job_dir=str(root / JOB), job_name=JOB, base_model="synthetic",
                         device="cpu", dtype="bfloat16", pipeline_profile="synthetic",
                         noise_algorithm="torch2.13-avx2", noise_algorithm_reason="synthetic",
                         thresholds=Thresholds(), items=items)
    return report, out, time.perf_counter() - start


def render_seconds(html: Path, runs: int) -> dict:
    """Headless Chromium: navigation to the first frame after the load event, per fresh page (seconds)."""
    from playwright.sync_api import sync_playwright

    walls, loads, paints = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for _ in range(runs):
                context = browser.new_context(viewport={"width": 1300, "height": 900})
                page = context.new_page()
                errors = []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                start = time.perf_counter()
                page.goto(html.as_uri(), wait_until="load")
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                walls.append(time.perf_counter() - start)
                timing = page.evaluate("""() => {
                    const nav = performance.getEntriesByType('navigation')[0];
                    const fcp = performance.getEntriesByName('first-contentful-paint')[0];
                    return [nav.loadEventEnd / 1000, fcp ? fcp.startTime / 1000 : null];
                }""")
                loads.append(timing[0])
                paints.append(timing[1])
                if errors:
                    raise RuntimeError(f"page errors: {errors}")
                context.close()
        finally:
            browser.close()
    return {"render_s": statistics.median(walls), "render_runs_s": [round(w, 3) for w in walls],
            "load_event_s": statistics.median(loads), "first_contentful_paint_s": statistics.median(
                [p for p in paints if p is not None]) if any(p is not None for p in paints) else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one, deleted)")
    parser.add_argument("--previews", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3, help="fresh Chromium pages; the median is reported")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="report_scale-") as tmp:
        root = args.out or Path(tmp)
        report, out, build_s = build_report(root, args.previews, args.size)
        start = time.perf_counter()
        paths = write_reports(report, out)
        write_s = time.perf_counter() - start
        page = paths["html"].stat().st_size
        figures = {
            "previews": args.previews, "size": args.size, "counts": {k: v for k, v in report.counts.items() if v},
            "page_bytes": page, "page_mb": round(page / 2**20, 2),
            "replays_mb": round(sum(f.stat().st_size for f in (out / "replays").iterdir()) / 2**20, 1),
            "build_and_score_s": round(build_s, 1), "write_reports_s": round(write_s, 2),
            **render_seconds(paths["html"], args.runs),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "load_average_1min": round(os.getloadavg()[0], 1),  # other work on the machine slows every figure
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = page < MAX_PAGE_BYTES and figures["render_s"] < MAX_RENDER_SECONDS
    print(f"page {figures['page_mb']} MB (limit 30), render {figures['render_s']:.2f} s (limit 3): "
          + ("OK" if ok else "OVER THE LIMIT"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
