"""``parity check``: plan -> replay (one base load) -> score -> causes -> report.

Replays are cached under ``<out>/replays/`` by a key of everything that determines their pixels and written
atomically as each one finishes, so a re-run reuses them and a run killed half way loses nothing finished.
Each replay's decode, PNG, scores and report card images finish on a worker thread while the next replay runs on
the GPU. Under ``torchrun`` the replays are shared between the ranks and rank 0 writes the report
(``parity/distributed.py``), assembling the card images every rank left in the report folder.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from parity import __version__, catalogue, distributed, seeds
from parity.cache import read_replay
from parity.cache import write_replay as save_png_atomic
from parity.causes import LintContext, item_causes, lora_keys_cause
from parity.diagnose import (
    CONFIRM_GAP_SHARE,
    FlipResult,
    analogue,
    bisect,
    explains,
    floor_cause,
    noise_floor,
    rank_causes,
    try_flip,
)
from parity.errors import EnvironmentProblem, InputError
from parity.jobfolder import read_job_folder
from parity.lint import job_codes
from parity.plan import ReplayItem, ReplayPlan, build_plan, with_recovered_seed
from parity.progress import Tick
from parity.replay import Replayer, ReplayOptions
from parity.results import Cause, CheckReport, PreviewResult
from parity.scores import Thresholds, Verdict, load_rgb, score_replay
from reports.html import save_card_images

# The causes check reads from the replays themselves (parity/catalogue.py), besides lint's and diagnosis's.
OUTCOMES = ("predicted_residual", "kernel_residual", "within_noise_floor", "lora_effect", "lora_barely_changes",
            "diagnosis_tried")
# A LoRA whose replay with and without it agree above this SSIM barely changes the image (lint uses it too).
BARELY_CHANGES_SSIM = 0.98
# Step-0 previews the kernel choice replays in a run that checks none of them itself (--steps latest): enough to
# tell kernel sets apart (a wrong one differs at the first), without replays that serve the choice alone.
KERNEL_PROBES_UNCHECKED = 2

@dataclass
class CheckOptions:
    replay: ReplayOptions = field(default_factory=ReplayOptions)
    steps: str = "all"  # "all", "latest" or "N,M,..."
    out_dir: Path = Path("parity-report")
    assets_dir: Path | None = None
    fail_on: str = "fail"
    thresholds: Thresholds = field(default_factory=Thresholds)
    use_cache: bool = True
    pipeline: str = "aitoolkit"  # "server": score ai-toolkit-inference's rendering instead (FACTS §6)
    images_dir: Path | None = None  # score images made elsewhere (named like the previews) instead of replays
    diagnose: bool = True  # flip knobs for every preview that does not pass
    diagnose_budget: int = 80  # most replays per preview when diagnosing
    seed_search: int = seeds.SEARCH_WORDS  # words of training_seed's stream searched per drawn seed


def select_items(plan: ReplayPlan, steps: str) -> list[ReplayItem]:
    """The plan's items for ``--steps`` (all, latest, or a comma list of step numbers)."""
    items = list(plan.items)
    if steps == "all":
        return items
    if steps == "latest":
        latest = max(i.step for i in items)
        return [i for i in items if i.step == latest]
    try:
        wanted = {int(s) for s in steps.split(",") if s.strip()}
    except ValueError:
        raise InputError(None, f"--steps must be all, latest or a comma list of step numbers, got {steps!r}") from None
    unknown = wanted - {i.step for i in items}
    if unknown:
        raise InputError(plan.job_dir, f"no previews at step(s) {', '.join(map(str, sorted(unknown)))}")
    return [i for i in items if i.step in wanted]


def settings_of(item: ReplayItem) -> dict:
    keys = ("prompt", "negative_prompt", "seed", "seed_source", "width", "height", "gen_width", "gen_height",
            "num_inference_steps", "guidance_scale", "network_multiplier", "lora_merged", "weights", "checkpoint",
            "ctrl_img")
    return {k: getattr(item, k) for k in keys}


