"""--kernels auto's search, with the replays faked (the real ones need CUDA and Triton: test_kernels.py): one
process tries the candidates in order and stops where it did before; under torchrun the ranks screen one
candidate each on the first step-0 preview and share the other previews of one identical there."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from fixtures import ORACLE_DIR
from parity.plan import build_plan
from parity.replay import Replay, Replayer, ReplayOptions

CANDIDATES = ["triton:16", "torch", "triton:8", "triton:4"]


@pytest.fixture
def fake_kernels(monkeypatch):
    """Kernel profiles per thread (each thread plays one rank), the search's inputs fixed."""
    local = threading.local()
    monkeypatch.setattr(Replayer, "set_kernels", lambda self, spec: setattr(local, "spec", spec))
    monkeypatch.setattr(Replayer, "kernels", property(lambda self: getattr(local, "spec", "torch")))
    monkeypatch.setattr(Replayer, "kernel_candidates", lambda self: list(CANDIDATES))
    monkeypatch.setattr(Replayer, "load", lambda self: None)
    return local


def replayer(log: list) -> Replayer:
    plan = build_plan(ORACLE_DIR / "jobs" / "og2_basic")  # three step-0 previews
    r = Replayer(plan, ReplayOptions(base_model="unused", device="cuda", noise_algorithm="torch2.13-avx2"))

    def replay(item, algorithm=None, **kwargs):
        log.append((r.kernels, item.prompt_index))
        return Replay((r.kernels, item.prompt_index), "key", "base", [])

    r.replay = replay
    return r


def scorer(exact: set[tuple[str, int]]):
    def score(item, pixels):
        same = pixels in exact
        metrics = SimpleNamespace(ssim=1.0 if same else 0.98, max_abs_diff=0 if same else 6, mean_abs_diff=0.0)
        return SimpleNamespace(metrics=metrics, verdict=SimpleNamespace(value="EXACT" if same else "PASS"))

    return score


def made_with(spec: str, previews=(0, 1, 2)) -> set[tuple[str, int]]:
    return {(spec, i) for i in previews}


def test_one_process_tries_in_order_and_stops_at_each_wrong_sets_first_difference(fake_kernels):
    log = []
    spec, reason = replayer(log).choose_kernels(scorer(made_with("triton:8")))
    assert spec == "triton:8" and reason == "reproduces all 3 step-0 preview(s) bit for bit (3 kernel sets tried)"
    assert log == [("triton:16", 0), ("torch", 0), ("triton:8", 0), ("triton:8", 1), ("triton:8", 2)]


def test_a_set_identical_on_the_first_preview_only_goes_on_to_the_next(fake_kernels):
    log = []
    r = replayer(log)
    spec, _ = r.choose_kernels(scorer(made_with("triton:16", (0,)) | made_with("torch")))
    assert spec == "torch"
    # on a GPU the next preview's replay is queued before the last one is scored: the wrong set's third replay
    # was under way when its second differed (the one replay such a set costs extra); it is not scored
    assert log == [("triton:16", 0), ("triton:16", 1), ("triton:16", 2), ("torch", 0), ("torch", 1), ("torch", 2)]
    first = r.kernel_trials[0]
    assert (first["probes_identical"], first["probes_tried"], first["identical"]) == (1, 2, False)


def test_cached_replays_are_not_replayed(fake_kernels):
    log = []
    r = replayer(log)
    r.prepare = lambda item, algorithm=None, knobs=None: (f"k{item.prompt_index}", {"weights": "base", "residuals": [],
                                                                        "lora_problem": None})
    cached = {"k0": ("triton:16", 0)}  # the noise choice replayed the first preview with the likeliest set
    spec, _ = r.choose_kernels(scorer(made_with("triton:16")), lookup=lambda item, key: cached.get(key))
    assert spec == "triton:16" and log == [("triton:16", 1), ("triton:16", 2)]


