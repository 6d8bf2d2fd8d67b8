"""Lint: every known cause of a preview/inference mismatch that can be read without a replay.

One registry (:data:`RULES`) holds every rule: when a cause of the catalogue (``parity.catalogue``, which says
what it is, how bad, and the fix) applies. A rule reads the replay plan and, where it needs them, the job folder,
the preview files and the LoRA checkpoints, and returns a :class:`Finding` (a one-line text and its evidence) or
None; :meth:`Rule.cause` turns a finding into a :class:`parity.results.Cause`. Sources: FACTS §3 (how ai-toolkit
makes a preview), §6 (where the ai-toolkit-inference server departs: the ``server_*`` causes that
``--pipeline server`` measures, informational here), §7 (causes users hit).

``scope`` says how often a rule runs: ``"job"`` once per job folder (``item`` is None), ``"preview"`` once per
preview. Rules marked ``in_check`` read the plan and the item only; ``parity check`` attaches them to every
preview through :func:`item_causes`. ``parity lint`` runs them all (:func:`lint`) and merges identical preview
findings into one line that lists the previews.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parity import catalogue
from parity.errors import InputError
from parity.jobfolder import TRAINER_TYPES, JobFolder, SampleItem, SampleSection, load_config, read_job_folder
from parity.plan import (
    PromptSettings,
    ReplayItem,
    ReplayPlan,
    build_plan,
    replace_trigger,
    requested_size,
    round_prompt_settings,
    split_prompt_flags,
)
from parity.results import SEVERITIES, Cause
from pipelines.registry import family_for

SCOPES = ("job", "preview")
BARELY_CHANGES_SSIM = 0.98  # first vs last preview of a prompt above this: the LoRA hardly changed anything
# ai-toolkit-inference's defaults for a request that leaves them out (FACTS §6); the same for FLUX.1-dev
# (src/pipelines/flux_dev.py CONFIG, base.py PipelineConfig: 25 steps, guidance 4.0, 1024x1024, seed 42 + i)
IR_STEPS, IR_CFG, IR_SIZE, IR_FIRST_SEED, IR_JPEG_QUALITY = 25, 4.0, 1024, 42, 95
IR_FLUX_BASE = "black-forest-labs/FLUX.1-dev"  # flux_dev.py FluxDevPipeline.CONFIG.base_model
PREVIEW_JPEG_QUALITY = 75  # ai-toolkit's image.save(path): Pillow's default
_QUOTES = ("'", '"')


@dataclass(frozen=True)
class Finding:
    """What a rule found: the one-line text, the facts it was read from, and a severity when not the rule's."""

    text: str
    evidence: dict[str, Any] = field(default_factory=dict)
    severity: str | None = None


Applies = Callable[[ReplayPlan, "ReplayItem | None", "LintContext"], "Finding | None"]


@dataclass(frozen=True)
class Rule:
    """When a catalogued cause (``parity.catalogue``) applies, read from the plan and the job's files."""

    code: str  # the catalogue's code: severity, explanation, fix and families come from there
    scope: str  # job or preview
    applies: Applies
    in_check: bool = False  # reported by `parity check` for each preview too

    @property
    def kind(self) -> catalogue.Kind:
        return catalogue.kind(self.code)

    @property
    def severity(self) -> str:
        return self.kind.severity

    def serves(self, plan: ReplayPlan) -> bool:
        """Whether the rule concerns ``plan``'s family; a server departure only where the family has a server."""
        if self.code.startswith("server_") and plan.family.server_profile is None:
            return False
        return self.kind.concerns(plan.family.name)

    def cause(self, finding: Finding) -> Cause:
        return catalogue.cause(self.code, finding.text, severity=finding.severity, evidence=finding.evidence)


_REGISTERED: list[Rule] = []  # filled by @rule while this module is imported; read through RULES


def rule(code: str, scope: str, in_check: bool = False):
    """Register the decorated ``applies(plan, item, ctx)`` as the rule that finds the catalogue's ``code``."""
    catalogue.kind(code)
    if scope not in SCOPES:
        raise ValueError(f"rule {code}: bad scope {scope!r}")

    def register(applies: Applies) -> Applies:
        if any(r.code == code for r in _REGISTERED):
            raise ValueError(f"rule {code} registered twice")
        _REGISTERED.append(Rule(code, scope, applies, in_check))
        return applies

    return register


def get_rule(code: str) -> Rule:
    return next(r for r in RULES if r.code == code)


# ---------------------------------------------------------------------------------------------------------
# what rules read besides the plan, read once per lint run


@dataclass(frozen=True)
class PromptInfo:
    """One prompt of a sampling section as ai-toolkit builds it (FACTS §2)."""

    round: str  # "sample" or "first_sample"
    index: int
    raw: str  # as the config gives it
    item: SampleItem  # samples[index], section values filled in
    settings: PromptSettings  # after [trigger], flags and seed rules, before the floor-to-8
    flags: tuple[tuple[str, str], ...]  # every `--flag content` piece, known or not
    seed_from: str  # where the seed came from: section, walk, item, carried, flag

    @property
    def label(self) -> str:
        return f"{self.round} prompt {self.index}"