@dataclass
class CheckRun:
    """One ``parity check``: what every step reads (plan, replayer, folders) and the probe replays they share."""

    options: CheckOptions
    plan: ReplayPlan
    items: list[ReplayItem]
    out: Path
    replayer: Replayer
    job: object  # the JobFolder
    lint: LintContext
    dist: object  # distributed.current()
    clock: PhaseClock
    progress: Callable[[str], None] | None = None
    fresh: dict[str, np.ndarray] = field(default_factory=dict)  # probe replays by cache key: reused, never redone
    fast_drift: dict | None = None
    warnings: list[str] = field(default_factory=list)  # run-level notes beyond the plan's
    job_causes: list[Cause] = field(default_factory=list)  # knobs proven by experiment, once for the job
    lora_effects: list[dict] = field(default_factory=list)  # per checked round: LoRA on vs off
    recoveries: dict[str, seeds.SeedRecovery] = field(default_factory=dict)  # drawn seeds, by preview file
    seed_recovery: dict | None = None  # the recovery's summary for the report
    diagnosis: dict | None = None  # what diagnosis cost: previews, experiments, replays, seconds

    @property
    def replays_dir(self) -> Path:
        return self.out / "replays"

    @property
    def samples(self) -> Path:
        return Path(self.plan.job_dir) / "samples"

    @property
    def plain(self) -> bool:
        """Replays of the previews themselves (not the server's rendering, not images made elsewhere)."""
        return self.options.pipeline == "aitoolkit" and not self.options.images_dir

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)

    def tick(self, phase: str, done: int, total: int, name: str) -> None:
        """Item ``done`` of ``total`` of a counted phase starts (the progress shows the count and the time left)."""
        if self.progress:
            self.progress(Tick(phase, done, total, name))

    def score_of(self, item: ReplayItem, pixels: np.ndarray):
        return score_replay(self.samples / item.file, pixels, self.options.thresholds)

    def png(self, item: ReplayItem, key: str) -> Path:
        return self.replays_dir / f"{Path(item.file).stem}-{key[:16]}.png"

    def experiment_png(self, item: ReplayItem, key: str) -> Path:
        """Where a replay made to test a setting (diagnosis, the LoRA's effect) is cached: apart from the
        previews' own replays, one per preview, in ``replays/``."""
        return self.replays_dir / "experiments" / f"{Path(item.file).stem}-{key[:16]}.png"

    def keep_replay(self, item: ReplayItem, replay) -> None:
        """A diagnosis replay into the replay cache (a re-run finds it)."""
        if self.options.use_cache:
            save_png_atomic(self.experiment_png(item, replay.key), replay.pixels)

    def cached_experiment(self, item: ReplayItem, key: str) -> np.ndarray | None:
        return read_replay(self.experiment_png(item, key)) if self.options.use_cache else None

    def keep_probe(self, item: ReplayItem, algorithm: str | None, replay) -> None:
        self.fresh[replay.key] = replay.pixels
        save_png_atomic(self.png(item, replay.key), replay.pixels)

    def cached_pixels(self, item: ReplayItem, key: str) -> np.ndarray | None:
        """A probe's pixels from this run's replays or the replay cache: the choices replay nothing twice."""
        if key in self.fresh:
            return self.fresh[key]
        return read_replay(self.png(item, key)) if self.options.use_cache else None

    def merged(self, scores: dict) -> dict:
        return {name: values for part in self.dist.all_gather(scores) for name, values in part.items()}


def run_check(job_dir: str | Path, options: CheckOptions, progress: Callable[[str], None] | None = None):
    """Check every selected preview of ``job_dir``; returns the CheckReport (reports not yet written)."""
    run = start(job_dir, options, progress)  # 1. plan and this run's folders
    calibrate(run)  # 2. the noise draw and kernels that reproduce the step-0 previews
    recover_seeds(run)  # 3. the seeds ai-toolkit drew for seed -1, found by replay
    mine = shard(run)  # 4. this rank's share of the previews
    by_index = replay_and_score(run, mine)  # 5. replay (or reuse) and score each one
    results = [by_index[i] for i in sorted(by_index)]
    step0 = apply_noise_floor(run, results)  # 6. step-0 drift: hardware, not the LoRA
    diagnose_all(run, results, step0)  # 7. name the cause of each mismatch by experiment
    refloor(run, results, step0)  # the floor again without the step-0 previews diagnosis proved wrong
    results = gather(run, by_index, results)  # 8. rank 0 collects every rank's results
    return build_report(run, results)  # 9. the report (written by the caller)


def start(job_dir: str | Path, options: CheckOptions, progress) -> CheckRun:
    dist = distributed.current()
    clock = PhaseClock(dist.rank)
    plan = build_plan(job_dir, options.assets_dir)
    if options.pipeline == "server" and plan.family.server_profile is None:
        raise InputError(None, f"--pipeline server: parity has no inference-server profile for {plan.family.label} "
                         "jobs yet (use --images DIR to score the server's own outputs)")
    out = Path(options.out_dir).resolve()
    guard_out_dir(out, Path(plan.job_dir).resolve())
    job = read_job_folder(plan.job_dir)
    run = CheckRun(options, plan, select_items(plan, options.steps), out, Replayer(plan, options.replay), job,
                   LintContext(job=job, base_model=options.replay.base_model), dist, clock, progress)
    clock.mark("plan")
    return run


def calibrate(run: CheckRun) -> None:
    """Load the base model, choose the noise draw and (on CUDA) the kernels from the step-0 previews, and with
    ``--fast`` measure it against exact mode. Nothing to do when no preview can be replayed (or recovered). A probe replay that
    crashes (a size the model cannot render, say) does not end the run: the choice falls back, says why, and that
    preview's own replay becomes its ERROR."""
    if not any(i.replayable or i.recoverable for i in run.items):
        return
    replayer, options, dist = run.replayer, run.options, run.dist
    replayer.load()
    run.clock.mark("load", load_detail(replayer.load_timings))
    run.say("choosing the noise algorithm")
    gather = run.merged if dist.world > 1 else None
    try:
        replayer.choose_noise_algorithm(run.score_of, part=(dist.rank, dist.world), gather=gather,
                                        on_replay=run.keep_probe if run.plain else None,
                                        clear_ssim=options.thresholds.drift_min_ssim,
                                        lookup=run.cached_pixels if run.plain else None)
    except (InputError, EnvironmentProblem):
        raise
    except Exception as exc:
        replayer.fall_back_noise(f"a step-0 replay crashed while choosing ({type(exc).__name__}: {exc})")
        run.warnings.append(f"noise choice: {replayer.noise_reason}")
    run.clock.mark("noise choice")
    if run.plain:
        run.say("choosing the kernels")
        # A run that checks no step-0 preview (--steps latest, say) replays a few only: they serve the choice alone.
        checks_step0 = any(i.step == 0 and i.replayable for i in run.items)
        try:
            replayer.choose_kernels(run.score_of, part=(dist.rank, dist.world), gather=gather,
                                    on_replay=run.keep_probe, lookup=run.cached_pixels,
                                    max_probes=None if checks_step0 else KERNEL_PROBES_UNCHECKED)
        except (InputError, EnvironmentProblem):
            raise
        except Exception as exc:
            replayer.kernel_reason = f"kept {replayer.kernels}: a step-0 replay crashed ({type(exc).__name__}: {exc})"
            run.warnings.append(f"kernel choice: {replayer.kernel_reason}")
        run.clock.mark("kernel choice")
    if dist.is_main and options.replay.fast:
        run.say("measuring --fast against exact mode")
        run.fast_drift = replayer.fast_drift(replayer.step0_probes()[:1])


