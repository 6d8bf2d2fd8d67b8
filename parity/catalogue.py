"""Every cause parity can name, in one catalogue: what it is, how bad it usually is, why it matters and what to do.

Lint rules (``parity.lint``), the server profile's departures (``parity.server``), diagnosis experiments
(``parity.diagnose``) and the replay outcomes ``parity check`` reads (a residual the files predict, the noise floor,
the LoRA's effect) all draw their causes from here, by code: each of those modules holds only its mechanism (when a
cause applies, how it is measured) and the one-line finding of the case at hand. One phenomenon has one code,
whichever way it is found: ``server_no_flag_parsing`` is read from the settings by ``parity lint`` and measured by
rendering under ``--pipeline server``.

A kind's ``title`` is the line a cause found by experiment shows (``str.format`` fields from the experiment);
``suspects`` names the diagnosis experiments a lint finding makes likelier, so that diagnosis tries them first.
``parity causes`` lists the catalogue; ``parity causes CODE`` explains one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from parity.results import SEVERITIES, Cause


@dataclass(frozen=True)
class Kind:
    """One known cause of a preview/inference mismatch."""

    code: str  # stable identifier: JSON, JUnit, annotations and the report show it
    severity: str  # info, warning or error; a finding may say otherwise (e.g. an error once proven)
    explanation: str
    fix: str
    title: str = ""  # the line of a cause found by experiment, with str.format fields
    families: tuple[str, ...] = ()  # the model families it concerns (pipelines/registry.py names); () = all
    suspects: tuple[str, ...] = ()  # diagnosis experiments (kind codes) to try first when a finding of this kind holds

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"cause {self.code}: severity must be one of {SEVERITIES}, got {self.severity!r}")

    def concerns(self, family: str) -> bool:
        return not self.families or family in self.families


def kind(code: str) -> Kind:
    """The catalogue's entry for ``code``; a code that is not in it is a programming error."""
    try:
        return CATALOGUE[code]
    except KeyError:
        raise ValueError(f"cause code {code!r} is not in parity's catalogue (parity/catalogue.py)") from None


def cause(code: str, title: str | None = None, *, severity: str | None = None, explanation: str | None = None,
          fix: str | None = None, evidence: dict[str, Any] | None = None, **fields: Any) -> Cause:
    """A :class:`Cause` of kind ``code``: ``title`` (else the kind's title filled with ``fields``), the kind's
    severity, explanation and fix unless given (the kind's fix may use ``fields`` too), and its evidence."""
    k = kind(code)
    return Cause(code, severity or k.severity, title if title is not None else k.title.format(**fields),
                 explanation if explanation is not None else k.explanation,
                 fix if fix is not None else k.fix.format(**fields) if fields else k.fix, dict(evidence or {}))


def summary_title(code: str, titles: list[str]) -> str:
    """One line for every finding of ``code`` in a run: their title when they share it; else the kind's title
    with its fields left open ("the LoRA's effect at step …"), or the first finding's and how many others."""
    distinct = list(dict.fromkeys(titles))
    if len(distinct) <= 1:
        return distinct[0] if distinct else ""
    template = CATALOGUE[code].title if code in CATALOGUE else ""
    if template:
        import string

        return "".join(text + ("…" if field is not None else "")
                       for text, field, _, _ in string.Formatter().parse(template))
    return f"{distinct[0]} (and {len(distinct) - 1} other finding(s) of this kind)"


def suspects_of(codes) -> dict[str, str]:
    """The diagnosis experiments that findings of ``codes`` point to, each with the first code that points to it,
    in the order found."""
    found: dict[str, str] = {}
    for code in codes:
        for experiment in CATALOGUE[code].suspects if code in CATALOGUE else ():
            found.setdefault(experiment, code)
    return found


def found_by(code: str) -> tuple[str, ...]:
    """How parity finds causes of ``code``: ``lint`` (read from the settings and files; ``check`` too where parity
    check reports it per preview), ``server`` (rendered by --pipeline server), ``diagnosis`` (an experiment) or
    ``check`` (read from the replays)."""
    from parity import check, diagnose, lint, server

    rule = next((r for r in lint.RULES if r.code == code), None)
    ways = (["lint"] + (["check"] if rule.in_check else [])) if rule else []
    ways += ["server"] if code in server.DEPARTURES else []
    ways += ["diagnosis"] if code in diagnose.experiment_codes() else []
    ways += ["check"] if code in check.OUTCOMES and "check" not in ways else []
    return tuple(ways)