@dataclass
class LintContext:
    """The job folder and lazily read files (previews, LoRAs, the transformer's module tree)."""

    job: JobFolder | None = None
    base_model: str | None = None
    _prompts: list[PromptInfo] | None = None
    _raw_process: dict[str, Any] | None = None
    _images: dict[str, Any] = field(default_factory=dict)
    _loras: dict[str, Any] = field(default_factory=dict)
    _skeleton: Any = None

    @property
    def samples_dir(self) -> Path:
        return self.job.path / "samples"

    def prompts(self) -> list[PromptInfo]:
        if self._prompts is None:
            self._prompts = []
            for kind, section in (("sample", self.job.sample), ("first_sample", self.job.first_sample)):
                if section is not None:
                    self._prompts += _section_prompts(self.job, section, kind)
        return self._prompts

    def raw_sample_items(self, kind: str) -> list[dict[str, Any]]:
        """``samples:`` of the sampling section exactly as the config has them (ctrl_img_2/3 are not parsed)."""
        if self._raw_process is None:
            _, raw = load_config(self.job.path)
            processes = raw["config"].get("process") or []
            self._raw_process = next(
                p for p in processes if isinstance(p, dict) and p.get("type") in TRAINER_TYPES
            )
        items = (self._raw_process.get(kind) or {}).get("samples") or []
        return [item if isinstance(item, dict) else {} for item in items]

    def image(self, file: str):
        """A preview's (or reference image's) ``(width, height)``, or the error text if it cannot be read."""
        if file not in self._images:
            from parity.safe_io import image_size

            path = Path(file) if Path(file).is_absolute() else self.samples_dir / file
            try:
                self._images[file] = image_size(path)
            except InputError as exc:  # not an image, not a regular file, over the pixel cap
                self._images[file] = exc.problem
        return self._images[file]

    def lora(self, file: str):
        """(LoraFile, KeyReport) for a checkpoint of the job folder, or the error text if unreadable."""
        if file not in self._loras:
            from parity.lora_report import match_against

            skeleton = self.skeleton()
            try:
                convert = family_for(self.job.model.arch).lora_convert
                self._loras[file] = match_against(self.job.path / file, skeleton, convert)
            except InputError as exc:  # an unreadable checkpoint is a finding, not a failed lint
                self._loras[file] = exc.problem
        return self._loras[file]

    @property
    def checked_against(self) -> str | None:
        """The transformer the checkpoints were matched with, once a rule needed it."""
        return self._skeleton[1] if self._skeleton is not None else None

    def skeleton(self):
        """(meta-device transformer, what it is) for matching LoRA keys and shapes."""
        if self._skeleton is None:
            from parity.lora_report import base_model_dir, transformer_skeleton

            base = self.base_model or _local_base_model(self.job)
            root = base_model_dir(base) if base is not None else None
            self._skeleton = transformer_skeleton(family_for(self.job.model.arch), root)
        return self._skeleton


def _local_base_model(job: JobFolder) -> str | None:
    """The config's base model when it exists on this machine (a folder with a transformer config)."""
    path = job.model.name_or_path
    if path and (Path(path).expanduser() / "transformer" / "config.json").is_file():
        return path
    return None


def _section_prompts(job: JobFolder, section: SampleSection, kind: str) -> list[PromptInfo]:
    settings = round_prompt_settings(section, job.trigger_word, job.config_file, kind)
    infos = []
    for i, raw in enumerate(section.prompts):
        _, flags = split_prompt_flags(replace_trigger(raw, job.trigger_word))
        infos.append(PromptInfo(kind, i, raw, section.samples[i], settings[i], tuple(flags), settings[i].seed_from))
    return infos


def _labels(prompts: list[PromptInfo]) -> str:
    """Prompt labels for a finding: "sample prompts 1, 2" for one round, else each label."""
    rounds = {p.round for p in prompts}
    if len(rounds) == 1:
        word = "prompt" if len(prompts) == 1 else "prompts"
        return f"{prompts[0].round} {word} " + ", ".join(str(p.index) for p in prompts)
    return ", ".join(p.label for p in prompts)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


# ---------------------------------------------------------------------------------------------------------
# preview rules that `parity check` reports too (plan and item only)


@rule("size_not_multiple_of_16", "preview", in_check=True)
def _size_not_multiple_of_16(plan, item, ctx):
    w, h = item.width, item.height
    if w and h and (w % 16 or h % 16):
        return Finding(
            f"{w}x{h} is not a multiple of 16: the preview was generated at {item.gen_width}x{item.gen_height}",
            {"requested": [w, h], "generated": [item.gen_width, item.gen_height]},
        )
    return None