def test_torchrun_ranks_screen_one_set_each_and_share_the_other_previews(fake_kernels, run_ranks_in_threads):
    world = 2
    logs = [[] for _ in range(world)]

    def work(rank, gather):
        r = replayer(logs[rank])
        chosen = r.choose_kernels(scorer(made_with("triton:8")), part=(rank, world), gather=gather)
        return chosen, r.kernel_trials

    results = run_ranks_in_threads(world, work)
    assert results[0] == results[1] and results[0][0][0] == "triton:8"
    assert logs[0] == [("triton:16", 0), ("triton:8", 0), ("triton:8", 1)]
    assert logs[1] == [("torch", 0), ("triton:4", 0), ("triton:8", 2)]
    chosen = next(t for t in results[0][1] if t["kernels"] == "triton:8")
    assert (chosen["probes_identical"], chosen["probes_tried"], chosen["identical"]) == (3, 3, True)


@pytest.mark.parametrize("made, expected", [
    # the likeliest set is right: checked from every rank's cache, nobody screens another set
    ("triton:16", [[("triton:16", 1)], [("triton:16", 2)]]),
    # it is not: the same cache check rules it out for free, then the ranks screen the others as before
    ("triton:8", [[("torch", 0), ("triton:8", 1)], [("triton:8", 0), ("triton:8", 2)]]),
])
def test_torchrun_ranks_check_the_cached_likeliest_set_first(fake_kernels, run_ranks_in_threads, made, expected):
    world = 2
    logs = [[] for _ in range(world)]

    def work(rank, gather):
        r = replayer(logs[rank])
        r.prepare = lambda item, algorithm=None, knobs=None: (f"k{item.prompt_index}-{r.kernels}",
                                                  {"weights": "base", "residuals": [], "lora_problem": None})
        cache = {"k0-triton:16": ("triton:16", 0)}  # the noise choice's replay of the first preview
        chosen = r.choose_kernels(scorer(made_with(made)), part=(rank, world), gather=gather,
                                  lookup=lambda item, key: cache.get(key))
        return chosen, r.kernel_trials

    results = run_ranks_in_threads(world, work)
    assert results[0] == results[1] and results[0][0][0] == made
    assert logs == expected


def test_a_run_that_checks_no_step0_preview_replays_only_the_first_few(fake_kernels):
    log = []
    r = replayer(log)
    spec, reason = r.choose_kernels(scorer(made_with("torch")), max_probes=2)
    assert spec == "torch" and log == [("triton:16", 0), ("torch", 0), ("torch", 1)]
    assert reason == ("reproduces the first 2 of 3 step-0 previews bit for bit (2 kernel sets tried; the others are "
                      "not checked in this run)")


@pytest.mark.parametrize("steps, max_probes", [("all", None), ("0", None), ("latest", 2)])
def test_check_limits_the_kernel_probes_only_when_it_checks_no_step0_preview(
    fake_kernels, monkeypatch, tmp_path, steps, max_probes
):
    """run_check's wiring: --steps latest leaves the step-0 previews unchecked, so the choice replays two."""
    from parity import check
    from parity.replay import Replayer

    seen = {}

    class Stop(BaseException):  # not an Exception: calibrate's fallback for a crashed probe must not catch it
        pass

    def choose_kernels(self, score_fn, **kwargs):
        seen.update(kwargs)
        raise Stop("stop here")  # the rest of the run is not this test's

    monkeypatch.setattr(Replayer, "choose_noise_algorithm", lambda self, *a, **k: ("torch2.13-avx2", "given"))
    monkeypatch.setattr(Replayer, "choose_kernels", choose_kernels)
    options = check.CheckOptions(out_dir=tmp_path / "out", steps=steps,
                                 replay=ReplayOptions(base_model="unused", device="cuda"))
    with pytest.raises(Stop, match="stop here"):
        check.run_check(ORACLE_DIR / "jobs" / "og2_basic", options)
    assert seen["max_probes"] == max_probes
