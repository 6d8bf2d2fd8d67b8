"""FLUX.1 on one GPU (issue 11, item 5): our replay against ai-toolkit's sampling path, tiny and full size.

    python benchmarks/flux_gpu.py --aitk .aitk_flux --out /tmp/flux_gpu [--profile]
    python benchmarks/flux_gpu.py --out /tmp/flux_smoke --smoke          # any device, tiny shapes: tests the script
    python benchmarks/flux_gpu.py --out /tmp/flux_fast --skip tiny,full --fast   # (c) only: --fast vs exact

ai-toolkit's FLUX.1 sampling path (toolkit/stable_diffusion_model.py ``generate_images``, plain ``FluxPipeline``
branch) is rebuilt here from diffusers' own ``FluxPipeline``, driven as ai-toolkit drives it: a fresh
``get_sampler('flowmatch', arch='flux')`` scheduler (ai-toolkit's ``CustomFlowMatchEulerDiscreteScheduler`` with its
``flux_config``: dynamic shifting, base_shift 0.5, max_shift 1.15, base_image_seq_len 256, max_image_seq_len 4096,
shift 3.0, exponential time shift); prompt embeddings precomputed with ai-toolkit's ``encode_prompts_flux``
(max_length 512) and cast to the transformer's dtype; ``torch.manual_seed(seed)`` + ``torch.cuda.manual_seed(seed)``
and the global CPU generator passed as ``generator``; ``callback_on_step_end`` casting the latents to the
transformer's dtype; PIL output. The pipeline shares our session's modules, so both paths run the same weights
(LoRA merged into them, or attached as hooks, by our ``LoraPatcher``) with the same kernels on the same GPU.

(a) tiny FLUX.1 (``fixtures/oracle/tiny_flux``, bf16): every oracle preview of ``flux_basic`` (merged rounds from
    the in-memory fp32 LoRAs, with the merge-out drift of the earlier rounds) and ``flux_odd`` (LoRA by hooks,
    multipliers 0.7/1/1.3, from the float32 checkpoints), step 0 included: our ``FluxSession`` vs ai-toolkit's path,
    both drawing the noise with this torch (``native``): pixel identical? Our embeddings vs ``encode_prompts_flux``
    bit for bit? And our replay with the oracle's noise draw (torch 2.13, AVX2) vs the CPU ground-truth PNGs.
(b) full-size FLUX.1-dev architecture (``FLUX1_DEV_CONFIG``: 19 double + 38 single blocks, 24 heads x 128,
    joint_attention_dim 4096, pooled 768, guidance embeds) with random weights, a FLUX-shaped random VAE (16 latent
    channels) and small random CLIP/T5 encoders whose outputs have the real shapes ((1, 512, 4096), (1, 768)), bf16,
    1024x1024, 28 steps, guidance 3.5: seconds per image for our session and for ai-toolkit's path (warm-up first,
    then interleaved timed repeats, ``torch.cuda.synchronize``), peak memory, a breakdown (one transformer forward,
    the VAE decode), the FLOP floor (``FlopCounterMode`` over one forward x steps + the decode, over the measured
    bf16 GEMM rate and over the nominal 790 TFLOP/s) and whether the two images are pixel identical.

(c) ``--fast``: the same full-size model timed in exact mode and with ``--fast`` (``pipelines/flux/fast.py``), plain
    FLUX.1 (guidance embedding, one pass per step) and true CFG (``use_flux_cfg``: prompt and negative, batched by
    --fast): seconds per image (the first fast image, which compiles, timed apart), peak memory, the pixels of the
    two modes compared (SSIM, max and mean abs diff), whether exact mode gives the same image after fast ran (the
    fused projections are views of the exact path's weights); an ablation (each --fast part switched off alone,
    true CFG) and T5-XXL's encoding (a random encoder of the real shape, 512 tokens) with eager attention (exact)
    and SDPA (--fast).

``--aitk`` is a folder holding ai-toolkit's ``toolkit/`` package (a checkout, or the few files copied into an
ignored folder: ``toolkit/__init__.py``, ``sampler.py``, ``train_tools.py``, ``samplers/{custom_flowmatch_sampler,
mean_flow_scheduler,custom_lcm_scheduler}.py``, ``timestep_weighing/``); default ``$AI_TOOLKIT_PATH``. Without it the
script stands in diffusers' ``FlowMatchEulerDiscreteScheduler`` with flux_config's values and our own encoding, and
says so in the JSON. ai-toolkit's code is never part of this repository. Results: ``<out>/flux_gpu.json``,
``<out>/images.npz``; ``--profile``: ``<out>/profile_{ours,aitk}.txt`` (torch.profiler, one full-size image each).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.family import LoadSpec, RenderRequest, WeightState  # noqa: E402
from pipelines.flux.family import FLUX1_DEV_CONFIG  # noqa: E402
from pipelines.flux.fast import FastParts, t5_attention  # noqa: E402
from pipelines.flux.loading import Components, load_tokenizers, quiet_libraries  # noqa: E402
from pipelines.flux.session import FluxSession, load_session  # noqa: E402

GIB = 1024**3
TINY = REPO / "fixtures/oracle/tiny_flux"
GROUND_TRUTH = REPO / "fixtures/oracle/ground_truth"
JOBS_DIR = REPO / "fixtures/oracle/jobs"
# where each job's exact weights are: flux_basic's merged rounds need the fp32 LoRA ai-toolkit held (its checkpoints
# are float16), flux_odd's float32 checkpoints are exact
JOB_SOURCES = {"flux_basic": "in_memory", "flux_odd": "checkpoint"}
ORACLE_NOISE = "torch2.13-avx2"  # the draw that made the CPU ground truth (torch 2.13 on an AVX2 CPU)
NOMINAL_TFLOPS = 790.0  # dense bf16 GEMM rate of an H200/H100 as measured here (RESULTS.md, KINDS.md)
PROMPT = "full-size benchmark prompt"
NEGATIVE = "blurry, low quality"  # (c)'s true-CFG negative prompt
# T5-XXL (google/t5-v1_1-xxl, FLUX.1's text_encoder_2) for (c)'s encoding times; --smoke: a small one
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
T5_SMOKE = dict(vocab_size=403, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
# toolkit/sampler.py flux_config: the stand-in scheduler's settings when ai-toolkit's code is not given
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
# --smoke: a FLUX.1-shaped transformer of the tiny oracle's size
SMOKE_CONFIG = dict(FLUX1_DEV_CONFIG, attention_head_dim=16, axes_dims_rope=[4, 6, 6], joint_attention_dim=32,
                    num_attention_heads=2, num_layers=1, num_single_layers=1, pooled_projection_dim=32)


# --------------------------------------------------------------------------------------------- ai-toolkit's path


class AitkSampling:
    """ai-toolkit's sampling scheduler and prompt encoding: its own code from ``path``, or stand-ins."""

    def __init__(self, path: str | None):
        self.path = path
        self.commit = None
        if path:
            root = Path(path).expanduser().resolve()
            if not (root / "toolkit" / "sampler.py").is_file():
                raise SystemExit(f"{root}: no toolkit/sampler.py (pass an ai-toolkit checkout or a copy of toolkit/)")
            sys.path.insert(0, str(root))
            from toolkit.sampler import get_sampler
            from toolkit.train_tools import encode_prompts_flux

            self._get_sampler, self._encode = get_sampler, encode_prompts_flux
            commit = root / "COMMIT"
            self.commit = commit.read_text().strip() if commit.is_file() else _git_head(root)
            self.source = f"ai-toolkit's own code from {path} ({self.commit or 'commit unknown'})"
        else:
            self._get_sampler = self._encode = None
            self.source = "stand-ins: diffusers FlowMatchEulerDiscreteScheduler(flux_config) and our encode_prompt"

    def scheduler(self):
        """A fresh sampling scheduler, as generate_images makes one per call (``get_sampler('flowmatch', ...)``)."""
        if self._get_sampler is not None:
            return self._get_sampler("flowmatch", {"prediction_type": "epsilon"}, arch="flux")
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)

    @torch.no_grad()
    def encode(self, session: FluxSession, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """StableDiffusion.encode_prompt for flux (``encode_prompts_flux``, max_length 512, no attn mask), then
        generate_images' ``.to(device, dtype=unet.dtype)``."""
        c = session.c
        if self._encode is None:
            text = session.pipeline.encode_prompt(prompt, attn_masking=False)
            return text.embeds, text.pooled
        embeds, pooled = self._encode([c.tokenizer, c.tokenizer_2], [c.text_encoder, c.text_encoder_2], [prompt],
                                      truncate=True, max_length=512, dropout_prob=0.0, attn_mask=False)
        dtype = c.transformer.dtype
        return embeds.to(c.device, dtype=dtype), pooled.to(c.device, dtype=dtype)


def _git_head(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@torch.no_grad()
def aitk_image(session: FluxSession, aitk: AitkSampling, embeds: torch.Tensor, pooled: torch.Tensor,
               r: RenderRequest) -> np.ndarray:
    """One preview through diffusers' FluxPipeline exactly as generate_images calls it (plain FLUX.1, no true CFG)."""
    from diffusers import FluxPipeline

    c = session.c
    pipe = FluxPipeline(vae=c.vae, transformer=c.transformer, text_encoder=c.text_encoder,
                        text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2,
                        scheduler=aitk.scheduler())
    pipe.watermark = None
    pipe.set_progress_bar_config(disable=True)
    unet_dtype = c.transformer.dtype

    def callback_on_step_end(pipe, i, t, callback_kwargs):  # generate_images' "Fix a bug in diffusers/torch"
        latents = callback_kwargs["latents"]
        if latents.dtype != unet_dtype:
            latents = latents.to(unet_dtype)
        return {"latents": latents}

    torch.manual_seed(r.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(r.seed)
    generator = torch.manual_seed(r.seed)
    image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=r.height, width=r.width,
                 num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale, latents=None,
                 generator=generator, callback_on_step_end=callback_on_step_end).images[0]
    return np.array(image)


# --------------------------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"identical": False, "shape": [list(a.shape), list(b.shape)]}
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"identical": bool(not d.any()), "max": int(d.max()), "mean": round(float(d.mean()), 4),
            "differing_fraction": round(float((d > 0).mean()), 5)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device, aitk: AitkSampling) -> dict:
    import diffusers
    import transformers

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device),
           "aitk": aitk.source, "aitk_commit": aitk.commit,
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        env["multiprocessors"] = props.multi_processor_count
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, check=True).stdout.strip()
    else:
        env["gpu"] = None
    return env


