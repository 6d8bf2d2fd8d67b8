"""Causes of a preview/inference mismatch that can be read from the settings alone (no replay needed).

Each rule returns a :class:`Cause` with a one-line title, an explanation, a fix and the evidence it read.
Deeper diagnosis (knob bisection) builds on these.
"""

from __future__ import annotations

from parity.plan import ReplayItem, ReplayPlan
from parity.results import Cause


def item_causes(plan: ReplayPlan, item: ReplayItem) -> list[Cause]:
    """Every settings-readable cause that applies to ``item``."""
    causes = []
    w, h = item.width, item.height
    if w and h and (w % 16 or h % 16):
        causes.append(Cause(
            "size_not_multiple_of_16", "info",
            f"{w}x{h} is not a multiple of 16: the preview was generated at {item.gen_width}x{item.gen_height}",
            "OmniGen2 generates at a size floored to 16 and ai-toolkit resizes the result back (bilinear); "
            "inference servers that floor to 16 return the smaller image instead.",
            "Use sizes that are multiples of 16 in training samples, or resize inference output the same way.",
            {"requested": [w, h], "generated": [item.gen_width, item.gen_height]},
        ))
    if w and h and w * h > 1024 * 1024:
        causes.append(Cause(
            "above_1mp", "info",
            f"{w}x{h} is above 1 MP: the preview was generated at {item.gen_width}x{item.gen_height} and upscaled",
            "OmniGen2 caps the generated area at 1024*1024 pixels; the preview is an upscaled smaller image.",
            "Compare at the generated size, or keep sample sizes at or below 1 MP.",
            {"requested": [w, h], "generated": [item.gen_width, item.gen_height]},
        ))
    if item.seed is None:
        causes.append(Cause(
            "seed_random", "warning", "seed -1: the preview used a random seed that was never recorded",
            "ai-toolkit draws a random seed for seed: -1 and does not save it, so the preview cannot be replayed.",
            "Set a fixed seed in the sample section (walk_seed keeps prompts distinct).",
            {"seed": -1},
        ))
    if not item.replayable and "deleted" in item.reason:
        causes.append(Cause(
            "checkpoint_deleted", "warning", f"the checkpoint for step {item.step} was deleted",
            "ai-toolkit keeps only save.max_step_saves_to_keep checkpoints; older ones are removed, so this "
            "preview's weights are gone. Comparing it with another checkpoint would be a different model.",
            "Raise save.max_step_saves_to_keep (0 keeps all) or compare against the final LoRA's previews.",
            {"step": item.step},
        ))
    if plan.quantize_te:
        causes.append(Cause(
            "quantized_text_encoder", "warning",
            f"the previews used a {plan.qtype_te}-quantised text encoder",
            "model.quantize_te quantises Qwen2.5-VL during training and the previews were encoded with it; an "
            "inference pipeline with a bf16 text encoder conditions on different embeddings.",
            "Quantise the text encoder the same way at inference, or set quantize_te: false for training samples.",
            {"quantize_te": True, "qtype_te": plan.qtype_te},
        ))
    if plan.quantize and item.weights != "base":
        causes.append(Cause(
            "quantized_base", "warning", f"the transformer was {plan.qtype}-quantised: the LoRA ran unmerged",
            "With model.quantize ai-toolkit runs the LoRA as a side branch on a quantised base; a bf16 inference "
            "base with a merged LoRA gives different pixels.",
            "Replay or serve with the same quantisation, or train unquantised.",
            {"quantize": True, "qtype": plan.qtype},
        ))
    if item.weights != "base" and plan.save_dtype in ("float16", "fp16", "bfloat16", "bf16"):
        causes.append(Cause(
            "lora_saved_fp16", "info", f"the checkpoint is the LoRA rounded to {plan.save_dtype}",
            "Previews used the fp32 LoRA held in memory; the saved file is rounded, which moves pixels by a few "
            "levels (the oracle: max 13, mean ~0.9 of 255).",
            "Expected and small; set save.dtype: float32 for bit-exact checkpoints.",
            {"save_dtype": plan.save_dtype},
        ))
    if item.lora_merged and item.weights != "base" and item.network_multiplier is not None and item.network_multiplier < 0:
        causes.append(Cause(
            "negative_multiplier_merged", "warning",
            f"multiplier {item.network_multiplier:g} was merged and never merged out",
            "ai-toolkit merges out with -|m|, so a negative multiplier is added twice and stays in the base weights "
            "of every later round.",
            "Avoid negative network_multiplier in sample prompts when all prompts of a round share it.",
            {"network_multiplier": item.network_multiplier},
        ))
    return causes


def lora_keys_cause(problem: str, checkpoint: str | None) -> Cause:
    """LoRA keys that match no OmniGen2 layer (or no layer at all)."""
    severity = "error" if "0 layers" in problem else "warning"
    return Cause(
        "lora_keys_unmatched", severity, f"LoRA keys that match nothing in {checkpoint or 'the LoRA'}",
        "Keys that match no transformer layer are not applied; inference tools drop them silently.",
        "Check the key prefix (diffusion_model. / transformer.) and the module names against the model.",
        {"problem": problem, "file": checkpoint},
    )

