"""GPU parity of our OmniGen2 with ai-toolkit's own OmniGen2 code, tiny model in bf16 on CUDA (issue 3).

    python benchmarks/gpu_parity.py --aitk .aitk --out /tmp/gpu_parity

Three questions, each answered per case/preview in a table and in ``<out>/gpu_parity.json``:

(a) transformer: our ``OmniGen2Transformer`` and ai-toolkit's ``OmniGen2Transformer2DModel`` loaded from the same
    checkpoint, fed identical inputs, with the same kernels (PyTorch RMSNorm, SDPA, float32 SiLU): equal bit for bit?
(b) replays: our ``OmniGen2Pipeline`` and ai-toolkit's ``OmniGen2Pipeline`` driven the way ai-toolkit samples
    (prompt embeddings passed in, ``align_res=False``, ``image_guidance_scale=1.0``, ``generator=torch.manual_seed``,
    noise drawn on the CPU) for the oracle's eight step-0 previews: pixel identical?
(c) ai-toolkit's DEFAULT GPU path (Triton RMSNorm whenever triton imports, flash-attn when installed) against ours:
    max/mean pixel difference and SSIM; and whether our ``triton`` kernel profile (``pipelines/omnigen2/
    triton_norm.py``) at the warp counts ai-toolkit's autotuner picked reproduces that path bit for bit.
(d) ``parity check --kernels auto`` on copies of the oracle jobs whose step-0 previews are ai-toolkit's default-path
    images from (c), saved as PNG: which noise and kernel profile it chooses, and whether every preview is EXACT.

Also: our GPU replays against the CPU ground truth (``fixtures/oracle/ground_truth/<job>/png``, drawn with the
oracle's torch 2.13 noise), and whether ai-toolkit's autotuned Triton RMSNorm is stable when re-tuned.

``--aitk`` is a folder holding the package ``aitkog2/`` (``aitkog2/__init__.py`` + ai-toolkit's
``extensions_built_in/diffusion_models/omnigen2/src`` copied to ``aitkog2/src``) or an ai-toolkit checkout
(default: ``$AI_TOOLKIT_PATH``). ai-toolkit's code is never part of this repository.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.omnigen2 import kernels  # noqa: E402
from pipelines.omnigen2.loading import load_components  # noqa: E402
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest  # noqa: E402

AITK_SRC = Path("extensions_built_in/diffusion_models/omnigen2/src")
DEFAULT_MODEL = REPO / "fixtures/oracle/tiny_omnigen2"
GROUND_TRUTH = REPO / "fixtures/oracle/ground_truth"
ORACLE_NOISE = "torch2.13-avx2"  # the draw that made the oracle's CPU previews (torch 2.13 on an AVX2 CPU)


# --------------------------------------------------------------------------------------------- ai-toolkit import


def aitk_sys_path(path: str | Path | None) -> Path:
    """The folder to put on ``sys.path`` so that ``import aitkog2.src...`` gives ai-toolkit's OmniGen2 code.

    ``path`` holds ``aitkog2/src`` already, or is an ai-toolkit checkout: then a temporary ``aitkog2`` package
    pointing at the checkout's ``src`` is made (its modules import relatively up to the package holding ``src``).
    """
    if path is None:
        path = os.environ.get("AI_TOOLKIT_PATH")
    if not path:
        raise SystemExit(
            "pass --aitk PATH (a folder holding aitkog2/src, or an ai-toolkit checkout) or set AI_TOOLKIT_PATH"
        )
    root = Path(path).expanduser().resolve()
    if (root / "aitkog2" / "src").is_dir():
        return root
    if (root / AITK_SRC).is_dir():
        tmp = Path(tempfile.mkdtemp(prefix="aitkog2_"))
        (tmp / "aitkog2").mkdir()
        (tmp / "aitkog2" / "__init__.py").write_text("")
        (tmp / "aitkog2" / "src").symlink_to(root / AITK_SRC, target_is_directory=True)
        return tmp
    raise SystemExit(f"{root}: neither aitkog2/src nor an ai-toolkit checkout ({AITK_SRC})")


@dataclass
class Aitk:
    """ai-toolkit's OmniGen2 classes from one import, with the kernels that import chose."""

    transformer_cls: type
    pipeline_cls: type
    scheduler_cls: type
    rope_cls: type
    triton_rmsnorm: bool
    flash_attn: bool
    rmsnorm_class: str
    layer_norm_module: object | None