def recover_seeds(run: CheckRun) -> None:
    """Find the seeds ai-toolkit drew for this run's ``seed: -1`` previews by replaying the candidates of
    training_seed's stream (``parity.seeds``); a recovered preview is replayed with its seed like any other. Rounds
    before the last one checked are searched too: they anchor the later rounds' word offsets. The candidates'
    replays go through the replay cache, so a re-run replays none."""
    plan, started = run.plan, time.perf_counter()
    wanted = {i.file for i in run.items if i.recoverable}
    if not wanted:
        return
    rounds = seeds.draw_rounds(plan.items)
    last = max(n for n, rnd in enumerate(rounds) if wanted & {i.file for i in rnd.previews.values()})
    run.say("recovering drawn seeds")
    gather = run.merged if run.dist.world > 1 else None
    found = seeds.recover_seeds(rounds[: last + 1], plan.training_seed, run.options.seed_search,
                                lambda item, seed: seed_trial(run, item, seed), (run.dist.rank, run.dist.world),
                                gather)
    run.recoveries = {r.preview: r for r in found if r.preview in {i.file for i in run.items}}
    run.items = [recovered_item(run, item) for item in run.items]
    run.seed_recovery = recovery_summary(run, found, time.perf_counter() - started)
    run.clock.mark("seed recovery", f"{run.seed_recovery['replays']} replays")


def seed_trial(run: CheckRun, item: ReplayItem, seed: int) -> tuple[float, str, bool]:
    """Replay ``item`` with a candidate seed (or take it from the replay cache) and score it against its preview:
    (SSIM, verdict, replayed). A candidate at PASS level or better is kept for the preview's own replay."""
    candidate = replace(item, seed=seed, replayable=True)

    def lookup(found: ReplayItem, key: str) -> np.ndarray | None:
        pixels = run.cached_pixels(found, key)
        return pixels if pixels is not None else run.cached_experiment(found, key)

    replay = run.replayer.replay_or_cached(candidate, lookup=lookup)
    pixels = replay.wait()
    score = run.score_of(item, pixels)
    kept = score.verdict in (Verdict.EXACT, Verdict.PASS)
    if not replay.cached:  # the preview's own replay beside the others; a rejected candidate with the experiments
        if kept:
            save_png_atomic(run.png(candidate, replay.key), pixels)
        else:
            run.keep_replay(candidate, replay)
    if kept:
        run.fresh[replay.key] = pixels
    return float(score.metrics.ssim), score.verdict.value, not replay.cached


def recovered_item(run: CheckRun, item: ReplayItem) -> ReplayItem:
    """``item`` with its recovered seed (replayable), or saying why its drawn seed was not recovered."""
    recovery = run.recoveries.get(item.file)
    if recovery is None or not item.recoverable:
        return item
    if recovery.recovered:
        return with_recovered_seed(item, recovery.seed, run.plan.training_seed)
    return replace(item, reason=f"not replayable: seed drawn from training_seed {run.plan.training_seed}, "
                                f"{recovery.summary}")


def recovery_summary(run: CheckRun, found: list[seeds.SeedRecovery], seconds: float) -> dict:
    """The recovery in the report: the stream, the search size, its cost and each checked preview's record
    (previews of earlier rounds searched only to anchor the offsets count in the cost, not in the list)."""
    checked = [r for r in found if r.preview in run.recoveries]
    return {
        "training_seed": run.plan.training_seed,
        "search_words": run.options.seed_search,
        "recovered": sum(r.recovered for r in checked),
        "drawn": len(checked),
        "candidates_tried": sum(len(r.trials) for r in found),
        "replays": sum(r.replays for r in found),
        "cached": sum(len(r.trials) - r.replays for r in found),
        "anchors": sum(1 for r in found if r.trials and r.preview not in run.recoveries),
        "seconds": round(seconds, 2),
        "previews": [r.to_dict() for r in checked],
    }


