"""``parity check``: plan -> replay (one base load) -> score -> causes -> report.

Replays are cached under ``<out>/replays/`` by a key of everything that determines their pixels and written
atomically as each one finishes, so a re-run reuses them and a run killed half way loses nothing finished.
Each replay's decode, PNG, scores and report card images finish on a worker thread while the next replay runs on
the GPU. Under ``torchrun`` the replays are shared between the ranks and rank 0 writes the report
(``parity/distributed.py``), assembling the card images every rank left in the report folder.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity import __version__, distributed
from parity.cache import read_replay
from parity.cache import write_replay as save_png_atomic
from parity.causes import LintContext, item_causes, lora_keys_cause
from parity.diagnose import bisect, floor_cause, noise_floor
from parity.errors import InputError
from parity.jobfolder import read_job_folder
from parity.plan import ReplayItem, ReplayPlan, build_plan
from parity.replay import Replayer, ReplayOptions
from parity.results import Cause, CheckReport, PreviewResult
from parity.scores import Thresholds, load_rgb, score_replay
from reports.html import save_card_images

# Step-0 previews the kernel choice replays in a run that checks none of them itself (--steps latest): enough to
# tell kernel sets apart (a wrong one differs at the first), without replays that serve the choice alone.
KERNEL_PROBES_UNCHECKED = 2

PIPELINE_PROFILES = {
    "aitoolkit": "aitoolkit-omnigen2-preview",  # reproduce the training previews
    "server": "ai-toolkit-inference-omnigen2",  # render each preview's request as the inference server does
}


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
    keys = ("prompt", "negative_prompt", "seed", "width", "height", "gen_width", "gen_height",
            "num_inference_steps", "guidance_scale", "network_multiplier", "lora_merged", "weights", "checkpoint",
            "ctrl_img")
    return {k: getattr(item, k) for k in keys}


def run_check(job_dir: str | Path, options: CheckOptions, progress: Callable[[str], None] | None = None):
    """Check every selected preview of ``job_dir``; returns the CheckReport (reports not yet written)."""
    dist = distributed.current()
    clock = PhaseClock(dist.rank)
    plan = build_plan(job_dir, options.assets_dir)
    items = select_items(plan, options.steps)
    out = Path(options.out_dir).resolve()
    guard_out_dir(out, Path(plan.job_dir).resolve())
    replayer = Replayer(plan, options.replay)
    job = read_job_folder(plan.job_dir)
    lint = LintContext(job=job, base_model=options.replay.base_model)
    replays_dir = out / "replays"
    samples = Path(plan.job_dir) / "samples"

    clock.mark("plan")

    def score_of(item: ReplayItem, pixels: np.ndarray):
        return score_replay(samples / item.file, pixels, options.thresholds)

    fresh: dict[str, np.ndarray] = {}  # probe replays of the noise choice, by cache key: reused, never redone

    def keep_probe(item: ReplayItem, algorithm: str, replay) -> None:
        fresh[replay.key] = replay.pixels
        save_png_atomic(replays_dir / f"{Path(item.file).stem}-{replay.key[:16]}.png", replay.pixels)

    def cached_pixels(item: ReplayItem, key: str) -> np.ndarray | None:
        """A probe's pixels from this run's replays or the replay cache: the choices replay nothing twice."""
        if key in fresh:
            return fresh[key]
        png = replays_dir / f"{Path(item.file).stem}-{key[:16]}.png"
        return read_replay(png) if options.use_cache else None

    def merged(scores: dict) -> dict:
        return {name: values for part in dist.all_gather(scores) for name, values in part.items()}

    replayable = [i for i in items if i.replayable]
    fast_drift = None
    plain = options.pipeline == "aitoolkit" and not options.images_dir
    if replayable:
        replayer.load()
        clock.mark("load", load_detail(replayer.load_timings))
        if progress:
            progress("choosing the noise algorithm")
        replayer.choose_noise_algorithm(score_of, part=(dist.rank, dist.world), gather=merged if dist.world > 1 else None,
                                        on_replay=keep_probe if plain else None,
                                        clear_ssim=options.thresholds.drift_min_ssim,
                                        lookup=cached_pixels if plain else None)
        clock.mark("noise choice")
        if plain:
            if progress:
                progress("choosing the kernels")
            # When this run checks no step-0 preview (--steps latest, say), the choice replays a few only: their
            # replays serve the choice alone.
            checks_step0 = any(i.step == 0 and i.replayable for i in items)
            replayer.choose_kernels(score_of, part=(dist.rank, dist.world),
                                    gather=merged if dist.world > 1 else None, on_replay=keep_probe,
                                    lookup=cached_pixels, max_probes=None if checks_step0 else KERNEL_PROBES_UNCHECKED)
            clock.mark("kernel choice")
        if dist.is_main and options.replay.fast:
            if progress:
                progress("measuring --fast against exact mode")
            fast_drift = replayer.fast_drift(replayer.step0_probes()[:1])

    def in_cache(item: ReplayItem) -> bool:
        """Whether a step-0 base-model preview's replay is in the replay cache already (replayed with the chosen
        draw and kernels while choosing them, or by an earlier run). The same on every rank: the choices end in
        an exchange, and the cache is shared. Later rounds are not looked up: their key needs their LoRA merged."""
        if not (plain and options.use_cache and item.step == 0 and item.weights == "base"):
            return False
        key, _ = replayer.prepare(item)
        return (replays_dir / f"{Path(item.file).stem}-{key[:16]}.png").is_file()

    # This rank's previews: a contiguous share of the replayable ones (rank 0 also takes the unreplayable ones),
    # balanced by the work left: a replay already in the cache costs nothing.
    replay_indices = [i for i, item in enumerate(items) if item.replayable]
    costs = [0.0 if in_cache(items[i]) else distributed.replay_cost(items[i]) for i in replay_indices]
    shares = distributed.shard(costs, dist.world)
    mine = {replay_indices[j] for j in shares[dist.rank]}
    if dist.is_main:
        mine |= {i for i, item in enumerate(items) if not item.replayable}

    def finish(item, causes, preview_path, info, png, get_pixels, save: bool) -> PreviewResult:
        """Pixels -> PNG (when new) -> score -> result; runs on the worker thread, overlapping the next replay."""
        try:
            pixels = get_pixels()
            if save:
                save_png_atomic(png, pixels)
            score = score_replay(preview_path, pixels, options.thresholds)
        except InputError:
            raise
        except Exception as exc:
            return PreviewResult(item.file, item.step, item.prompt_index, settings_of(item), True, "",
                                 causes=causes, preview_path=preview_path, error=f"{type(exc).__name__}: {exc}")
        return with_card(scored_result(item, causes, preview_path, info, png, score), out)

    by_index: dict[int, PreviewResult] = {}
    finishing: list[tuple[int, Future]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-finish") as worker:
        for index, item in enumerate(items):
            if index not in mine:
                continue
            preview_path = samples / item.file
            causes = item_causes(plan, item, lint)
            if not item.replayable:
                by_index[index] = PreviewResult(item.file, item.step, item.prompt_index, settings_of(item), False,
                                                item.reason, causes=causes, preview_path=preview_path)
                continue
            if progress:
                progress(item.file)
            external = find_external_image(options.images_dir, item.file) if options.images_dir else None
            if options.images_dir and external is None:
                by_index[index] = PreviewResult(
                    item.file, item.step, item.prompt_index, settings_of(item), False,
                    f"no image named like {Path(item.file).stem} in {options.images_dir}",
                    causes=causes, preview_path=preview_path)
                continue
            try:
                if external is not None:
                    _, info = replayer.prepare(item)
                    score = score_replay(preview_path, load_rgb(external), options.thresholds)
                    by_index[index] = with_card(scored_result(item, causes, preview_path, info, external, score), out)
                elif options.pipeline == "server":
                    score, png, info, departures = serve(replayer, plan, job, item, preview_path, replays_dir, options)
                    by_index[index] = with_card(
                        scored_result(item, departures + causes, preview_path, info, png, score), out)
                else:
                    key, info = replayer.prepare(item)
                    png = replays_dir / f"{Path(item.file).stem}-{key[:16]}.png"
                    if key in fresh:
                        get, save = (lambda k=key: fresh.pop(k)), False
                    elif options.use_cache and (cached := read_replay(png)) is not None:
                        get, save = (lambda c=cached: c), False
                    else:  # queue the replay; its decode, PNG and score finish while the next one runs
                        get, save = replayer.replay(item, deferred=True).wait, True
                    finishing.append((index, worker.submit(finish, item, causes, preview_path, info, png, get, save)))
            except InputError:
                raise
            except Exception as exc:  # a crash in one replay is reported, not fatal to the run
                by_index[index] = PreviewResult(item.file, item.step, item.prompt_index, settings_of(item), True, "",
                                                causes=causes, preview_path=preview_path,
                                                error=f"{type(exc).__name__}: {exc}")
        for index, future in finishing:
            by_index[index] = future.result()
    clock.mark(f"replays ({len(finishing)} new or cached)")

    # The noise floor and "does this machine replay step 0 exactly" come from every rank's step-0 results.
    step0 = [r for part in dist.all_gather([r for r in by_index.values() if r.step == 0]) for r in part]
    results = [by_index[i] for i in sorted(by_index)]
    clock.mark("step-0 exchange")

    floor = noise_floor(step0) if options.pipeline == "aitoolkit" else None
    if floor is not None:
        for result in results:
            if result.score is not None and (cause := floor_cause(result, floor)) is not None:
                result.causes.append(cause)
    if options.diagnose and options.pipeline == "aitoolkit":
        by_file = {item.file: item for item in items}
        # Where this machine reproduces a base-only preview bit for bit, only EXACT explains a mismatch.
        base_exact = any(r.step == 0 and r.score is not None and r.score.verdict.value == "EXACT" for r in step0)
        stop_at = "EXACT" if base_exact and not options.images_dir else "PASS"
        for result in results:
            if not needs_diagnosis(result, stop_at):
                continue
            if progress:
                progress(f"diagnosing {result.preview_file}")
            target, baseline = result.preview_path, result.score.metrics.ssim
            if options.images_dir:
                # An outside image: find which knob makes our replay reproduce IT (the tool's departure).
                target = result.replay_png
                own = replayer.replay(by_file[result.preview_file]).pixels
                baseline = score_replay(target, own, options.thresholds).metrics.ssim
            # A preview file re-saved, a swapped checkpoint or keys that load nowhere already explain the
            # mismatch: try only the first (cheapest) flips, e.g. the preview's own size.
            explained = any(c.code in EXPLAINED_BY_FILES and c.severity != "info" for c in result.causes)
            budget = min(options.diagnose_budget, 4) if explained else options.diagnose_budget
            if result.score.verdict.value == "PASS":  # a near miss: weights, templates, negatives, not seeds
                budget = min(budget, 24)
            diagnosed, _ = bisect(replayer, plan, job, by_file[result.preview_file], target,
                                  baseline, options.thresholds, budget, stop_at,
                                  target_name="the outside image" if options.images_dir else "the preview")
            if result.score.verdict.value == "PASS":  # a near miss: keep what explains it, not the LoRA note
                diagnosed = [c for c in diagnosed if c.code != "lora_effect"]
                if not diagnosed:
                    diagnosed = [kernel_residual_cause(result, replayer)]
            keys = [c for c in result.causes if c.code == "lora_keys_unmatched"]
            rest = [c for c in result.causes if c.code != "lora_keys_unmatched"]
            result.causes = keys + diagnosed + rest
    for result in results:
        result.causes = rank(result.causes)

    clock.mark("diagnosis")
    # Rank 0 gathers every rank's results, in plan order; the other ranks report their own share.
    if dist.world > 1:
        gathered = dist.gather(sorted(zip(sorted(by_index), results, strict=True), key=lambda pair: pair[0]))
        if gathered is not None:
            results = [r for _, r in sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])]
    clock.mark("gather")
    warnings = list(plan.warnings)
    profile = PIPELINE_PROFILES[options.pipeline]
    if options.replay.fast:
        profile += " (--fast)"
        warnings.insert(0, FAST_WARNING)
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
        kernels=kernel_profile_name(),
        kernels_reason=replayer.kernel_reason,
        kernel_trials=replayer.kernel_trials,
        fast_drift=fast_drift,
        thresholds=options.thresholds,
        fail_on=options.fail_on,
        items=results,
        warnings=warnings,
    )


def kernel_profile_name() -> str:
    from pipelines.omnigen2 import kernels

    return kernels.kernel_profile()


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
    "--fast: replays ran with batched CFG, maskless attention, float32 rotary and (on CUDA) torch.compile, so "
    "their last bits differ from ai-toolkit's: no EXACT verdict is expected, and a PASS/DRIFT boundary case may "
    "move; rerun without --fast for the bit-exact replay"
)


def scored_result(item, causes, preview_path, info, png, score) -> PreviewResult:
    """A scored preview's result, with the residual the files predict and unmatched LoRA keys among its causes."""
    causes = list(causes)
    settings = settings_of(item) | {"replayed_with": info["weights"], "noise_algorithm": info["noise"]}
    if info["residuals"] and score.verdict.value != "EXACT":
        causes.append(Cause(
            "predicted_residual", "info",
            "expected residual: " + ", ".join(dict.fromkeys(r.split(":")[0] for r in info["residuals"])),
            "The job's files do not carry the exact weights the preview was made with, so a small difference "
            "remains even with a perfect replay: " + "; ".join(info["residuals"]) + ".",
            "Nothing to fix in inference; supply the in-memory weights with --lora STEP=FILE to confirm.",
            {"residuals": info["residuals"]},
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
    return Cause(
        "kernel_residual", "info", "residual from the machine's kernels: no setting explains this near miss",
        f"SSIM {result.score.metrics.ssim:.4f}, max {result.score.metrics.max_abs_diff} levels. Every knob was "
        "flipped without restoring identity, so the difference comes from how this machine's kernels round "
        f"(here {replayer.options.device}, CPU profile as set) compared with the trainer's, e.g. a float32 GEMM "
        "summed in another order.",
        "Nothing to fix in inference; replay on the trainer's kind of machine for bit-exactness.",
        {"ssim": round(result.score.metrics.ssim, 4), "max_abs_diff": result.score.metrics.max_abs_diff},
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
