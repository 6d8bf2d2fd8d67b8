"""Replay speed on one GPU, in ONE run (issue 6): our exact and --fast replays, ai-toolkit's own sampling code and
the compute floor, on the full-size OmniGen2 architecture with random weights; then a whole job end to end.

    python benchmarks/perf.py --aitk .aitk --out /tmp/perf
    python benchmarks/perf.py --out /tmp/perf --smoke          # a 2-layer model on any device: tests the script

Per image (``--size``, ``--steps``, CFG ``--cfg``; 120 prompt and 40 negative tokens, as ``full_size.py``):

- ``legacy``: the loop as it was before issue 6 (two full forwards per step, the text length read from the mask
  and the rotary tables gathered on the CPU at every forward: a host sync each);
- ``exact eager``: today's exact loop without CUDA graphs (no syncs, text features once per replay);
- ``exact``: the default, every step a CUDA graph;
- ``fast`` (batched CFG, maskless attention, float32 rotary) eager, and with torch.compile + CUDA graphs;
- ai-toolkit's ``OmniGen2Pipeline`` on the same weights, with our kernels (triton and flash-attn hidden, as
  ``gpu_parity.py`` does: its pixels must equal ours) and with its own default (Triton RMSNorm);
- the floor: FLOPs of one image (``FlopCounterMode`` over two transformer forwards per step and the VAE decode)
  over the bf16 GEMM rate measured on the card (8192^3 products).

Whole job (``--job-*``): C checkpoints x P prompts at ``--job-size``, each checkpoint a random rank-16 LoRA over
every Linear, scored against a JPEG "preview" per prompt: (a) one base load from disk, LoRA swaps by exact
restore + merge, CUDA graphs, decode/PNG/scores on a worker thread (what ``parity check`` does); (b) a fresh load
from disk per preview, eager, everything serial (the reference server's way), on ``--job-fresh`` previews spread
over the job and extrapolated to C x P when fewer. Both paths' pixels are compared where both ran.

Writes ``<out>/perf.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from full_size import (  # noqa: E402
    NEGATIVE,
    PROMPT,
    _NoCuda,
    build_transformer,
    build_vae,
    default_dtype,
    image_request,
    make_pipe,
    model_config,
    random_encodings,
)

from pipelines.common import noise  # noqa: E402
from pipelines.omnigen2 import kernels, quirks  # noqa: E402
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest  # noqa: E402

GIB = 1024**3


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_mod():
    return torch.cuda if torch.cuda.is_available() else _NoCuda


def pixel_diff(a: np.ndarray, b: np.ndarray) -> dict:
    from parity.scores import compute_metrics

    metrics, _, _ = compute_metrics(a, b)
    return {
        "identical": bool(np.array_equal(a, b)),
        "max_abs_diff": int(metrics.max_abs_diff),
        "mean_abs_diff": round(float(metrics.mean_abs_diff), 4),
        "ssim": round(float(metrics.ssim), 5),
    }


# ------------------------------------------------------------------------------------------------ the floor


def gemm_rate(device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of an n^3 matrix product on random data (median of ``repeats``, CUDA events)."""
    if device.type != "cuda":
        n = 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1000)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


@torch.no_grad()
def image_flops(model, vae, encodings, size: int, steps: int, cfg: bool, device, dtype) -> dict:
    """FLOPs of one image: 2 full forwards per step (as ai-toolkit runs them) and the VAE decode."""
    from torch.utils.flop_counter import FlopCounterMode

    latent = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
    t = torch.tensor([0.5], device=device, dtype=dtype)
    cond, uncond = encodings[PROMPT], encodings[NEGATIVE]
    with FlopCounterMode(display=False) as fc:
        model(latent, t, cond.embeds, cond.mask)
    f_cond = fc.get_total_flops()
    f_uncond = 0
    if cfg:
        with FlopCounterMode(display=False) as fc:
            model(latent, t, uncond.embeds, uncond.mask)
        f_uncond = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vae.decode(latent, return_dict=False)
    f_vae = fc.get_total_flops()
    return {
        "forward_cond": f_cond,
        "forward_uncond": f_uncond,
        "vae_decode": f_vae,
        "image": steps * (f_cond + f_uncond) + f_vae,
    }