def shard(run: CheckRun) -> set[int]:
    """This rank's previews: a contiguous share of the replayable ones (rank 0 also takes the unreplayable ones),
    balanced by the work left: a replay already in the cache costs nothing."""
    items, dist = run.items, run.dist

    def in_cache(item: ReplayItem) -> bool:
        # A step-0 base-model preview replayed while choosing the draw and kernels, or by an earlier run. The same
        # on every rank (the choices end in an exchange, the cache is shared). Later rounds are not looked up:
        # their key needs their LoRA merged.
        if not (run.plain and run.options.use_cache and item.step == 0 and item.weights == "base"):
            return False
        return run.png(item, run.replayer.prepare(item)[0]).is_file()

    replay_indices = [i for i, item in enumerate(items) if item.replayable]
    costs = [0.0 if in_cache(items[i]) else distributed.replay_cost(items[i]) for i in replay_indices]
    shares = distributed.shard(costs, dist.world)
    mine = {replay_indices[j] for j in shares[dist.rank]}
    if dist.is_main:
        mine |= {i for i, item in enumerate(items) if not item.replayable}
    return mine


def replay_and_score(run: CheckRun, mine: set[int]) -> dict[int, PreviewResult]:
    """Replay this rank's previews in plan order; each one's decode, PNG and score finish on a worker thread while
    the next replay runs. A crash in one replay is that preview's ERROR, not the run's end."""
    by_index: dict[int, PreviewResult] = {}
    finishing: list[tuple[int, Future]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-finish") as worker:
        for index, item in enumerate(run.items):
            if index not in mine:
                continue
            causes = item_causes(run.plan, item, run.lint)
            if not item.replayable:
                by_index[index] = unscored(run, item, causes, item.reason)
                continue
            run.say(item.file)
            started = time.perf_counter()
            try:
                done = replay_one(run, item, causes, worker, started)
            except InputError:
                raise
            except Exception as exc:
                done = unscored(run, item, causes, "", error=f"{type(exc).__name__}: {exc}")
            if isinstance(done, Future):
                finishing.append((index, done))
            else:
                done.seconds = round(time.perf_counter() - started, 3)
                by_index[index] = done
        for index, future in finishing:
            by_index[index] = future.result()
    run.clock.mark(f"replays ({len(finishing)} new or cached)")
    return by_index


def unscored(run: CheckRun, item: ReplayItem, causes, reason: str, error: str | None = None) -> PreviewResult:
    return PreviewResult(item.file, item.step, item.prompt_index, settings_of(item), error is not None, reason,
                         causes=causes, preview_path=run.samples / item.file, error=error)


def replay_one(run: CheckRun, item: ReplayItem, causes, worker, started: float) -> PreviewResult | Future:
    """One preview: an outside image scored, the server's rendering, or our replay (queued on ``worker``)."""
    options, replayer = run.options, run.replayer
    preview_path = run.samples / item.file
    if options.images_dir:
        external = find_external_image(options.images_dir, item.file)
        if external is None:
            return unscored(run, item, causes, f"no image named like {Path(item.file).stem} in {options.images_dir}")
        _, info = replayer.prepare(item)
        score = score_replay(preview_path, load_rgb(external), options.thresholds)
        return with_card(scored_result(item, causes, preview_path, info, external, score), run.out)
    if options.pipeline == "server":
        score, png, info, departures = serve(replayer, run.plan, run.job, item, preview_path, run.replays_dir,
                                             options)
        return with_card(scored_result(item, departures + causes, preview_path, info, png, score), run.out)
    key, info = replayer.prepare(item)
    png = run.png(item, key)
    if key in run.fresh:
        get, save = (lambda k=key: run.fresh.pop(k)), False
    elif options.use_cache and (cached := read_replay(png)) is not None:
        get, save = (lambda c=cached: c), False
    else:  # queue the replay; its decode, PNG and score finish while the next one runs
        get, save = replayer.replay(item, deferred=True).wait, True
    return worker.submit(finish, run, item, causes, info, png, get, save, started)


def finish(run: CheckRun, item, causes, info, png, get_pixels, save: bool, started: float) -> PreviewResult:
    """Pixels -> PNG (when new) -> score -> result; runs on the worker thread, overlapping the next replay.
    ``seconds``: from the replay's start to its score (JUnit's case time)."""
    preview_path = run.samples / item.file
    try:
        pixels = get_pixels()
        if save:
            save_png_atomic(png, pixels)
        score = score_replay(preview_path, pixels, run.options.thresholds)
    except InputError:
        raise
    except Exception as exc:
        result = unscored(run, item, causes, "", error=f"{type(exc).__name__}: {exc}")
    else:
        result = with_card(scored_result(item, causes, preview_path, info, png, score), run.out)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def apply_noise_floor(run: CheckRun, results: list[PreviewResult]) -> list[PreviewResult]:
    """The noise floor and "does this machine replay step 0 exactly" come from every rank's step-0 results."""
    step0 = [r for part in run.dist.all_gather([r for r in results if r.step == 0]) for r in part]
    run.clock.mark("step-0 exchange")
    floor = noise_floor(step0) if run.options.pipeline == "aitoolkit" else None
    if floor is not None:
        for result in results:
            if result.score is not None and (cause := floor_cause(result, floor)) is not None:
                result.causes.append(cause)
    return step0


def proven_wrong(result: PreviewResult) -> bool:
    """Whether an experiment showed that ``result``'s preview was made with another setting."""
    return any(c.evidence.get("proven") for c in result.causes)


def refloor(run: CheckRun, results: list[PreviewResult], step0: list[PreviewResult]) -> None:
    """A step-0 preview that diagnosis proved was made with another setting (a changed guidance that still
    PASSes, say) measures that setting, not the machine: the floor is taken again without it, and a preview
    whose own mismatch is proven gets no "hardware, not the LoRA" note."""
    wrong = {r.preview_file for r in results if proven_wrong(r)}
    if not wrong or run.options.pipeline != "aitoolkit":
        return
    floor = noise_floor([r for r in step0 if r.preview_file not in wrong])
    for result in results:
        result.causes = [c for c in result.causes if c.code != "within_noise_floor"]
        if floor is not None and result.score is not None and result.preview_file not in wrong:
            if (cause := floor_cause(result, floor)) is not None:
                result.causes.append(cause)
        result.causes = rank(result.causes)


def diagnose_all(run: CheckRun, results: list[PreviewResult], step0: list[PreviewResult]) -> None:
    """Name the cause of every mismatch by experiment (``parity.diagnose``): explanations proven on one preview
    are tried first on the next, then tested on every other preview they could affect (a PASS included: a
    setting shown to differ is an error wherever it applies); one knob that explains several previews becomes
    one job-level cause. Then each preview's causes are ranked."""
    options = run.options
    started = time.perf_counter()
    tried: list[FlipResult] = []  # every experiment, for the cost summary
    if options.diagnose and options.pipeline == "aitoolkit":
        by_file = {item.file: item for item in run.items}
        # Where this machine reproduces a base-only preview bit for bit, only EXACT explains a mismatch.
        base_exact = any(r.step == 0 and r.score is not None and r.score.verdict == Verdict.EXACT for r in step0)
        proven: list[tuple[FlipResult, ReplayItem]] = []
        stop_at = "EXACT" if base_exact and not options.images_dir else "PASS"
        failing = [r for r in results if needs_diagnosis(r, stop_at)]
        lint_codes = job_lint_codes(run) if failing else []
        for n, result in enumerate(failing, 1):
            run.tick("diagnosing", n, len(failing), result.preview_file)
            found = diagnose_one(run, result, by_file[result.preview_file], expected(result, stop_at), proven,
                                 lint_codes, tried)
            if found is not None:
                proven.append((found, by_file[result.preview_file]))
        confirm_elsewhere(run, results, by_file, proven, base_exact, tried)
        run.job_causes = job_causes(results)
        run.diagnosis = diagnosis_summary(len(failing), tried, time.perf_counter() - started)
    if options.diagnose and options.pipeline == "aitoolkit" and not options.images_dir:
        run.lora_effects = measure_lora_effects(run, results)
    for result in results:
        result.causes = rank(result.causes)
    run.clock.mark("diagnosis")


def expected(result: PreviewResult, stop_at: str) -> str:
    """The verdict a right replay reaches: EXACT, or PASS where the files predict a residual."""
    predicted = any(c.code == "predicted_residual" for c in result.causes)
    return "PASS" if predicted else stop_at


def diagnosis_summary(previews: int, tried: list[FlipResult], seconds: float) -> dict:
    """What diagnosis cost: the previews it diagnosed, the experiments it ran (replays made now or taken from the
    replay cache) and its wall time, proving what was proven on other previews included."""
    replays = sum(not r.cached for r in tried)
    return {"previews": previews, "experiments": len(tried), "replays": replays, "cached": len(tried) - replays,
            "per_preview": round(len(tried) / previews, 2) if previews else 0.0, "seconds": round(seconds, 2)}


def job_lint_codes(run: CheckRun) -> list[str]:
    """The job-level lint findings (a seed carried over, multipliers that differ in a round...): diagnosis tries
    the experiments they point to first. A rule that cannot read the job points nowhere."""
    try:
        return job_codes(run.plan, run.lint)
    except Exception:
        return []


def diagnose_one(run: CheckRun, result: PreviewResult, item: ReplayItem, expect: str, proven,
                 lint_codes: list[str] = (), tried: list[FlipResult] | None = None) -> FlipResult | None:
    """Bisect one mismatch: explanations proven elsewhere in the job first, then what lint points to (the job's
    findings and this preview's own), then the rest by likelihood."""
    options, replayer = run.options, run.replayer
    target, baseline = result.preview_path, result.score.metrics.ssim
    if options.images_dir:
        # An outside image: find which knob makes our replay reproduce IT (the tool's departure).
        target = result.replay_png
        baseline = score_replay(target, replayer.replay(item).pixels, options.thresholds).metrics.ssim
    # A preview file re-saved, a swapped checkpoint or keys that load nowhere already explain the mismatch: try
    # only the first (cheapest) flips, e.g. the preview's own size.
    explained = any(c.code in EXPLAINED_BY_FILES and c.severity != "info" for c in result.causes)
    budget = min(options.diagnose_budget, 4) if explained else options.diagnose_budget
    near_miss = result.score.verdict == Verdict.PASS
    if near_miss:  # weights, templates, negatives, not seeds
        budget = min(budget, 24)
    # each explanation once: previews proven by the same knob carry it over as the same experiment here
    first = list({(f.knob, f.label): f for r, source in proven
                  if (f := analogue(r.flip, source, item, run.plan)) is not None}.values())
    diagnosed, results, found = bisect(replayer, run.plan, run.job, item, target, baseline, options.thresholds, budget,
                                 expect, target_name="the outside image" if options.images_dir else "the preview",
                                 first=first, lookup=run.cached_experiment if run.plain else None,
                                 keep=run.keep_replay if run.plain else None,
                                 suspects=catalogue.suspects_of([*lint_codes, *(c.code for c in result.causes)]))
    if tried is not None:
        tried.extend(results)
    if near_miss and not any(c.severity != "info" for c in diagnosed):
        diagnosed = [c for c in diagnosed if c.code != "lora_effect"] + [kernel_residual_cause(result, replayer)]
    keys = [c for c in result.causes if c.code == "lora_keys_unmatched"]
    rest = [c for c in result.causes if c.code != "lora_keys_unmatched"]
    result.causes = keys + diagnosed + rest
    return found


def confirm_elsewhere(run: CheckRun, results, by_file, proven, base_exact: bool,
                      tried_all: list[FlipResult] | None = None) -> None:
    """A setting proven to differ on one preview, tested on every other scored preview it could affect that no
    experiment has explained yet (PASS ones included): where it closes most of the gap there too, it is proven
    there as well."""
    if not proven or run.options.images_dir:
        return
    open_ = [r for r in results if r.score is not None and r.score.verdict != Verdict.EXACT
             and not any(c.evidence.get("proven") for c in r.causes)]
    for n, result in enumerate(open_, 1):
        run.tick("testing what was proven", n, len(open_), result.preview_file)
        item = by_file[result.preview_file]
        expect = expected(result, "EXACT" if base_exact else "PASS")
        baseline = result.score.metrics.ssim
        flips = {}  # each carried experiment once: previews proven by the same knob give the same one here
        for found, source in proven:
            if (flip := analogue(found.flip, source, item, run.plan)) is not None:
                flips.setdefault((flip.knob, flip.label), (flip, source))
        for flip, source in flips.values():
            tried = try_flip(run.replayer, flip, result.preview_path, run.options.thresholds,
                             run.cached_experiment if run.plain else None, run.keep_replay if run.plain else None)
            if tried is not None and tried_all is not None:
                tried_all.append(tried)
            if tried is not None and (explains(tried, expect) or tried.gap_closed(baseline) >= CONFIRM_GAP_SHARE):
                cause = rank_causes([tried], baseline, run.options.thresholds, expect, partial=CONFIRM_GAP_SHARE)[0]
                # shown by experiment to differ here too: an error even where the preview passes
                evidence = cause.evidence | {"proven": True, "confirmed_from": source.file}
                result.causes = [c for c in result.causes if c.code not in (cause.code, "kernel_residual")]
                result.causes.insert(0, dataclasses.replace(cause, severity="error", evidence=evidence))
                break


def job_causes(results: list[PreviewResult]) -> list[Cause]:
    """Each knob proven by experiment, once for the job: which previews it explains, of those that did not match."""
    def proven(result: PreviewResult) -> bool:
        return any(c.evidence.get("proven") for c in result.causes)

    def expected_residual(result: PreviewResult) -> bool:  # a PASS the files predict: nothing to explain
        return result.score.verdict == Verdict.PASS and any(c.code == "predicted_residual" for c in result.causes)

    mismatched = [r for r in results if r.score is not None and r.score.verdict != Verdict.EXACT
                  and (proven(r) or not expected_residual(r))]
    by_code: dict[str, list[tuple[PreviewResult, Cause]]] = {}
    for result in mismatched:
        for cause in result.causes:
            if cause.evidence.get("proven"):
                by_code.setdefault(cause.code, []).append((result, cause))
                break
    causes = []
    for code, found in sorted(by_code.items(), key=lambda kv: -len(kv[1])):
        first = found[0][1]
        flips = sorted({c.evidence.get("flip", "") for _, c in found})
        shown = "; ".join(flips[:3]) + (f" and {len(flips) - 3} more" if len(flips) > 3 else "")
        complete = len(found) == len(mismatched)
        causes.append(catalogue.cause(
            code, first.title, severity="error", fix=first.fix,
            explanation=f"{code}: {shown}: explains {len(found)} of {len(mismatched)} mismatched preview(s)"
                        + (" (the whole mismatch)" if complete else ""),
            evidence={"explains": len(found), "of": len(mismatched), "previews": [r.preview_file for r, _ in found],
                      "flips": flips, "proven": True, "complete": complete},
        ))
    return causes


def measure_lora_effects(run: CheckRun, results: list[PreviewResult]) -> list[dict]:
    """How far each checked round's LoRA moves the picture: its first scored preview replayed with the LoRA off
    (cached like any replay) against the replay with it. Under BARELY_CHANGES_SSIM the LoRA barely changes the
    image: a warning in its own right."""
    from parity.replay import Knobs
    from parity.scores import compute_metrics

    effects = []
    by_file = {item.file: item for item in run.items}
    firsts: dict[int, tuple[ReplayItem, PreviewResult]] = {}  # each round's first scored preview with a replay
    for result in results:
        item = by_file.get(result.preview_file)
        if item is None or item.weights == "base" or result.score is None or item.step in firsts:
            continue
        if result.replay_png is not None and Path(result.replay_png).is_file():
            firsts[item.step] = (item, result)
    for n, (item, result) in enumerate(firsts.values(), 1):
        run.tick("measuring the LoRA's effect", n, len(firsts), f"step {item.step}")
        try:
            off = run.replayer.replay_or_cached(item, lookup=run.cached_experiment, knobs=Knobs(lora=False))
            if not off.cached:
                run.keep_replay(item, off)
            on = read_replay(Path(result.replay_png))
            if on is None:
                continue
        except Exception:  # no evidence rather than a failed run
            continue
        metrics = compute_metrics(on, off.pixels)[0]
        effect = {"step": item.step, "checkpoint": item.checkpoint, "preview": item.file,
                  "ssim_on_vs_off": round(float(metrics.ssim), 4),
                  "mean_abs_diff": round(float(metrics.mean_abs_diff), 3), "max_abs_diff": int(metrics.max_abs_diff),
                  "barely": bool(metrics.ssim >= BARELY_CHANGES_SSIM)}
        effects.append(effect)
        differ = (f"Replayed with and without {item.checkpoint or 'the LoRA'}, the images differ by a mean of "
                  f"{metrics.mean_abs_diff:.2f} levels (max {metrics.max_abs_diff})")
        if not effect["barely"]:
            result.causes.append(catalogue.cause(
                "lora_effect", step=item.step, ssim=metrics.ssim, evidence=effect,
                explanation=f"{differ}: the LoRA visibly changes the picture."))
        else:
            result.causes.append(catalogue.cause(
                "lora_barely_changes", step=item.step, ssim=metrics.ssim, evidence=effect,
                explanation=f"{differ}: the LoRA has little to show, in training previews and in inference alike."))
    return effects


def gather(run: CheckRun, by_index: dict[int, PreviewResult], results: list[PreviewResult]) -> list[PreviewResult]:
    """Rank 0 gathers every rank's results, in plan order; the other ranks report their own share."""
    if run.dist.world > 1:
        pairs = sorted(zip(sorted(by_index), results, strict=True), key=lambda pair: pair[0])
        gathered = run.dist.gather(pairs)
        if gathered is not None:
            results = [r for _, r in sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])]
    run.clock.mark("gather")
    return results


