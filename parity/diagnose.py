"""Name the cause of a mismatch by experiment: flip one knob at a time and see what restores agreement.

For a preview whose replay does not pass, ``bisect`` replays it with one preview-relevant choice changed at a
time (cheapest and likeliest first: the preview file's own size, the LoRA, the chat template, the checkpoint,
the multiplier, the trigger word, the negative, the seed, guidance, steps, the noise draw, text-encoder
quantisation, the merge precision), stops once a flip makes it pass, and ranks the flips that helped by how much
agreement they restored. The LoRA's own effect (on vs off) is always measured and said plainly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from parity import catalogue
from parity.jobfolder import JobFolder
from parity.plan import ReplayItem, ReplayPlan
from parity.replay import NOISE_CANDIDATES, Knobs, Replayer
from parity.results import Cause
from parity.scores import Thresholds, Verdict, load_rgb, score_replay

GUIDANCE_VALUES = (1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 7.5, 8.0)
STEP_VALUES = (20, 25, 28, 30, 50)


@dataclass
class Flip:
    """One knob changed from what the replay used."""

    knob: str  # the cause code it would confirm
    label: str  # "seed 42 instead of 43"
    item: ReplayItem
    knobs: Knobs = field(default_factory=Knobs)
    algorithm: str | None = None
    fields: dict = field(default_factory=dict)  # what changed, for the catalogue's title (parity/catalogue.py)

    @property
    def title(self) -> str:
        return catalogue.kind(self.knob).title.format(**self.fields)


@dataclass
class FlipResult:
    flip: Flip
    ssim: float
    psnr_db: float
    exact: bool
    verdict: str = ""
    cached: bool = False  # its replay came from the replay cache (a re-run): it cost no replay

    def gap_closed(self, baseline_ssim: float) -> float:
        """The share of the SSIM gap to identity this flip closed (1: identical; 0 or less: no help)."""
        if self.exact:
            return 1.0
        return (self.ssim - baseline_ssim) / (1.0 - baseline_ssim) if baseline_ssim < 1.0 else 0.0


# When a flip counts as evidence. A flip that reaches the verdict the preview should have (EXACT where nothing else
# is expected to differ, PASS where the files predict a residual or the machine does not replay step 0 exactly)
# explains the mismatch completely. One that closes at least PARTIAL_GAP_SHARE of the SSIM gap is a partial
# explanation (a warning). Anything less moved the picture by noise: on the seed fault of og2_basic, the wrong
# knobs moved an unrelated picture's SSIM from 0.07 to 0.08-0.09 (1-2% of the gap), the right one to 0.99 (99%).
PARTIAL_GAP_SHARE = 0.5
# A knob already proven on another preview of the job needs less evidence where it is tried again: a quarter of the
# gap (noise-level flips moved 1-2%). On og2_odd's final round, whose replays keep a kernel residual of 4-8 levels
# on this project's CPU even with the right settings, the right guidance closed 49% of the gap: all there was to close.
CONFIRM_GAP_SHARE = 0.25


def explains(result: FlipResult, expect: str) -> bool:
    """Whether ``result`` reached the verdict ``expect`` (EXACT, or PASS where a residual is predicted)."""
    return result.exact or (expect == "PASS" and result.verdict == "PASS")


def replace(plan: ReplayPlan, item: ReplayItem, **changes) -> ReplayItem:
    """A copy of ``item`` with ``changes``; a new size recomputes the generation size (the family's rule)."""
    if "width" in changes or "height" in changes:
        w, h = changes.get("width", item.width), changes.get("height", item.height)
        changes["gen_width"], changes["gen_height"] = plan.generation_size(w, h)
    return dataclasses.replace(item, **changes)


def trigger_candidates(job: JobFolder, plan: ReplayPlan) -> list[str]:
    """Trigger words the LoRA was trained with, from its metadata (``ss_tag_frequency`` folder names)."""
    words = []
    for checkpoint in job.checkpoints:
        try:
            tags = json.loads(checkpoint.metadata.get("ss_tag_frequency", "{}"))
        except json.JSONDecodeError:
            continue
        for folder in tags:
            word = folder.split("_", 1)[-1]
            if word and word not in words:
                words.append(word)
    return words


def candidate_flips(plan: ReplayPlan, job: JobFolder, item: ReplayItem, preview_size: tuple[int, int],
                    algorithm: str) -> list[Flip]:
    """Every single-knob change worth trying for ``item``, cheapest and likeliest first."""
    others = [i for i in plan.items if i is not item]
    return (_size_and_weight_flips(plan, job, item, preview_size) + _prompt_flips(plan, job, item, others)
            + _seed_flips(plan, job, item, others) + _sampling_flips(plan, item)
            + _machine_flips(plan, item, algorithm))


def _size_and_weight_flips(plan, job, item, preview_size) -> list[Flip]:
    flips: list[Flip] = []
    # 1. The preview file's own size: a config edited after training replays at the wrong size.
    if preview_size != plan.saved_size(item):
        w, h = preview_size
        flips.append(Flip("size_changed", f"size {w}x{h} (the preview file's) instead of {item.width}x{item.height}",
                          replace(plan, item, width=w, height=h),
                          fields={"config": f"{item.width}x{item.height}", "preview": f"{w}x{h}"}))
    # 2. The LoRA's effect and the family's own ways to get a preview wrong (e.g. OmniGen2's chat template).
    if item.weights != "base":
        flips.append(Flip("lora_off", "without the LoRA", item, Knobs(lora=False)))
    for knob in plan.family.knob_flips(item, plan.model_flags):
        flips.append(Flip(knob.code, knob.label, item, Knobs(options=knob.options)))
    # 3. Which checkpoint.
    for checkpoint in job.checkpoints:
        if checkpoint.file != item.checkpoint and item.weights != "base":
            flips.append(Flip("checkpoint_mismatch", f"checkpoint {checkpoint.file} instead of {item.checkpoint}",
                              replace(plan, item, checkpoint=checkpoint.file, weights="checkpoint"),
                              fields={"checkpoint": item.checkpoint}))
    # 4. Multiplier.
    for m in (1.0, 0.5, 1.5, 0.75, 1.25, 2.0, 0.0):
        if item.weights != "base" and item.network_multiplier is not None and m != item.network_multiplier:
            flips.append(Flip("multiplier_changed", f"multiplier {m:g} instead of {item.network_multiplier:g}",
                              replace(plan, item, network_multiplier=m), fields={"multiplier": f"{m:g}"}))
    return flips

def _prompt_flips(plan, job, item, others) -> list[Flip]:
    flips: list[Flip] = []
    # 5. Trigger word.
    for word in trigger_candidates(job, plan):
        if plan.trigger_word and plan.trigger_word in (item.prompt or "") and word != plan.trigger_word:
            flips.append(Flip("trigger_word_changed", f"trigger word {word!r} instead of {plan.trigger_word!r}",
                              replace(plan, item, prompt=item.prompt.replace(plan.trigger_word, word)),
                              fields={"word": word}))
    # 6. Negative prompt.
    negatives = {""} | {o.negative_prompt for o in others if isinstance(o.negative_prompt, str)}
    if not plan.family.rules.uses_negative(item.guidance_scale, plan.model_flags):
        negatives = set()  # the negative never reaches this preview's picture (FLUX.1 without true CFG)
    for negative in sorted(negatives - {item.negative_prompt}):
        flips.append(Flip("negative_changed", f"negative {negative!r} instead of {item.negative_prompt!r}",
                          replace(plan, item, negative_prompt=negative), fields={"negative": negative}))
    return flips


def _seed_flips(plan, job, item, others) -> list[Flip]:
    flips: list[Flip] = []
    # 7. Seed: walk_seed toggled (the prompt index added or taken away), neighbours, common defaults.
    if item.seed is not None and item.prompt_index > 0:
        walked = item.seed - item.prompt_index if job.sample.walk_seed else item.seed + item.prompt_index
        if walked >= 0:
            flips.append(Flip("walk_seed_changed",
                              f"seed {walked} (walk_seed {'off' if job.sample.walk_seed else 'on'})",
                              replace(plan, item, seed=walked),
                              fields={"state": "off" if job.sample.walk_seed else "on"}))
    seeds: list[int] = []
    n = len({o.prompt_index for o in plan.items}) + 1
    if item.seed is not None:
        seeds += [item.seed + k for k in range(-n, n + 1) if k]
    seeds += [42 + item.prompt_index, 42, 0, item.prompt_index] + [o.seed for o in others if o.seed is not None]
    for seed in dict.fromkeys(s for s in seeds if s is not None and s >= 0 and s != item.seed):
        flips.append(Flip("seed_changed", f"seed {seed} instead of {item.seed}", replace(plan, item, seed=seed),
                          fields={"seed": seed}))
    return flips


def _sampling_flips(plan, item) -> list[Flip]:
    flips: list[Flip] = []
    # 8. Guidance and steps.
    guidances = sorted(set(GUIDANCE_VALUES + tuple(item.guidance_scale + d for d in (-1, -0.5, 0.5, 1))),
                       key=lambda g: abs(g - item.guidance_scale))
    for g in guidances:
        if item.guidance_scale is not None and g > 0 and abs(g - item.guidance_scale) > 1e-9:
            flips.append(Flip("guidance_changed", f"guidance {g:g} instead of {item.guidance_scale:g}",
                              replace(plan, item, guidance_scale=float(g)), fields={"guidance": f"{g:g}"}))
    steps = [item.num_inference_steps + d for d in (-1, 1, -2, 2, -3, 3, 4, 6)] + list(STEP_VALUES)
    for s in dict.fromkeys(steps):
        if s >= 1 and s != item.num_inference_steps:
            flips.append(Flip("steps_changed", f"{s} steps instead of {item.num_inference_steps}",
                              replace(plan, item, num_inference_steps=s), fields={"steps": s}))
    return flips


def _machine_flips(plan, item, algorithm) -> list[Flip]:
    flips: list[Flip] = []
    # 9. The noise draw, text-encoder quantisation, merge precision.
    for name in NOISE_CANDIDATES:
        if name != algorithm:
            flips.append(Flip("noise_algorithm", f"noise {name} instead of {algorithm}", item, algorithm=name,
                              fields={"algorithm": name}))
    flips.append(Flip("te_quantization_mismatch",
                      f"text encoder {'unquantised' if plan.quantize_te else 'qfloat8'} instead of as configured",
                      item, Knobs(te_quantized=not plan.quantize_te)))
    if item.weights != "base":
        flips.append(Flip("merge_precision", "LoRA fused in bf16 from the file dtype", item, Knobs(merge_mode="server")))
    return flips


# The experiments ``candidate_flips`` makes (each family adds its own, ``Family.knob_flips``): catalogue codes.
EXPERIMENTS = ("size_changed", "lora_off", "checkpoint_mismatch", "multiplier_changed", "trigger_word_changed",
               "negative_changed", "walk_seed_changed", "seed_changed", "guidance_changed", "steps_changed",
               "noise_algorithm", "te_quantization_mismatch", "merge_precision")


def experiment_codes() -> tuple[str, ...]:
    """Every experiment diagnosis can run, the families' own included."""
    from pipelines.registry import families

    return EXPERIMENTS + tuple(dict.fromkeys(k.code for f in families() for k in f.knob_flips(None, None)))


# Knobs that change the whole picture (an unrelated image) vs. those that keep its composition.
PICTURE_KNOBS = ("size_changed", "walk_seed_changed", "seed_changed", "noise_algorithm")


def order_by_likelihood(flips: list[Flip], baseline_ssim: float) -> list[Flip]:
    """An unrelated picture (low SSIM) is most likely a seed, size or noise change; the same picture with
    drift is most likely guidance, steps, the negative, the trigger word or the weights. Order stays stable."""
    unrelated = baseline_ssim < 0.5
    return sorted(flips, key=lambda f: (f.knob in PICTURE_KNOBS) != unrelated)


def order_flips(flips: list[Flip], baseline_ssim: float, suspects: dict[str, str] | None = None) -> list[Flip]:
    """The order to try ``flips`` in: by likelihood (:func:`order_by_likelihood`), and within each group the
    experiments lint's findings point to first (``suspects``: experiment code -> the lint code that suggests it,
    in the order lint found them). A hint never outranks the picture: a seed lint suspects comes before the
    multipliers it suspects when the replay is an unrelated picture."""
    unrelated = baseline_ssim < 0.5
    rank = {code: n for n, code in enumerate(suspects or {})}
    rank["lora_off"] = -1  # the LoRA's own effect stays first of its group: what the report always says
    return sorted(flips, key=lambda f: ((f.knob in PICTURE_KNOBS) != unrelated, rank.get(f.knob, len(rank))))


def bisect(replayer: Replayer, plan: ReplayPlan, job: JobFolder, item: ReplayItem, preview_path: Path,
           baseline_ssim: float, thresholds: Thresholds, budget: int = 80, expect: str = "EXACT",
           progress: Callable[[str], None] | None = None, target_name: str = "the preview",
           first: list[Flip] = (), lookup=None, keep=None, suspects: dict[str, str] | None = None,
           ) -> tuple[list[Cause], list[FlipResult], FlipResult | None]:
    """Flip knobs one at a time for a preview that does not match, ``first`` (explanations already proven in
    this job, carried over to this preview) before the candidates, the ones lint's findings point to
    (``suspects``, see :func:`order_flips`) before the rest, and stop at the first complete explanation.

    ``expect`` is the verdict that counts as explained (see :func:`explains`). ``lookup(item, key)`` finds a flip's
    replay in the replay cache and ``keep(item, replay)`` stores a new one there. Returns the causes (the
    explanation, partial explanations, and what was tried without effect), every result, and the explanation.
    """
    preview = load_rgb(preview_path)
    size = (preview.shape[1], preview.shape[0])
    flips = order_flips(candidate_flips(plan, job, item, size, replayer.noise_algorithm), baseline_ssim, suspects)
    flips = list(first) + flips[: max(0, budget - len(first))]
    results: list[FlipResult] = []
    explained = None
    carried = {(f.knob, f.label) for f in first}
    for flip in flips:
        if progress:
            progress(flip.label)
        result = try_flip(replayer, flip, preview_path, thresholds, lookup, keep)
        if result is None:
            continue
        results.append(result)
        if explains(result, expect):
            explained = result
            break
        if (flip.knob, flip.label) in carried and result.gap_closed(baseline_ssim) >= CONFIRM_GAP_SHARE:
            break  # proven elsewhere and effective here: the job-level check (confirm_elsewhere) rules on it
    partial = CONFIRM_GAP_SHARE if results and (results[-1].flip.knob, results[-1].flip.label) in carried \
        else PARTIAL_GAP_SHARE
    causes = rank_causes(results, baseline_ssim, thresholds, expect, suspects, partial)
    lora_off = next((r for r in results if r.flip.knob == "lora_off"), None)
    # with nothing else explaining it (or the LoRA itself explaining it), what the LoRA does to this image matters
    if lora_off is not None and (explained is None or explained.flip.knob == "lora_off"):
        causes.append(lora_effect_cause(lora_off, baseline_ssim, item, target_name))
    return causes, results, explained


def try_flip(replayer: Replayer, flip: Flip, target: Path, thresholds: Thresholds, lookup=None,
             keep=None) -> FlipResult | None:
    """Replay one flip (from the replay cache when it is there) and score it; None when it cannot run (e.g. no
    quantisation package): that is simply not evidence."""
    try:
        replay = replayer.replay_or_cached(flip.item, flip.algorithm, lookup, knobs=flip.knobs)
        if keep is not None and not replay.cached:
            keep(flip.item, replay)
    except Exception:
        return None
    score = score_replay(target, replay.pixels, thresholds)
    return FlipResult(flip, score.metrics.ssim, score.metrics.psnr_db, score.verdict == Verdict.EXACT,
                      score.verdict.value, bool(replay.cached))


def rank_causes(results: list[FlipResult], baseline_ssim: float, thresholds: Thresholds,
                expect: str = "EXACT", suspects: dict[str, str] | None = None,
                partial: float = PARTIAL_GAP_SHARE) -> list[Cause]:
    """The complete explanation (error) and partial ones (warnings), best first, with their evidence (and the lint
    finding that pointed to it, from ``suspects``); the flips that moved SSIM by noise only are listed in one note
    ("tried, no effect"), never as causes."""
    ranked = sorted((r for r in results if r.flip.knob != "lora_off"), key=lambda r: (-r.exact, -r.ssim))
    causes, seen, idle = [], set(), []
    for r in ranked:
        complete = explains(r, expect)
        if not complete and r.gap_closed(baseline_ssim) < partial:
            idle.append(r)
            continue
        if r.flip.knob in seen:
            continue
        seen.add(r.flip.knob)
        detail = f"with {r.flip.label} SSIM rises from {baseline_ssim:.2f} to {r.ssim:.2f}"
        detail += " (identical pixels)" if r.exact else ""
        detail += ": a complete explanation" if complete else (
            f"; only a partial explanation ({r.gap_closed(baseline_ssim):.0%} of the gap closed)")
        evidence = {"flip": r.flip.label, "ssim_before": round(baseline_ssim, 4), "ssim_after": round(r.ssim, 4),
                    "exact": r.exact, "rank": len(causes) + 1, "proven": complete, "complete": complete,
                    "gap_closed": round(r.gap_closed(baseline_ssim), 4), "partial_gap_share": partial}
        if suspects and r.flip.knob in suspects:
            evidence["suggested_by"] = suspects[r.flip.knob]  # the lint finding that had it tried first
        causes.append(catalogue.cause(r.flip.knob, severity="error" if complete else "warning", explanation=detail,
                                      evidence=evidence, **r.flip.fields))
    if idle:
        shown = ", ".join(f"{r.flip.label} ({r.ssim:.2f})" for r in idle[:8])
        more = f" and {len(idle) - 8} more" if len(idle) > 8 else ""
        causes.append(catalogue.cause(
            "diagnosis_tried", count=len(idle),
            explanation=f"Each moved SSIM by less than {partial:.0%} of the gap from {baseline_ssim:.2f}: "
                        f"{shown}{more}.",
            evidence={"tried": [{"flip": r.flip.label, "ssim": round(r.ssim, 4)} for r in idle]},
        ))
    return causes


def analogue(flip: Flip, source: ReplayItem, target: ReplayItem, plan: ReplayPlan) -> Flip | None:
    """``flip``, proven on ``source``, as it applies to ``target``: the same change where ``target`` has the same
    setting (a seed shifted by the same amount, the same guidance, steps, negative or knob); None where it cannot
    affect ``target``."""
    changed = {k: getattr(flip.item, k) for k in ("seed", "guidance_scale", "num_inference_steps",
                                                   "negative_prompt", "network_multiplier", "prompt", "width",
                                                   "height", "checkpoint")
               if getattr(flip.item, k) != getattr(source, k)}
    if flip.knob in ("checkpoint_mismatch", "size_changed", "lora_off"):
        return None  # tied to one preview's own file or step
    if "seed" in changed:
        if target.seed is None or source.seed is None:
            return None
        # a fault in the section's seed reaches section and walk seeds; one in a sample's own seed, the prompts it
        # carries over to; a --seed flag is each prompt's own (the section's seed never reached it)
        origins = {target.seed_from, source.seed_from}
        if not (origins <= {"section", "walk"} or origins <= {"item", "carried"}) or "flag" in origins:
            return None
        delta = flip.item.seed - source.seed
        if flip.knob == "walk_seed_changed":  # the prompt index added or taken away: each preview's own
            delta = target.prompt_index * (1 if delta > 0 else -1)
            if target.prompt_index == 0:
                return None
        changed["seed"] = target.seed + delta
        if changed["seed"] < 0:
            return None
    for key in changed:
        if key != "seed" and getattr(target, key) != getattr(source, key):
            return None  # the target does not have the setting this flip corrected
    if not changed and flip.knobs == Knobs() and flip.algorithm is None:
        return None
    if "network_multiplier" in changed and target.weights == "base":
        return None
    item = replace(plan, target, **changed) if changed else target
    if "seed" not in changed:
        return dataclasses.replace(flip, item=item)
    fields = {"seed": changed["seed"]} if flip.knob == "seed_changed" else flip.fields
    return dataclasses.replace(flip, item=item, label=f"seed {changed['seed']} instead of {target.seed}",
                               fields=fields)


def lora_effect_cause(result: FlipResult, baseline_ssim: float, item: ReplayItem,
                      target_name: str = "the preview") -> Cause:
    """Say plainly what the LoRA does to this image: LoRA on vs off, both against ``target_name``."""
    off = result.ssim
    if off > baseline_ssim + 0.02:
        title = f"{target_name} is closer to the base model WITHOUT the LoRA"
        severity = "error"
    elif abs(off - baseline_ssim) <= 0.02:
        title = "LoRA on and off give the same agreement: the LoRA barely changes this preview"
        severity = "warning"
    else:
        title = f"the LoRA's effect is visible: {target_name} is closer to the replay with it"
        severity = "info"
    return catalogue.cause(
        "lora_effect", title, severity=severity,
        explanation=f"against {target_name}, SSIM with the LoRA {baseline_ssim:.2f}, without it {off:.2f}",
        fix="If the LoRA has no effect, check that its keys load and that training moved it (parity lora FILE).",
        evidence={"ssim_lora_on": round(baseline_ssim, 4), "ssim_lora_off": round(off, 4), "step": item.step},
    )


def noise_floor(items) -> tuple[float, float] | None:
    """The step-0 (base-only) drift of this machine: (lowest SSIM, highest mean abs diff); None without step 0.
    Only previews that match count (EXACT or PASS): one failing for another reason (a wrong seed) is no floor."""
    base = [i for i in items if i.step == 0 and i.score is not None and i.score.verdict.value in ("EXACT", "PASS")]
    if not base:
        return None
    return min(i.score.metrics.ssim for i in base), max(i.score.metrics.mean_abs_diff for i in base)


def floor_cause(item, floor: tuple[float, float]) -> Cause | None:
    """A later preview that drifts no more than the step-0 previews: hardware and kernels, not the LoRA."""
    ssim_floor, mad_floor = floor
    metrics = item.score.metrics
    if item.step == 0 or item.score.verdict.value == "EXACT" or ssim_floor >= 1.0:
        return None
    if metrics.ssim >= ssim_floor - 0.005:
        return catalogue.cause(
            "within_noise_floor", step=item.step,
            explanation=f"SSIM {metrics.ssim:.3f} against a step-0 floor of {ssim_floor:.3f} (base model only): this "
                        "machine's kernels differ from the trainer's by as much on their own.",
            evidence={"ssim": round(metrics.ssim, 4), "floor_ssim": round(ssim_floor, 4),
                      "floor_mad": round(mad_floor, 3)},
        )
    return None

