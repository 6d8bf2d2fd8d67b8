"""The staged noise-algorithm choice: one step-0 preview when it is clear, the second when it is not, and the
same choice on every rank of a torchrun split. Replays are faked here (scores by candidate); the real choice on
the oracle previews is pinned in test_oracle_replay.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fixtures import ORACLE_DIR
from parity.plan import build_plan
from parity.replay import Replayer, ReplayOptions

# bf16 draws: torch 2.11's two paths agree, so three distinct candidates
DRAW = {"torch2.11-avx512": 0.0, "torch2.11-scalar": 0.0, "torch2.13-avx2": 1.0, "torch2.13-scalar": 2.0}
CANDIDATES = ("torch2.11-avx512", "torch2.13-avx2", "torch2.13-scalar")


def fake_replayer(monkeypatch, log: list, device: str = "cpu") -> Replayer:
    plan = build_plan(ORACLE_DIR / "jobs" / "og2_basic")  # three step-0 previews: two are probes
    monkeypatch.setattr(Replayer, "_noise_for", lambda self, item, name: torch.tensor([DRAW[name]]))

    def replay(item, algorithm=None, **kwargs):
        log.append((algorithm, item.prompt_index))
        pixels = (algorithm, item.prompt_index)
        return SimpleNamespace(pixels=pixels, wait=lambda: pixels)

    replayer = Replayer(plan, ReplayOptions(base_model="unused", device=device))
    replayer.replay = replay
    return replayer


def scorer(table: dict[tuple[str, int], float]):
    return lambda item, pixels: table.get(pixels, 0.07)


def exact_scorer(table: dict[tuple[str, int], float], exact: set[tuple[str, int]]):
    """Scores as ``parity.scores.score_replay`` gives them: SSIM and a verdict (EXACT for the pairs in ``exact``)."""

    def score(item, pixels):
        verdict = "EXACT" if pixels in exact else "PASS"
        metrics = SimpleNamespace(ssim=1.0 if pixels in exact else table.get(pixels, 0.07))
        return SimpleNamespace(metrics=metrics, verdict=SimpleNamespace(value=verdict))

    return score


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # cuda: scored on a worker thread (the replay is faked)
def test_a_clear_first_preview_decides_without_the_second(monkeypatch, device):
    log = []
    replayer = fake_replayer(monkeypatch, log, device)
    name, reason = replayer.choose_noise_algorithm(scorer({("torch2.13-avx2", 0): 0.93}))
    assert name == "torch2.13-avx2"
    assert sorted(log) == sorted((c, 0) for c in CANDIDATES)  # 3 replays, not 6
    assert reason == (
        "chosen from 1 step-0 preview (clear at once, so no second was replayed): SSIM 0.930; "
        "next torch2.11-avx512 0.070"
    )


@pytest.mark.parametrize(
    "table",
    [
        {("torch2.13-avx2", 0): 0.85, ("torch2.13-avx2", 1): 0.99},  # best below the DRIFT threshold
        {("torch2.13-avx2", 0): 1.0, ("torch2.13-scalar", 0): 0.6, ("torch2.13-avx2", 1): 1.0},  # runner-up close
    ],
)
def test_an_unclear_first_preview_goes_on_to_the_second(monkeypatch, table):
    log = []
    replayer = fake_replayer(monkeypatch, log)
    name, reason = replayer.choose_noise_algorithm(scorer(table))
    assert name == "torch2.13-avx2"
    assert sorted(log) == sorted((c, i) for c in CANDIDATES for i in (0, 1))
    assert reason.startswith("chosen from 2 step-0 previews: mean SSIM ")


def test_the_clear_threshold_is_the_callers(monkeypatch):
    log = []
    table = {("torch2.13-avx2", 0): 0.93}
    fake_replayer(monkeypatch, log).choose_noise_algorithm(scorer(table), clear_ssim=0.95)
    assert len(log) == 6


def run_ranks(monkeypatch, run_ranks_in_threads, world: int, table) -> list[tuple[list, tuple[str, str]]]:
    """``world`` replayers in threads, joined by an all-gather of their score dicts (as check.py's ``merged``)."""
    logs = [[] for _ in range(world)]
    replayers = [fake_replayer(monkeypatch, logs[r]) for r in range(world)]

    def work(rank, gather):
        return replayers[rank].choose_noise_algorithm(scorer(table), part=(rank, world), gather=gather)

    return list(zip(logs, run_ranks_in_threads(world, work), strict=True))


def test_torchrun_split_decides_the_same_on_every_rank(monkeypatch, run_ranks_in_threads):
    from pipelines.common import noise

    monkeypatch.setattr(noise, "detect_native_algorithm", lambda probe=True: "torch2.13-avx2")
    # clear: 3 first-preview replays over 2 ranks; the idle slot takes a second-preview replay in advance, with
    # this torch's own draw (the likeliest to be reused)
    ranks = run_ranks(monkeypatch, run_ranks_in_threads, 2, {("torch2.13-avx2", 0): 1.0})
    assert [len(log) for log, _ in ranks] == [2, 2]
    assert sorted(u for log, _ in ranks for u in log) == sorted([(c, 0) for c in CANDIDATES] + [("torch2.13-avx2", 1)])
    assert {result for _, result in ranks} == {ranks[0][1]} and ranks[0][1][0] == "torch2.13-avx2"
    assert "chosen from 1 step-0 preview" in ranks[0][1][1]
    # unclear: every (candidate, probe) pair once over both ranks, 3 each
    ranks = run_ranks(monkeypatch, run_ranks_in_threads, 2, {("torch2.13-avx2", 0): 0.8, ("torch2.13-avx2", 1): 0.9})
    assert [len(log) for log, _ in ranks] == [3, 3]
    assert sorted(u for log, _ in ranks for u in log) == sorted((c, i) for c in CANDIDATES for i in (0, 1))
    assert {result for _, result in ranks} == {ranks[0][1]}
    assert ranks[0][1][1].startswith("chosen from 2 step-0 previews: mean SSIM 0.850")


def near_draws(monkeypatch):
    """torch 2.13's vector and scalar draws as they are at full size: the same but for 1 value in 10k."""
    draws = {name: torch.full((10000,), DRAW[name]) for name in DRAW}
    draws["torch2.13-scalar"] = draws["torch2.13-avx2"].clone()
    draws["torch2.13-scalar"][1234] = 5.0
    monkeypatch.setattr(Replayer, "_noise_for", lambda self, item, name: draws[name])


def test_a_nearly_same_draw_scoring_high_too_does_not_make_the_choice_unclear(monkeypatch):
    log = []
    replayer = fake_replayer(monkeypatch, log)
    near_draws(monkeypatch)
    table = {("torch2.13-avx2", 0): 0.97, ("torch2.13-scalar", 0): 0.99}
    name, reason = replayer.choose_noise_algorithm(scorer(table))
    assert name == "torch2.13-scalar" and len(log) == 3
    assert reason == (
        "chosen from 1 step-0 preview (clear at once, so no second was replayed): SSIM 0.990; next torch2.13-avx2 "
        "0.970 (nearly the same draw: 1 of 10000 values differ); then torch2.11-avx512 0.070"
    )
    # an unrelated draw scoring high is another matter: the second preview is replayed
    log.clear()
    table[("torch2.11-avx512", 0)] = 0.6
    replayer = fake_replayer(monkeypatch, log)
    near_draws(monkeypatch)
    replayer.choose_noise_algorithm(scorer(table))
    assert len(log) == 6


def test_probes_in_the_replay_cache_are_not_replayed_again(monkeypatch):
    """A re-run: every first-preview replay is in the cache already, so the choice replays nothing."""
    log = []
    replayer = fake_replayer(monkeypatch, log)
    replayer.prepare = lambda item, algorithm=None, knobs=None: (f"{algorithm}|{item.prompt_index}", {
        "weights": "base", "residuals": [], "lora_problem": None})
    seen = []

    def lookup(item, key):
        name, index = key.split("|")
        return (name, int(index)) if int(index) == 0 else None

    name, _ = replayer.choose_noise_algorithm(scorer({("torch2.13-avx2", 0): 1.0}), lookup=lookup,
                                              on_replay=lambda *a: seen.append(a))
    assert name == "torch2.13-avx2" and log == [] and seen == []  # nothing replayed, nothing cached again


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_replay_identical_to_the_preview_decides_at_once(monkeypatch, device):
    """This torch's own draw replays the first preview first; identical to it (EXACT), no other draw is tried."""
    from pipelines.common import noise

    monkeypatch.setattr(noise, "detect_native_algorithm", lambda probe=True: "torch2.13-scalar")
    log = []
    replayer = fake_replayer(monkeypatch, log, device)
    name, reason = replayer.choose_noise_algorithm(exact_scorer({}, {("torch2.13-scalar", 0)}))
    assert name == "torch2.13-scalar" and log == [("torch2.13-scalar", 0)]
    assert reason == "chosen from 1 step-0 preview: its replay is identical to the preview (EXACT), so no other draw was needed"
    # not identical (another machine's kernels): every candidate on the first preview, as before
    log.clear()
    replayer = fake_replayer(monkeypatch, log, device)
    name, reason = replayer.choose_noise_algorithm(exact_scorer({("torch2.13-scalar", 0): 0.97}, set()))
    assert name == "torch2.13-scalar" and sorted(log) == sorted((c, 0) for c in CANDIDATES)
    assert reason.startswith("chosen from 1 step-0 preview (clear at once, so no second was replayed): SSIM 0.970")


def test_torchrun_ranks_screen_one_draw_each_and_stop_at_an_identical_one(monkeypatch, run_ranks_in_threads):
    from pipelines.common import noise

    monkeypatch.setattr(noise, "detect_native_algorithm", lambda probe=True: "torch2.13-avx2")
    logs = [[], []]
    replayers = [fake_replayer(monkeypatch, logs[r]) for r in range(2)]
    score = exact_scorer({}, {("torch2.13-avx2", 0)})

    def work(rank, gather):
        return replayers[rank].choose_noise_algorithm(score, part=(rank, 2), gather=gather)

    results = run_ranks_in_threads(2, work)
    assert logs == [[("torch2.13-avx2", 0)], [("torch2.11-avx512", 0)]]  # one replay each, at once
    # the same words as one process: the report does not depend on the number of ranks
    assert results[0] == results[1] == (
        "torch2.13-avx2",
        "chosen from 1 step-0 preview: its replay is identical to the preview (EXACT), so no other draw was needed",
    )