def import_aitk(sys_path: Path, triton: bool | None) -> Aitk:
    """Import ai-toolkit's OmniGen2 afresh. ``triton=False`` hides triton and flash-attn from it (the same kernels as
    our 'torch' profile); ``None`` keeps its own choice (its default GPU path)."""
    for name in [n for n in sys.modules if n == "aitkog2" or n.startswith("aitkog2.")]:
        del sys.modules[name]
    if str(sys_path) not in sys.path:
        sys.path.insert(0, str(sys_path))
    flags = importlib.import_module("aitkog2.src.utils.import_utils")
    if triton is False:
        flags._triton_available = False
        flags._flash_attn_available = False
    elif triton is True and not flags._triton_available:
        raise RuntimeError("triton is not importable here")
    transformer_mod = importlib.import_module("aitkog2.src.models.transformers.transformer_omnigen2")
    block_mod = importlib.import_module("aitkog2.src.models.transformers.block_lumina2")
    pipeline_mod = importlib.import_module("aitkog2.src.pipelines.omnigen2.pipeline_omnigen2")
    scheduler_mod = importlib.import_module("aitkog2.src.schedulers.scheduling_flow_match_euler_discrete")
    rope_mod = importlib.import_module("aitkog2.src.models.transformers.repo")
    rms = block_mod.RMSNorm
    layer_norm = sys.modules.get("aitkog2.src.ops.triton.layer_norm")
    return Aitk(
        transformer_cls=transformer_mod.OmniGen2Transformer2DModel,
        pipeline_cls=pipeline_mod.OmniGen2Pipeline,
        scheduler_cls=scheduler_mod.FlowMatchEulerDiscreteScheduler,
        rope_cls=rope_mod.OmniGen2RotaryPosEmbed,
        triton_rmsnorm=bool(flags.is_triton_available()),
        flash_attn=bool(flags.is_flash_attn_available()),
        rmsnorm_class=f"{rms.__module__}.{rms.__qualname__}",
        layer_norm_module=layer_norm,
    )


def autotuned_warps(aitk: Aitk) -> dict[int, int]:
    """``N -> num_warps`` that ai-toolkit's autotuned Triton RMSNorm forward chose so far in this process."""
    if aitk.layer_norm_module is None:
        return {}
    tuner = aitk.layer_norm_module._layer_norm_fwd_1pass_kernel
    return {int(key[0]): int(cfg.num_warps) for key, cfg in getattr(tuner, "cache", {}).items()}


def clear_autotune(aitk: Aitk) -> None:
    if aitk.layer_norm_module is not None:
        aitk.layer_norm_module._layer_norm_fwd_1pass_kernel.cache.clear()


def aitk_freqs(aitk: Aitk, config) -> list[torch.Tensor]:
    return aitk.rope_cls.get_freqs_cis(config.axes_dim_rope, config.axes_lens, theta=10000)


def aitk_forward(model, freqs, latent, timestep, text, mask, ref=None):
    out = model(
        latent, timestep, text, freqs, mask, ref_image_hidden_states=[[ref]] if ref is not None else None
    )
    return out.sample if hasattr(out, "sample") else out


# ------------------------------------------------------------------------------------------------------ helpers


