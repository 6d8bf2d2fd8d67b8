"""The ``server`` profile: render a preview's request the way ai-toolkit-inference does (FACTS §6), and tell an
inference deployment which of its behaviours break parity with the training previews.

Each departure is a cause of the catalogue (``parity.catalogue``: what it is, its families, its fix) with an
applicability test in ``server_request`` and a way to turn it off (``disabled``). ``server_pixels`` renders the
request with every applicable departure; ``departure_causes`` renders each one ALONE and reports those that
change the picture, with the measured effect as evidence.

FLUX.1 (ai-toolkit-inference ``src/pipelines/flux_dev.py``: diffusers' ``FluxPipeline`` from
black-forest-labs/FLUX.1-dev in bf16, called with prompt, size, steps, guidance_scale, a CPU generator and the
negative prompt) departs from ai-toolkit's FLUX.1 preview path (fixtures/oracle/FLUX.md) only where listed below;
its size floor (16, as FluxPipeline floors in training too, and the image is returned as generated), its noise
(the seeded CPU generator draws what ai-toolkit's seeded global generator draws), its scheduler (the model
folder's FlowMatchEulerDiscreteScheduler, FLUX.1-dev's config = ai-toolkit's flux_config) and its unused empty
negative are the training path's own.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from parity import catalogue
from parity.jobfolder import JobFolder
from parity.plan import ReplayItem, ReplayPlan, replace_trigger, split_prompt_flags
from parity.replay import Knobs, Replayer
from parity.results import Cause
from parity.scores import Thresholds, compute_metrics, load_rgb

SERVER_JPEG_QUALITY = 95


# What the server profile renders, in the order they are reported: the catalogue's codes (parity/catalogue.py holds
# what each one is and its fix; ``server_request`` below, when each applies and how it is rendered). A departure
# whose kind names families belongs to those families' server profiles only.
DEPARTURES = (
    "server_size_floor16",  # OmniGen2: the size floored to 16, not resized back
    "server_empty_negative_once",  # OmniGen2: the empty negative templated once
    "server_no_flag_parsing",
    "server_seed_default",
    "server_lora_fuse_fp16",  # OmniGen2: fused in bf16 from the file's float16
    "server_single_multiplier",
    "server_no_te_quantization",
    "server_jpeg_q95",
    # FLUX.1-dev, read in src/pipelines/flux_dev.py and base.py:
    # base.py BasePipeline._load_lora: PipelineConfig's default SET_ADAPTERS, so load_lora_weights makes a PEFT
    # adapter that is never fused; PEFT casts A/B to the layer dtype and adds B(A(x)) * scale in it
    "server_lora_peft_bf16",
    # flux_dev.py FluxDevPipeline._run_inference: no true_cfg_scale, so FluxPipeline's 1.0: guidance goes into the
    # guidance embedding and the negative prompt is dropped
    "server_no_true_cfg",
    # flux_dev.py FluxDevPipeline._load_pipeline: plain FluxPipeline, whose _get_t5_prompt_embeds keeps T5's padded
    # positions, and from_pretrained(torch_dtype=...) quantises nothing
    "server_no_attn_masking",
    "server_no_quantization",
)


def departures_for(family: str) -> tuple[str, ...]:
    """The departure codes of ``family``'s server profile, in report order."""
    return tuple(code for code in DEPARTURES if catalogue.kind(code).concerns(family))


@dataclass
class ServerRequest:
    item: ReplayItem  # what the server renders (its own seed, size, prompt text, multiplier)
    knobs: Knobs
    departures: list[str]  # applicable departure codes


