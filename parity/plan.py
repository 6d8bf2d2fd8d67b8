"""The replay plan: for every preview, the exact settings ai-toolkit used to make it (no torch).

Each ai-toolkit quirk that decides a preview's settings is a small function in the "ai-toolkit rules" section
below, with a one-line comment saying why (FACTS §1-§3). ``build_plan`` applies them preview by preview.
The JSON form is documented in ``parity/schemas/plan.schema.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from parity.errors import InputError
from parity.jobfolder import JobFolder, Preview, SampleSection, read_job_folder
from parity.safe_io import MAX_IMAGE_SIDE, image_size, json_safe
from pipelines.family import Family
from pipelines.registry import family_for

SCHEMA_VERSION = 1
_TORCH_SEED_MIN, _TORCH_SEED_MAX = -(2**63), 2**64 - 1  # torch.manual_seed accepts int64 or uint64


@dataclass(frozen=True)
class ReplayItem:
    """One preview and the settings that reproduce it. Field names match ``samples.jsonl`` where they overlap.

    Effective fields are None only when the config has no prompt for this preview's index.
    """

    file: str  # the preview's file name in samples/
    step: int  # the step in the file name
    prompt_index: int
    round: str  # "sample" or "first_sample"
    ms_time: int  # epoch milliseconds in the file name
    prompt: str | None  # after [trigger] replacement and flag parsing
    negative_prompt: str | None  # None when ai-toolkit's value is not text (the False default)
    seed: int | None  # what torch.manual_seed received, as uint64; None = drawn for seed -1, not recorded
    width: int | None  # requested size after floor-to-8 and the 64 minimum (what the pipeline is asked for)
    height: int | None
    gen_width: int | None  # size the family's pipeline generates at (OmniGen2: 1 MP cap, floor-16; FLUX.1: floor-16)
    gen_height: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    network_multiplier: float | None
    lora_merged: bool | None  # ai-toolkit merged the LoRA into the base weights for this round
    weights: str  # "base" (step 0), "checkpoint", "final" or "none"
    checkpoint: str | None  # LoRA file name in the job folder
    ctrl_img: str | None  # resolved reference image path
    ctrl_img_recorded: str | None  # the reference image path as the config gives it
    unknown_flags: tuple[str, ...]  # prompt flags ai-toolkit dropped silently
    replayable: bool
    reason: str
    # ai-toolkit draws seed -1 with random.randint(0, 2**32 - 1), Python's random seeded with training_seed:
    # "config" (the config or a --seed flag set it), "drawn" (seed is None until parity check recovers it) or
    # "recovered" (drawn, then found by replay: parity check's items only).
    seed_source: str = "config"
    seed_from: str = "section"  # what set the seed (SEED_ORIGINS): a fault in the section seed affects section/walk
    seed_draw: int | None = None  # a drawn seed: which of its round's draws it is (0: the round's first)
    round_draws: int = 0  # how many seeds ai-toolkit drew for this preview's round (each reads >= 2 words)
    recoverable: bool = False  # drawn, training_seed known, nothing else stops the replay: check recovers it


@dataclass(frozen=True)
class ReplayPlan:
    """A job folder's previews with the settings and weights that made each one, plus the job-wide facts."""

    job_dir: str
    config_file: str
    job_name: str
    process_type: str
    arch: str
    base_model: str | None  # model.name_or_path: the transformer
    extras_model: str | None  # model.extras_name_or_path: MLLM, VAE and processor
    train_dtype: str  # transformer, MLLM, VAE and initial noise all use it
    train_steps: int
    quantize: bool
    quantize_te: bool
    qtype: str
    qtype_te: str
    layer_offloading: bool
    save_dtype: str  # the checkpoints are the fp32 LoRA rounded to this
    use_ema: bool
    trigger_word: str | None
    sample_format: str
    network_type: str
    network_linear: int
    network_linear_alpha: float
    transformer_only: bool
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    model_flags: dict[str, Any] = field(default_factory=dict)  # use_flux_cfg, attn_masking (jobfolder)
    training_seed: int | None = None  # the process's training_seed: the stream drawn seeds come from
    items: tuple[ReplayItem, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def family(self) -> Family:
        """The model family that replays this plan (``pipelines/registry.py``)."""
        return family_for(self.arch)

    def generation_size(self, width: int, height: int) -> tuple[int, int]:
        return self.family.rules.generation_size(width, height)

    def saved_size(self, item: ReplayItem) -> tuple[int, int] | None:
        """The size of the preview file ``item`` describes (the family may save at the generation size)."""
        if item.width is None:
            return None
        return self.family.rules.saved_size(item.width, item.height)

    @property
    def replayable_count(self) -> int:
        return sum(item.replayable for item in self.items)

    @property
    def recoverable_count(self) -> int:
        return sum(item.recoverable for item in self.items)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON types, in the documented schema."""
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        data["items"] = [_item_dict(item) for item in self.items]
        data["warnings"] = list(self.warnings)
        data["summary"] = {"previews": len(self.items), "replayable": self.replayable_count,
                           "seeds_to_recover": self.recoverable_count}
        return data

    def to_json(self) -> str:
        """The plan as a JSON document (``schema_version`` 1, see ``parity/schemas/plan.schema.json``)."""
        return json.dumps(json_safe(self.to_dict()), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _item_dict(item: ReplayItem) -> dict[str, Any]:
    data = asdict(item)
    data["unknown_flags"] = list(item.unknown_flags)
    return data


def build_plan(job_dir: str | Path, assets_dir: str | Path | None = None) -> ReplayPlan:
    """Read ``job_dir`` and say, for each preview, what ai-toolkit did to make it and whether it can be replayed.

    ``assets_dir`` is searched by file name for reference images whose recorded path does not exist here.
    Raises InputError for a folder, config or file that cannot be used.
    """
    job = read_job_folder(job_dir)
    if assets_dir is not None and not Path(assets_dir).is_dir():
        raise InputError(assets_dir, "assets folder does not exist")
    rounds = {"sample": _plan_round(job, job.sample, "sample")}
    if job.first_sample is not None:
        rounds["first_sample"] = _plan_round(job, job.first_sample, "first_sample")
    items = [
        _replay_item(job, preview, kind, rounds[kind], assets_dir)
        for preview, kind in _assign_rounds(job, job.previews)
    ]
    items.sort(key=lambda item: (item.step, item.ms_time, item.prompt_index))
    return ReplayPlan(
        job_dir=str(job.path.resolve()),
        config_file=job.config_file.name,
        job_name=job.name,
        process_type=job.process_type,
        arch=job.model.arch,
        base_model=job.model.name_or_path,
        extras_model=job.model.extras_name_or_path,
        train_dtype=job.train.dtype,
        train_steps=job.train.steps,
        quantize=job.model.quantize,
        quantize_te=job.model.quantize_te,
        qtype=job.model.qtype,
        qtype_te=job.model.qtype_te,
        layer_offloading=job.model.layer_offloading,
        save_dtype=job.save.dtype,
        use_ema=job.train.use_ema,
        trigger_word=job.trigger_word,
        sample_format=job.sample.format,
        network_type=job.network.type,
        network_linear=job.network.linear,
        network_linear_alpha=job.network.linear_alpha,
        transformer_only=job.network.transformer_only,
        network_kwargs=dict(job.network.network_kwargs),
        model_kwargs=dict(job.model.model_kwargs),
        model_flags=dict(job.model.flags),
        training_seed=job.training_seed,
        items=tuple(items),
        warnings=job.warnings,
    )


# ---------------------------------------------------------------------------------------------------------
# ai-toolkit rules, one function each (FACTS §2-§3)


@dataclass(frozen=True)
class PromptSettings:
    """What ai-toolkit's GenerateImageConfig holds for one prompt of a round, before the 8/16 flooring."""

    prompt: str
    negative_prompt: Any
    seed: int | None  # None: random
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    network_multiplier: float
    ctrl_img: str | None
    unknown_flags: tuple[str, ...] = ()
    seed_drawn: bool = False  # seed -1 before the flags: ai-toolkit drew one (a --seed flag replaces it after)
    seed_from: str = "section"  # SEED_ORIGINS: what set the seed


def replace_trigger(prompt: str, trigger_word: str | None) -> str:
    """``[trigger]`` (and ``[name]``) become the trigger word, flags included; nothing is added when absent."""
    if trigger_word is None:
        return prompt  # ai-toolkit only injects when trigger_word is set: [trigger] then stays literally
    return prompt.replace("[name]", trigger_word).replace("[trigger]", trigger_word)


def split_prompt_flags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """Split ``prompt --flag content --flag content`` the way ai-toolkit does (sd-scripts style).

    The text is stripped and split on every ``--`` (so a literal ``--`` truncates the prompt); a flag is the
    text up to the first space and its content the rest, stripped. Quotes are kept. An empty prompt is not parsed.
    """
    if len(prompt) == 0:
        return prompt, []
    pieces = prompt.strip().split("--")
    flags = []
    for piece in pieces[1:]:
        flag = piece.split(" ")[0].strip()
        flags.append((flag, piece[len(flag) :].strip()))
    return pieces[0].strip(), flags


# flag -> (setting, parser); aliases share a setting. Flags for other models are parsed (a bad value still
# crashed ai-toolkit) but change no preview of the families parity replays (OmniGen2, FLUX.1).
_FLAGS: dict[str, tuple[str, type]] = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "seed": ("seed", int),
    "l": ("guidance_scale", float),
    "cfg": ("guidance_scale", float),
    "s": ("num_inference_steps", int),
    "steps": ("num_inference_steps", int),
    "m": ("network_multiplier", float),
    "network_multiplier": ("network_multiplier", float),
    "ctrl_img": ("ctrl_img", str),
    "p2": ("prompt_2", str),
    "n2": ("negative_prompt_2", str),
    "gr": ("guidance_rescale", float),
    "a": ("adapter_conditioning_scale", float),
    "ref": ("refiner_start_at", float),
    "ev": ("extra_values", list),
    "extra_values": ("extra_values", list),
    "frames": ("num_frames", int),
    "num_frames": ("num_frames", int),
    "fps": ("fps", int),
    "ctrl_idx": ("ctrl_idx", int),
}
_SETTINGS_FROM_FLAGS = (
    "negative_prompt", "width", "height", "seed", "guidance_scale", "num_inference_steps", "network_multiplier",
    "ctrl_img",
)  # fmt: skip