# ------------------------------------------------------------------------------------------------ our loops


@torch.no_grad()
def legacy_image(pipe: OmniGen2Pipeline, r: ReplayRequest) -> np.ndarray:
    """The replay loop before issue 6: two full forwards per step, each reading the text length from the mask
    (a host sync) and gathering the rotary tables on the CPU and copying them to the device."""
    c = pipe.c
    model = c.transformer
    gen_w, gen_h = quirks.generation_size(r.width, r.height)
    generator = quirks.seed_everything(r.seed)
    cond = pipe.encode_text(r.prompt, r.chat_template_passes)
    uncond = pipe.encode_text(r.negative_prompt, r.negative_chat_template_passes)
    shape = quirks.latent_shape(pipe.vae_scale, model.config.in_channels, gen_w, gen_h)
    latents = noise.draw_noise(generator, shape, r.noise_algorithm, dtype=c.dtype).to(c.device, c.dtype)
    scheduler = c.scheduler()
    timesteps = scheduler.set_timesteps(r.num_inference_steps, shape[-2] * shape[-1], device=c.device)
    for t in timesteps:
        timestep = t.expand(1).to(c.dtype)
        model._device_cache.clear()
        v = model(latents, timestep, cond.embeds, cond.mask, [])
        if r.guidance_scale > 1:
            model._device_cache.clear()
            v_uncond = model(latents, timestep, uncond.embeds, uncond.mask, [])
            v = quirks.cfg_combine(v, v_uncond, r.guidance_scale)
        latents = scheduler.step(v, latents).to(c.dtype)
    return quirks.decode_to_pixels(c.vae, latents, r.width, r.height)


def time_images(fn, warmup: int, repeats: int) -> dict:
    cuda = cuda_mod()
    first = None
    for _ in range(warmup):
        first = fn()
    sync()
    cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return {
        "seconds_per_image": round(float(np.mean(times)), 3),
        "seconds_each": [round(x, 3) for x in times],
        "peak_allocated_gib": round(cuda.max_memory_allocated() / GIB, 3),
        "pixels": out,
        "first_pixels": first,
    }


# ------------------------------------------------------------------------------------------------ ai-toolkit


def aitk_pipeline(aitk, model, config, vae, device, dtype):
    from gpu_parity import aitk_pipeline_on

    with default_dtype(dtype), torch.device("meta"):
        theirs = aitk.transformer_cls(**{k: v for k, v in config.to_dict().items() if k != "_class_name"})
    theirs.load_state_dict(model.state_dict(), assign=True, strict=True)  # shares our GPU tensors
    return aitk_pipeline_on(aitk, theirs.eval().requires_grad_(False), vae, device)


def aitk_image(pipe, cond, uncond, r: ReplayRequest) -> np.ndarray:
    from gpu_parity import aitk_call

    return aitk_call(pipe, cond, uncond, r)


# ------------------------------------------------------------------------------------------------ --fast study


