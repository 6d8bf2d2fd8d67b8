"""Full-size OmniGen2 (real architecture, random weights) in bf16 on one GPU: 1024x1024, 25 steps, CFG 4.

    python benchmarks/full_size.py --out /tmp/full_size [--aitk .aitk]

Builds our ``OmniGen2Transformer`` with ``OmniGen2Config()`` (the released ``OmniGen2/OmniGen2`` transformer
config: hidden 2520, 32 layers, 2 refiner layers, 21 heads, 7 KV heads, rope [40, 40, 40], axes_lens
[10000, 10000, 10000], multiple_of 256, text_feat_dim 2048) on the meta device and materialises it on the GPU
with random weights; a FLUX-shaped diffusers ``AutoencoderKL`` (16 latent channels, block_out_channels
[128, 256, 512, 512], scaling 0.3611, shift 0.1159) with random weights. No MLLM: random text embeddings
(2048 features; 120 prompt tokens, 40 negative tokens by default) stand in for the pipeline's encode_text, so
``OmniGen2Pipeline.__call__`` runs its own denoise and decode path (CPU noise draw, 25 steps x 2 passes, VAE
decode, resize, uint8).

Reports seconds per image after warm-up, a breakdown (one transformer forward, the VAE decode), and peak GPU memory
(``torch.cuda.max_memory_allocated``) in ``<out>/full_size.json``. With ``--aitk`` it also times ai-toolkit's
own transformer forward on the same weights and inputs, with the same kernels as ours and with its default GPU
path (Triton RMSNorm), checks whether the same-kernel output equals ours bit for bit at full size, and times one
image through ai-toolkit's pipeline on its default path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pipelines.omnigen2 import kernels  # noqa: E402
from pipelines.omnigen2.loading import Components  # noqa: E402
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest, TextEncoding  # noqa: E402
from pipelines.omnigen2.transformer import OmniGen2Config, OmniGen2Transformer  # noqa: E402

GIB = 1024**3
PROMPT, NEGATIVE = "full-size benchmark prompt", ""


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random weights that keep 32 bf16 layers finite: linear ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.05),
    biases and embeddings ~ N(0, 0.02). Every parameter is written (``to_empty`` leaves garbage)."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and not name.endswith("image_index_embedding"):
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.05, generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)


def model_config(smoke: bool) -> OmniGen2Config:
    """The released architecture, or with ``smoke`` a 2-layer model of the same family (any device, seconds)."""
    if not smoke:
        return OmniGen2Config()
    return OmniGen2Config(hidden_size=240, num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                          text_feat_dim=64)


def make_pipe(model, vae, encodings, device, dtype, fast=False, graphs=None) -> OmniGen2Pipeline:
    """Our pipeline on random weights with no MLLM: its text encoding step returns ``encodings[prompt]``."""
    components = Components(
        root=Path("<random weights>"),
        transformer=model,
        vae=vae,
        mllm=None,
        tokenizer=None,
        scheduler_config={"num_train_timesteps": 1000, "dynamic_time_shift": True},
        dtype=dtype,
        device=device,
    )
    pipe = OmniGen2Pipeline(components, fast=fast, cuda_graphs=graphs)
    pipe.encode_text = lambda prompt, passes=None: encodings[prompt]
    return pipe


def random_encodings(
    config, device, dtype, lengths: dict[str, int], seed: int = 1, generator: torch.Generator | None = None
) -> dict[str, TextEncoding]:
    """Random prompt embeddings standing in for the MLLM's: ``lengths`` maps each text to its token count."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    out = {}
    for text, n in lengths.items():
        embeds = torch.randn(1, n, config.text_feat_dim, generator=g).to(device, dtype)
        mask = torch.ones(1, n).to(device, dtype)
        out[text] = TextEncoding(text, embeds, mask, n)
    return out


def image_request(args, steps: int | None = None) -> ReplayRequest:
    """The benchmark's image: the random prompt and negative, seed 0, ``--size`` square, ``--steps``, ``--cfg``."""
    return ReplayRequest(PROMPT, NEGATIVE, seed=0, width=args.size, height=args.size,
                         num_inference_steps=args.steps if steps is None else steps, guidance_scale=args.cfg)


def build_transformer(
    config: OmniGen2Config, device: torch.device, dtype: torch.dtype, seed: int
) -> OmniGen2Transformer:
    with default_dtype(dtype), torch.device("meta"):
        model = OmniGen2Transformer(config)
    model.to_empty(device=device)
    randomise_(model, seed)
    return model.eval().requires_grad_(False)


def build_vae(device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        force_upcast=True,
    )
    return vae.to(device, dtype=dtype).eval().requires_grad_(False)