def server_request(plan: ReplayPlan, job: JobFolder, item: ReplayItem, request_multiplier: float = 1.0,
                   disabled: frozenset[str] = frozenset()) -> ServerRequest:
    """The request ai-toolkit-inference would render for ``item``'s sample prompt, departures not in ``disabled``."""
    section = job.first_sample if item.round == "first_sample" and job.first_sample else job.sample
    sample = section.samples[item.prompt_index] if item.prompt_index < len(section.samples) else None
    raw = replace_trigger((section.prompts[item.prompt_index] if sample else item.prompt) or "", plan.trigger_word)
    _, flags = split_prompt_flags(raw)
    codes = departures_for(plan.family.name)
    applies: list[str] = []
    changes: dict = {}
    knobs: dict = {}
    options: list = []

    def on(code: str) -> bool:
        if code not in codes:
            return False
        applies.append(code)
        return code not in disabled

    if flags and on("server_no_flag_parsing"):
        changes["prompt"] = raw.strip()
        if sample is not None:
            w, h = max(64, sample.width // 8 * 8), max(64, sample.height // 8 * 8)
            neg = sample.neg if isinstance(sample.neg, str) else ""
            changes.update(width=w, height=h, num_inference_steps=sample.sample_steps,
                           guidance_scale=float(sample.guidance_scale), negative_prompt=neg,
                           network_multiplier=float(sample.network_multiplier))
    flag_parsing_off = "prompt" in changes
    if flag_parsing_off and sample is not None and sample.seed is not None:
        changes["seed"] = sample.seed  # a --seed flag is text now; the item's own seed is what the request carries
    seed_flagged = any(flag in ("seed", "d") for flag, _ in flags)
    has_own = (sample is not None and sample.seed is not None) or (seed_flagged and not flag_parsing_off)
    default_seed = 42 + item.prompt_index
    if not has_own and changes.get("seed", item.seed) != default_seed and on("server_seed_default"):
        changes["seed"] = default_seed
    width = changes.get("width", item.width)
    height = changes.get("height", item.height)
    if (width % 16 or height % 16) and on("server_size_floor16"):
        knobs["output_size"] = "generation"
    negative = changes.get("negative_prompt", item.negative_prompt) or ""
    guidance = changes.get("guidance_scale", item.guidance_scale)
    if negative == "" and guidance > 1 and on("server_empty_negative_once"):
        options.append(("empty_negative_template_passes", 1))
    if plan.model_flags.get("use_flux_cfg") and on("server_no_true_cfg"):
        options.append(("true_cfg", False))
    if plan.model_flags.get("attn_masking") and on("server_no_attn_masking"):
        options.append(("attn_masking", False))
    if item.weights != "base":
        if on("server_lora_fuse_fp16"):
            knobs["merge_mode"] = "server"
        if on("server_lora_peft_bf16"):
            knobs["merge_mode"] = "adapter"
        multiplier = changes.get("network_multiplier", item.network_multiplier)
        if multiplier != request_multiplier and on("server_single_multiplier"):
            changes["network_multiplier"] = request_multiplier
    if plan.quantize_te and on("server_no_te_quantization"):
        knobs["te_quantized"] = False
    if plan.quantize and on("server_no_quantization"):
        options.append(("transformer_quantized", False))
    on("server_jpeg_q95")
    if options:
        knobs["options"] = tuple(options)
    if "width" in changes or "height" in changes:
        changes["gen_width"], changes["gen_height"] = plan.generation_size(width, height)
    return ServerRequest(dataclasses.replace(item, **changes), Knobs(**knobs), applies)


def server_pixels(replayer: Replayer, request: ServerRequest, jpeg: bool = True) -> np.ndarray:
    """The server's output as a client decodes it (JPEG q95 unless that departure is turned off)."""
    pixels = replayer.replay(request.item, knobs=request.knobs).pixels
    if not jpeg:
        return pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=SERVER_JPEG_QUALITY)
    return np.array(Image.open(buffer).convert("RGB"))


def compare(preview: np.ndarray, output: np.ndarray) -> float:
    """SSIM of a server output against the preview; a smaller output is resized (bilinear) to compare."""
    if output.shape != preview.shape:
        output = np.array(Image.fromarray(output).resize((preview.shape[1], preview.shape[0]), Image.BILINEAR))
    return compute_metrics(preview, output)[0].ssim


def departure_causes(replayer: Replayer, plan: ReplayPlan, job: JobFolder, item: ReplayItem, preview_path,
                     thresholds: Thresholds) -> tuple[float, list[Cause]]:
    """Which of the server's behaviours break parity for ``item``: each applicable departure is rendered ALONE
    (everything else as in training) and kept when it changes the picture, with its measured effect.

    Returns the full server output's SSIM against the preview and the departures, worst first.
    """
    from parity.scores import encode_like, identify_encoding

    preview = load_rgb(preview_path)
    encoding = identify_encoding(preview_path)
    full = server_request(plan, job, item)
    ssim = compare(preview, server_pixels(replayer, full))
    codes = departures_for(plan.family.name)
    everything = frozenset(codes)
    training = replayer.replay(server_request(plan, job, item, disabled=everything).item).pixels
    training_ssim = compare(preview, encode_like(training, encoding))
    causes = []
    for code in codes:
        if code not in server_request(plan, job, item, disabled=everything - {code}).departures:
            continue  # does not apply to this preview on its own
        if code == "server_jpeg_q95":
            alone = server_pixels(replayer, server_request(plan, job, item, disabled=everything))
        else:
            request = server_request(plan, job, item, disabled=everything - {code})
            alone = server_pixels(replayer, request, jpeg=False)
            if alone.shape == preview.shape:
                alone = encode_like(alone, encoding)
            elif np.array_equal(alone, training):
                continue
        alone_ssim = compare(preview, alone)
        if alone.shape == training.shape and np.array_equal(alone, encode_like(training, encoding)):
            continue
        causes.append(catalogue.cause(
            code, severity="error" if alone_ssim < thresholds.drift_min_ssim else "warning",
            explanation=f"{catalogue.kind(code).explanation} Alone, it moves SSIM against the preview from "
                        f"{training_ssim:.3f} (training behaviour) to {alone_ssim:.3f}.",
            evidence={"ssim_training": round(training_ssim, 4), "ssim_with_departure": round(alone_ssim, 4)},
        ))
    causes.sort(key=lambda c: c.evidence["ssim_with_departure"])
    return ssim, causes