def parse_flag_value(flag: str, content: str) -> Any:
    """Convert a flag's content as ai-toolkit does (``int()``, ``float()``); ValueError where it would crash."""
    _, kind = _FLAGS[flag]
    if kind is list:
        return [float(value) for value in content.split(",")]
    return kind(content)


def round_seeds(section: SampleSection) -> list[int]:
    """The seed each prompt of a round starts from, before its flags.

    ``walk_seed`` adds the prompt index to the section seed; an item's own ``seed`` wins and, with walk_seed
    off, carries over to the following prompts. Every round restarts from the section seed.
    """
    seeds = []
    current = section.seed
    for i in range(len(section.prompts)):
        if section.walk_seed:
            current = section.seed + i
        own_seed = section.samples[i].seed
        if own_seed is not None:
            current = own_seed
        seeds.append(current)
    return seeds


def requested_size(width: int, height: int) -> tuple[int, int]:
    """ai-toolkit floors the requested size to a multiple of 8, with a minimum of 64."""
    return max(64, width - width % 8), max(64, height - height % 8)


def torch_seed(seed: int) -> int:
    """The uint64 seed torch.manual_seed uses: a negative int64 wraps (``--seed -1`` is 2**64 - 1)."""
    return seed % 2**64


# What set a prompt's seed: the section seed, the section seed + the index (walk_seed), the sample's own seed, an
# earlier sample's own seed carried over (walk_seed off), or the prompt's --seed/--d flag.
SEED_ORIGINS = ("section", "walk", "item", "carried", "flag")


