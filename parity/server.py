"""The ``server`` profile: render a preview's request the way ai-toolkit-inference does (FACTS §6), and tell an
inference deployment which of its behaviours break parity with the training previews.

Each departure is a named rule with an applicability test and a way to turn it off. ``server_replay`` renders
the request with every applicable departure; ``departure_causes`` turns each one off in turn and reports those
that change the picture, with the measured effect as evidence.
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


DEPARTURES = {
    d.code: d
    for d in (
        Departure("server_size_floor16", "the server floors the size to 16 and returns the smaller image",
                  "ai-toolkit generates at the floor-16 size too but resizes the result back to the requested size.",
                  "Resize the output back to the requested size (bilinear), or use sizes that are multiples of 16."),
        Departure("server_empty_negative_once", "an empty negative prompt is chat-templated once, not twice",
                  "ai-toolkit-inference leaves an empty negative untemplated, so OmniGen2 templates it once; training "
                  "templated it twice. This changes the unconditional branch at the default settings.",
                  "Template the empty negative like any other (twice)."),
        Departure("server_no_flag_parsing", "prompt flags (--w --h --seed --cfg --steps --n --m) are sent as text",
                  "ai-toolkit parses '--' flags out of sample prompts; the server passes them to the text encoder and "
                  "ignores their values.",
                  "Parse the flags as ai-toolkit does and send their values as request fields."),
        Departure("server_seed_default", "the server seeds a prompt without its own seed with 42 + index",
                  "ai-toolkit used the section seed (walk_seed adds the index; an item's seed carries over).",
                  "Send every prompt's effective seed (parity plan shows it)."),
        Departure("server_lora_fuse_fp16", "the LoRA is fused in bf16 from the file's float16 weights",
                  "ai-toolkit merges the fp32 LoRA as an fp32 sum rounded once, or runs it unmerged.",
                  "Fuse as W = bf16(fp32(W) + m * fp32(B) @ fp32(A)), or run the LoRA unmerged."),
        Departure("server_single_multiplier", "one request-level LoRA multiplier replaces per-prompt multipliers",
                  "The request schema has no per-prompt multiplier; the preview used its prompt's own.",
                  "Send the prompt's network_multiplier (a per-request LoRA scale)."),
        Departure("server_no_te_quantization", "the server's text encoder is not quantised",
                  "The previews were encoded with a qfloat8-quantised Qwen2.5-VL (model.quantize_te).",
                  "Quantise the text encoder like training, or retrain the samples without quantize_te."),
        Departure("server_jpeg_q95", "the server saves JPEG quality 95, the previews Pillow's default 75",
                  "Compressing the same pixels differently changes the decoded image.",
                  "Compare lossless outputs, or save like ai-toolkit (Pillow defaults)."),
    )
}


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
    applies: list[str] = []
    changes: dict = {}
    knobs: dict = {}

    def on(code: str) -> bool:
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
        knobs["options"] = (("empty_negative_template_passes", 1),)
    if item.weights != "base":
        if on("server_lora_fuse_fp16"):
            knobs["merge_mode"] = "server"
        multiplier = changes.get("network_multiplier", item.network_multiplier)
        if multiplier != request_multiplier and on("server_single_multiplier"):
            changes["network_multiplier"] = request_multiplier
    if plan.quantize_te and on("server_no_te_quantization"):
        knobs["te_quantized"] = False
    on("server_jpeg_q95")
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
    everything = frozenset(DEPARTURES)
    training = replayer.replay(server_request(plan, job, item, disabled=everything).item).pixels
    training_ssim = compare(preview, encode_like(training, encoding))
    causes = []
    for code in DEPARTURES:
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