@rule("above_1mp", "preview", in_check=True)
def _above_1mp(plan, item, ctx):
    w, h = item.width, item.height
    if w and h and w * h > 1024 * 1024:
        return Finding(
            f"{w}x{h} is above 1 MP: the preview was generated at {item.gen_width}x{item.gen_height} and upscaled",
            {"requested": [w, h], "generated": [item.gen_width, item.gen_height]},
        )
    return None


@rule("seed_random", "preview", in_check=True)
def _seed_random(plan, item, ctx):
    if item.seed_source == "recovered":
        return Finding(f"seed -1: drawn by ai-toolkit, recovered by replay from training_seed {plan.training_seed}",
                       {"seed": item.seed, "training_seed": plan.training_seed}, "info")
    if item.seed_source != "drawn" or item.prompt is None:
        return None
    if plan.training_seed is None:
        return Finding("seed -1: drawn at random and never recorded; not recoverable: the job has no training_seed",
                       {"seed": -1, "training_seed": None})
    return Finding(f"seed -1: drawn at random and never recorded; recoverable from training_seed "
                   f"{plan.training_seed} (parity check replays the candidates)",
                   {"seed": -1, "training_seed": plan.training_seed})


@rule("checkpoint_deleted", "preview", in_check=True)
def _checkpoint_deleted(plan, item, ctx):
    if not item.replayable and "deleted" in item.reason:
        return Finding(f"the checkpoint for step {item.step} was deleted", {"step": item.step})
    return None


@rule("quantized_text_encoder", "preview", in_check=True)
def _quantized_text_encoder(plan, item, ctx):
    if plan.quantize_te:
        return Finding(
            f"the previews used a {plan.qtype_te}-quantised text encoder",
            {"quantize_te": True, "qtype_te": plan.qtype_te},
        )
    return None


@rule("quantized_base", "preview", in_check=True)
def _quantized_base(plan, item, ctx):
    if plan.quantize and item.weights != "base":
        return Finding(
            f"the transformer was {plan.qtype}-quantised: the LoRA ran unmerged",
            {"quantize": True, "qtype": plan.qtype},
        )
    return None


@rule("lora_saved_fp16", "preview", in_check=True)
def _lora_saved_fp16(plan, item, ctx):
    if item.weights != "base" and plan.save_dtype in ("float16", "fp16", "bfloat16", "bf16"):
        return Finding(
            f"the checkpoint is the LoRA rounded to {plan.save_dtype}", {"save_dtype": plan.save_dtype}
        )
    return None


@rule("negative_multiplier_merged", "preview", in_check=True)
def _negative_multiplier_merged(plan, item, ctx):
    m = item.network_multiplier
    if item.lora_merged and item.weights != "base" and m is not None and m < 0:
        return Finding(f"multiplier {m:g} was merged and never merged out", {"network_multiplier": m})
    return None


# ---------------------------------------------------------------------------------------------------------
# which weights made a preview (FACTS §1)


@rule("checkpoint_never_saved", "preview")
def _checkpoint_never_saved(plan, item, ctx):
    if not item.replayable and "no checkpoint was saved" in item.reason:
        return Finding(f"no checkpoint was saved at step {item.step}", {"step": item.step})
    return None


@rule("checkpoint_wrong_step", "preview")
def _checkpoint_wrong_step(plan, item, ctx):
    if item.weights == "none" and item.checkpoint is not None:
        found = next((c for c in ctx.job.checkpoints if c.file == item.checkpoint), None) if ctx.job else None
        held = found.training_step if found else None
        return Finding(
            f"{item.checkpoint} holds step {held if held is not None else '?'}, not {item.step}",
            {"file": item.checkpoint, "file_step": item.step, "training_info_step": held},
        )
    return None


@rule("final_checkpoint_missing", "preview")
def _final_checkpoint_missing(plan, item, ctx):
    if item.step and item.step == plan.train_steps and item.weights == "none" and item.checkpoint is None:
        return Finding(
            f"step {item.step} is the last round but {plan.job_name}.safetensors is missing",
            {"step": item.step, "expected": f"{plan.job_name}.safetensors"},
        )
    return None


@rule("step_not_sampled", "preview")
def _step_not_sampled(plan, item, ctx):
    if not item.replayable and "not a sampling step" in item.reason:
        return Finding(f"step {item.step} is not a sampling step of this config", {"step": item.step})
    return None


@rule("final_round_uses_final_file", "job")
def _final_round_uses_final_file(plan, item, ctx):
    last = [i for i in plan.items if i.weights == "final"]
    if last:
        return Finding(
            f"the step-{last[0].step} previews pair with {last[0].checkpoint}",
            {"step": last[0].step, "file": last[0].checkpoint},
        )
    return None


