"""Calibration: which initial-noise draw and which kernels reproduce this job's step-0 previews.

Both choices are pure functions over callables: ``replay(item, ...)`` gives a replay (``.wait()`` -> pixels,
``.cached``), ``score(item, pixels)`` a ``parity.scores.Score`` (or a bare SSIM), ``gather`` joins the ranks'
dicts under torchrun. They know nothing of models: the family's session is behind ``replay``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Distinct CPU draw algorithms worth trying when choosing automatically (2.11's two paths draw bf16 alike).
NOISE_CANDIDATES = ("torch2.11-avx512", "torch2.11-scalar", "torch2.13-avx2", "torch2.13-scalar")
# A candidate draw scoring below this on a step-0 preview made another picture (a wrong draw scores ~0.07), so a
# candidate at the DRIFT threshold or above while every other stays below it is chosen from one preview.
CLEARLY_UNRELATED_SSIM = 0.5
# Draws differing in at most this share of values are "nearly the same" (torch 2.13's vector and scalar bf16 paths:
# ~1 in 10k): they make the same picture, so the first preview decides between them as well as a second would.
NEAR_DRAW_SHARE = 0.01


@dataclass
class Probing:
    """How a choice replays and scores its probes (the step-0 previews of the base model)."""

    replay: Callable  # (item, algorithm or None, deferred) -> a replay with wait() and cached
    score: Callable  # (item, pixels) -> Score or SSIM
    on_replay: Callable | None = None  # (item, algorithm, replay): a fresh probe replay, to cache it
    on_gpu: bool = False  # queue the next replay before scoring the last (a worker thread scores)
    part: tuple[int, int] = (0, 1)  # (rank, world) under torchrun
    gather: Callable | None = None  # dict -> the merged dict of every rank


def probe_score(item, algorithm: str, replay, score_fn, on_replay=None):
    """A choice's probe replay finished: its pixels (waiting for a deferred decode), handed to ``on_replay`` when
    fresh (to cache them), and scored with ``score_fn(item, pixels)``. Runs on the choices' worker thread."""
    pixels = replay.wait()
    if on_replay is not None and not getattr(replay, "cached", False):
        on_replay(item, algorithm, replay)
    return score_fn(item, pixels)


def ssim_and_exact(score) -> tuple[float, bool]:
    """A probe's SSIM and whether its replay reproduced the preview (EXACT), from a ``parity.scores`` Score; a bare
    SSIM (a caller that scores only that) is never taken for EXACT."""
    metrics = getattr(score, "metrics", None)
    if metrics is None:
        return float(score), False
    return float(metrics.ssim), score.verdict.value == "EXACT"


# -- noise ----------------------------------------------------------------------------------------------------
def distinct_draws(draw: Callable[[str], object], candidates=NOISE_CANDIDATES) -> dict[str, np.ndarray]:
    """The candidates whose draws differ here (identical draws are the same algorithm on this torch)."""
    draws: dict[str, np.ndarray] = {}
    for name in candidates:
        values = np.asarray(draw(name), dtype=np.float32).ravel()
        if not any(np.array_equal(values, other) for other in draws.values()):
            draws[name] = values
    return draws


def noise_stages(likely: list[str], probes: int, world: int) -> list[list[tuple[str, int]]]:
    """(candidate, probe) pairs in three stages: the likeliest draw(s) on the first preview (one per rank), every
    other draw there (an idle rank takes a second-preview pair in advance), then the rest."""
    first = [(name, 0) for name in likely]
    rest = [(name, index) for index in range(1, probes) for name in likely]
    screen, first = first[:world], first[world:]
    ahead = -len(first) % world  # idle slots of the first preview's stage
    return [screen, first + rest[:ahead], rest[ahead:]]