# --------------------------------------------------------------------------------------------- (a) tiny oracle


def oracle_rows(job: str) -> list[dict]:
    return [json.loads(line) for line in (GROUND_TRUTH / job / "samples.jsonl").open()]


def request_for(row: dict, noise_algorithm: str) -> RenderRequest:
    """The preview's settings as samples.jsonl records what ai-toolkit passed to its pipeline."""
    return RenderRequest(prompt=row["prompt"], negative_prompt=row["negative_prompt"], seed=row["seed"],
                         width=row["width"], height=row["height"], num_inference_steps=row["num_inference_steps"],
                         guidance_scale=float(row["guidance_scale"]), noise_algorithm=noise_algorithm)


def lora_file(job: str, step: int, source: str, rows: list[dict]) -> Path:
    if source == "in_memory":
        return GROUND_TRUTH / job / "lora_in_memory" / f"step_{step:09d}.safetensors"
    row = next(r for r in rows if r["step"] == step)
    (name,) = row["lora"]["checkpoints_equal_to_in_memory_weights"]
    return JOBS_DIR / job / name


def weights_for(job: str, row: dict, rows: list[dict]) -> WeightState:
    """The transformer state of ``row``'s preview: the base at step 0; a merged round on the base drifted by every
    earlier merged round (merge + merge-out); a hooks round unmerged."""
    step, source = row["step"], JOB_SOURCES[job]
    if step == 0:
        return WeightState()
    mode = "merged" if row["lora_merged"] else "hooks"
    history = ()
    if mode == "merged":
        earlier = sorted({r["step"] for r in rows if 0 < r["step"] < step and r["lora_merged"]})
        history = tuple((lora_file(job, s, source, rows), 1.0) for s in earlier)
    return WeightState(lora_file(job, step, source, rows), float(row["network_multiplier"]), mode, history)