def build_report(run: CheckRun, results: list[PreviewResult]) -> CheckReport:
    options, replayer, plan = run.options, run.replayer, run.plan
    note_recoveries(run, results)
    warnings = list(plan.warnings) + run.warnings
    family = plan.family
    profile = f"aitoolkit-{family.name}-preview"
    if options.pipeline == "server":
        profile = family.server_profile or f"server-{family.name}"
    if options.replay.fast:
        profile += " (--fast)"
        warnings.insert(0, fast_warning(family.fast_changes))
    return CheckReport(
        tool_version=__version__,
        job_dir=str(plan.job_dir),
        job_name=plan.job_name,
        base_model=replayer.base_model_path(),
        device=options.replay.device,
        dtype=replayer.dtype_name,
        pipeline_profile=profile,
        noise_algorithm=replayer.noise_algorithm,
        noise_algorithm_reason=replayer.noise_reason,
        kernels=replayer.kernels,
        kernels_reason=replayer.kernel_reason,
        kernel_trials=replayer.kernel_trials,
        fast_drift=run.fast_drift,
        job_causes=run.job_causes,
        lora_effects=run.lora_effects,
        seed_recovery=run.seed_recovery,
        diagnosis=run.diagnosis,
        thresholds=options.thresholds,
        fail_on=options.fail_on,
        items=results,
        warnings=warnings,
    )