# Section order: settings and files (lint), FLUX.1, LoRA files, the inference server, diagnosis experiments (their
# title's {fields} are what the experiment changed), what check reads from the replays.
KINDS: tuple[Kind, ...] = (
    Kind(
        "size_not_multiple_of_16", "info",
        explanation="OmniGen2 generates at a size floored to 16 and ai-toolkit resizes the result back (bilinear); "
                    "inference servers that floor to 16 return the smaller image instead.",
        fix="Use sizes that are multiples of 16 in training samples, or resize inference output the same way.",
        families=("omnigen2",),
    ),
    Kind(
        "above_1mp", "info",
        explanation="OmniGen2 caps the generated area at 1024*1024 pixels; the preview is an upscaled smaller image.",
        fix="Compare at the generated size, or keep sample sizes at or below 1 MP.",
        families=("omnigen2",),
    ),
    Kind(
        "seed_random", "warning",
        explanation="For seed: -1 ai-toolkit draws the seed with Python's random.randint(0, 2**32 - 1) and does not "
                    "save it. Python's random is seeded with the process's training_seed when training starts, so "
                    "with training_seed set the drawn seed is a value of a known stream at an unknown offset: parity "
                    "check recovers it by replaying the candidates (--seed-search words). Without training_seed (a "
                    "job-level config.training_seed seeds nothing; the SEED environment variable is not recorded) it "
                    "cannot be recovered, and an inference run cannot draw the same seed either.",
        fix="Fix a seed in the sample section for previews you want to compare (walk_seed keeps prompts distinct); "
            "keep training_seed set so that drawn seeds stay recoverable.",
    ),
    Kind(
        "checkpoint_deleted", "warning",
        explanation="ai-toolkit keeps only save.max_step_saves_to_keep checkpoints; older ones are removed, so this "
                    "preview's weights are gone. Comparing it with another checkpoint would be a different model.",
        fix="Raise save.max_step_saves_to_keep (0 keeps all) or compare against the final LoRA's previews.",
    ),
    Kind(
        "quantized_text_encoder", "warning",
        explanation="model.quantize_te quantises Qwen2.5-VL during training and the previews were encoded with it; "
                    "an inference pipeline with a bf16 text encoder (ai-toolkit-inference never quantises it) "
                    "conditions on different embeddings.",
        fix="Quantise the text encoder the same way at inference, or set quantize_te: false for training samples.",
        suspects=("te_quantization_mismatch",),
    ),
    Kind(
        "quantized_base", "warning",
        explanation="With model.quantize ai-toolkit runs the LoRA as a side branch on a quantised base; a bf16 "
                    "inference base with a merged LoRA gives different pixels.",
        fix="Replay or serve with the same quantisation, or train unquantised.",
    ),
    Kind(
        "lora_saved_fp16", "info",
        explanation="Previews used the fp32 LoRA held in memory; the saved file is rounded, which moves pixels by a "
                    "few levels (the oracle: max 13, mean ~0.9 of 255).",
        fix="Expected and small; set save.dtype: float32 for bit-exact checkpoints.",
    ),
    Kind(
        "negative_multiplier_merged", "warning",
        explanation="ai-toolkit merges out with -|m|, so a negative multiplier is added twice and stays in the base "
                    "weights of every later round.",
        fix="Avoid negative network_multiplier in sample prompts when all prompts of a round share it.",
        suspects=("multiplier_changed",),
    ),
    Kind(
        "checkpoint_never_saved", "warning",
        explanation="ai-toolkit saves a checkpoint every save.save_every steps only; a sampling step between saves "
                    "has previews but no weights on disk.",
        fix="Make save_every a divisor of sample_every, or compare only the steps that have a checkpoint.",
    ),
    Kind(
        "checkpoint_wrong_step", "error",
        explanation="The checkpoint's training_info.step differs from the step in its file name: the file was "
                    "swapped or renamed, so it is not the weights that made this preview.",
        fix="Put the right checkpoint back (its metadata names its step), or compare the preview of the step it "
            "holds.",
        suspects=("checkpoint_mismatch",),
    ),
    Kind(
        "final_checkpoint_missing", "warning",
        explanation="The last round is labelled train.steps and was made with the weights ai-toolkit saves as "
                    "<name>.safetensors; without that file the round cannot be replayed.",
        fix="Copy the final LoRA <name>.safetensors back into the job folder.",
    ),
    Kind(
        "step_not_sampled", "warning",
        explanation="The preview's step is not one this config samples at: a UI 'sample now' round (labelled one "
                    "step after its weights) or a config edited since training. Its weights cannot be named.",
        fix="Use the config the job ran with, or leave such previews out of the comparison.",
    ),
    Kind(
        "final_round_uses_final_file", "info",
        explanation="The last round is labelled train.steps and pairs with <name>.safetensors; "
                    "<name>_<steps:09d>.safetensors is normally never written. Comparing the last previews with an "
                    "intermediate checkpoint compares different weights.",
        fix="Compare the last round's previews with the final LoRA file.",
    ),
    Kind(
        "merge_drift", "info",
        explanation="Every merged round merges the LoRA into bf16 base weights and merges it out again; the two "
                    "roundings leave some base weights a bf16 step off, and later rounds run on that drifted base "
                    "(the oracle: max 13 of 255).",
        fix="Expected and small; parity replays the earlier rounds' drift. Inference on a pristine base cannot "
            "reproduce it: judge these rounds with the PASS threshold, not EXACT.",
    ),
    Kind(
        "layer_offloading", "warning",
        explanation="With model.layer_offloading ai-toolkit does not merge the LoRA (it runs as a side branch) and "
                    "stores quantised layers as float8; a merged bf16 inference gives different last bits.",
        fix="Replay with the LoRA unmerged, or train without layer_offloading for exact previews.",
    ),
    Kind(
        "preview_dtype_not_bf16", "warning",
        explanation="Previews run the transformer, MLLM and VAE in train.dtype and draw the initial noise in it; "
                    "inference servers run bf16, so the same seed gives other noise and other pixels.",
        fix="Train with dtype: bf16, or run inference in the job's dtype.",
    ),
    Kind(
        "ema_previews", "info",
        explanation="With train.ema_config.use_ema ai-toolkit samples previews with the EMA weights (and saves "
                    "them); the raw trained weights never made a preview.",
        fix="Compare with the saved (EMA) checkpoints, not with weights taken from the optimizer state.",
    ),
    Kind(
        "multipliers_differ_in_round", "info",
        explanation="ai-toolkit merges the LoRA only when every prompt of a round has the same network_multiplier; "
                    "otherwise it runs unmerged (a float32 side branch added in bf16), a different code path from "
                    "merged rounds and from inference that fuses the LoRA.",
        fix="Replay unmerged (parity does); give all sample prompts one multiplier for merged previews.",
        suspects=("multiplier_changed",),
    ),
    Kind(
        "seed_carried_over", "info",
        explanation="With walk_seed off, a sample item's own seed: wins for that prompt AND carries over to every "
                    "following prompt without one; inference that uses the section seed (or 42 + i) draws other "
                    "noise.",
        fix="Give each sample its own seed, or send the carried seed to inference.",
        suspects=("seed_changed", "walk_seed_changed"),
    ),
    Kind(
        "walk_seed_random_start", "warning",
        explanation="With walk_seed and seed: -1, prompt 0 is random (and unrecorded) while prompt i >= 1 gets the "
                    "fixed seed -1 + i: the round is neither random nor walked from a chosen seed.",
        fix="Set a fixed section seed with walk_seed.",
        suspects=("walk_seed_changed", "seed_changed"),
    ),
    Kind(
        "negative_not_text", "error",
        explanation="sample.neg defaults to the boolean False (and `neg:` is None); that reaches OmniGen2's chat "
                    "template and crashes sampling, so an omnigen2 job with it has no previews at all: these "
                    "previews came from another config.",
        fix="Set neg: '' (or a negative prompt) in the sample section.",
        suspects=("negative_changed",),
    ),
    Kind(
        "prompt_not_in_config", "error",
        explanation="The preview's prompt index is beyond the config's prompts: the config was edited after "
                    "training, so the prompt and settings of this preview are unknown.",
        fix="Use the config.yaml the job was trained with.",
    ),
    Kind(
        "trigger_left_literal", "warning",
        explanation="ai-toolkit replaces [trigger] only when trigger_word is set; without it the text '[trigger]' "
                    "went to the model as is. A server that substitutes the trigger conditions on other text.",
        fix="Set trigger_word, or send the prompt with the literal '[trigger]'.",
        suspects=("trigger_word_changed",),
    ),
    Kind(
        "trigger_word_absent", "info",
        explanation="ai-toolkit never adds the trigger word: a prompt without it (or [trigger]) sampled the LoRA "
                    "unprompted. Inference that prepends the trigger word conditions on other text.",
        fix="Send the prompt exactly as the preview had it; add [trigger] to sample prompts that should use it.",
        suspects=("trigger_word_changed",),
    ),
    Kind(
        "unknown_flags_dropped", "warning",
        explanation="ai-toolkit splits prompts on '--' and silently drops flags it does not know (and a literal '--' "
                    "truncates the prompt): the preview ignored them.",
        fix="Remove or fix the flags (known: n w h d/seed l/cfg s/steps m/network_multiplier gr ctrl_img ctrl_idx "
            "frames fps).",
    ),
    Kind(
        "flag_quotes_kept", "info",
        explanation="ai-toolkit does not strip quotes from flag values: `--n \"blurry\"` gives the negative prompt "
                    "\"blurry\" with its quote marks, and the preview was conditioned on that text.",
        fix="Send the value with its quotes to reproduce the preview; drop the quotes in the config for what was "
            "meant.",
        suspects=("negative_changed",),
    ),
    Kind(
        "size_floored_to_8", "info",
        explanation="ai-toolkit floors every sample size to a multiple of 8 with a 64 minimum before generating: the "
                    "preview is smaller (or larger) than the config asked for.",
        fix="Ask inference for the floored size shown here.",
        suspects=("size_changed",),
    ),
    Kind(
        "ctrl_img_numbered_ignored", "warning",
        explanation="ai-toolkit's omnigen2 sampling reads only ctrl_img (a sample with only ctrl_img_1 is plain "
                    "text-to-image); ai-toolkit-inference prefers ctrl_img_1..3 and passes them all.",
        fix="Put the reference image in ctrl_img; send inference the image the preview used.",
        families=("omnigen2",),
    ),
    Kind(
        "reference_image_missing", "warning",
        explanation="The preview was conditioned on a reference image that is not on this machine; without it the "
                    "preview cannot be replayed.",
        fix="Pass --assets DIR with the reference images (found by file name).",
        families=("omnigen2",),
    ),
    Kind(
        "ctrl_img_resized", "warning",
        explanation="ai-toolkit resizes the reference image (bilinear) to exactly the sample's width x height before "
                    "OmniGen2's processor; inference that passes the original image encodes another picture.",
        fix="Resize the reference image to the sample size (bilinear) before sending it, or store it at that size.",
        families=("omnigen2",),
    ),
    Kind(
        "preview_unreadable", "error",
        explanation="The preview file cannot be decoded: it was truncated or is not an image.",
        fix="Restore the preview file from the training machine.",
    ),
    Kind(
        "preview_size_mismatch", "error",
        explanation="The preview's pixel size differs from what the config gives for it: the config was edited after "
                    "training or the preview was resized since.",
        fix="Use the config and previews exactly as ai-toolkit wrote them.",
        suspects=("size_changed",),
    ),
    Kind(
        "preview_reencoded", "warning",
        explanation="ai-toolkit saves JPEG previews with Pillow's defaults (quality 75, 4:2:0); another quality "
                    "means the file was re-saved, and its pixels are no longer ai-toolkit's.",
        fix="Use the previews as ai-toolkit wrote them; parity encodes replays the way the file says, but a re-save "
            "adds a second loss.",
    ),
    Kind(
        "preview_barely_changes", "warning",
        explanation="A prompt's last preview is almost the first one (SSIM > 0.98): the LoRA hardly changed the "
                    "output during training. That is a training problem (learning rate, steps, captions, trigger "
                    "word), not an inference mismatch.",
        fix="Check the training (lr, steps, dataset captions, trigger word) before debugging inference.",
    ),
    Kind(
        "flux_size_floored_to_16", "info",
        explanation="FLUX.1's pipeline floors each side to a multiple of 16 and ai-toolkit saves the image as "
                    "generated, not resized back: the preview is smaller than the sample size. An inference tool "
                    "that keeps the requested size (or pads) renders another picture.",
        fix="Use sample sizes that are multiples of 16, or ask inference for the floor-16 size the preview has.",
        families=("flux",),
    ),
    Kind(
        "flux_negative_unused", "warning",
        explanation="ai-toolkit samples FLUX.1 with the plain FluxPipeline: guidance goes only into the guidance "
                    "embedding and the negative prompt is encoded but never used (no true CFG). Inference that "
                    "applies this negative with true CFG (ComfyUI's CFG > 1, diffusers' true_cfg_scale) renders "
                    "another picture.",
        fix="Drop the negative prompt in inference (or train with model.use_flux_cfg: true if you want it used).",
        families=("flux",),
        suspects=("flux_true_cfg_on",),
    ),
    Kind(
        "flux_guidance_embedding", "info",
        explanation="FLUX.1-dev is guidance-distilled: guidance_scale is a value fed to the guidance embedding "
                    "(about 3.5 is typical), not a classifier-free guidance scale. Inference that treats it as CFG "
                    "(two passes, uncond + g * (cond - uncond)) renders another picture.",
        fix="Pass the same value as the distilled guidance (diffusers: guidance_scale; ComfyUI: FluxGuidance) with "
            "CFG 1.",
        families=("flux",),
    ),
    Kind(
        "flux_true_cfg", "warning",
        explanation="model.use_flux_cfg: ai-toolkit sampled with true CFG: the guidance embedding bypassed and, when "
                    "guidance > 1, a second pass on the negative prompt, uncond + g * (cond - uncond). The plain "
                    "FluxPipeline (and most FLUX.1 inference) does neither.",
        fix="Run inference with true CFG at the same scale and the guidance embedding bypassed (as training did), or "
            "retrain without use_flux_cfg.",
        families=("flux",),
    ),
    Kind(
        "flux_attn_masking", "info",
        explanation="model.attn_masking (with is_flux: true): the T5 embeddings' padded positions were zeroed before "
                    "the transformer. Inference that feeds the padded embeddings as they come renders a slightly "
                    "different picture.",
        fix="Zero T5's padded positions in inference too, or train without attn_masking.",
        families=("flux",),
    ),
    Kind(
        "flux_quantized_lora_hooks", "warning",
        explanation="A quantised FLUX.1 transformer (model.quantize) cannot take a merged LoRA: ai-toolkit ran it as "
                    "an unmerged float32 side branch on qfloat8 weights. Inference that fuses the LoRA into "
                    "quantised (or bf16) weights rounds the LoRA's small deltas away, so its effect shrinks or "
                    "vanishes.",
        fix="Keep the LoRA unmerged in inference on a quantised model, or fuse it into full-precision weights before "
            "quantising.",
        families=("flux",),
    ),
    Kind(
        "lora_keys_unmatched", "error",
        explanation="Keys that match no transformer layer are not applied; inference tools drop them silently.",
        fix="Check the key prefix (diffusion_model. / transformer.) and the module names against the model.",
    ),
    Kind(
        "checkpoint_unreadable", "error",
        explanation="The checkpoint's tensors cannot be read (truncated or corrupt file), so the preview cannot be "
                    "replayed.",
        fix="Copy the checkpoint again from the training machine.",
    ),
    Kind(
        "lora_untrained", "warning",
        explanation="Every lora_B (up) matrix of the checkpoint is zero, as at initialisation: the LoRA changes "
                    "nothing, so the preview is the base model. A training problem, not an inference mismatch.",
        fix="Check the learning rate and that training ran; compare against the base model.",
    ),
    Kind(
        "lora_nonfinite", "error",
        explanation="The checkpoint holds NaN or infinite values. Merged or added, one of them makes every weight it "
                    "touches, then the whole image, NaN: the preview and any replay come out black or as noise, and "
                    "no setting explains the difference. Training diverged (learning rate too high, fp16 overflow) "
                    "or the file is corrupt.",
        fix="Use an earlier checkpoint, lower the learning rate or train in bf16/fp32; `parity lora FILE` lists the "
            "tensors.",
    ),
    # ---- where ai-toolkit-inference departs from the previews (FACTS §6; FLUX.1: src/pipelines/flux_dev.py, base.py).
    # parity lint reads them from the settings (informational); --pipeline server renders each one alone.
    Kind(
        "server_size_floor16", "info",
        title="the server floors the size to 16 and returns the smaller image",
        explanation="OmniGen2 generates at the floor-16 size in training too, but ai-toolkit resizes the result back "
                    "to the requested size (bilinear); ai-toolkit-inference returns the smaller image.",
        fix="Resize the server's output back to the requested size (bilinear), or use sizes that are multiples of "
            "16.",
        families=("omnigen2",),
    ),
    Kind(
        "server_empty_negative_once", "info",
        title="an empty negative prompt is chat-templated once, not twice",
        explanation="Training templates the empty negative prompt with OmniGen2's chat template twice; "
                    "ai-toolkit-inference leaves an empty negative untemplated, so the pipeline templates it once: "
                    "the unconditional branch differs at the default settings.",
        fix="Template the empty negative twice at inference, like any other negative.",
        families=("omnigen2",),
    ),
    Kind(
        "server_no_flag_parsing", "info",
        title="prompt flags (--w --h --seed --cfg --steps --n --m) are sent as text",
        explanation="ai-toolkit parses '--' flags out of sample prompts; ai-toolkit-inference does not: "
                    "'--w 96 --seed 7 ...' reaches the text encoder as prompt text and the settings they set in "
                    "training are lost.",
        fix="Strip the flags from the prompt and send their values as request fields.",
    ),
    Kind(
        "server_seed_default", "info",
        title="the server seeds a prompt without its own seed with 42 + index",
        explanation="ai-toolkit-inference seeds prompt i with 42 + i when the request has no seed; the previews used "
                    "the section seed (walk_seed adds the index; an item's seed carries over).",
        fix="Send every prompt's effective seed with its request (parity plan lists them).",
    ),
    Kind(
        "server_defaults_differ", "info",
        explanation="A request that leaves settings out gets ai-toolkit-inference's defaults (25 steps, cfg 4, "
                    "1024x1024), not the sample section's.",
        fix="Send steps, guidance scale, width and height with every request.",
    ),
    Kind(
        "server_lora_fuse_fp16", "info",
        title="the LoRA is fused in bf16 from the file's float16 weights",
        explanation="ai-toolkit merges the fp32 LoRA as an fp32 sum rounded once, or runs it unmerged; the server "
                    "fuses the file's float16 weights in bf16.",
        fix="Fuse as W = bf16(fp32(W) + m * fp32(B) @ fp32(A)), or run the LoRA unmerged.",
        families=("omnigen2",),
    ),
    Kind(
        "server_single_multiplier", "info",
        title="one request-level LoRA multiplier replaces per-prompt multipliers",
        explanation="ai-toolkit-inference's request has one LoRA multiplier; the previews used each prompt's own "
                    "network_multiplier, which a request cannot express.",
        fix="Send one request per multiplier with loras[0].network_multiplier set to it.",
    ),
    Kind(
        "server_no_te_quantization", "info",
        title="the server's text encoder is not quantised",
        explanation="The previews were encoded with a quantised text encoder (model.quantize_te: OmniGen2's "
                    "Qwen2.5-VL with qtype_te, FLUX.1's T5 with model.qtype); ai-toolkit-inference's is bf16 and "
                    "conditions on other embeddings.",
        fix="Quantise the text encoder like training, or train with quantize_te: false.",
    ),
    Kind(
        "server_jpeg_q95", "info",
        title="the server saves JPEG quality 95, the previews Pillow's default 75",
        explanation="Previews are JPEG at Pillow's default quality 75 (4:2:0); ai-toolkit-inference returns JPEG "
                    "quality 95. Two different losses cap the agreement even for identical pixels.",
        fix="Compare lossless outputs, or encode both the same way (parity encodes replays like the preview).",
    ),
    Kind(
        "server_lora_peft_bf16", "info",
        title="the LoRA runs as an unfused PEFT adapter in bf16",
        explanation="ai-toolkit-inference loads a FLUX.1 LoRA with diffusers' load_lora_weights as a PEFT adapter "
                    "that it never fuses (base.py _load_lora): A and B rounded to bf16, B(A(x)) * multiplier "
                    "computed in bf16. The previews merged it as an fp32 sum rounded once to bf16, or ran it as an "
                    "fp32 side branch (hooks): the last bits differ.",
        fix="Merge the LoRA as W = bf16(fp32(W) + m * fp32(B) @ fp32(A)), or run it unmerged in float32; "
            "--pipeline server measures the effect (usually SSIM > 0.98).",
        families=("flux",),
    ),
    Kind(
        "server_no_true_cfg", "info",
        title="the server never runs true CFG: guidance embedding only, negative unused",
        explanation="ai-toolkit-inference calls FluxPipeline without true_cfg_scale (flux_dev.py _run_inference): "
                    "guidance goes into the guidance embedding and the negative prompt is dropped. The previews were "
                    "sampled with model.use_flux_cfg: ai-toolkit's FluxWithCFGPipeline bypassed the guidance "
                    "embedding and ran uncond + g * (cond - uncond) on the negative prompt.",
        fix="No request field turns true CFG on: run inference with true CFG at the preview's scale and the guidance "
            "embedding bypassed, or retrain without use_flux_cfg.",
        families=("flux",),
    ),
    Kind(
        "server_no_attn_masking", "info",
        title="the server keeps T5's padded positions (no attn_masking)",
        explanation="ai-toolkit-inference's FluxPipeline feeds T5's padded positions as they come; the previews' T5 "
                    "embeddings had them zeroed (model.attn_masking).",
        fix="Zero T5's padded output positions in inference, as training did, or retrain without attn_masking.",
        families=("flux",),
    ),
    Kind(
        "server_no_quantization", "info",
        title="the server's transformer is bf16, not quantised",
        explanation="ai-toolkit-inference loads FLUX.1-dev with FluxPipeline.from_pretrained in bf16 and quantises "
                    "nothing (flux_dev.py _load_pipeline); the previews ran a quantised transformer (model.quantize) "
                    "with the LoRA as an fp32 side branch on it.",
        fix="Quantise the transformer like training (optimum-quanto, model.qtype), or train without quantize.",
        families=("flux",),
    ),
    Kind(
        "server_base_model", "info",
        explanation="ai-toolkit-inference's flux model always loads black-forest-labs/FLUX.1-dev (flux_dev.py "
                    "CONFIG.base_model); a LoRA trained on another FLUX.1 (schnell, a fine-tune, Flex.1) runs there "
                    "on other base weights.",
        fix="Train on FLUX.1-dev, or serve the LoRA with the base model it was trained on.",
        families=("flux",),
    ),
    # ---- diagnosis experiments (parity.diagnose): a setting the preview was made with, shown by replaying with it
    Kind(
        "size_changed", "error",
        title="the config's size {config} is not the preview's {preview}",
        explanation="Replayed at the preview file's own size, the replay matches: the sample size in the config is "
                    "not the one the preview was made with.",
        fix="Restore the sample size the previews were made with (the preview files show it).",
    ),
    Kind(
        "lora_off", "error",
        title="the preview matches the base model without the LoRA",
        explanation="Replayed without the LoRA, the replay matches: the LoRA had no visible effect when the preview "
                    "was made.",
        fix="The LoRA had no visible effect when the preview was made; check training, not inference.",
    ),
    Kind(
        "checkpoint_mismatch", "error",
        title="the preview was made with other weights than {checkpoint}",
        explanation="Replayed with another checkpoint of the job, the replay matches: the preview is paired with the "
                    "wrong weights.",
        fix="Pair each preview with the checkpoint of its step (step N <-> <name>_N).",
    ),
    Kind(
        "multiplier_changed", "error",
        title="the preview used LoRA multiplier {multiplier}",
        explanation="Replayed with another network_multiplier, the replay matches.",
        fix="Use the network_multiplier the previews were made with.",
    ),
    Kind(
        "trigger_word_changed", "error",
        title="the preview's prompt had the trigger word {word!r}",
        explanation="Replayed with the trigger word from the LoRA's metadata instead of the config's, the replay "
                    "matches.",
        fix="Use the trigger word the LoRA was trained with ({word!r}).",
    ),
    Kind(
        "negative_changed", "error",
        title="the preview used the negative prompt {negative!r}",
        explanation="Replayed with another negative prompt, the replay matches.",
        fix="Use the negative prompt the previews were made with.",
    ),
    Kind(
        "walk_seed_changed", "error",
        title="walk_seed was {state} when the previews were made",
        explanation="Replayed with the prompt index added to (or taken from) the seed, the replay matches.",
        fix="Restore sample.walk_seed: with it each prompt's seed is the section seed + its index.",
    ),
    Kind(
        "seed_changed", "error",
        title="the preview was made with seed {seed}",
        explanation="Replayed with another seed, the replay matches: the same seed draws the same noise, another "
                    "seed an unrelated picture.",
        fix="Use the seed the previews were made with (walk_seed adds the prompt index).",
    ),
    Kind(
        "guidance_changed", "error",
        title="the preview used guidance {guidance}",
        explanation="Replayed with another guidance scale, the replay matches.",
        fix="Use the guidance_scale the previews were made with.",
    ),
    Kind(
        "steps_changed", "error",
        title="the preview used {steps} sampling steps",
        explanation="Replayed with another number of sampling steps, the replay matches.",
        fix="Use the sample_steps the previews were made with.",
    ),
    Kind(
        "noise_algorithm", "error",
        title="the initial noise was drawn like {algorithm}",
        explanation="Replayed with another torch version's CPU bf16 noise draw, the replay matches.",
        fix="Replay with the torch version's CPU bf16 draw that made the previews (--noise).",
    ),
    Kind(
        "te_quantization_mismatch", "error",
        title="the previews' text encoder quantisation differs from the config's quantize_te",
        explanation="Replayed with the text encoder quantised the other way, the replay matches.",
        fix="Match model.quantize_te to how the previews were made.",
    ),
    Kind(
        "merge_precision", "error",
        title="the LoRA was merged in the model dtype, not as an fp32 sum",
        explanation="Replayed with the LoRA fused in bf16 from the file's dtype, the replay matches.",
        fix="Merge as W = bf16(fp32(W) + m * B@A).",
    ),
    # the families' own experiments (pipelines/<family>/family.py knob_flips)
    Kind(
        "negative_template_once", "error",
        title="the negative prompt was templated once, not twice",
        explanation="Replayed with OmniGen2's chat template applied to the negative prompt once, the replay "
                    "matches.",
        fix="Apply OmniGen2's chat template to the negative prompt twice, as ai-toolkit does.",
        families=("omnigen2",),
    ),
    Kind(
        "prompt_template_once", "error",
        title="the prompt was templated once, not twice",
        explanation="Replayed with OmniGen2's chat template applied to the prompt once, the replay matches.",
        fix="Apply OmniGen2's chat template twice (the wrapper and encode_prompt both apply it).",
        families=("omnigen2",),
    ),
    Kind(
        "flux_true_cfg_on", "error",
        title="the preview was made with true CFG: guidance embedding bypassed, negative prompt used",
        explanation="Replayed with ai-toolkit's true-CFG FLUX.1 pipeline (model.use_flux_cfg), the replay matches.",
        fix="Replay with model.use_flux_cfg: true, as the training job had it.",
        families=("flux",),
    ),
    Kind(
        "flux_true_cfg_off", "error",
        title="the preview was made with the plain FluxPipeline: guidance embedding only, negative prompt unused",
        explanation="Replayed without true CFG (the plain FluxPipeline), the replay matches.",
        fix="Replay without model.use_flux_cfg, as the training job had it.",
        families=("flux",),
    ),
    Kind(
        "flux_attn_masking_on", "error",
        title="the preview's T5 embeddings had their padded positions zeroed (model.attn_masking)",
        explanation="Replayed with T5's padded positions zeroed, the replay matches.",
        fix="Replay with model.attn_masking: true (and is_flux: true, which ai-toolkit requires for it).",
        families=("flux",),
    ),
    Kind(
        "flux_attn_masking_off", "error",
        title="the preview's T5 embeddings kept their padded positions (no model.attn_masking)",
        explanation="Replayed with T5's padded positions kept, the replay matches.",
        fix="Replay without model.attn_masking, as the training job had it.",
        families=("flux",),
    ),
    # ---- what parity check reads from the replays themselves
    Kind(
        "diagnosis_tried", "info",
        title="tried {count} other setting(s): no effect beyond noise",
        explanation="Each of these settings, replayed, moved SSIM by less than half the gap to identity: they are "
                    "not what differs.",
        fix="Nothing to do: these settings are not what differs.",
    ),
    Kind(
        "predicted_residual", "info",
        title="expected residual: {what}",
        explanation="The job's files do not carry the exact weights the preview was made with, so a small difference "
                    "remains even with a perfect replay.",
        fix="Nothing to fix in inference; supply the in-memory weights with --lora STEP=FILE to confirm.",
    ),
    Kind(
        "kernel_residual", "info",
        title="residual from the machine's kernels: no setting explains this near miss",
        explanation="Every knob was flipped without restoring identity, so the difference comes from how this "
                    "machine's kernels round compared with the trainer's, e.g. a float32 GEMM summed in another "
                    "order.",
        fix="Nothing to fix in inference; replay on the trainer's kind of machine for bit-exactness.",
    ),
    Kind(
        "within_noise_floor", "info",
        title="step {step} drifts no more than step 0: hardware, not the LoRA",
        explanation="This preview drifts from its replay no more than the step-0 previews (base model only) do on "
                    "this machine: its kernels differ from the trainer's by as much on their own.",
        fix="Nothing to fix in the LoRA; replay on the trainer's kind of machine for bit-exactness.",
    ),
    Kind(
        "lora_effect", "info",
        title="the LoRA's effect at step {step}: SSIM {ssim:.3f} with vs without it",
        explanation="Replayed with and without the LoRA, the images differ: the LoRA visibly changes the picture.",
        fix="Nothing to fix; compare inference with and without the LoRA the same way.",
    ),
    Kind(
        "lora_barely_changes", "warning",
        title="the LoRA barely changes the image at step {step} (SSIM {ssim:.3f} with vs without)",
        explanation="Replayed with and without the LoRA, the two images hardly differ: the LoRA has little to show, "
                    "in training previews and in inference alike.",
        fix="Train longer, at a higher learning rate or rank, or check that the LoRA's keys load (parity lora).",
    ),
)

CATALOGUE = MappingProxyType({k.code: k for k in KINDS})
if len(CATALOGUE) != len(KINDS):
    raise ValueError("parity/catalogue.py: a cause code is listed twice")