def truth_png(job: str, row: dict) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(GROUND_TRUTH / job / row["png"]).convert("RGB"))


def run_tiny(args, device: torch.device, aitk: AitkSampling, images: dict) -> dict:
    start = time.perf_counter()
    session = load_session(LoadSpec(root=TINY, dtype="bfloat16", device=str(device)))
    load_s = time.perf_counter() - start
    previews = []
    for job in JOB_SOURCES:
        rows = oracle_rows(job)
        chosen = rows if not args.tiny_limit else rows[: args.tiny_limit]
        for row in chosen:
            state = weights_for(job, row, rows)
            session.set_weights(state)
            native = request_for(row, "native")
            ours = session.pipeline(native)
            embeds, pooled = aitk.encode(session, row["prompt"])
            theirs = aitk_image(session, aitk, embeds, pooled, native)
            on_truth_noise = session.pipeline(request_for(row, ORACLE_NOISE)).pixels
            stem = Path(row["file"]).stem
            images[f"{job}/{stem}/ours"] = ours.pixels
            images[f"{job}/{stem}/aitk"] = theirs
            images[f"{job}/{stem}/ours_oracle_noise"] = on_truth_noise
            previews.append({
                "job": job, "file": row["file"], "step": row["step"], "prompt_index": row["prompt_index"],
                "weights": "base" if state.lora is None else state.mode,
                "history_rounds": len(state.history), "multiplier": state.multiplier,
                "size": f"{ours.pixels.shape[1]}x{ours.pixels.shape[0]}", "steps": row["num_inference_steps"],
                "embeds_equal_aitk": bit_equal(embeds, ours.cond.embeds) and bit_equal(pooled, ours.cond.pooled),
                "ours_vs_aitk": compare(ours.pixels, theirs),
                "cuda_vs_cpu_truth": compare(on_truth_noise, truth_png(job, row)),
            })
            print(f"  {job}/{row['file']}: step {row['step']} {previews[-1]['weights']:6s} ours vs ai-toolkit "
                  f"{_fmt(previews[-1]['ours_vs_aitk'])}; vs CPU truth {_fmt(previews[-1]['cuda_vs_cpu_truth'])}",
                  flush=True)
    # determinism: the first preview again, from a fresh weight state
    first_job = next(iter(JOB_SOURCES))
    rows = oracle_rows(first_job)
    session.set_weights(weights_for(first_job, rows[0], rows))
    again = session.pipeline(request_for(rows[0], "native")).pixels
    repeat = compare(again, images[f"{first_job}/{Path(rows[0]['file']).stem}/ours"])
    session.set_weights(WeightState())
    ident = sum(p["ours_vs_aitk"]["identical"] for p in previews)
    truth_ident = sum(p["cuda_vs_cpu_truth"]["identical"] for p in previews)
    cpu = [p["cuda_vs_cpu_truth"] for p in previews]
    return {
        "load_s": round(load_s, 3),
        "seconds": round(time.perf_counter() - start, 2),
        "previews": previews,
        "ours_vs_aitk_identical": f"{ident}/{len(previews)}",
        "embeds_equal_aitk": f"{sum(p['embeds_equal_aitk'] for p in previews)}/{len(previews)}",
        "cuda_vs_cpu_truth_identical": f"{truth_ident}/{len(previews)}",
        "cuda_vs_cpu_truth_max": max((c.get("max", -1) for c in cpu), default=None),
        "cuda_vs_cpu_truth_mean_range": [min((c.get("mean", 0) for c in cpu), default=None),
                                         max((c.get("mean", 0) for c in cpu), default=None)],
        "repeat_identical": repeat["identical"],
    }