def note_recoveries(run: CheckRun, results: list[PreviewResult]) -> None:
    """Each drawn-seed preview's settings say what recovery found: the seed's word offset in training_seed's
    stream and how it was confirmed, or what was tried."""
    for result in results:
        recovery = run.recoveries.get(result.preview_file)
        if recovery is None:
            continue
        result.settings["seed_recovery"] = recovery.summary
        if recovery.recovered:
            result.settings["seed_offset"] = recovery.offset
            result.settings["seed_confirmed_by"] = recovery.confirmed_by


class PhaseClock:
    """Seconds per phase of a run, printed to stderr when ``PARITY_TIMINGS`` is set (scale-out measurements).
    The first line is the time from the process's start (interpreter, imports, joining the process group)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.on = bool(os.environ.get("PARITY_TIMINGS"))
        self.last = time.perf_counter()
        age = seconds_since_process_start() if self.on else None
        if age is not None:
            self._print(f"startup: {age:.2f}s")

    def mark(self, phase: str, detail: str = "") -> None:
        now = time.perf_counter()
        if self.on:
            more = f" ({detail})" if detail else ""
            self._print(f"{phase}: {now - self.last:.2f}s{more}")
        self.last = now

    def _print(self, text: str) -> None:
        # One write per line: under torchrun every rank writes to the same stream.
        sys.stderr.write(f"[rank {self.rank}] {text}\n")
        sys.stderr.flush()


def load_detail(parts: dict[str, float]) -> str:
    """The base load's parts in words: the transformer on its own thread (GPU) or first, then the rest."""
    rest = ", ".join(f"{name} {parts[name]:.2f}s" for name in ("libraries", "vae", "mllm", "tokenizer") if name in parts)
    if "transformer" not in parts:
        return rest
    alongside = " on its own thread, alongside" if parts.get("overlapped") else ","
    return f"transformer {parts['transformer']:.2f}s{alongside} {rest}"