def seed_origin(section: SampleSection, index: int, seeds: list[int], flagged: bool) -> str:
    """Which of SEED_ORIGINS set prompt ``index``'s seed (``seeds``: ``round_seeds(section)``)."""
    if flagged:
        return "flag"
    if section.samples[index].seed is not None:
        return "item"
    if section.walk_seed:
        return "walk"
    return "section" if seeds[index] == section.seed else "carried"


def round_prompt_settings(
    section: SampleSection, trigger_word: str | None, config_file: Path, where: str
) -> list[PromptSettings]:
    """Every prompt of one sampling round as ai-toolkit builds it. A flag value ai-toolkit's ``int()`` or
    ``float()`` rejects crashed the job before any preview of the round was saved: that is an InputError."""
    settings = []
    seeds = round_seeds(section)
    for i, raw_prompt in enumerate(section.prompts):
        item = section.samples[i]  # ai-toolkit pairs prompt i with samples[i] even when an item had no prompt
        values: dict[str, Any] = {
            "negative_prompt": item.neg,
            # seed -1 is drawn before the flags are read (a --seed flag then replaces it) and never recorded
            "seed": None if seeds[i] == -1 else seeds[i],
            "seed_drawn": seeds[i] == -1,
            "width": item.width,
            "height": item.height,
            "num_inference_steps": item.sample_steps,
            "guidance_scale": item.guidance_scale,
            "network_multiplier": item.network_multiplier,
            "ctrl_img": item.ctrl_img,
        }
        prompt, flags = split_prompt_flags(replace_trigger(raw_prompt, trigger_word))
        unknown = []
        for flag, content in flags:
            if flag not in _FLAGS:
                unknown.append(f"--{flag}")  # ai-toolkit drops unknown flags silently
                continue
            try:
                value = parse_flag_value(flag, content)
            except ValueError:
                kind = "an integer" if _FLAGS[flag][1] is int else "a number"
                raise InputError(
                    config_file,
                    f"{where} prompt {i}: --{flag} {content!r} is not {kind}; ai-toolkit crashes on it, "
                    "so this config cannot have made these previews",
                ) from None
            if _FLAGS[flag][0] in _SETTINGS_FROM_FLAGS:
                values[_FLAGS[flag][0]] = value
        values["seed_from"] = seed_origin(section, i, seeds, any(_FLAGS.get(f, ("",))[0] == "seed" for f, _ in flags))
        check_flag_values(values, config_file, f"{where} prompt {i}")
        if values["seed"] is not None:
            if not _TORCH_SEED_MIN <= values["seed"] <= _TORCH_SEED_MAX:
                raise InputError(
                    config_file, f"{where} prompt {i}: seed {values['seed']} is outside torch's seed range"
                )
            values["seed"] = torch_seed(values["seed"])
        settings.append(PromptSettings(prompt=prompt, unknown_flags=tuple(unknown), **values))
    return settings