@rule("merge_drift", "preview")
def _merge_drift(plan, item, ctx):
    if not item.lora_merged or item.weights == "base":
        return None
    earlier = sorted({o.step for o in plan.items if o.lora_merged and 0 < o.step < item.step})
    if earlier:
        return Finding(
            "merged round after earlier merged rounds: the base weights had drifted",
            {"earlier_merged_steps": earlier},
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# how the model ran (FACTS §3 quantisation, precision, EMA)


@rule("layer_offloading", "preview")
def _layer_offloading(plan, item, ctx):
    if plan.layer_offloading and item.weights != "base":
        return Finding("layer_offloading: the LoRA ran unmerged", {"layer_offloading": True})
    return None


@rule("preview_dtype_not_bf16", "job")
def _preview_dtype(plan, item, ctx):
    if plan.train_dtype not in ("bf16", "bfloat16"):
        return Finding(f"previews ran in {plan.train_dtype}, not bf16", {"train_dtype": plan.train_dtype})
    return None


@rule("ema_previews", "job")
def _ema_previews(plan, item, ctx):
    if plan.use_ema:
        return Finding("previews were made with the EMA weights", {"use_ema": True})
    return None


@rule("multipliers_differ_in_round", "job")
def _multipliers_differ(plan, item, ctx):
    if plan.quantize or plan.layer_offloading:
        return None  # never merged anyway
    differing = {}
    for kind in ("sample", "first_sample"):
        prompts = [p for p in ctx.prompts() if p.round == kind]
        if len({p.settings.network_multiplier for p in prompts}) > 1:
            differing[kind] = {p.index: p.settings.network_multiplier for p in prompts}
    if differing:
        kind, values = next(iter(differing.items()))
        shown = ", ".join(_g(m) for m in values.values())
        return Finding(
            f"{kind} prompts use multipliers {shown}: every round ran the LoRA unmerged", differing
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# seeds (FACTS §2)


@rule("seed_carried_over", "job")
def _seed_carried_over(plan, item, ctx):
    carried = [p for p in ctx.prompts() if p.seed_from == "carried"]
    if carried:
        seeds = {p.label: p.settings.seed for p in carried}
        return Finding(
            f"{_labels(carried)} {'uses' if len(carried) == 1 else 'use'} seed {carried[0].settings.seed} carried over from an earlier item's seed "
            "(walk_seed is off)",
            {"seeds": seeds},
        )
    return None


@rule("walk_seed_random_start", "job")
def _walk_seed_random_start(plan, item, ctx):
    job = ctx.job
    starts = {
        k
        for k, s in (("sample", job.sample), ("first_sample", job.first_sample))
        if s and s.walk_seed and s.seed == -1
    }
    walked = [p for p in ctx.prompts() if p.round in starts and p.seed_from == "walk" and p.index > 0]
    if walked:
        return Finding(
            "walk_seed with seed -1: prompt 0 is random but the others are fixed ("
            + ", ".join(f"{p.label}: seed {p.settings.seed}" for p in walked)
            + ")",
            {"seeds": {p.label: p.settings.seed for p in walked}},
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# prompt text (FACTS §2 trigger and flags, §7)


@rule("negative_not_text", "preview")
def _negative_not_text(plan, item, ctx):
    if item.prompt is not None and item.negative_prompt is None:
        return Finding("the negative prompt is not text (neg False or None): no previews are possible", {})
    return None


@rule("prompt_not_in_config", "preview")
def _prompt_not_in_config(plan, item, ctx):
    if item.prompt is None:
        return Finding(
            f"prompt {item.prompt_index} is not in the config", {"prompt_index": item.prompt_index}
        )
    return None


@rule("trigger_left_literal", "job")
def _trigger_left_literal(plan, item, ctx):
    if plan.trigger_word is not None:
        return None
    literal = [p for p in ctx.prompts() if "[trigger]" in p.raw]
    if literal:
        return Finding(
            f"'[trigger]' stayed literally in {_labels(literal)}: trigger_word is unset",
            {"prompts": [p.label for p in literal]},
        )
    return None


@rule("trigger_word_absent", "job")
def _trigger_word_absent(plan, item, ctx):
    word = plan.trigger_word
    if not word:
        return None
    absent = [p for p in ctx.prompts() if word not in p.settings.prompt]
    if absent:
        return Finding(
            f"the trigger word {word!r} is not in {_labels(absent)}",
            {"trigger_word": word, "prompts": [p.label for p in absent]},
        )
    return None


@rule("unknown_flags_dropped", "job")
def _unknown_flags(plan, item, ctx):
    found = [p for p in ctx.prompts() if p.settings.unknown_flags]
    if found:
        flags = {p.label: list(p.settings.unknown_flags) for p in found}
        shown = "; ".join(f"{label}: {' '.join(f)}" for label, f in flags.items())
        return Finding(f"unknown prompt flags were dropped ({shown})", {"flags": flags})
    return None


@rule("flag_quotes_kept", "job")
def _flag_quotes_kept(plan, item, ctx):
    quoted = {
        p.label: [f"--{flag} {content}" for flag, content in p.flags
                  if content[:1] in _QUOTES or content[-1:] in _QUOTES]
        for p in ctx.prompts()
    }  # fmt: skip
    quoted = {label: flags for label, flags in quoted.items() if flags}
    if quoted:
        shown = "; ".join(f"{label}: {', '.join(f)}" for label, f in quoted.items())
        return Finding(f"quotes kept in flag values ({shown})", {"flags": quoted})
    return None


@rule("size_floored_to_8", "job")
def _size_floored_to_8(plan, item, ctx):
    changed = {}
    for p in ctx.prompts():
        asked = (p.settings.width, p.settings.height)
        got = requested_size(*asked)
        if got != asked:
            changed[p.label] = {"config": list(asked), "preview": list(got)}
    if changed:
        shown = ", ".join(f"{v['config'][0]}x{v['config'][1]} -> {v['preview'][0]}x{v['preview'][1]}"
                          for v in changed.values())  # fmt: skip
        return Finding(f"sizes floored to 8 / raised to 64: {shown}", {"sizes": changed})
    return None


# ---------------------------------------------------------------------------------------------------------
# reference images (FACTS §3 "Reference image", §6)


@rule("ctrl_img_numbered_ignored", "job")
def _ctrl_img_numbered(plan, item, ctx):
    ignored = {}
    for kind in ("sample", "first_sample"):
        for i, raw in enumerate(ctx.raw_sample_items(kind)):
            extra = {k: raw[k] for k in ("ctrl_img_1", "ctrl_img_2", "ctrl_img_3")
                     if raw.get(k) is not None and raw.get(k) != raw.get("ctrl_img")}  # fmt: skip
            if extra:
                ignored[f"{kind}.samples[{i}]"] = extra
    if ignored:
        shown = "; ".join(f"{where}: {', '.join(keys)}" for where, keys in ignored.items())
        return Finding(f"ctrl_img_1..3 were ignored by the previews ({shown})", {"ignored": ignored})
    return None


@rule("reference_image_missing", "preview")
def _reference_image_missing(plan, item, ctx):
    if item.ctrl_img_recorded and item.ctrl_img is None:
        return Finding(
            f"reference image {item.ctrl_img_recorded} not found", {"ctrl_img": item.ctrl_img_recorded}
        )
    return None


@rule("ctrl_img_resized", "preview")
def _ctrl_img_resized(plan, item, ctx):
    if item.ctrl_img is None or item.width is None:
        return None
    size = ctx.image(item.ctrl_img)
    if isinstance(size, tuple) and size != (item.width, item.height):
        return Finding(
            f"reference image {Path(item.ctrl_img).name} is {size[0]}x{size[1]}; the preview used it resized to "
            f"{item.width}x{item.height}",
            {"image_size": list(size), "resized_to": [item.width, item.height]},
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# the preview files


@rule("preview_unreadable", "preview")
def _preview_unreadable(plan, item, ctx):
    size = ctx.image(item.file)
    if isinstance(size, str):
        return Finding(f"{item.file} cannot be read: {size}", {"error": size})
    return None


@rule("preview_size_mismatch", "preview")
def _preview_size_mismatch(plan, item, ctx):
    size = ctx.image(item.file)
    saved = plan.saved_size(item)  # FLUX.1 saves the floor-16 image, OmniGen2 the requested size
    if saved is not None and isinstance(size, tuple) and size != saved:
        return Finding(
            f"the preview is {size[0]}x{size[1]} but the config makes it {saved[0]}x{saved[1]}",
            {"preview_size": list(size), "config_size": [item.width, item.height], "expected_size": list(saved)},
        )
    return None


@rule("preview_reencoded", "preview")
def _preview_reencoded(plan, item, ctx):
    if not isinstance(ctx.image(item.file), tuple):
        return None
    from parity.scores import identify_encoding

    try:
        encoding = identify_encoding(ctx.samples_dir / item.file)
    except InputError:
        return None  # not an image format ai-toolkit writes: nothing to say about its encoding
    if encoding.format == "JPEG" and not encoding.matches_aitoolkit_default:
        return Finding(
            f"the preview is {encoding.describe()}, not ai-toolkit's JPEG quality 75 4:2:0",
            {"encoding": encoding.describe()},
        )
    return None


@rule("preview_barely_changes", "job")
def _preview_barely_changes(plan, item, ctx):
    from parity.scores import compute_metrics, load_rgb

    by_prompt: dict[int, list[ReplayItem]] = {}
    for i in plan.items:
        if i.round == "sample" and isinstance(ctx.image(i.file), tuple):
            by_prompt.setdefault(i.prompt_index, []).append(i)
    still = {}
    for index, items in sorted(by_prompt.items()):
        first, last = min(items, key=lambda i: i.step), max(items, key=lambda i: i.step)
        if first.step == last.step or ctx.image(first.file) != ctx.image(last.file):
            continue
        ssim = compute_metrics(load_rgb(ctx.samples_dir / first.file), load_rgb(ctx.samples_dir / last.file))[
            0
        ].ssim
        if ssim > BARELY_CHANGES_SSIM:
            still[f"sample prompt {index}"] = {"steps": [first.step, last.step], "ssim": round(ssim, 4)}
    if still:
        shown = ", ".join(f"{label} (step {v['steps'][0]} vs {v['steps'][1]}: SSIM {v['ssim']:.3f})"
                          for label, v in still.items())  # fmt: skip
        return Finding(
            f"previews barely change across training: {shown}",
            {"prompts": still, "threshold_ssim": BARELY_CHANGES_SSIM},
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# the LoRA files (FACTS §4, §7)


# ---------------------------------------------------------------------------------------------------------
# FLUX.1 (pipelines/flux/rules.py has the quirks; FLUX.md the ai-toolkit code they come from)


@rule("flux_size_floored_to_16", "preview", in_check=True)
def _flux_size_floored(plan, item, ctx):
    if item.width and (item.gen_width, item.gen_height) != (item.width, item.height):
        return Finding(
            f"{item.width}x{item.height} is not a multiple of 16: the preview was generated and saved at "
            f"{item.gen_width}x{item.gen_height}",
            {"requested": [item.width, item.height], "generated": [item.gen_width, item.gen_height]},
        )
    return None


@rule("flux_negative_unused", "preview", in_check=True)
def _flux_negative_unused(plan, item, ctx):
    if item.negative_prompt and not plan.family.rules.uses_negative(item.guidance_scale or 0.0, plan.model_flags):
        return Finding(f"negative prompt {item.negative_prompt!r} never reached the preview",
                       {"negative_prompt": item.negative_prompt})
    return None


@rule("flux_guidance_embedding", "job")
def _flux_guidance_embedding(plan, item, ctx):
    if plan.model_flags.get("use_flux_cfg"):
        return None
    values = sorted({i.guidance_scale for i in plan.items if i.guidance_scale is not None})
    if values:
        return Finding(f"guidance {', '.join(map(_g, values))} went into the guidance embedding only",
                       {"guidance_scales": values})
    return None


@rule("flux_true_cfg", "job")
def _flux_true_cfg(plan, item, ctx):
    if plan.model_flags.get("use_flux_cfg"):
        return Finding("previews sampled with true CFG and no guidance embedding (model.use_flux_cfg: true)")
    return None


@rule("flux_attn_masking", "job")
def _flux_attn_masking(plan, item, ctx):
    if plan.model_flags.get("attn_masking"):
        return Finding("T5 padding zeroed in every preview (model.attn_masking)")
    return None


@rule("flux_quantized_lora_hooks", "job")
def _flux_quantized_lora(plan, item, ctx):
    if plan.quantize:
        return Finding(f"transformer quantised ({plan.qtype}): the LoRA ran unmerged in every preview",
                       {"qtype": plan.qtype})
    return None


def lora_keys_cause(problem: str, checkpoint: str | None) -> Cause:
    """LoRA keys that match no OmniGen2 layer (or no layer at all): an error at 0 layers, else a warning."""
    return get_rule("lora_keys_unmatched").cause(Finding(
        f"LoRA keys that match nothing in {checkpoint or 'the LoRA'}",
        {"problem": problem, "file": checkpoint},
        "error" if "0 layers" in problem else "warning",
    ))  # fmt: skip


@rule("lora_keys_unmatched", "preview")
def _lora_keys_unmatched(plan, item, ctx):
    if item.checkpoint is None or ctx.job is None:
        return None
    checked = ctx.lora(item.checkpoint)
    if isinstance(checked, str):
        return None  # checkpoint_unreadable says it
    problem = checked[1].problem()
    if problem:
        cause = lora_keys_cause(problem, item.checkpoint)
        return Finding(cause.title, cause.evidence | {"checked_against": ctx.skeleton()[1]}, cause.severity)
    return None


@rule("checkpoint_unreadable", "preview")
def _checkpoint_unreadable(plan, item, ctx):
    if item.checkpoint is None or ctx.job is None:
        return None
    checked = ctx.lora(item.checkpoint)
    if isinstance(checked, str):
        return Finding(
            f"{item.checkpoint} cannot be read: {checked}", {"file": item.checkpoint, "error": checked}
        )
    return None


@rule("lora_untrained", "preview")
def _lora_untrained(plan, item, ctx):
    if item.checkpoint is None or item.step == 0 or ctx.job is None:
        return None
    checked = ctx.lora(item.checkpoint)
    if (
        not isinstance(checked, str)
        and checked[0].modules
        and all(not m.up.any() for m in checked[0].modules.values())
    ):
        return Finding(f"{item.checkpoint} is untrained: every B matrix is zero", {"file": item.checkpoint})
    return None


@rule("lora_nonfinite", "preview")
def _lora_nonfinite(plan, item, ctx):
    if item.checkpoint is None or ctx.job is None:
        return None
    checked = ctx.lora(item.checkpoint)
    if isinstance(checked, str) or not checked[0].nonfinite:
        return None
    from parity.lora_report import nonfinite_text

    nonfinite = checked[0].nonfinite
    return Finding(f"{item.checkpoint}: {nonfinite_text(nonfinite)}",
                   {"file": item.checkpoint, "tensors": dict(sorted(nonfinite.items())[:20])})


# ---------------------------------------------------------------------------------------------------------
# where ai-toolkit-inference departs from the previews (FACTS §6): informational


@rule("server_empty_negative_once", "job")
def _ir_empty_negative(plan, item, ctx):
    empty = [p for p in ctx.prompts() if p.settings.negative_prompt == "" and p.settings.guidance_scale > 1]
    if empty:
        return Finding(f"{_labels(empty)} have an empty negative prompt (templated twice in training, once by "
                       "ai-toolkit-inference)", {"prompts": [p.label for p in empty]})  # fmt: skip
    return None


@rule("server_size_floor16", "job")
def _ir_size_floored(plan, item, ctx):
    sizes = sorted({(i.width, i.height) for i in plan.items if i.width and (i.width % 16 or i.height % 16)})
    if sizes:
        shown = ", ".join(f"{w}x{h} -> {w // 16 * 16}x{h // 16 * 16}" for w, h in sizes)
        return Finding(
            f"ai-toolkit-inference returns smaller images: {shown}", {"sizes": [list(s) for s in sizes]}
        )
    return None


@rule("server_jpeg_q95", "job")
def _ir_jpeg_quality(plan, item, ctx):
    if plan.sample_format.lower() in ("jpg", "jpeg"):
        return Finding(
            f"previews are JPEG q{PREVIEW_JPEG_QUALITY}, ai-toolkit-inference returns q{IR_JPEG_QUALITY}",
            {"preview_quality": PREVIEW_JPEG_QUALITY, "inference_quality": IR_JPEG_QUALITY},
        )
    return None


@rule("server_defaults_differ", "job")
def _ir_defaults_differ(plan, item, ctx):
    prompts = ctx.prompts()
    steps = sorted({p.settings.num_inference_steps for p in prompts} - {IR_STEPS})
    cfgs = sorted({p.settings.guidance_scale for p in prompts} - {IR_CFG})
    sizes = sorted(
        {requested_size(p.settings.width, p.settings.height) for p in prompts} - {(IR_SIZE, IR_SIZE)}
    )
    if not (steps or cfgs or sizes):
        return None
    parts = (
        ([f"steps {', '.join(map(str, steps))} (default {IR_STEPS})"] if steps else [])
        + ([f"cfg {', '.join(map(_g, cfgs))} (default {IR_CFG:g})"] if cfgs else [])
        + ([f"size {', '.join(f'{w}x{h}' for w, h in sizes)} (default {IR_SIZE}x{IR_SIZE})"] if sizes else [])
    )
    return Finding("the previews used " + "; ".join(parts),
                   {"steps": steps, "guidance_scale": cfgs, "sizes": [list(s) for s in sizes]})  # fmt: skip


@rule("server_seed_default", "job")
def _ir_default_seeds(plan, item, ctx):
    other = {p.label: p.settings.seed for p in ctx.prompts()
             if p.settings.seed is not None and p.settings.seed != IR_FIRST_SEED + p.index}  # fmt: skip
    if other:
        shown = ", ".join(f"{label}: {seed}" for label, seed in other.items())
        return Finding(f"seeds differ from ai-toolkit-inference's 42 + i ({shown})", {"seeds": other})
    return None


@rule("server_no_flag_parsing", "job")
def _ir_flags_not_parsed(plan, item, ctx):
    flagged = [p for p in ctx.prompts() if p.flags]
    if flagged:
        return Finding(
            f"'--' flags in {_labels(flagged)} would reach ai-toolkit-inference as prompt text",
            {"prompts": [p.label for p in flagged]},
        )
    return None


@rule("server_single_multiplier", "job")
def _ir_per_prompt_multiplier(plan, item, ctx):
    values = {p.label: p.settings.network_multiplier for p in ctx.prompts()}
    if len(set(values.values())) > 1:
        shown = ", ".join(f"{label}: {_g(m)}" for label, m in values.items())
        return Finding(f"per-prompt LoRA multipliers ({shown})", {"multipliers": values})
    return None


# where ai-toolkit-inference's FLUX.1-dev pipeline departs (src/pipelines/flux_dev.py, base.py; parity/server.py
# renders each): informational


@rule("server_lora_peft_bf16", "job")
def _ir_flux_lora_adapter(plan, item, ctx):
    rounds = sorted({i.step for i in plan.items if i.weights != "base"})
    if rounds:
        return Finding(f"the LoRA of steps {', '.join(map(str, rounds))} would run as a bf16 PEFT adapter",
                       {"steps": rounds})  # fmt: skip
    return None


@rule("server_no_true_cfg", "job")
def _ir_flux_no_true_cfg(plan, item, ctx):
    if plan.model_flags.get("use_flux_cfg"):
        return Finding("previews used true CFG (model.use_flux_cfg); ai-toolkit-inference never does")
    return None


@rule("server_no_attn_masking", "job")
def _ir_flux_no_attn_masking(plan, item, ctx):
    if plan.model_flags.get("attn_masking"):
        return Finding("previews zeroed T5's padding (model.attn_masking); ai-toolkit-inference does not")
    return None


@rule("server_no_quantization", "job")
def _ir_not_quantized(plan, item, ctx):
    if plan.quantize:
        return Finding(f"previews ran a {plan.qtype}-quantised transformer; ai-toolkit-inference runs bf16",
                       {"qtype": plan.qtype})  # fmt: skip
    return None


@rule("server_no_te_quantization", "job")
def _ir_te_not_quantized(plan, item, ctx):
    if plan.quantize_te:
        return Finding("previews were encoded with a quantised text encoder; ai-toolkit-inference's is bf16",
                       {"quantize_te": True})  # fmt: skip
    return None


@rule("server_base_model", "job")
def _ir_flux_base_model(plan, item, ctx):
    name = (plan.base_model or "").rstrip("/")
    if name and name.split("/")[-1].lower() != IR_FLUX_BASE.split("/")[-1].lower():
        return Finding(f"trained on {name}; ai-toolkit-inference serves {IR_FLUX_BASE}",
                       {"base_model": name, "inference_base_model": IR_FLUX_BASE})  # fmt: skip
    return None


# ---------------------------------------------------------------------------------------------------------
# running the rules

RULES: tuple[Rule, ...] = tuple(_REGISTERED)  # every rule, in registration order


def item_causes(plan: ReplayPlan, item: ReplayItem, ctx: LintContext | None = None) -> list[Cause]:
    """Every cause readable without a replay that applies to ``item``, in registry order.

    Without ``ctx`` only the ``in_check`` rules (plan and item alone); with the job folder's context every
    preview-scope rule (files, previews, checkpoints), except the LoRA key match that ``parity check`` reports
    from the replay itself.
    """
    causes = []
    for r in RULES:
        wanted = r.in_check or (ctx is not None and r.scope == "preview" and r.code != "lora_keys_unmatched")
        wanted = wanted and r.serves(plan)
        if wanted and (finding := r.applies(plan, item, ctx or LintContext())) is not None:
            causes.append(r.cause(finding))
    return causes


def job_codes(plan: ReplayPlan, ctx: LintContext) -> list[str]:
    """The codes of the job-scope rules that hold for ``plan`` (what diagnosis orders its experiments by)."""
    return [r.code for r in RULES if r.scope == "job" and r.serves(plan) and r.applies(plan, None, ctx) is not None]


@dataclass(frozen=True)
class LintFinding:
    """A cause found by lint and the previews it concerns (empty for a job-level rule)."""

    cause: Cause
    scope: str
    previews: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**self.cause.to_dict(), "scope": self.scope, "previews": list(self.previews)}


@dataclass(frozen=True)
class LintReport:
    job_dir: str
    job_name: str
    findings: tuple[LintFinding, ...]
    rules_checked: int
    lora_checked_against: str | None  # the transformer the checkpoints' keys were matched with

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(f.cause.severity == s for f in self.findings) for s in reversed(SEVERITIES)}

    @property
    def codes(self) -> list[str]:
        return [f.cause.code for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": {"dir": self.job_dir, "name": self.job_name},
            "rules_checked": self.rules_checked,
            "lora_checked_against": self.lora_checked_against,
            "counts": self.counts,
            "findings": [f.to_dict() for f in self.findings],
        }


def lint(
    job_dir: str | Path, base_model: str | None = None, assets_dir: str | Path | None = None
) -> LintReport:
    """Run every rule on ``job_dir``: errors first, then warnings, then informational findings.

    ``base_model`` (a folder) gives the transformer whose module names and shapes the checkpoints are matched
    with; without it the config's base model if it is on this machine, else the real OmniGen2 architecture.
    Raises InputError for a folder, config or base model that cannot be used.
    """
    plan = build_plan(job_dir, assets_dir)
    ctx = LintContext(job=read_job_folder(job_dir), base_model=base_model)
    findings: list[LintFinding] = []
    rules = [r for r in RULES if r.serves(plan)]
    for r in rules:
        if r.scope == "job":
            if (finding := r.applies(plan, None, ctx)) is not None:
                findings.append(LintFinding(r.cause(finding), "job"))
            continue
        grouped: dict[tuple[str, str], tuple[Cause, list[str]]] = {}
        for item in plan.items:
            if (finding := r.applies(plan, item, ctx)) is not None:
                cause = r.cause(finding)
                grouped.setdefault((cause.severity, cause.title), (cause, []))[1].append(item.file)
        findings += [LintFinding(cause, "preview", tuple(files)) for cause, files in grouped.values()]
    findings.sort(key=lambda f: -SEVERITIES.index(f.cause.severity))
    return LintReport(
        job_dir=plan.job_dir,
        job_name=plan.job_name,
        findings=tuple(findings),
        rules_checked=len(rules),
        lora_checked_against=ctx.checked_against,
    )