def cuda_time(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Mean seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():  # --smoke on a CPU
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sum(times) / len(times), times


class _NoCuda:
    """Stand-ins for the ``torch.cuda`` calls used here, for ``--smoke`` on a machine without CUDA."""

    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def reset_peak_memory_stats():
        pass

    @staticmethod
    def max_memory_allocated():
        return 0

    max_memory_reserved = memory_allocated = max_memory_allocated

    @staticmethod
    def get_device_name(_device):
        return "cpu (smoke test)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for full_size.json")
    ap.add_argument(
        "--aitk",
        default=None,
        help="folder holding aitkog2/src or an ai-toolkit checkout: also time ai-toolkit's forward",
    )
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--text-tokens", type=int, default=120)
    ap.add_argument("--negative-tokens", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=1, help="untimed images first")
    ap.add_argument("--repeats", type=int, default=3, help="timed images")
    ap.add_argument("--forward-repeats", type=int, default=10)
    ap.add_argument(
        "--no-aitk-pipeline", action="store_true", help="skip the image through ai-toolkit's pipeline"
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a 2-layer model of the same family on any device (tests the script)",
    )
    args = ap.parse_args(argv)

    cuda = torch.cuda if torch.cuda.is_available() else _NoCuda
    if cuda is _NoCuda and not args.smoke:
        raise SystemExit("full_size.py needs a CUDA GPU (or --smoke)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda" if cuda is torch.cuda else "cpu"), torch.bfloat16
    env = {
        "device": cuda.get_device_name(device),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "kernel_profile": kernels.KernelSet().spec,  # a model starts with PyTorch's kernels
    }
    for name in ("triton", "diffusers"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception:
            env[name] = None
    res: dict = {"env": env}

    # ---- build
    config = model_config(args.smoke)
    t0 = time.perf_counter()
    model = build_transformer(config, device, dtype, seed=0)
    vae = build_vae(device, dtype, seed=0)
    cuda.synchronize()
    res["build_seconds"] = round(time.perf_counter() - t0, 2)
    res["config"] = config.to_dict()
    res["transformer_parameters"] = sum(p.numel() for p in model.parameters())
    res["vae_parameters"] = sum(p.numel() for p in vae.parameters())
    res["weights_gib"] = round(cuda.memory_allocated() / GIB, 3)

    request = image_request(args)
    g = torch.Generator().manual_seed(1)  # the encodings, then the breakdown's latent
    encodings = random_encodings(config, device, dtype, {PROMPT: args.text_tokens, NEGATIVE: args.negative_tokens},
                                 generator=g)
    pipe = make_pipe(model, vae, encodings, device, dtype)

    # ---- whole images through our pipeline
    for _ in range(args.warmup):
        pipe(request)
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        out = pipe(request)
        cuda.synchronize()
        times.append(time.perf_counter() - t)
    res["ours"] = {
        "seconds_per_image": round(sum(times) / len(times), 3),
        "seconds_each": [round(x, 3) for x in times],
        "peak_allocated_gib": round(cuda.max_memory_allocated() / GIB, 3),
        "peak_reserved_gib": round(cuda.max_memory_reserved() / GIB, 3),
        "image": {
            "shape": list(out.pixels.shape),
            "mean": float(out.pixels.mean()),
            "std": float(out.pixels.std()),
        },
    }

    # ---- breakdown: one transformer forward (conditional pass) and the VAE decode
    latent_hw = args.size // 8
    latent = torch.randn(1, 16, latent_hw, latent_hw, generator=g).to(device, dtype)
    timestep = torch.tensor([0.5]).to(device, dtype)
    cond = encodings[PROMPT]
    with torch.no_grad():
        ours_velocity = model(latent, timestep, cond.embeds, cond.mask)
        fwd, _ = cuda_time(lambda: model(latent, timestep, cond.embeds, cond.mask), args.forward_repeats)
        dec, _ = cuda_time(lambda: vae.decode(latent / 0.3611 + 0.1159, return_dict=False)[0], 3, warmup=1)
    res["ours"]["forward_seconds"] = round(fwd, 4)
    res["ours"]["vae_decode_seconds"] = round(dec, 4)
    res["ours"]["velocity_finite"] = bool(torch.isfinite(ours_velocity).all())
    res["ours"]["tokens"] = {"text": args.text_tokens, "image": (latent_hw // 2) ** 2}

    # ---- ai-toolkit's own transformer on the same weights and inputs
    if args.aitk:
        from gpu_parity import aitk_forward, aitk_freqs, aitk_sys_path, import_aitk

        sys_path = aitk_sys_path(args.aitk)
        res["aitk"] = {}
        kwargs = {k: v for k, v in config.to_dict().items() if k != "_class_name"}
        for mode, flag in (("same_kernels", False), ("aitk_default", None)):
            aitk = import_aitk(sys_path, flag)
            with default_dtype(dtype), torch.device("meta"):
                theirs = aitk.transformer_cls(**kwargs)
            theirs.load_state_dict(model.state_dict(), assign=True, strict=True)  # shares our GPU tensors
            theirs = theirs.eval().requires_grad_(False)
            freqs = aitk_freqs(aitk, theirs.config)
            with torch.no_grad():
                cuda.reset_peak_memory_stats()
                v = aitk_forward(theirs, freqs, latent, timestep, cond.embeds, cond.mask)
                peak = cuda.max_memory_allocated() / GIB
                t_theirs, _ = cuda_time(
                    lambda m=theirs, f=freqs: aitk_forward(m, f, latent, timestep, cond.embeds, cond.mask),
                    args.forward_repeats,
                )
                t_ours, _ = cuda_time(
                    lambda: model(latent, timestep, cond.embeds, cond.mask), args.forward_repeats
                )
            d = (v.float() - ours_velocity.float()).abs()
            block = {
                "triton_rmsnorm": aitk.triton_rmsnorm,
                "flash_attn": aitk.flash_attn,
                "forward_seconds": round(t_theirs, 4),
                "ours_forward_seconds_same_run": round(t_ours, 4),
                "forward_peak_allocated_gib": round(peak, 3),
                "velocity_equal_to_ours": bool(torch.equal(v, ours_velocity)),
                "velocity_max_abs_diff": float(d.max()),
                "velocity_mean_abs_diff": float(d.mean()),
            }
            if mode == "aitk_default" and aitk.triton_rmsnorm:
                block.update(
                    triton_checks(aitk, theirs, freqs, model, v, latent, timestep, cond, args.forward_repeats)
                )
            if mode == "aitk_default" and not args.no_aitk_pipeline:
                block["pipeline"] = time_aitk_pipeline(
                    aitk,
                    theirs,
                    vae,
                    cond,
                    encodings[NEGATIVE],
                    request,
                    device,
                )
            res["aitk"][mode] = block
            del theirs

    (out_dir / "full_size.json").write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res, indent=2, default=str))
    return 0


@torch.no_grad()
def triton_checks(aitk, theirs, freqs, model, v_first, latent, timestep, cond, repeats: int) -> dict:
    """ai-toolkit's Triton RMSNorm at full size: the warps its autotuner chose, whether re-tuning changes its
    output, whether our ``triton`` kernel profile pinned to those warps equals it bit for bit, and how far each other warp count lands."""
    import gpu_parity

    tuned = gpu_parity.autotuned_warps(aitk)
    out = {"autotuned_num_warps": {str(k): w for k, w in sorted(tuned.items())}}

    def diff(a, b):
        d = (a.float() - b.float()).abs()
        return {
            "equal": bool(torch.equal(a, b)),
            "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()),
        }

    retunes = []
    for _ in range(3):
        gpu_parity.clear_autotune(aitk)
        again = aitk_forward_(theirs, freqs, latent, timestep, cond)
        retunes.append(
            {
                "num_warps": {str(k): w for k, w in sorted(gpu_parity.autotuned_warps(aitk).items())},
                **diff(again, v_first),
            }
        )
    out["retunes_vs_first_tuning"] = retunes

    profile = kernels.format_profile("triton", tuned)
    before = model.kernels
    try:
        model.use_kernels(kernels.KernelSet.parse(profile, before.fast_attention))
        v = model(latent, timestep, cond.embeds, cond.mask)
        out["ours_triton_profile"] = profile
        out["ours_triton_pinned"] = diff(v, v_first)
        out["ours_triton_forward_seconds"] = round(
            cuda_time(lambda: model(latent, timestep, cond.embeds, cond.mask), repeats)[0], 4
        )
        sweep = []
        for nw in sorted(kernels.TRITON_WARPS):
            model.use_kernels(kernels.KernelSet.parse(f"triton:{nw}", before.fast_attention))
            sweep.append({"num_warps": nw, **diff(model(latent, timestep, cond.embeds, cond.mask), v_first)})
        out["ours_triton_warp_sweep_vs_aitk_first_tuning"] = sweep
    finally:
        model.use_kernels(before)
    return out


def aitk_forward_(theirs, freqs, latent, timestep, cond):
    from gpu_parity import aitk_forward

    return aitk_forward(theirs, freqs, latent, timestep, cond.embeds, cond.mask)


def time_aitk_pipeline(aitk, theirs, vae, cond, uncond, r: ReplayRequest, device) -> dict:
    """One warm-up and one timed image through ai-toolkit's own pipeline (its default GPU kernels)."""
    cuda = torch.cuda if torch.cuda.is_available() else _NoCuda
    from gpu_parity import aitk_call, aitk_pipeline_on

    pipe = aitk_pipeline_on(aitk, theirs, vae, device)

    def run():
        return aitk_call(pipe, cond, uncond, r)

    run()
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    image = np.asarray(run())
    cuda.synchronize()
    return {
        "seconds_per_image": round(time.perf_counter() - t, 3),
        "peak_allocated_gib": round(cuda.max_memory_allocated() / GIB, 3),
        "image_shape": list(image.shape),
    }


if __name__ == "__main__":
    sys.exit(main())