def choose_noise(probes: list, draws: dict[str, np.ndarray], native: str, probing: Probing,
                 clear_ssim: float = 0.90, unrelated_ssim: float = CLEARLY_UNRELATED_SSIM) -> tuple[str, str]:
    """Pick the CPU draw that reproduces the step-0 (base-only) previews best; returns (name, reason).

    This torch's own draw (with several ranks, one candidate each) replays the first preview first: a replay
    identical to the preview (EXACT) decides at once, since no other draw gives the same pixels. Otherwise every
    distinct draw replays the first preview; when the best reaches ``clear_ssim`` (the DRIFT threshold: the same
    picture) and every other stays below ``unrelated_ssim`` (a wrong draw is an unrelated picture, SSIM ~0.07),
    that decides it. A draw nearly the same as the best's (a few values in 10k apart) makes the same picture, so it
    scores high too without making the choice unclear. Otherwise every draw replays the other probes too and the
    best mean SSIM wins. Every rank decides the same from the gathered scores.
    """
    if not probes:
        return native, "no step-0 preview to choose from: this torch's own draw"
    names = list(draws)

    def near(a: str, b: str) -> bool:
        return int(np.count_nonzero(draws[a] != draws[b])) <= NEAR_DRAW_SHARE * draws[a].size

    likely = sorted(names, key=lambda n: n != native)
    found, used, identical = _noise_rounds(probes, likely, names, near, probing, clear_ssim, unrelated_ssim)
    if identical:
        return identical, ("chosen from 1 step-0 preview: its replay is identical to the preview (EXACT), so no "
                           "other draw was needed")
    scores = {name: float(np.mean([found[(name, index)][0] for index in range(used)])) for name in names}
    ranked = sorted(names, key=lambda n: (-scores[n], names.index(n)))
    best = ranked[0]
    runner = ""
    for other in ranked[1:3]:  # the runner-up; after a nearly-same draw, the best unrelated one too
        runner += f"; {'next' if not runner else 'then'} {other} {scores[other]:.3f}"
        if not near(other, best):
            break
        differing = int(np.count_nonzero(draws[other] != draws[best]))
        runner += f" (nearly the same draw: {differing} of {draws[best].size} values differ)"
    if used == 1:
        clear = " (clear at once, so no second was replayed)" if len(probes) > 1 else ""
        return best, f"chosen from 1 step-0 preview{clear}: SSIM {scores[best]:.3f}{runner}"
    return best, f"chosen from {used} step-0 previews: mean SSIM {scores[best]:.3f}{runner}"


def _noise_rounds(probes, likely, names, near, probing: Probing, clear_ssim, unrelated_ssim):
    """Replay the stages of :func:`noise_stages` until one decides; (scores, probes used, identical draw)."""
    rank, world = probing.part
    found: dict[tuple[str, int], tuple[float, bool]] = {}  # (SSIM, EXACT) per (candidate, probe)

    def scored(item, name: str, replay) -> tuple[float, bool]:
        return ssim_and_exact(probe_score(item, name, replay, probing.score, probing.on_replay))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-probe") as worker:
        for stage, units in enumerate(noise_stages(likely, len(probes), world)):
            queued = []
            for name, index in units[rank::world]:  # this process's share of the stage's replays
                replay = probing.replay(probes[index], name, probing.on_gpu)
                if probing.on_gpu:
                    queued.append(((name, index), worker.submit(scored, probes[index], name, replay)))
                else:
                    found[(name, index)] = scored(probes[index], name, replay)
            for unit, future in queued:
                found[unit] = future.result()
            if probing.gather is not None:
                found = probing.gather(found)
            if stage == 0:
                identical = next((n for n in likely if found.get((n, 0), (0.0, False))[1]), None)
                if identical:
                    return found, 1, identical
            elif stage == 1:
                top = max(names, key=lambda n: (found[(n, 0)][0], -names.index(n)))
                others = [found[(n, 0)][0] for n in names if not near(n, top)]
                if found[(top, 0)][0] >= clear_ssim and all(s < unrelated_ssim for s in others):
                    return found, 1, None  # a second preview would tell apart no more than the first did
    return found, len(probes), None


# -- kernels --------------------------------------------------------------------------------------------------
def choose_kernels(probes: list, every_probe: int, candidates: list[str], set_kernels: Callable[[str], None],
                   probing: Probing, first_cached: Callable[[], bool] | None = None) -> tuple[str, str, list[dict]]:
    """The kernel profile that reproduces the step-0 previews bit for bit; (spec, reason, trials).

    Candidates are replayed on the first preview, likeliest first, and the first EXACT one is checked on the
    others. Ranks share the candidates: each replays its own on the first preview (unless ``first_cached()``
    says the likeliest one's replay is in every rank's cache: then that one is checked alone first, for free),
    and a candidate identical there is checked on the others by every rank, each replaying its share. One process
    tries them in the same order and stops where it would have. ``every_probe``: how many step-0 previews the job
    has (``probes`` may be the first few only, in a run that checks none of them itself).
    """
    if not probes:
        set_kernels(candidates[0])
        return candidates[0], "no step-0 preview to choose from: ai-toolkit's default GPU path", []
    rank, world = probing.part
    batches = [candidates[i : i + world] for i in range(0, len(candidates), world)]
    if world > 1 and first_cached is not None and first_cached():
        batches = [candidates[:1]] + [candidates[i : i + world] for i in range(1, len(candidates), world)]
    found: dict[str, dict] = {}
    chosen = None
    for batch in batches:
        mine = {}
        if rank < len(batch):  # this rank's candidate, on the first preview
            set_kernels(batch[rank])
            mine[batch[rank]] = kernel_trial(batch[rank], probes[:1], probing)
        found.update(probing.gather(mine) if probing.gather is not None else mine)
        for spec in batch:  # in order, the ones identical there: on the other previews, shared by the ranks
            if not found[spec]["identical"]:
                continue
            set_kernels(spec)
            share = kernel_trial(spec, probes[1:][rank::world], probing)
            shares = probing.gather({rank: share}) if probing.gather is not None else {rank: share}
            found[spec] = merged_trial(found[spec], [shares[r] for r in sorted(shares)], len(probes))
            if found[spec]["identical"]:
                chosen = spec
                break
        if chosen:
            break
    trials = [found[spec] for spec in candidates if spec in found]
    chosen, reason = kernel_verdict(chosen, trials, candidates, len(probes), every_probe)
    set_kernels(chosen)
    return chosen, reason, trials