def step0_rows() -> list[dict]:
    rows = []
    for job in sorted(p.name for p in GROUND_TRUTH.iterdir() if p.is_dir()):
        for line in (GROUND_TRUTH / job / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["step"] == 0:
                row["job"] = job
                rows.append(row)
    return rows


def request_of(row: dict, noise_algorithm: str = "native") -> ReplayRequest:
    return ReplayRequest(
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        seed=int(row["seed"]),
        width=int(row["width"]),
        height=int(row["height"]),
        num_inference_steps=int(row["num_inference_steps"]),
        guidance_scale=float(row["guidance_scale"]),
        noise_algorithm=noise_algorithm,
    )


def pixel_metrics(a: np.ndarray, b: np.ndarray) -> dict:
    from parity.scores import compute_metrics

    metrics, _, _ = compute_metrics(a, b)
    return {
        "identical": bool(np.array_equal(a, b)),
        "max_abs_diff": metrics.max_abs_diff,
        "mean_abs_diff": round(metrics.mean_abs_diff, 4),
        "ssim": round(metrics.ssim, 5),
        "psnr_db": None if metrics.psnr_db == float("inf") else round(metrics.psnr_db, 2),
    }


def tensor_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.float() - b.float()).abs()
    return {
        "equal": bool(torch.equal(a, b)),
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "share_elements_differing": float((a != b).float().mean()),
    }