def check_flag_values(values: dict[str, Any], config_file: Path, where: str) -> None:
    """Settings a prompt's ``--`` flags gave that no replay can use: fewer than one step, a side over
    MAX_IMAGE_SIDE, a non-finite number. (The config's own values are checked where they are read.)"""
    if values["num_inference_steps"] < 1:
        raise InputError(config_file, f"{where}: num_inference_steps must be at least 1, got "
                                      f"{values['num_inference_steps']} (from --steps/--s)")
    for name in ("width", "height"):
        if values[name] > MAX_IMAGE_SIDE:
            raise InputError(config_file, f"{where}: {name} must be at most {MAX_IMAGE_SIDE}, got {values[name]} "
                                          "(from --w/--h)")
    for name in ("guidance_scale", "network_multiplier"):
        if not math.isfinite(values[name]):
            raise InputError(config_file, f"{where}: {name} must be a finite number, got {values[name]}")


def lora_merged(round_settings: list[PromptSettings], job: JobFolder) -> bool:
    """ai-toolkit merges the LoRA into the base for a round when every prompt has the same multiplier and the
    base is neither quantised nor offloaded (a merged round runs on bf16(W + m*B@A), an unmerged one adds the
    LoRA branch in the forward). A pre-quantised base model also prevents merging; the config cannot show that."""
    can_merge = not job.model.quantize and not job.model.layer_offloading and job.network.type != "lorm"
    return can_merge and len({s.network_multiplier for s in round_settings}) == 1