def attention_bench(
    device, dtype, seq: int, heads: int, kv_heads: int, dim: int, repeats: int = 20
) -> list[dict]:
    """One attention call at the full-size shape through each SDPA backend (maskless, and the exact mode's
    boolean mask through the default order), with the KV heads repeated first or passed as GQA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, seq, dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, kv_heads, seq, dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, kv_heads, seq, dim, device=device, dtype=dtype, generator=g)
    rep = heads // kv_heads
    k_rep, v_rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = torch.ones(1, 1, 1, seq, dtype=torch.bool, device=device)
    flops = 4 * seq * seq * dim * heads
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k_rep.float(), v_rep.float()).to(
        dtype
    )
    rows = []
    cases = [("default (exact: bool mask, repeated KV)", None, False, True)]
    for name in ("flash", "cudnn", "efficient"):
        cases += [(name, name, False, False), (f"{name} gqa", name, True, False)]
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    for label, backend, gqa, masked in cases:
        kk, vv = (k, v) if gqa else (k_rep, v_rep)
        extra = {"enable_gqa": True} if gqa else {}
        if masked:
            extra["attn_mask"] = mask

        def call(kk=kk, vv=vv, extra=extra):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, **extra)

        try:
            import contextlib

            ctx = sdpa_kernel([backends[backend]]) if backend else contextlib.nullcontext()
            with ctx:
                out = call()
                for _ in range(3):
                    call()
                sync()
                times = []
                for _ in range(repeats):
                    s_ev, e_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s_ev.record()
                    call()
                    e_ev.record()
                    torch.cuda.synchronize()
                    times.append(s_ev.elapsed_time(e_ev) / 1000)
            t = float(np.median(times))
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            rows.append(
                {
                    "attention": label,
                    "ms": round(t * 1000, 3),
                    "tflops": round(flops / t / 1e12, 1),
                    "rel_err_vs_fp32": round(err, 5),
                }
            )
        except Exception as exc:
            rows.append({"attention": label, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
    return rows


def profile_pipe(pipe, request, top: int = 14) -> list[dict]:
    """CUDA kernel time of one short replay (``request``), grouped by kernel, largest first."""
    from torch.profiler import ProfilerActivity, profile

    pipe(request)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe(request)
        sync()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: -e.device_time_total)
    return [
        {
            "kernel": e.key[:90],
            "share": round(e.device_time_total / total, 4),
            "calls": e.count,
            "ms": round(e.device_time_total / 1000, 2),
        }
        for e in events[:top]
    ] + [{"kernel": "(total)", "share": 1.0, "ms": round(total / 1000, 1)}]


# ------------------------------------------------------------------------------------------------ whole job


def random_lora(patcher, seed: int, rank: int = 16):
    """A LoRA over every Linear of the transformer (float32 on the CPU, as read from a file)."""
    from pipelines.common.lora import LoraModule

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in patcher.targets.items():
        out_f, in_f = module.weight.shape
        down = torch.randn(rank, in_f, generator=g) * in_f**-0.5
        up = torch.randn(out_f, rank, generator=g) * (0.02 / rank**0.5)
        modules[name] = LoraModule(name, down, up, 1.0)
    return SimpleNamespace(modules=modules)


def save_model(model, vae, root: Path) -> None:
    from safetensors.torch import save_file

    (root / "transformer").mkdir(parents=True, exist_ok=True)
    (root / "transformer" / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(root / "transformer" / "diffusion_pytorch_model.safetensors"),
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)


def load_model(root: Path, device, dtype):
    from pipelines.omnigen2.loading import load_transformer, load_vae

    return load_transformer(root, dtype, device), load_vae(root, dtype, device)


def whole_job(args, config, model, vae, device, dtype, out_dir: Path) -> dict:
    """C checkpoints x P prompts: one base load + LoRA swaps + overlap vs a fresh load per preview."""
    from PIL import Image

    from parity.check import save_png_atomic
    from parity.scores import score_replay
    from pipelines.common.lora import LoraPatcher

    cuda = cuda_mod()
    C, P, size = args.job_checkpoints, args.job_prompts, args.job_size
    root = Path(tempfile.mkdtemp(prefix="perf_model_"))
    t = time.perf_counter()
    save_model(model, vae, root)
    save_seconds = time.perf_counter() - t
    patcher0 = LoraPatcher(model)
    loras = [random_lora(patcher0, 100 + c) for c in range(C)]
    del patcher0
    prompts = [f"prompt {p}" for p in range(P)]
    lengths = {text: 60 + 9 * p for p, text in enumerate(prompts)} | {NEGATIVE: args.negative_tokens}
    requests = [
        ReplayRequest(
            prompts[p],
            NEGATIVE,
            seed=1000 + p,
            width=size,
            height=size,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
        )
        for p in range(P)
    ]
    previews = []
    rng = np.random.default_rng(0)
    for p in range(P):  # a JPEG q75 "preview" per prompt: scoring costs the same whatever it shows
        path = out_dir / "job_previews" / f"preview_{p}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        previews.append(path)
    replays = Path(tempfile.mkdtemp(prefix="perf_replays_"))
    # free the benchmark's own model: each path loads its own from disk
    res: dict = {
        "checkpoints": C,
        "prompts": P,
        "size": size,
        "steps": args.steps,
        "cfg": args.cfg,
        "save_model_seconds": round(save_seconds, 2),
    }

    # (a) what parity check does
    sync()
    cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr, va = load_model(root, device, dtype)
    encodings = random_encodings(tr.config, device, dtype, lengths)
    sync()
    load_seconds = time.perf_counter() - t0
    pipe = make_pipe(tr, va, encodings, device, dtype)
    patcher = LoraPatcher(tr)
    ours: dict[tuple[int, int], np.ndarray] = {}
    ssims = []

    def finish(key, replay_out, png, preview):
        pixels = replay_out.pending.wait()
        save_png_atomic(png, pixels)
        ssims.append(score_replay(preview, pixels).metrics.ssim)
        ours[key] = pixels

    futures = []
    swap_seconds = 0.0
    with ThreadPoolExecutor(max_workers=1) as worker:
        for c in range(C):
            ts = time.perf_counter()
            patcher.restore()
            patcher.merge(loras[c], 1.0)
            swap_seconds += time.perf_counter() - ts
            for p in range(P):
                out = pipe(requests[p], deferred=True)
                futures.append(worker.submit(finish, (c, p), out, replays / f"c{c}_p{p}.png", previews[p]))
        for f in futures:
            f.result()
    sync()
    ours_seconds = time.perf_counter() - t0
    res["one_load"] = {
        "seconds": round(ours_seconds, 2),
        "seconds_per_preview": round(ours_seconds / (C * P), 3),
        "base_load_seconds": round(load_seconds, 2),
        "lora_swap_seconds_total": round(swap_seconds, 2),
        "graph_captures": pipe.graphs.captures if pipe.graphs else 0,
        "graph_replays": pipe.graphs.replays if pipe.graphs else 0,
        "graphs_disabled": pipe.graphs.disabled if pipe.graphs else "no CUDA",
        "peak_allocated_gib": round(cuda.max_memory_allocated() / GIB, 3),
        "mean_ssim_vs_random_previews": round(float(np.mean(ssims)), 4),
    }
    del pipe, patcher, tr, va, encodings
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # (b) a fresh load per preview, everything serial
    total = C * P
    k = min(args.job_fresh, total)
    picks = sorted({(i * total // k) for i in range(k)})
    sync()
    cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    identical = []
    per = []
    for flat in picks:
        c, p = divmod(flat, P)
        ti = time.perf_counter()
        tr, va = load_model(root, device, dtype)
        encodings = random_encodings(tr.config, device, dtype, lengths)
        LoraPatcher(tr).merge(loras[c], 1.0)
        pipe = make_pipe(tr, va, encodings, device, dtype, graphs=False)
        pixels = pipe(requests[p]).pixels
        save_png_atomic(replays / f"fresh_c{c}_p{p}.png", pixels)
        score_replay(previews[p], pixels)
        identical.append(bool(np.array_equal(pixels, ours[(c, p)])))
        del pipe, tr, va, encodings
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sync()
        per.append(time.perf_counter() - ti)
    fresh_seconds = time.perf_counter() - t0
    res["fresh_load"] = {
        "previews_run": len(picks),
        "seconds_run": round(fresh_seconds, 2),
        "seconds_per_preview": round(fresh_seconds / len(picks), 3),
        "seconds_each": [round(x, 2) for x in per],
        "seconds_for_job": round(fresh_seconds / len(picks) * total, 2),
        "extrapolated": len(picks) < total,
        "peak_allocated_gib": round(cuda.max_memory_allocated() / GIB, 3),
        "pixels_identical_to_one_load": f"{sum(identical)}/{len(identical)}",
    }
    res["speedup"] = round(res["fresh_load"]["seconds_for_job"] / ours_seconds, 2)
    return res


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--aitk", default=None, help="folder holding aitkog2/src or an ai-toolkit checkout")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--text-tokens", type=int, default=120)
    ap.add_argument("--negative-tokens", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of parts to skip: exact_serial,aitk,fast_eager,compile,fast (the compiled default),job,legacy,"
        "eager,aitk_default,exact_triton",
    )
    ap.add_argument("--job-size", type=int, default=256)
    ap.add_argument("--job-checkpoints", type=int, default=10)
    ap.add_argument("--job-prompts", type=int, default=10)
    ap.add_argument(
        "--job-fresh", type=int, default=10, help="fresh-load previews run (extrapolated to C x P)"
    )
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the parts that would start after this")
    ap.add_argument(
        "--fast-attention",
        default="default",
        help="comma list of --fast SDPA settings to time: "
        "default (the library's: cuDNN, unrepeated KV heads), or BACKEND or BACKEND+gqa (BACKEND: auto, "
        "cudnn, flash, efficient)",
    )
    ap.add_argument(
        "--study", action="store_true", help="also an attention micro-benchmark and kernel profiles"
    )
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode for --fast (e.g. max-autotune-no-cudagraphs; default: its default)")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model of the same family on any device")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}

    cuda = cuda_mod()
    if cuda is _NoCuda and not args.smoke:
        raise SystemExit("perf.py needs a CUDA GPU (or --smoke)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda" if cuda is torch.cuda else "cpu"), torch.bfloat16
    t_start = time.perf_counter()
    env = {
        "device": cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    for name in ("triton", "diffusers"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:
            env[name] = None
    res: dict = {"env": env, "args": vars(args)}

    config = model_config(args.smoke)
    model = build_transformer(config, device, dtype, seed=0)
    vae = build_vae(device, dtype, seed=0)
    encodings = random_encodings(
        config, device, dtype, {PROMPT: args.text_tokens, NEGATIVE: args.negative_tokens}
    )
    request = image_request(args)
    res["weights_gib"] = round(cuda.memory_allocated() / GIB, 3)

    # ---- the floor
    rate = gemm_rate(device)
    flops = image_flops(model, vae, encodings, args.size, args.steps, args.cfg > 1, device, dtype)
    res["floor"] = {
        "gemm_tflops": round(rate / 1e12, 1),
        "flops": flops,
        "seconds_per_image": round(flops["image"] / rate, 3),
    }

    modes: dict[str, dict] = {}
    res["modes"] = modes
    res["pixel_checks"] = checks = {}
    base: dict = {}
    kept: dict[str, np.ndarray] = {}  # each mode's last image

    def dump() -> None:
        res["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
        (out_dir / "perf.json").write_text(json.dumps(res, indent=2, default=str))

    def over_budget(part: str) -> bool:
        if part in skip:
            return True
        if time.perf_counter() - t_start > args.budget_s:
            res.setdefault("skipped_for_time", []).append(part)
            return True
        return False

    def run_mode(name, fn):
        t = time.perf_counter()
        mode = modes[name] = time_images(fn, args.warmup, args.repeats)
        mode["wall_seconds_incl_warmup"] = round(time.perf_counter() - t, 1)
        pixels, first = mode.pop("pixels"), mode.pop("first_pixels")
        kept[name] = pixels
        if name == "exact":
            base["pixels"] = pixels
            checks["exact_repeat_deterministic"] = bool(first is None or np.array_equal(first, pixels))
        else:
            checks[f"{name}_vs_exact"] = pixel_diff(pixels, base["pixels"])
        print(
            f"[{time.perf_counter() - t_start:6.1f}s] {name}: {mode['seconds_per_image']} s/image, "
            f"{checks.get(f'{name}_vs_exact', '')}",
            flush=True,
        )
        dump()

    # ---- ours, exact (the default: CUDA graphs)
    exact = make_pipe(model, vae, encodings, device, dtype)
    run_mode("exact", lambda: exact(request).pixels)
    if exact.graphs is not None:
        modes["exact"]["graphs"] = {
            "captures": exact.graphs.captures,
            "replays": exact.graphs.replays,
            "disabled": exact.graphs.disabled,
        }

    # ---- ours, exact, both CFG passes on one stream (before the second-stream change): must be identical
    if not over_budget("exact_serial"):
        model.concurrent_texts = False
        serial = make_pipe(model, vae, encodings, device, dtype)
        run_mode("exact_serial", lambda: serial(request).pixels)
        model.concurrent_texts = True
        del serial

    # ---- ai-toolkit's own pipeline, same kernels (its pixels must equal ours)
    sys_path = None
    if args.aitk:
        from gpu_parity import aitk_sys_path, import_aitk

        sys_path = aitk_sys_path(args.aitk)

    def aitk_mode(name, flag):
        aitk = import_aitk(sys_path, flag)
        pipe = aitk_pipeline(aitk, model, config, vae, device, dtype)
        run_mode(name, lambda: aitk_image(pipe, encodings[PROMPT], encodings[NEGATIVE], request))
        modes[name]["triton_rmsnorm"] = aitk.triton_rmsnorm
        return aitk

    if sys_path and not over_budget("aitk"):
        aitk_mode("aitk_same_kernels", False)

    # ---- --fast: eager, then torch.compile + CUDA graphs
    if not over_budget("fast_eager"):
        fast_eager = make_pipe(model, vae, encodings, device, dtype, fast=True, graphs=False)
        run_mode("fast_eager", lambda: fast_eager(request).pixels)
    if not over_budget("compile"):
        model.compile_fast = True
        model.compile_mode = args.compile_mode
        model._fast_fns = None
        library_default = model.kernels
        for setting in [x for x in args.fast_attention.split(",") if x]:
            if setting == "default":
                model.use_kernels(library_default)
            else:
                backend, _, gqa = setting.partition("+")
                model.use_kernels(library_default.with_fast_attention(backend, gqa == "gqa"))
            name = "fast" if setting == "default" else f"fast[{setting}]"
            if over_budget(name):
                continue
            fast = make_pipe(model, vae, encodings, device, dtype, fast=True)
            t = time.perf_counter()
            try:
                fast(request)  # compile (the first time) and graph capture outside the timing
                first_seconds = round(time.perf_counter() - t, 1)
                run_mode(name, lambda fast=fast: fast(request).pixels)
                modes[name]["first_image_seconds_incl_compile_and_capture"] = first_seconds
                if fast.graphs is not None:
                    modes[name]["graphs"] = {
                        "captures": fast.graphs.captures,
                        "disabled": fast.graphs.disabled,
                    }
            except Exception as exc:
                modes[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"{name} failed: {modes[name]['error']}", flush=True)
            del fast
            dump()
        model.use_kernels(library_default)
        if args.study and not over_budget("study"):
            short = image_request(args, steps=2)
            attn = model.layers[0].attn
            res["attention_bench"] = attention_bench(
                device,
                dtype,
                args.size**2 // 256 + args.text_tokens,
                attn.heads,
                attn.kv_heads,
                attn.head_dim,
            )
            for row in res["attention_bench"]:
                print("attention", row, flush=True)
            res["profile_fast_2_steps"] = profile_pipe(
                make_pipe(model, vae, encodings, device, dtype, fast=True, graphs=False), short
            )
            res["profile_exact_2_steps"] = profile_pipe(
                make_pipe(model, vae, encodings, device, dtype, graphs=False), short
            )
            for key in ("profile_exact_2_steps", "profile_fast_2_steps"):
                print(key)
                for row in res[key]:
                    print(
                        f"  {row['share']:7.2%} {row['ms']:9.2f} ms  {row.get('calls', '')!s:>6}  {row['kernel']}"
                    )
            dump()
        model.compile_fast = False
        model._fast_fns = None

    # ---- whole job
    if not over_budget("job"):
        try:
            res["job"] = whole_job(args, config, model, vae, device, dtype, out_dir)
            print(f"[{time.perf_counter() - t_start:6.1f}s] job: {res['job']}", flush=True)
        except Exception as exc:
            res["job"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"job failed: {res['job']['error']}", flush=True)
        dump()

    # ---- the loop before issue 6, today's exact loop without graphs, ai-toolkit's default kernels
    if not over_budget("legacy"):
        run_mode("legacy", lambda: legacy_image(exact, request))
    if not over_budget("eager"):
        eager = make_pipe(model, vae, encodings, device, dtype, graphs=False)
        run_mode("exact_eager", lambda: eager(request).pixels)
    if sys_path and not over_budget("aitk_default"):
        from gpu_parity import autotuned_warps

        tuned = autotuned_warps(aitk_mode("aitk_default", None))
        modes["aitk_default"]["autotuned_num_warps"] = {str(k): v for k, v in sorted(tuned.items())}
        # ai-toolkit's default GPU path, reproduced: our exact replay with its Triton RMSNorm at the tuner's warps
        if tuned and not over_budget("exact_triton"):
            before = model.kernels
            model.use_kernels(kernels.KernelSet.parse(kernels.format_profile("triton", tuned), before.fast_attention))
            exact_triton = make_pipe(model, vae, encodings, device, dtype)
            run_mode("exact_triton", lambda: exact_triton(request).pixels)
            modes["exact_triton"]["kernels"] = model.kernels.spec
            checks["exact_triton_vs_aitk_default"] = pixel_diff(kept["exact_triton"], kept["aitk_default"])
            model.use_kernels(before)
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "perf.json").write_text(json.dumps(res, indent=2, default=str))
    print_table(res)
    return 0


def print_table(res: dict) -> None:
    modes, floor = res["modes"], res["floor"]["seconds_per_image"]
    aitk = modes.get("aitk_same_kernels", {}).get("seconds_per_image")
    print(
        f"\n{res['env']['device']} | {res['env']['date_utc']} | torch {res['env']['torch']} | "
        f"{res['args']['size']}px, {res['args']['steps']} steps, CFG {res['args']['cfg']}"
    )
    print("| what | s/image | vs ai-toolkit (same kernels) | vs floor | peak GiB | pixels vs exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, mode in modes.items():
        if "seconds_per_image" not in mode:
            print(f"| {name} | {mode.get('error')} | | | | |")
            continue
        s = mode["seconds_per_image"]
        check = res["pixel_checks"].get(f"{name}_vs_exact")
        shown = (
            "-"
            if check is None
            else (
                "identical"
                if check["identical"]
                else f"max {check['max_abs_diff']} mean {check['mean_abs_diff']} SSIM {check['ssim']}"
            )
        )
        ratio = f"{aitk / s:.3f}x" if aitk else "-"
        print(f"| {name} | {s:.3f} | {ratio} | {s / floor:.2f}x | {mode['peak_allocated_gib']} | {shown} |")
    print(
        f"| floor | {floor:.3f} | | 1.00x | | {res['floor']['gemm_tflops']} TFLOP/s GEMM, "
        f"{res['floor']['flops']['image'] / 1e12:.1f} TFLOP/image |"
    )
    default, ours = modes.get("aitk_default", {}), modes.get("exact_triton", {})
    if "seconds_per_image" in default and "seconds_per_image" in ours:
        check = res["pixel_checks"]["exact_triton_vs_aitk_default"]
        print(
            f"\nai-toolkit's default GPU path (Triton RMSNorm, warps {default.get('autotuned_num_warps')}): "
            f"{default['seconds_per_image']:.3f} s; ours exact with {ours['kernels']}: {ours['seconds_per_image']:.3f} s "
            f"= {default['seconds_per_image'] / ours['seconds_per_image']:.3f}x; pixels "
            f"{'identical' if check['identical'] else check}"
        )
    job = res.get("job")
    if job:
        print(
            f"\nwhole job {job['checkpoints']}x{job['prompts']} at {job['size']}px: one load "
            f"{job['one_load']['seconds']} s ({job['one_load']['seconds_per_preview']} s/preview), fresh load "
            f"{job['fresh_load']['seconds_for_job']} s ({job['fresh_load']['seconds_per_preview']} s/preview, "
            f"{job['fresh_load']['previews_run']} run{', extrapolated' if job['fresh_load']['extrapolated'] else ''}"
            f"): {job['speedup']}x; pixels identical {job['fresh_load']['pixels_identical_to_one_load']}"
        )


if __name__ == "__main__":
    sys.exit(main())