def seconds_since_process_start() -> float | None:
    """How long this process has run, from /proc (Linux); None where that cannot be read."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


FAST_WARNING = (
    "--fast: replays ran with {changes}, so their last bits differ from ai-toolkit's: no EXACT verdict is expected, "
    "and a PASS/DRIFT boundary case may move; rerun without --fast for the bit-exact replay"
)


def fast_warning(changes: str) -> str:
    """The report's first warning under ``--fast``, with what the family's fast path changes (``Family.fast_changes``)."""
    return FAST_WARNING.format(changes=changes or "the model family's faster, inexact path")


def scored_result(item, causes, preview_path, info, png, score) -> PreviewResult:
    """A scored preview's result, with the residual the files predict and unmatched LoRA keys among its causes."""
    causes = list(causes)
    settings = settings_of(item) | {"replayed_with": info["weights"], "noise_algorithm": info["noise"]}
    if info["residuals"] and score.verdict != Verdict.EXACT:
        kind = catalogue.kind("predicted_residual")
        causes.append(catalogue.cause(
            "predicted_residual", what=", ".join(dict.fromkeys(r.split(":")[0] for r in info["residuals"])),
            explanation=f"{kind.explanation[:-1]}: " + "; ".join(info["residuals"]) + ".",
            evidence={"residuals": info["residuals"]},
        ))
    if info["lora_problem"]:
        causes.insert(0, lora_keys_cause(info["lora_problem"], item.checkpoint))
    return PreviewResult(item.file, item.step, item.prompt_index, settings, True, "", score=score,
                         causes=causes, preview_path=preview_path, replay_png=png)