# ---------------------------------------------------------------------------------------------------------
# preview by preview


@dataclass(frozen=True)
class _Round:
    kind: str
    section: SampleSection
    settings: list[PromptSettings]
    merged: bool
    draw_index: list[int | None]  # per prompt: which of the round's seed draws it made (None: no draw)

    @property
    def draws(self) -> int:
        return sum(index is not None for index in self.draw_index)


def draw_indices(settings: list[PromptSettings]) -> list[int | None]:
    """Which draw each prompt of a round made: ai-toolkit builds every prompt's settings, in order, before the
    round's first image, so the draws of one round are consecutive calls of ``random.randint``."""
    indices, drawn = [], 0
    for s in settings:
        indices.append(drawn if s.seed_drawn else None)
        drawn += s.seed_drawn
    return indices


def drawn_seed_reason(training_seed: int) -> str:
    """What the plan says of a preview whose seed ai-toolkit drew and ``parity check`` can recover."""
    return f"seed drawn from training_seed {training_seed}: to be recovered"


def with_recovered_seed(item: ReplayItem, seed: int, training_seed: int) -> ReplayItem:
    """``item`` (recoverable) replayable with the seed ``parity check`` recovered for it."""
    if not item.recoverable:
        raise ValueError(f"{item.file}: no drawn seed to recover ({item.reason})")
    notes = item.reason.removeprefix(drawn_seed_reason(training_seed)).removeprefix("; ")
    return replace(item, seed=seed, seed_source="recovered", replayable=True, recoverable=False, reason=notes)


def _plan_round(job: JobFolder, section: SampleSection, kind: str) -> _Round:
    settings = round_prompt_settings(section, job.trigger_word, job.config_file, kind)
    return _Round(kind, section, settings, lora_merged(settings, job), draw_indices(settings))


def _assign_rounds(job: JobFolder, previews: tuple[Preview, ...]) -> list[tuple[Preview, str]]:
    """Tell the first_sample round from the baseline round: both are labelled step 0; first_sample comes first.

    Previews of one step, in save-time order, start a new round whenever the prompt index does not increase.
    """
    first_sample_runs = job.first_sample is not None and not job.train.disable_sampling
    assigned = []
    by_step: dict[int, list[Preview]] = {}
    for preview in previews:
        by_step.setdefault(preview.step, []).append(preview)
    for step, step_previews in by_step.items():
        step_previews.sort(key=lambda p: (p.ms_time, p.prompt_index, p.file))
        round_number, last_index = 0, None
        for preview in step_previews:
            if last_index is not None and preview.prompt_index <= last_index:
                round_number += 1
            last_index = preview.prompt_index
            is_first = step == 0 and first_sample_runs and round_number == 0
            assigned.append((preview, "first_sample" if is_first else "sample"))
    return assigned