def transformer_cases(config, device) -> list[dict]:
    """Identical random inputs for (a): plain, padded text mask, a reference image, a 512-px latent."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    def mask(n, valid):
        m = torch.zeros(1, n)
        m[:, :valid] = 1
        return m.to(device, torch.bfloat16)

    c, f = config.in_channels, config.text_feat_dim
    t = lambda v: torch.tensor([v]).to(device, torch.bfloat16)  # noqa: E731
    return [
        {
            "name": "64px, 20 tokens",
            "latent": rnd(1, c, 8, 8),
            "t": t(0.25),
            "text": rnd(1, 20, f),
            "mask": mask(20, 20),
            "ref": None,
        },
        {
            "name": "80x96px, 24 tokens (5 padded)",
            "latent": rnd(1, c, 12, 10),
            "t": t(0.7),
            "text": rnd(1, 24, f),
            "mask": mask(24, 19),
            "ref": None,
        },
        {
            "name": "64px + 96x64 reference",
            "latent": rnd(1, c, 8, 8),
            "t": t(0.5),
            "text": rnd(1, 20, f),
            "mask": mask(20, 20),
            "ref": rnd(c, 8, 12),
        },
        {
            "name": "512px, 120 tokens",
            "latent": rnd(1, c, 64, 64),
            "t": t(0.1),
            "text": rnd(1, 120, f),
            "mask": mask(120, 120),
            "ref": None,
        },
    ]


def our_forward(model, case):
    refs = [case["ref"]] if case["ref"] is not None else None
    return model(case["latent"], case["t"], case["text"], case["mask"], refs)


def aitk_pipeline_on(aitk: Aitk, transformer, vae, device):
    """ai-toolkit's ``OmniGen2Pipeline`` around a loaded transformer and VAE, with its own flow-match scheduler."""
    scheduler = aitk.scheduler_cls(dynamic_time_shift=True, num_train_timesteps=1000)
    pipe = aitk.pipeline_cls(
        transformer=transformer, vae=vae, scheduler=scheduler, mllm=None, processor=None
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def aitk_call(pipe, cond, uncond, r: ReplayRequest, latents=None) -> np.ndarray:
    """One image through ai-toolkit's pipeline, called as its ``generate_single_image`` calls it: prompt embeddings
    passed in, ``align_res=False``, ``image_guidance_scale=1.0``, the global generators seeded and the global CPU
    generator passed (noise drawn on the CPU). ``uncond`` None: no CFG."""
    generator = torch.manual_seed(r.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(r.seed)
    image = pipe(
        prompt_embeds=cond.embeds,
        prompt_attention_mask=cond.mask,
        negative_prompt_embeds=uncond.embeds if uncond is not None else None,
        negative_prompt_attention_mask=uncond.mask if uncond is not None else None,
        height=r.height,
        width=r.width,
        num_inference_steps=r.num_inference_steps,
        text_guidance_scale=r.guidance_scale,
        image_guidance_scale=1.0,
        latents=latents,
        align_res=False,
        generator=generator,
        input_images=[],
    ).images[0]
    return np.asarray(image.convert("RGB"))


def aitk_replay(
    aitk: Aitk, transformer, vae, pipe_ours: OmniGen2Pipeline, row: dict, device, latents=None
) -> np.ndarray:
    """One oracle preview through ai-toolkit's pipeline, its texts encoded by ours."""
    pipe = aitk_pipeline_on(aitk, transformer, vae, device)
    r = request_of(row)
    cond = pipe_ours.encode_text(r.prompt, r.chat_template_passes)
    cfg = r.guidance_scale > 1.0
    uncond = pipe_ours.encode_text(r.negative_prompt, r.negative_chat_template_passes) if cfg else None
    return aitk_call(pipe, cond, uncond, r, latents)


def check_on_aitk_previews(rows: list[dict], pixels: list[np.ndarray], model: str, out_dir: Path) -> dict:
    """(d): copies of the oracle jobs with ai-toolkit's default-path images as step-0 previews (PNG), checked with
    ``--kernels auto`` and ``--noise auto`` on this card: what parity chooses and whether it replays them exactly."""
    import shutil

    from PIL import Image

    from parity.check import CheckOptions, run_check
    from parity.replay import ReplayOptions

    jobs_root = Path(tempfile.mkdtemp(prefix="aitk_previews_"))
    out = {}
    for job in sorted({row["job"] for row in rows}):
        folder = jobs_root / job
        shutil.copytree(REPO / "fixtures/oracle/jobs" / job, folder)
        for row, px in zip(rows, pixels, strict=True):
            if row["job"] == job:
                target = folder / "samples" / row["file"]
                target.unlink()
                Image.fromarray(px).save(target.with_suffix(".png"))
        t0 = time.perf_counter()
        report = run_check(folder, CheckOptions(
            replay=ReplayOptions(base_model=model, device="cuda"), steps="0", out_dir=out_dir / f"check_{job}",
            diagnose=False))
        out[job] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "noise": f"{report.noise_algorithm} ({report.noise_algorithm_reason})",
            "kernels": report.kernels,
            "kernels_reason": report.kernels_reason,
            "kernel_trials": report.kernel_trials,
            "verdicts": [i.outcome.value for i in report.items],
            "step0": report.base_drift,
        }
    return out


def load_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--aitk",
        default=None,
        help="folder holding aitkog2/src, or an ai-toolkit checkout (default $AI_TOOLKIT_PATH)",
    )
    ap.add_argument("--out", required=True, help="folder for gpu_parity.json and images.npz")
    ap.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="diffusers-layout OmniGen2 folder (default: the tiny oracle model)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--retunes", type=int, default=3, help="times to clear and re-run ai-toolkit's RMSNorm autotuner"
    )
    args = ap.parse_args(argv)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    on_cuda = device.type == "cuda"
    sys_path = aitk_sys_path(args.aitk)
    t_start = time.perf_counter()

    env = {
        "device": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    for name in ("triton", "diffusers", "transformers", "flash_attn"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:
            env[name] = None
    results: dict = {"env": env}

    # ---- ours (PyTorch's kernels: what a fresh transformer runs)
    components = load_components(args.model, dtype, device)
    pipe = OmniGen2Pipeline(components)
    ours_model = components.transformer
    config = ours_model.config
    rows = step0_rows()
    cases = transformer_cases(config, device)

    with torch.no_grad():
        ours_velocity = [our_forward(ours_model, case) for case in cases]
    ours_pixels = [pipe(request_of(row)).pixels for row in rows]
    repeat = pipe(request_of(rows[0])).pixels
    results["ours_deterministic"] = bool(np.array_equal(repeat, ours_pixels[0]))

    # our GPU replays against the CPU previews, with the oracle's torch 2.13 CPU noise
    vs_cpu = []
    for row in rows:
        px = pipe(request_of(row, ORACLE_NOISE)).pixels
        vs_cpu.append(
            {
                "preview": f"{row['job']}/{row['prompt_index']}",
                **pixel_metrics(load_png(GROUND_TRUTH / row["job"] / row["png"]), px),
            }
        )
    results["ours_gpu_vs_cpu_ground_truth"] = vs_cpu

    images = {f"ours_{i}": p for i, p in enumerate(ours_pixels)}

    # ---- ai-toolkit, same kernels (a, b) and default path (c)
    modes = [("same_kernels", False)]
    triton_ok = False
    try:
        import triton  # noqa: F401

        triton_ok = on_cuda
    except ImportError:
        pass
    modes.append(("aitk_default", None))

    aitk_outputs: dict[str, dict] = {}
    for mode, flag in modes:
        if mode == "aitk_default" and not on_cuda:
            results[mode] = {"skipped": "ai-toolkit's default GPU path needs CUDA"}
            continue
        aitk = import_aitk(sys_path, flag)
        theirs = aitk.transformer_cls.from_pretrained(Path(args.model) / "transformer", torch_dtype=dtype)
        theirs = theirs.to(device, dtype=dtype).eval().requires_grad_(False)
        freqs = aitk_freqs(aitk, theirs.config)
        block = {
            "triton_rmsnorm": aitk.triton_rmsnorm,
            "flash_attn": aitk.flash_attn,
            "rmsnorm_class": aitk.rmsnorm_class,
        }
        with torch.no_grad():
            vel = [
                aitk_forward(theirs, freqs, c["latent"], c["t"], c["text"], c["mask"], c["ref"])
                for c in cases
            ]
        block["transformer"] = [
            {"case": c["name"], **tensor_diff(v, o)}
            for c, v, o in zip(cases, vel, ours_velocity, strict=True)
        ]
        px = [aitk_replay(aitk, theirs, components.vae, pipe, row, device) for row in rows]
        block["replays"] = [
            {
                "preview": f"{row['job']}/{row['prompt_index']}",
                "size": f"{row['width']}x{row['height']}",
                **pixel_metrics(p, o),
            }
            for row, p, o in zip(rows, px, ours_pixels, strict=True)
        ]
        if aitk.triton_rmsnorm:
            block["autotuned_num_warps"] = {str(k): v for k, v in sorted(autotuned_warps(aitk).items())}
            # stability: clear the autotuner, run again, compare
            retunes = []
            for _ in range(args.retunes):
                clear_autotune(aitk)
                with torch.no_grad():
                    again = [
                        aitk_forward(theirs, freqs, c["latent"], c["t"], c["text"], c["mask"], c["ref"])
                        for c in cases
                    ]
                retunes.append(
                    {
                        "num_warps": {str(k): v for k, v in sorted(autotuned_warps(aitk).items())},
                        "all_cases_equal_first_tuning": all(
                            torch.equal(a, b) for a, b in zip(again, vel, strict=True)
                        ),
                        "cases": [
                            {"case": c["name"], **tensor_diff(a, b)}
                            for c, a, b in zip(cases, again, vel, strict=True)
                        ],
                    }
                )
            block["retunes"] = retunes
        aitk_outputs[mode] = {"velocity": vel, "pixels": px, "aitk": aitk}
        for i, p in enumerate(px):
            images[f"{mode}_{i}"] = p
        results[mode] = block
        del theirs

    # ---- our triton kernel profile against ai-toolkit's default path
    tuned = {int(k): v for k, v in (results.get("aitk_default") or {}).get("autotuned_num_warps", {}).items()}
    if triton_ok and "aitk_default" in aitk_outputs and tuned:
        from pipelines.omnigen2 import triton_norm

        ref = aitk_outputs["aitk_default"]
        profile = kernels.format_profile("triton", tuned)
        before = ours_model.kernels
        ours_model.use_kernels(kernels.KernelSet.parse(profile, before.fast_attention))
        try:
            with torch.no_grad():
                vel = [our_forward(ours_model, c) for c in cases]
            px = [pipe(request_of(row)).pixels for row in rows]
            block = {
                "profile": profile,
                "transformer": [
                    {"case": c["name"], **tensor_diff(v, o)}
                    for c, v, o in zip(cases, vel, ref["velocity"], strict=True)
                ],
                "replays": [
                    {"preview": f"{row['job']}/{row['prompt_index']}", **pixel_metrics(p, o)}
                    for row, p, o in zip(rows, px, ref["pixels"], strict=True)
                ],
            }
            # sensitivity of the result to the warp count, and distance to torch.rms_norm, at the model's widths
            sens = []
            g = torch.Generator().manual_seed(1)
            for n in sorted({config.hidden_size, config.text_feat_dim, 2048, 2520}):
                x = (torch.randn(512, n, generator=g) * 3).to(device, dtype)
                w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
                outs = {nw: triton_norm.rms_norm(x, w, 1e-5, nw) for nw in kernels.TRITON_WARPS}
                distinct = len({o.cpu().view(torch.int16).numpy().tobytes() for o in outs.values()})
                torch_out = torch.nn.functional.rms_norm(x, (n,), w, 1e-5)
                sens.append(
                    {
                        "N": n,
                        "distinct_results_over_num_warps_1_to_32": distinct,
                        "share_differing_from_torch_rms_norm": {
                            nw: float((o != torch_out).float().mean()) for nw, o in sorted(outs.items())
                        },
                    }
                )
            block["warp_sensitivity"] = sens
            # every width pinned to one warp count, against ai-toolkit's first tuning
            sweep = []
            for nw in sorted(kernels.TRITON_WARPS):
                ours_model.use_kernels(kernels.KernelSet.parse(f"triton:{nw}", before.fast_attention))
                with torch.no_grad():
                    v_nw = [our_forward(ours_model, c) for c in cases]
                px_nw = [pipe(request_of(row)).pixels for row in rows]
                metrics = [pixel_metrics(p, o) for p, o in zip(px_nw, ref["pixels"], strict=True)]
                sweep.append(
                    {
                        "num_warps": nw,
                        "transformer_cases_equal": sum(
                            torch.equal(a, b) for a, b in zip(v_nw, ref["velocity"], strict=True)
                        ),
                        "replays_identical": sum(m["identical"] for m in metrics),
                        "replay_max_abs_diff": max(m["max_abs_diff"] for m in metrics),
                        "replay_mean_abs_diff_max": max(m["mean_abs_diff"] for m in metrics),
                        "replay_ssim_min": min(m["ssim"] for m in metrics),
                    }
                )
            block["warp_sweep_vs_aitk_first_tuning"] = sweep
            for i, p in enumerate(px):
                images[f"ours_triton_{i}"] = p
            results["ours_triton_vs_aitk_default"] = block
        finally:
            ours_model.use_kernels(before)
        results["check_auto_on_aitk_default_previews"] = check_on_aitk_previews(
            rows, ref["pixels"], args.model, out_dir)
    elif on_cuda:
        results["ours_triton_vs_aitk_default"] = {"skipped": "triton not importable or ai-toolkit did not use it"}

    results["seconds"] = round(time.perf_counter() - t_start, 1)
    (out_dir / "gpu_parity.json").write_text(json.dumps(results, indent=2, default=str))
    np.savez_compressed(out_dir / "images.npz", **images)
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    env = results["env"]
    print(
        f"\n== GPU parity: {env['device']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, "
        f"transformers {env['transformers']}, flash_attn {env['flash_attn']}"
    )
    print(f"our replay deterministic on this device: {results['ours_deterministic']}")
    for mode in ("same_kernels", "aitk_default"):
        block = results.get(mode, {})
        if "skipped" in block or not block:
            print(f"\n[{mode}] skipped: {block.get('skipped')}")
            continue
        print(
            f"\n[{mode}] ai-toolkit RMSNorm = {block['rmsnorm_class']} (triton {block['triton_rmsnorm']}, flash_attn {block['flash_attn']})"
        )
        print(f"  {'transformer case':38s} {'equal':>6s} {'max|d|':>10s} {'mean|d|':>10s} {'share!=':>8s}")
        for r in block["transformer"]:
            print(
                f"  {r['case']:38s} {str(r['equal']):>6s} {r['max_abs_diff']:10.4g} {r['mean_abs_diff']:10.4g} {r['share_elements_differing']:8.4f}"
            )
        print(f"  {'replay (ours vs ai-toolkit)':38s} {'ident':>6s} {'max':>5s} {'mean':>8s} {'SSIM':>8s}")
        for r in block["replays"]:
            print(
                f"  {r['preview'] + ' ' + r['size']:38s} {str(r['identical']):>6s} {r['max_abs_diff']:5d} {r['mean_abs_diff']:8.4f} {r['ssim']:8.5f}"
            )
        if "autotuned_num_warps" in block:
            print(f"  autotuned num_warps by N: {block['autotuned_num_warps']}")
            for r in block["retunes"]:
                print(
                    f"  re-tuned: num_warps {r['num_warps']}, cases equal to the first tuning: "
                    f"{[c['equal'] for c in r['cases']]}, max|d| {max(c['max_abs_diff'] for c in r['cases']):.4g}"
                )
    proto = results.get("ours_triton_vs_aitk_default")
    if proto and "skipped" not in proto:
        print(f"\n[our kernel profile {proto['profile']} vs ai-toolkit default]")
        for r in proto["transformer"]:
            print(
                f"  {r['case']:38s} {str(r['equal']):>6s} {r['max_abs_diff']:10.4g} {r['mean_abs_diff']:10.4g}"
            )
        for r in proto["replays"]:
            print(
                f"  {r['preview']:38s} {str(r['identical']):>6s} {r['max_abs_diff']:5d} {r['mean_abs_diff']:8.4f} {r['ssim']:8.5f}"
            )
        for w in proto["warp_sweep_vs_aitk_first_tuning"]:
            print(
                f"  all widths at num_warps={w['num_warps']:2d}: transformer cases equal {w['transformer_cases_equal']}/4, "
                f"replays identical {w['replays_identical']}/8, max {w['replay_max_abs_diff']}, "
                f"worst mean {w['replay_mean_abs_diff_max']}, worst SSIM {w['replay_ssim_min']}"
            )
        for s in proto["warp_sensitivity"]:
            print(
                f"  N={s['N']}: {s['distinct_results_over_num_warps_1_to_32']} distinct results over num_warps; "
                f"share != torch.rms_norm {s['share_differing_from_torch_rms_norm']}"
            )
    elif proto:
        print(f"\n[our triton kernel profile] skipped: {proto['skipped']}")
    for job, r in (results.get("check_auto_on_aitk_default_previews") or {}).items():
        print(f"\n[parity check --kernels auto, {job} with ai-toolkit default-path previews] {r['seconds']} s")
        print(f"  noise {r['noise']}\n  kernels {r['kernels']} ({r['kernels_reason']})")
        print(f"  verdicts {r['verdicts']}; step-0 {r['step0']}")
    print("\n[ours on this device vs the CPU ground truth PNGs, oracle noise torch2.13-avx2]")
    for r in results["ours_gpu_vs_cpu_ground_truth"]:
        print(
            f"  {r['preview']:38s} {str(r['identical']):>6s} {r['max_abs_diff']:5d} {r['mean_abs_diff']:8.4f} {r['ssim']:8.5f}"
        )
    print(f"\ntotal {results['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