def with_card(result: PreviewResult, out: Path) -> PreviewResult:
    """Make ``result``'s report card images now, where the replay finished (the worker thread, on every rank),
    so that writing the report only assembles them. The score's full-size maps are then no longer needed and
    are dropped: the results stay small to gather. On any failure the report makes the images itself."""
    try:
        result.card_file = save_card_images(result, out)
    except Exception:
        return result
    result.score.ssim_map = result.score.diff_map = None
    return result


def serve(replayer, plan, job, item, preview_path, replays_dir, options):
    """``--pipeline server``: the server's output (JPEG q95 as a client gets it), scored against the preview,
    and the FACTS §6 departures that change it."""
    from parity.server import departure_causes, server_pixels, server_request

    request = server_request(plan, job, item)
    _, info = replayer.prepare(request.item, knobs=request.knobs)
    pixels = server_pixels(replayer, request)
    png = replays_dir / f"{Path(item.file).stem}-server.png"
    save_png_atomic(png, pixels)
    score = score_replay(preview_path, pixels, options.thresholds)
    _, departures = departure_causes(replayer, plan, job, item, preview_path, options.thresholds)
    info["residuals"] = []
    return score, png, info, departures


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
EXPLAINED_BY_FILES = {"preview_reencoded", "preview_size_mismatch", "lora_keys_unmatched", "checkpoint_wrong_step"}


def find_external_image(folder: Path, preview_file: str) -> Path | None:
    """The image in ``folder`` made for ``preview_file``: same file name, or same stem with any image suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "--images folder not found")
    stem = Path(preview_file).stem
    for candidate in [folder / preview_file] + [folder / f"{stem}{suffix}" for suffix in IMAGE_SUFFIXES]:
        if candidate.is_file():
            return candidate
    return None


def kernel_residual_cause(result: PreviewResult, replayer: Replayer) -> Cause:
    """A near miss that no setting explains: the last bits come from the kernels, not from parity's choices."""
    return catalogue.cause(
        "kernel_residual",
        explanation=f"SSIM {result.score.metrics.ssim:.4f}, max {result.score.metrics.max_abs_diff} levels. Every "
                    "knob was flipped without restoring identity, so the difference comes from how this machine's "
                    f"kernels round (here {replayer.options.device}, CPU profile as set) compared with the "
                    "trainer's, e.g. a float32 GEMM summed in another order.",
        evidence={"ssim": round(result.score.metrics.ssim, 4), "max_abs_diff": result.score.metrics.max_abs_diff},
    )


def needs_diagnosis(result: PreviewResult, stop_at: str) -> bool:
    """DRIFT and FAIL always; a PASS too where this machine replays exactly and no residual is predicted."""
    if result.score is None:
        return False
    verdict = result.score.verdict.value
    if verdict in ("DRIFT", "FAIL"):
        return True
    predicted = any(c.code == "predicted_residual" for c in result.causes)
    return verdict == "PASS" and stop_at == "EXACT" and not predicted


SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def rank(causes: list[Cause]) -> list[Cause]:
    """LoRA keys that load nowhere first (nothing else is meaningful then), then errors, warnings and notes;
    within a severity the order found (diagnosis ranks its own)."""
    return sorted(causes, key=lambda c: (c.code != "lora_keys_unmatched", SEVERITY_ORDER.get(c.severity, 3)))


def guard_out_dir(out: Path, job_dir: Path) -> None:
    """The job folder is read-only to us: refuse any output inside it."""
    if out == job_dir or job_dir in out.parents:
        raise InputError(out, "the report folder is inside the job folder; parity never writes there (use --out)")