def _replay_item(
    job: JobFolder, preview: Preview, kind: str, rnd: _Round, assets_dir: str | Path | None
) -> ReplayItem:
    problems: list[str] = []
    notes: list[str] = []
    weights, checkpoint = _weights(job, preview, kind, problems, notes)
    base = dict(
        file=preview.file,
        step=preview.step,
        prompt_index=preview.prompt_index,
        round=kind,
        ms_time=preview.ms_time,
        weights=weights,
        checkpoint=checkpoint,
        round_draws=rnd.draws,
    )
    if preview.prompt_index >= len(rnd.settings):
        problems.insert(
            0,
            f"prompt index {preview.prompt_index} is not in the config's {kind} section "
            f"({len(rnd.settings)} prompts): the config changed since this preview",
        )
        return ReplayItem(
            **base, prompt=None, negative_prompt=None, seed=None, width=None, height=None, gen_width=None,
            gen_height=None, num_inference_steps=None, guidance_scale=None, network_multiplier=None,
            lora_merged=None, ctrl_img=None, ctrl_img_recorded=None, unknown_flags=(), replayable=False,
            reason="not replayable: " + "; ".join(problems),
        )  # fmt: skip
    s = rnd.settings[preview.prompt_index]
    width, height = requested_size(s.width, s.height)
    gen_width, gen_height = family_for(job.model.arch).rules.generation_size(width, height)
    negative = s.negative_prompt if isinstance(s.negative_prompt, str) else None
    if negative is None:
        problems.append(
            f"negative prompt is {s.negative_prompt!r} (sample.neg defaults to False): ai-toolkit encodes the "
            "negative of every preview and crashes on one that is not text, so this preview cannot come from this config"
        )
    drawn = s.seed is None
    if drawn and job.training_seed is None:
        problems.append("seed -1: ai-toolkit drew a random seed and did not record it; not recoverable: the job "
                        "has no training_seed")
    ctrl_img = _reference_image(s.ctrl_img, job, assets_dir, problems)
    notes += _drift_notes(job, preview, rnd, s, weights)
    return ReplayItem(
        **base,
        prompt=s.prompt,
        negative_prompt=negative,
        seed=s.seed,
        width=width,
        height=height,
        gen_width=gen_width,
        gen_height=gen_height,
        num_inference_steps=s.num_inference_steps,
        guidance_scale=s.guidance_scale,
        network_multiplier=s.network_multiplier,
        lora_merged=rnd.merged,
        ctrl_img=ctrl_img,
        ctrl_img_recorded=s.ctrl_img,
        unknown_flags=s.unknown_flags,
        replayable=not problems and not drawn,
        reason=_reason(problems, notes, job.training_seed if drawn else None),
        seed_source="drawn" if drawn else "config",
        seed_from=s.seed_from,
        seed_draw=rnd.draw_index[preview.prompt_index] if drawn else None,
        recoverable=not problems and drawn,
    )


def _reference_image(recorded: str | None, job: JobFolder, assets_dir, problems: list[str]) -> str | None:
    if recorded is None:
        return None
    found = find_reference_image(recorded, job.path, assets_dir)
    if found is None:
        problems.append(f"reference image {recorded!r} not found (looked at that path, then for "
                        f"{_file_name(recorded)!r} under --assets and the job folder)")
        return None
    if (unusable := reference_image_problem(found)) is not None:
        problems.append(f"reference image {recorded!r} cannot be used: {unusable}")
        return None
    return str(found)


def _reason(problems: list[str], notes: list[str], drawn_from: int | None) -> str:
    """Why a preview cannot be replayed, or what to know about its replay; ``drawn_from``: the training_seed its
    drawn seed came from (its draw counts in the offsets even when nothing else can be done with it)."""
    if problems:
        counted = "" if drawn_from is None else (
            f"; seed drawn from training_seed {drawn_from} (its draw still counts for the others)")
        return "not replayable: " + "; ".join(problems) + counted
    return "; ".join(([drawn_seed_reason(drawn_from)] if drawn_from is not None else []) + notes)


