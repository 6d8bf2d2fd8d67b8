"""The ``server`` profile: render a preview's request the way ai-toolkit-inference does (FACTS §6), and tell an
inference deployment which of its behaviours break parity with the training previews.

Each departure is a named rule of one family's catalogue (``Departure.families``; none: every family) with an
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

from parity.jobfolder import JobFolder
from parity.plan import ReplayItem, ReplayPlan, replace_trigger, split_prompt_flags
from parity.replay import Knobs, Replayer
from parity.results import Cause
from parity.scores import Thresholds, compute_metrics, load_rgb

SERVER_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Departure:
    code: str
    title: str
    explanation: str
    fix: str
    families: tuple[str, ...] = ()  # the model families whose server profile has it (pipelines.registry); () = all


OMNIGEN2, FLUX = ("omnigen2",), ("flux",)
DEPARTURES = {
    d.code: d
    for d in (
        Departure("server_size_floor16", "the server floors the size to 16 and returns the smaller image",
                  "ai-toolkit generates at the floor-16 size too but resizes the result back to the requested size.",
                  "Resize the output back to the requested size (bilinear), or use sizes that are multiples of 16.",
                  OMNIGEN2),
        Departure("server_empty_negative_once", "an empty negative prompt is chat-templated once, not twice",
                  "ai-toolkit-inference leaves an empty negative untemplated, so OmniGen2 templates it once; training "
                  "templated it twice. This changes the unconditional branch at the default settings.",
                  "Template the empty negative like any other (twice).", OMNIGEN2),
        Departure("server_no_flag_parsing", "prompt flags (--w --h --seed --cfg --steps --n --m) are sent as text",
                  "ai-toolkit parses '--' flags out of sample prompts; the server passes them to the text encoder and "
                  "ignores their values.",
                  "Parse the flags as ai-toolkit does and send their values as request fields."),
        Departure("server_seed_default", "the server seeds a prompt without its own seed with 42 + index",
                  "ai-toolkit used the section seed (walk_seed adds the index; an item's seed carries over).",
                  "Send every prompt's effective seed (parity plan shows it)."),
        Departure("server_lora_fuse_fp16", "the LoRA is fused in bf16 from the file's float16 weights",
                  "ai-toolkit merges the fp32 LoRA as an fp32 sum rounded once, or runs it unmerged.",
                  "Fuse as W = bf16(fp32(W) + m * fp32(B) @ fp32(A)), or run the LoRA unmerged.",
                  OMNIGEN2),
        Departure("server_single_multiplier", "one request-level LoRA multiplier replaces per-prompt multipliers",
                  "The request schema has no per-prompt multiplier; the preview used its prompt's own.",
                  "Send the prompt's network_multiplier (a per-request LoRA scale)."),
        Departure("server_no_te_quantization", "the server's text encoder is not quantised",
                  "The previews were encoded with a qfloat8-quantised Qwen2.5-VL (model.quantize_te).",
                  "Quantise the text encoder like training, or retrain the samples without quantize_te.",
                  OMNIGEN2),
        Departure("server_jpeg_q95", "the server saves JPEG quality 95, the previews Pillow's default 75",
                  "Compressing the same pixels differently changes the decoded image.",
                  "Compare lossless outputs, or save like ai-toolkit (Pillow defaults)."),
        # FLUX.1-dev (src/pipelines/flux_dev.py FluxDevPipeline); each comment names where it is read
        # base.py BasePipeline._load_lora: PipelineConfig's default SET_ADAPTERS, so load_lora_weights makes a PEFT
        # adapter that is never fused; PEFT casts A/B to the layer dtype and adds B(A(x)) * scale in it
        Departure("server_lora_peft_bf16", "the LoRA runs as an unfused PEFT adapter in bf16",
                  "ai-toolkit merged the LoRA as an fp32 sum rounded once to bf16, or ran it as an fp32 side branch "
                  "(hooks); the server's adapter rounds A and B to bf16 and computes B(A(x)) * multiplier in bf16.",
                  "Merge the LoRA as W = bf16(fp32(W) + m * fp32(B) @ fp32(A)), or run it unmerged in float32.",
                  FLUX),
        # flux_dev.py FluxDevPipeline._run_inference: no true_cfg_scale, so FluxPipeline's 1.0: guidance goes into
        # the guidance embedding and the negative prompt is dropped
        Departure("server_no_true_cfg", "the server never runs true CFG: guidance embedding only, negative unused",
                  "The previews were sampled with model.use_flux_cfg: ai-toolkit's FluxWithCFGPipeline bypassed the "
                  "guidance embedding and ran uncond + g * (cond - uncond) on the negative prompt.",
                  "Run inference with true CFG at the preview's scale and the guidance embedding bypassed.", FLUX),
        # flux_dev.py FluxDevPipeline._load_pipeline: plain FluxPipeline, whose _get_t5_prompt_embeds keeps T5's
        # padded positions
        Departure("server_no_attn_masking", "the server keeps T5's padded positions (no attn_masking)",
                  "The previews' T5 embeddings had their padded positions zeroed (model.attn_masking).",
                  "Zero T5's padded output positions in inference, as training did.", FLUX),
        # flux_dev.py FluxDevPipeline._load_pipeline: FluxPipeline.from_pretrained(torch_dtype=...) quantises nothing
        Departure("server_no_quantization", "the server's transformer is bf16, not quantised",
                  "The previews ran a qfloat8-quantised transformer (model.quantize) with the LoRA as an fp32 side "
                  "branch on it.",
                  "Quantise the transformer like training (optimum-quanto, model.qtype), or train without quantize.",
                  FLUX),
        Departure("server_no_t5_quantization", "the server's T5 text encoder is not quantised",
                  "The previews were encoded with a quantised T5 (model.quantize_te, with model.qtype).",
                  "Quantise T5 like training, or train with quantize_te: false.", FLUX),
    )
}


def departures_for(family: str) -> tuple[str, ...]:
    """The departure codes of ``family``'s server profile, in catalogue order."""
    return tuple(code for code, d in DEPARTURES.items() if not d.families or family in d.families)


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
    catalogue = departures_for(plan.family.name)
    applies: list[str] = []
    changes: dict = {}
    knobs: dict = {}
    options: list = []

    def on(code: str) -> bool:
        if code not in catalogue:
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
    if plan.quantize_te and on("server_no_t5_quantization"):
        knobs["te_quantized"] = False
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
    catalogue = departures_for(plan.family.name)
    everything = frozenset(catalogue)
    training = replayer.replay(server_request(plan, job, item, disabled=everything).item).pixels
    training_ssim = compare(preview, encode_like(training, encoding))
    causes = []
    for code in catalogue:
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
        d = DEPARTURES[code]
        severity = "error" if alone_ssim < thresholds.drift_min_ssim else "warning"
        causes.append(Cause(
            code, severity, d.title,
            f"{d.explanation} Alone, it moves SSIM against the preview from {training_ssim:.3f} (training "
            f"behaviour) to {alone_ssim:.3f}.",
            d.fix, {"ssim_training": round(training_ssim, 4), "ssim_with_departure": round(alone_ssim, 4)},
        ))
    causes.sort(key=lambda c: c.evidence["ssim_with_departure"])
    return ssim, causes