def _fmt(c: dict) -> str:
    if "max" not in c:
        return f"shape {c['shape']}"
    return "IDENTICAL" if c["identical"] else f"max {c['max']} mean {c['mean']:.3f}"


# --------------------------------------------------------------------------------------------- (b) full size


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random weights that keep 57 bf16 blocks finite: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.05),
    biases ~ N(0, 0.02). Every parameter is written (``to_empty`` leaves garbage)."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.05, generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import FluxTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(old)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise RuntimeError(f"buffers would be left uninitialised by to_empty: {buffers[:5]}")
    model.to_empty(device=device)
    randomise_(model, seed)
    return model.eval().requires_grad_(False)


def build_vae(device: torch.device, dtype: torch.dtype, seed: int, smoke: bool):
    """FLUX.1's AutoencoderKL shape (16 latent channels, 4 blocks -> /8, scaling 0.3611, shift 0.1159), random."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16) if smoke else (128, 256, 512, 512),
        layers_per_block=1 if smoke else 2, act_fn="silu", latent_channels=16, norm_num_groups=8 if smoke else 32,
        sample_size=64 if smoke else 1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True, force_upcast=True,
    )
    return vae.to(device, dtype=dtype).eval().requires_grad_(False)


def build_encoders(text_dim: int, pooled_dim: int, device: torch.device, dtype: torch.dtype, seed: int):
    """Small random CLIP and T5 encoders whose outputs have the real shapes ((1, 512, text_dim) and (1, pooled_dim))
    for the tiny oracle's tokenizers (vocabularies 935 and 403; CLIP's legacy eos id 2 as in FLUX.1-dev), with the
    attention implementations ``loading.py`` gives them (CLIP SDPA, T5 eager)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    heads = 12 if pooled_dim % 64 == 0 else 2
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=935, hidden_size=pooled_dim, intermediate_size=4 * pooled_dim,
                                        num_hidden_layers=1, num_attention_heads=heads, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=pooled_dim,
                                        hidden_act="quick_gelu", attn_implementation="sdpa"))
    t5 = T5EncoderModel(T5Config(vocab_size=403, d_model=text_dim, d_kv=64, d_ff=1024, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                                 pad_token_id=0, eos_token_id=1, attn_implementation="eager"))
    return (clip.to(device, dtype=dtype).eval().requires_grad_(False),
            t5.to(device, dtype=dtype).eval().requires_grad_(False))