def _drift_notes(job: JobFolder, preview: Preview, rnd: _Round, s: PromptSettings, weights: str) -> list[str]:
    """Known reasons a faithful replay from the saved files still differs from the preview (FACTS §3, §9)."""
    notes = []
    if weights in ("checkpoint", "final") and job.save.dtype not in ("float32", "fp32"):
        notes.append(f"the checkpoint is the fp32 LoRA the preview used, rounded to {job.save.dtype}")
    if rnd.merged and preview.step > 0:
        notes.append("merged round: earlier merge/unmerge rounds leave base weights a bf16 step off")
        if s.network_multiplier < 0:
            notes.append(
                "negative multiplier: ai-toolkit never merges it back out, later rounds ran on a shifted base"
            )
    return notes


def _weights(
    job: JobFolder, preview: Preview, kind: str, problems: list[str], notes: list[str]
) -> tuple[str, str | None]:
    """Pair a preview with the weights that made it: base at step 0, the step's checkpoint, or the final file."""
    step, steps = preview.step, job.train.steps
    if step == 0:
        # the fresh LoRA has B = 0 before training, so step-0 previews are the base model
        notes.append(f"{'first_sample round' if kind == 'first_sample' else 'step 0'}: base model only")
        return "base", None
    if step == steps:
        # the last round is labelled train.steps and pairs with the final file, not <name>_<steps:09d>
        final = job.final_checkpoint
        if final is None:
            problems.append(f"final checkpoint {job.name}.safetensors is missing")
            return "none", None
        if final.training_step is not None and final.training_step != step:
            problems.append(f"{final.file} is from step {final.training_step}, not {step}")
            return "none", final.file
        notes.append(f"last round (train.steps={steps}): final {final.file}")
        return "final", final.file
    sample = job.sample
    if not (0 < step < steps and sample.sample_every and step >= sample.sample_start_step
            and step % sample.sample_every == 0):  # fmt: skip
        problems.append(
            f"step {step} is not a sampling step of this config (sample_every={sample.sample_every}, "
            f"sample_start_step={sample.sample_start_step}, train.steps={steps}): a UI 'sample now' round "
            "(labelled one step after its weights) or an earlier config"
        )
        return "none", None
    checkpoint = job.checkpoint_for_step(step)
    expected = f"{job.name}_{step:09d}.safetensors"
    if checkpoint is None:
        if job.save.save_every and step % job.save.save_every == 0:
            problems.append(
                f"checkpoint deleted: {expected} is gone "
                f"(save.max_step_saves_to_keep={job.save.max_step_saves_to_keep})"
            )
        else:
            problems.append(f"no checkpoint was saved at step {step} (save.save_every={job.save.save_every})")
        return "none", None
    if checkpoint.training_step is not None and checkpoint.training_step != step:
        problems.append(f"{checkpoint.file} is from step {checkpoint.training_step}, not {step}")
        return "none", checkpoint.file
    notes.append(f"step {step}: {checkpoint.file}")
    return "checkpoint", checkpoint.file


def find_reference_image(recorded: str, job_dir: Path, assets_dir: str | Path | None) -> Path | None:
    """A reference image recorded on the training machine: its path as given, else by file name under the
    assets folder, else by file name in the job folder."""
    candidates = [Path(recorded)]
    if not Path(recorded).is_absolute():
        candidates.append(job_dir / recorded)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    name = _file_name(recorded)
    if not name:
        return None
    for folder in ([Path(assets_dir)] if assets_dir is not None else []) + [job_dir]:
        direct = folder / name
        if direct.is_file():
            return direct.resolve()
        matches = sorted(Path(root) / name for root, _, files in os.walk(folder) if name in files)
        if matches:
            return matches[0].resolve()
    return None


def reference_image_problem(path: Path) -> str | None:
    """Why a found reference image cannot be replayed with (not an image, over the pixel cap), from its header."""
    try:
        image_size(path, "reference image")
    except InputError as exc:
        return exc.problem
    return None


def _file_name(path: str) -> str:
    # the training machine may have been Windows: split on both separators
    return re.split(r"[\\/]", path)[-1]