def kernel_verdict(chosen: str | None, trials: list[dict], candidates: list[str], probes: int,
                   every_probe: int) -> tuple[str, str]:
    """The kernel choice in words: identical, the closest, or none (ai-toolkit's default kept)."""
    sets = f"{len(trials)} kernel set{'s' if len(trials) > 1 else ''} tried"
    if chosen:
        if probes < every_probe:
            return chosen, (f"reproduces the first {probes} of {every_probe} step-0 previews bit for bit ({sets}; "
                            "the others are not checked in this run)")
        return chosen, f"reproduces all {probes} step-0 preview(s) bit for bit ({sets})"
    best = max(trials, key=lambda t: t["probes_identical"])
    if best["probes_identical"]:
        return best["kernels"], (f"closest: reproduces {best['probes_identical']} of {best['probes_tried']} "
                                 f"step-0 preview(s) tried bit for bit ({sets})")
    ssims = [t["ssim"] for t in trials]
    return candidates[0], (f"no kernel set reproduced a step-0 preview exactly (SSIM {min(ssims):.4f}-"
                           f"{max(ssims):.4f}, {sets}): kept ai-toolkit's default GPU path; the previews were made "
                           "on another kind of machine or Triton version")


def kernel_trial(spec: str, probes: list, probing: Probing) -> dict:
    """Replay the probes with the active kernels until one differs (a wrong set costs one replay).

    On a GPU the next probe's replay is queued before the last one is scored (its pixels saved and compared on a
    worker thread: ~1 s a 1024px preview that would otherwise leave the GPU idle); a set that differs past its
    first preview then costs the one replay already queued."""
    trial = {"kernels": spec, "identical": False, "probes_identical": 0, "probes_tried": 0,
             "ssim": 1.0, "max_abs_diff": 0, "mean_abs_diff": 0.0}

    def record(score) -> bool:
        metrics = score.metrics
        trial["probes_tried"] += 1
        trial["ssim"] = round(min(trial["ssim"], float(metrics.ssim)), 5)
        trial["max_abs_diff"] = max(trial["max_abs_diff"], int(metrics.max_abs_diff))
        trial["mean_abs_diff"] = round(max(trial["mean_abs_diff"], float(metrics.mean_abs_diff)), 4)
        if score.verdict.value != "EXACT":
            return False
        trial["probes_identical"] += 1
        return True

    ahead = 1 if probing.on_gpu else 0  # replays queued beyond the one being scored
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-probe") as worker:
        queued: deque = deque()
        for probe in probes:
            replay = probing.replay(probe, None, probing.on_gpu)
            queued.append(worker.submit(probe_score, probe, None, replay, probing.score, probing.on_replay))
            if len(queued) > ahead and not record(queued.popleft().result()):
                break
        else:
            while queued and record(queued.popleft().result()):
                pass
    trial["identical"] = trial["probes_identical"] == len(probes)
    return trial


def merged_trial(first: dict, shares: list[dict], probes: int) -> dict:
    """A kernel trial on the first preview joined with the trials of the others' shares (see choose_kernels)."""
    trial = dict(first)
    for share in shares:
        trial["probes_tried"] += share["probes_tried"]
        trial["probes_identical"] += share["probes_identical"]
        trial["ssim"] = min(trial["ssim"], share["ssim"])
        trial["max_abs_diff"] = max(trial["max_abs_diff"], share["max_abs_diff"])
        trial["mean_abs_diff"] = max(trial["mean_abs_diff"], share["mean_abs_diff"])
    trial["identical"] = trial["probes_identical"] == probes
    return trial