def full_session(args, device: torch.device, dtype: torch.dtype) -> tuple[FluxSession, dict]:
    config = SMOKE_CONFIG if args.smoke else FLUX1_DEV_CONFIG
    start = time.perf_counter()
    transformer = build_transformer(config, device, dtype, seed=1)
    vae = build_vae(device, dtype, seed=2, smoke=args.smoke)
    clip, t5 = build_encoders(config["joint_attention_dim"], config["pooled_projection_dim"], device, dtype, seed=3)
    tokenizer, tokenizer_2 = load_tokenizers(TINY)
    sync(device)
    root = Path(tempfile.mkdtemp(prefix="flux_random_"))
    components = Components(root=root, transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5,
                            tokenizer=tokenizer, tokenizer_2=tokenizer_2, dtype=dtype, device=device)
    session = FluxSession(components, LoadSpec(root=root, dtype="bfloat16", device=str(device)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    info = {
        "transformer_config": {k: v for k, v in config.items()},
        "parameters": {"transformer": count(transformer), "vae": count(vae), "clip": count(clip), "t5": count(t5)},
        "build_s": round(time.perf_counter() - start, 2),
        "weights_gib": round(torch.cuda.memory_allocated(device) / GIB, 3) if device.type == "cuda" else None,
    }
    return session, info


def gemm_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """Median bf16 rate of an n^3 product on random data (CUDA events), or None off CUDA."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize(device)
        times.append(s.elapsed_time(e) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / float(np.median(times)) / 1e12


def event_time(fn, device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def forward_inputs(session: FluxSession, r: RenderRequest):
    """The transformer's inputs at the first step of ``r`` (what our pipeline feeds it)."""
    from pipelines.flux import quirks
    from pipelines.flux.scheduler import flux_schedule

    c = session.c
    text = session.pipeline.encode_prompt(r.prompt, attn_masking=False)
    raw = session.pipeline.initial_noise(r)
    h, w = raw.shape[-2:]
    latents = quirks.pack_latents(raw).to(c.device)
    timesteps, _ = flux_schedule(r.num_inference_steps, latents.shape[1], c.device)
    return dict(hidden_states=latents, timestep=quirks.model_timestep(timesteps[0], latents.dtype),
                guidance=quirks.guidance_value(c.transformer, r.guidance_scale, c.device),
                pooled_projections=text.pooled, encoder_hidden_states=text.embeds,
                txt_ids=quirks.text_ids(text.embeds.shape[1], c.text_encoder.dtype, c.device),
                img_ids=quirks.image_ids(h, w, c.dtype, c.device), return_dict=False), (h, w)


def profile_image(fn, device: torch.device, path: Path) -> dict:
    """One image under torch.profiler: the top operators by device time into ``path``; a few totals back."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(averages.table(sort_by=sort, row_limit=25, max_name_column_width=70))
    # kernel rows only: an operator's row repeats its kernels' time, and "Command Buffer Full" (the host waiting
    # for room in the launch queue: the GPU is the bottleneck) is no kernel
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in averages
                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                    and e.key != "Command Buffer Full")
    syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaEventSynchronize", "aten::item", "aten::nonzero"))
    copies = sum(e.count for e in averages if e.key in ("cudaMemcpyAsync", "aten::_local_scalar_dense"))
    return {"wall_s_profiled": round(wall, 3), "device_kernel_s": round(device_us / 1e6, 3),
            "sync_like_calls": int(syncs), "memcpy_calls": int(copies)}


def run_full(args, device: torch.device, aitk: AitkSampling, images: dict, out: Path, built) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.bfloat16
    session, info = built[0], dict(built[1])
    size, steps = args.size, args.steps
    request = RenderRequest(prompt=PROMPT, negative_prompt="", seed=0, width=size, height=size,
                            num_inference_steps=steps, guidance_scale=args.guidance, noise_algorithm="native")
    ours_text = session.pipeline.encode_prompt(PROMPT, attn_masking=False)
    embeds, pooled = aitk.encode(session, PROMPT)
    info["embeds_equal_aitk"] = bit_equal(embeds, ours_text.embeds) and bit_equal(pooled, ours_text.pooled)
    info["embeds_shapes"] = [list(embeds.shape), list(pooled.shape)]

    def ours_fn():
        return session.render(request).wait()

    def aitk_fn():
        return aitk_image(session, aitk, embeds, pooled, request)

    runs = {"ours": ours_fn, "aitk": aitk_fn}
    times = {k: [] for k in runs}
    peaks = {k: 0.0 for k in runs}
    pixels: dict[str, list[np.ndarray]] = {k: [] for k in runs}
    for name, fn in runs.items():  # warm-up: one image each
        sync(device)
        t = time.perf_counter()
        pixels[name].append(fn())
        sync(device)
        info[f"{name}_warmup_s"] = round(time.perf_counter() - t, 3)
        print(f"  warm-up {name}: {info[f'{name}_warmup_s']:.3f} s", flush=True)
    for i in range(args.repeats):  # interleaved, so drift of the card's clocks hits both alike
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            pixels[name].append(fn())
            sync(device)
            times[name].append(time.perf_counter() - t)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / GIB)
            print(f"  repeat {i + 1} {name}: {times[name][-1]:.3f} s", flush=True)
    result = dict(info)
    for name in runs:
        result[name] = {"seconds_per_image": round(float(np.mean(times[name])), 4),
                        "each": [round(t, 4) for t in times[name]],
                        "peak_allocated_gib": round(peaks[name], 3) if device.type == "cuda" else None,
                        "repeats_identical": all(np.array_equal(p, pixels[name][0]) for p in pixels[name])}
    result["ours_vs_aitk"] = compare(pixels["ours"][-1], pixels["aitk"][-1])
    result["aitk_over_ours"] = round(result["aitk"]["seconds_per_image"] / result["ours"]["seconds_per_image"], 4)
    images["full/ours"] = pixels["ours"][-1]
    images["full/aitk"] = pixels["aitk"][-1]

    # breakdown and the FLOP floor: one transformer forward (first step's inputs) and the VAE decode
    kwargs, (h, w) = forward_inputs(session, request)
    c = session.c
    latent = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    forward = lambda: c.transformer(**kwargs)  # noqa: E731
    decode = lambda: c.vae.decode(latent, return_dict=False)  # noqa: E731
    with torch.no_grad():
        out_v = forward()[0]
        result["velocity_finite"] = bool(torch.isfinite(out_v).all())
        result["forward_s"] = round(event_time(forward, device, repeats=args.fwd_repeats), 5)
        result["decode_s"] = round(event_time(decode, device, repeats=max(1, args.fwd_repeats // 2)), 5)
        with FlopCounterMode(display=False) as counter:
            forward()
        fwd_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            decode()
        dec_flops = counter.get_total_flops()
    total = steps * fwd_flops + dec_flops
    rate = gemm_tflops(device)
    result["tokens"] = {"image": kwargs["hidden_states"].shape[1], "text": kwargs["encoder_hidden_states"].shape[1]}
    result["flops"] = {"forward_tflop": round(fwd_flops / 1e12, 3), "decode_tflop": round(dec_flops / 1e12, 3),
                       "image_tflop": round(total / 1e12, 3)}
    result["gemm_tflops_measured"] = round(rate, 1) if rate else None
    result["floor_s"] = round(total / (rate * 1e12), 5) if rate else None
    result["floor_s_nominal"] = round(total / (NOMINAL_TFLOPS * 1e12), 5)
    denominator = total / ((rate or NOMINAL_TFLOPS) * 1e12) or 1.0
    for name in runs:
        result[name]["over_floor"] = round(result[name]["seconds_per_image"] / denominator, 3) if total else None
        result[name]["overhead_s"] = round(result[name]["seconds_per_image"] - steps * result["forward_s"]
                                           - result["decode_s"], 4)
    if args.profile:
        result["profile"] = {name: profile_image(fn, device, out / f"profile_{name}.txt") for name, fn in runs.items()}
    return result


# --------------------------------------------------------------------------------------------- (c) --fast


def pixel_drift(exact: np.ndarray, fast: np.ndarray) -> dict:
    """--fast against exact mode, as the report's fast-drift section measures it."""
    from parity.scores import compute_metrics

    metrics = compute_metrics(exact, fast)[0]
    return {"identical": bool(np.array_equal(exact, fast)), "ssim": round(float(metrics.ssim), 5),
            "max_abs_diff": int(metrics.max_abs_diff), "mean_abs_diff": round(float(metrics.mean_abs_diff), 4)}


class ImageTimer:
    """One image at a time: seconds (synchronised), the peak memory over the image, the pixels."""

    def __init__(self, session: FluxSession, device: torch.device):
        self.session, self.device = session, device

    def __call__(self, request: RenderRequest, fast: bool, parts: FastParts | None = None) -> tuple[float, float, np.ndarray]:
        session = self.session
        session.fast = fast
        if parts is not None:
            session.pipeline.fast_parts = parts
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        start = time.perf_counter()
        pixels = session.render(request).wait()
        sync(self.device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) / GIB if self.device.type == "cuda" else 0.0
        return seconds, peak, pixels


def fast_requests(args) -> dict[str, RenderRequest]:
    """(c)'s two previews: plain FLUX.1 (the guidance embedding) and true CFG (prompt and negative every step)."""
    plain = RenderRequest(prompt=PROMPT, negative_prompt="", seed=0, width=args.size, height=args.size,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, noise_algorithm="native")
    true_cfg = RenderRequest(prompt=PROMPT, negative_prompt=NEGATIVE, seed=0, width=args.size, height=args.size,
                             num_inference_steps=args.steps, guidance_scale=args.cfg, noise_algorithm="native",
                             options=(("true_cfg", True),))
    return {"plain": plain, "true_cfg": true_cfg}


def run_fast(args, device: torch.device, images: dict, built, save) -> dict:
    """(c): exact mode against --fast on the full-size model (``save(result)`` after each part: a run cut short
    still leaves what it measured)."""
    session, info = built
    compile_ = {"auto": device.type == "cuda", "on": True, "off": False}[args.compile]
    parts = FastParts(compile=compile_, compile_backend=args.compile_backend, compile_mode=args.compile_mode)
    result: dict = {"parts": vars(parts), "build_s": info["build_s"], "weights_gib": info["weights_gib"]}
    timer = ImageTimer(session, device)
    requests = fast_requests(args)
    # exact mode before anything ran fast: the reference for "exact mode is unchanged after --fast"
    _, _, exact_before = timer(requests["plain"], fast=False)
    for kind, request in requests.items():
        row: dict = {}
        seconds, _, _ = timer(request, fast=False)
        row["exact_warmup_s"] = round(seconds, 3)
        seconds, peak, first_fast = timer(request, fast=True, parts=parts)
        # compiles the blocks for this shape (with compile on) and encodes the prompts with SDPA T5
        row["fast_first_image_s"] = round(seconds, 3)
        ran = session.pipeline.fast_forward.last
        row["fast_ran"] = {"fused_projections": ran.fused, "compiled": ran.compiled}
        print(f"  {kind}: exact warm-up {row['exact_warmup_s']:.3f} s, first fast image (compile) "
              f"{row['fast_first_image_s']:.3f} s", flush=True)
        times: dict[str, list[float]] = {"exact": [], "fast": []}
        peaks = {"exact": 0.0, "fast": peak}
        pixels: dict[str, list[np.ndarray]] = {"exact": [], "fast": [first_fast]}
        for i in range(args.fast_repeats):  # interleaved, so drift of the card's clocks hits both alike
            for mode in ("exact", "fast"):
                seconds, peak, px = timer(request, fast=mode == "fast", parts=parts)
                times[mode].append(seconds)
                peaks[mode] = max(peaks[mode], peak)
                pixels[mode].append(px)
                print(f"  {kind} repeat {i + 1} {mode}: {seconds:.3f} s", flush=True)
        for mode in ("exact", "fast"):
            row[mode] = {"seconds_per_image": round(float(np.mean(times[mode])), 4),
                         "each": [round(t, 4) for t in times[mode]],
                         "peak_allocated_gib": round(peaks[mode], 3) if device.type == "cuda" else None,
                         "repeats_identical": all(np.array_equal(p, pixels[mode][0]) for p in pixels[mode])}
        row["compile_warmup_s"] = round(row["fast_first_image_s"] - row["fast"]["seconds_per_image"], 3)
        row["speedup"] = round(row["exact"]["seconds_per_image"] / row["fast"]["seconds_per_image"], 4)
        row["fast_vs_exact"] = pixel_drift(pixels["exact"][-1], pixels["fast"][-1])
        images[f"fast/{kind}/exact"] = pixels["exact"][-1]
        images[f"fast/{kind}/fast"] = pixels["fast"][-1]
        result[kind] = row
        save(result)
    if args.fast_ablation:
        result["ablation"] = run_ablation(args, timer, requests["true_cfg"], parts, result["true_cfg"], save, result)
    _, _, exact_after = timer(requests["plain"], fast=False)
    result["exact_unchanged_after_fast"] = compare(exact_before, exact_after)
    session.fast = False
    save(result)
    result["t5"] = t5_encoding(args, device, session)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the T5 is gone with t5_encoding's frame
    save(result)
    return result


def run_ablation(args, timer: ImageTimer, request: RenderRequest, parts: FastParts, full: dict, save,
                 result: dict) -> dict:
    """True CFG with each --fast part switched off alone (one warm-up image each: a new compile where the blocks'
    inputs change), against all of them on (``full``)."""
    variants = {"no_batch_cfg": dataclasses.replace(parts, batch_cfg=False),
                "no_fuse": dataclasses.replace(parts, fuse=False),
                "no_compile": dataclasses.replace(parts, compile=False)}
    if not parts.compile:
        del variants["no_compile"]
    out: dict = {}
    for name, variant in variants.items():
        warm, _, _ = timer(request, fast=True, parts=variant)
        times = [timer(request, fast=True, parts=variant)[0] for _ in range(args.ablation_repeats)]
        mean = float(np.mean(times))
        out[name] = {"warmup_s": round(warm, 3), "seconds_per_image": round(mean, 4),
                     "over_all_parts": round(mean / full["fast"]["seconds_per_image"], 4)}
        print(f"  ablation {name}: {mean:.3f} s/image ({out[name]['over_all_parts']}x all parts on; warm-up "
              f"{warm:.3f} s)", flush=True)
        result["ablation"] = out
        save(result)
    timer.session.pipeline.fast_parts = parts
    return out


def build_t5(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A random T5 encoder of ``config`` (gated-gelu, 32 relative-position buckets, eager attention, as loaded)."""
    from transformers import T5Config, T5EncoderModel

    t5_config = T5Config(**config, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                         pad_token_id=0, eos_token_id=1, attn_implementation="eager")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = T5EncoderModel(t5_config)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device=device)
    randomise_(model, seed)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def t5_encoding(args, device: torch.device, session: FluxSession) -> dict:
    """One 512-token prompt through a random T5-XXL-shaped encoder: eager attention (exact) against SDPA
    (--fast), seconds per encoding and how far the embeddings move."""
    from pipelines.flux import quirks

    config = T5_SMOKE if args.smoke else T5_XXL
    start = time.perf_counter()
    t5 = build_t5(config, device, torch.bfloat16, seed=4)
    build_s = time.perf_counter() - start
    tokenizer = session.c.tokenizer_2

    def encode():
        return quirks.encode_t5(tokenizer, t5, PROMPT)

    out: dict = {"config": config, "parameters": sum(p.numel() for p in t5.parameters()), "build_s": round(build_s, 2)}
    embeds = {}
    for name in ("eager", "sdpa"):
        with t5_attention(t5, name):
            embeds[name] = encode()
            out[f"{name}_s"] = round(event_time(encode, device, repeats=args.fwd_repeats, warmup=1), 5)
    a, b = embeds["eager"].float(), embeds["sdpa"].float()
    out["finite"] = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    out["values_changed"] = f"{int((a != b).sum())}/{a.numel()}"
    out["max_abs_diff"] = float((a - b).abs().max())
    out["max_abs_value"] = float(a.abs().max())
    out["speedup"] = round(out["eager_s"] / out["sdpa_s"], 4) if out["sdpa_s"] else None
    print(f"  T5 {config['d_model']}x{config['num_layers']}: eager {out['eager_s']} s, sdpa {out['sdpa_s']} s per "
          f"prompt; {out['values_changed']} values changed, max {out['max_abs_diff']:.4g}", flush=True)
    return out


# --------------------------------------------------------------------------------------------- main


def summary(report: dict) -> str:
    lines = []
    env = report["environment"]
    lines.append(f"{env.get('gpu') or 'cpu'} | {env.get('nvidia_smi', '')} | torch {env['torch']} | diffusers "
                 f"{env['diffusers']} | transformers {env['transformers']} | {env['aitk']}")
    tiny = report.get("tiny")
    if tiny:
        lines.append(f"(a) tiny FLUX.1: ours vs ai-toolkit's path {tiny['ours_vs_aitk_identical']} identical; "
                     f"embeddings {tiny['embeds_equal_aitk']} bit-equal; repeat identical {tiny['repeat_identical']}; "
                     f"CUDA vs CPU truth {tiny['cuda_vs_cpu_truth_identical']} identical, max "
                     f"{tiny['cuda_vs_cpu_truth_max']}, mean {tiny['cuda_vs_cpu_truth_mean_range']}")
        lines.append("| preview | step | weights | size | ours vs ai-toolkit | CUDA vs CPU truth |")
        for p in tiny["previews"]:
            lines.append(f"| {p['job']}/{p['file']} | {p['step']} | {p['weights']} | {p['size']} | "
                         f"{_fmt(p['ours_vs_aitk'])} | {_fmt(p['cuda_vs_cpu_truth'])} |")
    full = report.get("full")
    if full:
        lines.append(f"(b) full size {report['args']['size']}px, {report['args']['steps']} steps: params "
                     f"{full['parameters']}, weights {full['weights_gib']} GiB, tokens {full['tokens']}")
        for name in ("ours", "aitk"):
            r = full[name]
            lines.append(f"  {name:5s}: {r['seconds_per_image']:.3f} s/image {r['each']} peak {r['peak_allocated_gib']} "
                         f"GiB, {r['over_floor']}x floor, overhead {r['overhead_s']} s, repeats identical "
                         f"{r['repeats_identical']}")
        lines.append(f"  ai-toolkit / ours {full['aitk_over_ours']}x; pixels {_fmt(full['ours_vs_aitk'])}; forward "
                     f"{full['forward_s']} s, decode {full['decode_s']} s; FLOPs {full['flops']}; GEMM "
                     f"{full['gemm_tflops_measured']} TFLOP/s; floor {full['floor_s']} s (nominal "
                     f"{full['floor_s_nominal']} s); embeddings equal {full['embeds_equal_aitk']}; finite "
                     f"{full['velocity_finite']}")
        if "profile" in full:
            lines.append(f"  profile: {full['profile']}")
    fast = report.get("fast")
    if fast:
        lines.append(f"(c) --fast vs exact, {report['args']['size']}px, {report['args']['steps']} steps, parts "
                     f"{fast['parts']}")
        for kind in ("plain", "true_cfg"):
            if kind not in fast:
                continue
            r = fast[kind]
            lines.append(f"  {kind:8s}: {r['fast_ran']}; exact {r['exact']['seconds_per_image']:.3f} s/image, fast "
                         f"{r['fast']['seconds_per_image']:.3f} s/image ({r['speedup']}x), compile warm-up "
                         f"{r['compile_warmup_s']} s; peak exact {r['exact']['peak_allocated_gib']} GiB, fast "
                         f"{r['fast']['peak_allocated_gib']} GiB; fast vs exact {r['fast_vs_exact']}; repeats "
                         f"identical exact {r['exact']['repeats_identical']} fast {r['fast']['repeats_identical']}")
        for name, r in fast.get("ablation", {}).items():
            lines.append(f"  ablation {name}: {r['seconds_per_image']:.3f} s/image ({r['over_all_parts']}x all "
                         f"parts on)")
        if "exact_unchanged_after_fast" in fast:
            lines.append(f"  exact mode after --fast ran: {_fmt(fast['exact_unchanged_after_fast'])}")
        if "t5" in fast:
            t5 = fast["t5"]
            lines.append(f"  T5 ({t5['parameters'] / 1e9:.2f}B): eager {t5['eager_s']} s, SDPA {t5['sdpa_s']} s per "
                         f"prompt ({t5['speedup']}x); {t5['values_changed']} values changed, max "
                         f"{t5['max_abs_diff']:.4g} of {t5['max_abs_value']:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for flux_gpu.json, images.npz (and profiles)")
    ap.add_argument("--aitk", default=os.environ.get("AI_TOOLKIT_PATH"),
                    help="folder holding ai-toolkit's toolkit/ package (default $AI_TOOLKIT_PATH); without it, "
                         "stand-ins")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: tiny, full")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, 2 previews per job: any device")
    ap.add_argument("--size", type=int, default=None, help="full-size image side (default 1024; smoke 64)")
    ap.add_argument("--steps", type=int, default=None, help="full-size steps (default 28; smoke 2)")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--repeats", type=int, default=None, help="timed images per pipeline (default 3; smoke 1)")
    ap.add_argument("--fwd-repeats", type=int, default=None, help="timed forwards for the breakdown (default 10)")
    ap.add_argument("--tiny-limit", type=int, default=None, help="previews per oracle job (default all; smoke 2)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one full-size image of each")
    ap.add_argument("--fast", action="store_true", help="(c): --fast against exact mode on the full-size model")
    ap.add_argument("--cfg", type=float, default=3.5, help="(c): the true-CFG preview's guidance scale")
    ap.add_argument("--fast-repeats", type=int, default=None, help="(c): timed images per mode (default 2; smoke 1)")
    ap.add_argument("--no-fast-ablation", dest="fast_ablation", action="store_false",
                    help="(c): skip timing each --fast part switched off alone")
    ap.add_argument("--ablation-repeats", type=int, default=1, help="(c): timed images per ablation variant")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="(c): torch.compile the blocks (auto: on CUDA, as parity check --fast does)")
    ap.add_argument("--compile-backend", default="inductor", help="(c): torch.compile backend ('eager': tracing only)")
    ap.add_argument("--compile-mode", default=None, help="(c): torch.compile mode (default: its default)")
    args = ap.parse_args(argv)
    args.size = args.size or (64 if args.smoke else 1024)
    args.steps = args.steps or (2 if args.smoke else 28)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.fwd_repeats = args.fwd_repeats or (2 if args.smoke else 10)
    args.fast_repeats = args.fast_repeats or (1 if args.smoke else 2)
    if args.tiny_limit is None and args.smoke:
        args.tiny_limit = 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster than two contended ones
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    aitk = AitkSampling(args.aitk)
    report: dict = {"args": vars(args), "environment": environment(device, aitk)}
    print(json.dumps(report["environment"]), flush=True)
    images: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    if "tiny" not in skip:
        print("(a) tiny FLUX.1 oracle previews", flush=True)
        report["tiny"] = run_tiny(args, device, aitk, images)
        (out / "flux_gpu.json").write_text(json.dumps(report, indent=1))
    built = None
    if "full" not in skip or args.fast:
        print(f"building the full-size model ({'smoke' if args.smoke else 'FLUX.1-dev'} shapes)", flush=True)
        built = full_session(args, device, torch.bfloat16)
    if "full" not in skip:
        print(f"(b) full size {args.size}px x {args.steps} steps", flush=True)
        report["full"] = run_full(args, device, aitk, images, out, built)
        (out / "flux_gpu.json").write_text(json.dumps(report, indent=1))
    if args.fast:
        print(f"(c) --fast vs exact, {args.size}px x {args.steps} steps", flush=True)

        def save(partial: dict) -> None:
            report["fast"] = partial
            (out / "flux_gpu.json").write_text(json.dumps(report, indent=1, default=str))

        report["fast"] = run_fast(args, device, images, built, save)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "flux_gpu.json").write_text(json.dumps(report, indent=1, default=str))
    np.savez_compressed(out / "images.npz", **{k.replace("/", "__"): v for k, v in images.items()})
    print(summary(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
