"""Seeds ai-toolkit drew for ``seed: -1``: the candidate stream, the plan, the search, and the oracle job recovered."""

import random
import shutil

import pytest
import yaml

from fixtures import ORACLE_DIR
from parity import seeds
from parity.plan import build_plan

JOB = ORACLE_DIR / "jobs" / "h_randseed"
TINY = ORACLE_DIR / "tiny_omnigen2"
# ground_truth/h_randseed/samples.jsonl: prompt 0 of each round drew its seed
DRAWN = {"1795683054266__000000000_0.jpg": 2500648409, "1795683058695__000000002_0.jpg": 360511942}


# -- the candidate stream ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("training_seed", [1234, 0, 42, 2**40 + 7])
def test_randint_at_an_offset_is_pythons_randint_after_that_many_words(training_seed):
    stream = seeds.WordStream(training_seed)
    for offset in range(120):
        rng = random.Random(training_seed)
        for _ in range(offset):
            rng.getrandbits(32)
        candidate = stream.randint_at(offset)
        assert candidate.seed == rng.randint(0, 2**32 - 1)
        assert rng.getrandbits(32) == stream.word(candidate.end)  # it read exactly `words` words


def test_successive_draws_are_the_measured_randints_of_training_seed_1234():
    stream, offset, values = seeds.WordStream(1234), 0, []
    for _ in range(5):
        candidate = stream.randint_at(offset)
        values.append(candidate.seed)
        offset = candidate.end
    assert values == [1892932127, 32175636, 2500648409, 360511942, 3292010550]


def test_candidates_keep_each_value_once_at_its_smallest_offset():
    candidates = seeds.WordStream(1234).candidates(0, 13)
    by_seed = {c.seed: (c.offset, c.words) for c in candidates}
    assert len(by_seed) == len(candidates)
    assert [c.offset for c in candidates] == sorted(c.offset for c in candidates)
    assert by_seed[1892932127] == (0, 4)  # redrawn once: offset 2 gives it too and is not listed again
    assert 2 not in {c.offset for c in candidates}
    assert by_seed[2500648409] == (6, 6)  # h_randseed's step-0 draw: offsets 6, 8 and 10 all give it
    assert by_seed[360511942] == (12, 4)  # its step-2 draw starts where the step-0 draw ended


# -- the plan ---------------------------------------------------------------------------------------------------
def copy_job(tmp_path, edit=None):
    job = shutil.copytree(JOB, tmp_path / "h_randseed")
    if edit is not None:
        config = yaml.safe_load((job / "config.yaml").read_text())
        edit(config)
        (job / "config.yaml").write_text(yaml.safe_dump(config))
    return job


def process(config):
    return config["config"]["process"][0]


def test_a_drawn_seed_is_to_be_recovered_from_training_seed():
    plan = build_plan(JOB)
    drawn = [i for i in plan.items if i.seed_source == "drawn"]
    assert plan.training_seed == 1234 and [i.file for i in drawn] == list(DRAWN)
    for item in drawn:
        assert (item.seed, item.replayable, item.recoverable, item.seed_draw, item.round_draws) == (None, False, True, 0, 1)
        assert item.reason.startswith("seed drawn from training_seed 1234: to be recovered")
    assert plan.to_dict()["summary"] == {"previews": 6, "replayable": 4, "seeds_to_recover": 2}


def test_without_training_seed_a_drawn_seed_is_plainly_not_replayable(tmp_path):
    plan = build_plan(copy_job(tmp_path, lambda c: process(c).pop("training_seed")))
    item = next(i for i in plan.items if i.seed_source == "drawn")
    assert (plan.training_seed, item.seed, item.replayable, item.recoverable) == (None, None, False, False)
    assert item.reason.startswith("not replayable: seed -1") and "not recoverable: the job has no training_seed" in item.reason


def test_a_drawn_preview_whose_checkpoint_is_gone_is_not_recoverable_but_its_draw_counts(tmp_path):
    job = copy_job(tmp_path)
    (job / "h_randseed.safetensors").unlink()
    plan = build_plan(job)
    item = next(i for i in plan.items if i.seed_source == "drawn" and i.step == 2)
    assert (item.replayable, item.recoverable, item.seed_draw, item.round_draws) == (False, False, 0, 1)
    assert "final checkpoint h_randseed.safetensors is missing" in item.reason
    assert "seed drawn from training_seed 1234 (its draw still counts for the others)" in item.reason
    assert [r.label for r in seeds.draw_rounds(plan.items)] == ["step 0", "step 2"]


def test_a_job_level_training_seed_seeds_nothing(tmp_path):
    def move(config):
        config["config"]["training_seed"] = process(config).pop("training_seed")

    plan = build_plan(copy_job(tmp_path, move))
    assert plan.training_seed is None and plan.recoverable_count == 0
    assert any("config.training_seed is ignored" in w for w in plan.warnings)


def test_a_seed_flag_replaces_a_drawn_seed_but_its_draw_still_counts(tmp_path):
    def edit(config):
        process(config)["sample"].update(walk_seed=False, prompts=["a --seed 5", "b", "c"])

    plan = build_plan(copy_job(tmp_path, edit))
    step0 = sorted((i for i in plan.items if i.step == 0), key=lambda i: i.prompt_index)
    assert [(i.seed, i.seed_source, i.seed_draw) for i in step0] == [(5, "config", None), (None, "drawn", 1),
                                                                      (None, "drawn", 2)]
    assert {i.round_draws for i in plan.items} == {3}


# -- the search, over a fake replay -----------------------------------------------------------------------------
class Item:
    def __init__(self, file, recoverable=True, reason=""):
        self.file, self.recoverable, self.reason = file, recoverable, reason


def fake_probe(truth: dict, level: dict, calls: list):
    """Replays that reproduce ``truth[file]`` at ``level[file]`` (EXACT or PASS), every other seed unrelated."""

    def probe(item, seed):
        calls.append((item.file, seed))
        if truth.get(item.file) == seed:
            return (1.0 if level[item.file] == "EXACT" else 0.984), level[item.file], True
        return 0.05 + (seed % 7) / 100, "FAIL", True

    return probe


def oracle_rounds(step2_item=None):
    first, second = Item("s0"), step2_item or Item("s2")
    return [seeds.DrawRound("step 0", 1, {0: first}), seeds.DrawRound("step 2", 1, {0: second})]


def test_step0_is_confirmed_exact_and_the_next_round_searches_from_where_it_ended():
    calls = []
    probe = fake_probe({"s0": 2500648409, "s2": 360511942}, {"s0": "EXACT", "s2": "PASS"}, calls)
    step0, step2 = seeds.recover_seeds(oracle_rounds(), 1234, 64, probe)
    assert (step0.seed, step0.offset, step0.words, step0.confirmed_by, step0.window) == (2500648409, 6, 6, "EXACT", (0, 64))
    assert (step2.seed, step2.offset, step2.confirmed_by, step2.window) == (360511942, 12, "PASS", (12, 76))
    assert len(step0.trials) == 6 and len(step2.trials) == 1 + seeds.CONTRAST_CANDIDATES  # the PASS one, then contrast
    assert len(calls) == step0.replays + step2.replays == 10


def test_a_pass_level_candidate_needs_unrelated_others_around_it():
    trial = lambda seed, ssim, verdict: seeds.Trial(seed, seed, ssim, verdict, True)  # noqa: E731
    candidates = [seeds.Candidate(n, n, 2) for n in range(10)]
    assert seeds.judge(candidates, {0: trial(0, 0.98, "PASS")}) is None  # no contrast yet
    unrelated = {n: trial(n, 0.08, "FAIL") for n in (1, 2, 3)}
    assert seeds.judge(candidates, {0: trial(0, 0.98, "PASS"), **unrelated}) == "PASS"
    assert seeds.judge(candidates, {0: trial(0, 0.98, "PASS"), 1: trial(1, 0.97, "PASS")}) == "ambiguous"
    assert seeds.judge(candidates, {0: trial(0, 0.98, "PASS"), 1: trial(1, 0.6, "FAIL")}) == "unclear"
    assert seeds.judge(candidates, {5: trial(5, 1.0, "EXACT")}) == "EXACT"
    assert seeds.judge(candidates[:1], {0: trial(0, 0.98, "PASS")}) is None  # alone: nothing shows the seed matters


def test_a_search_that_finds_nothing_claims_no_seed():
    calls = []
    probe = fake_probe({"s0": 2500648409}, {"s0": "EXACT"}, calls)
    (record,) = seeds.recover_seeds(oracle_rounds()[:1], 1234, 6, probe)  # offsets 0-5: the draw is at 6
    assert (record.status, record.seed, record.offset, record.confirmed_by) == ("not recovered", None, None, None)
    assert record.summary.startswith("not recovered: no candidate reproduced the preview clearly")
    assert len(calls) == len(record.trials) == 5  # every distinct candidate of the window, no more


def test_an_unreplayable_preview_is_not_searched_but_its_draw_counts():
    calls = []
    gone = Item("s2", recoverable=False, reason="not replayable: checkpoint deleted")
    rounds = oracle_rounds(gone) + [seeds.DrawRound("step 4", 1, {0: Item("s4")})]
    probe = fake_probe({"s0": 2500648409, "s4": 3292010550}, {"s0": "EXACT", "s4": "EXACT"}, calls)
    step0, step2, step4 = seeds.recover_seeds(rounds, 1234, 64, probe)
    assert (step2.status, step2.seed, step2.trials) == ("not replayable", None, ())
    assert step4.window == (14, 78)  # step 0's draw ended at 12, step 2's read two words at least
    assert (step4.seed, step4.offset) == (3292010550, 16)
    assert {file for file, _ in calls} == {"s0", "s4"}


def test_ranks_share_the_candidates_and_decide_alike(run_ranks_in_threads):
    truth, level = {"s0": 2500648409, "s2": 360511942}, {"s0": "EXACT", "s2": "PASS"}
    calls = [[], [], []]
    found = run_ranks_in_threads(3, lambda rank, gather: seeds.recover_seeds(
        oracle_rounds(), 1234, 64, fake_probe(truth, level, calls[rank]), (rank, 3), gather))
    assert all([(r.seed, r.offset) for r in part] == [(2500648409, 6), (360511942, 12)] for part in found)
    replayed = sorted(seed for part in calls for _, seed in part)
    assert replayed == sorted(t.seed for r in found[0] for t in r.trials)  # each candidate once, by one rank


# -- parity check on the oracle job (CPU, tiny model) -----------------------------------------------------------
def check(job, out, **options):
    from parity.check import CheckOptions, run_check
    from parity.replay import ReplayOptions

    return run_check(job, CheckOptions(replay=ReplayOptions(base_model=str(TINY)), out_dir=out, **options))


def test_check_recovers_both_drawn_seeds_and_a_rerun_replays_none(tmp_path):
    report = check(JOB, tmp_path / "report")
    by_file = {i.preview_file: i for i in report.items}
    step0, step2 = (by_file[f] for f in DRAWN)
    assert {f: by_file[f].settings["seed"] for f in DRAWN} == DRAWN
    assert (step0.outcome.value, step0.settings["seed_offset"], step0.settings["seed_confirmed_by"]) == ("EXACT", 6, "EXACT")
    assert (step2.outcome.value, step2.settings["seed_offset"], step2.settings["seed_confirmed_by"]) == ("PASS", 12, "PASS")
    residual = next(c for c in step2.causes if c.code == "predicted_residual")
    assert "fp16-rounded LoRA" in residual.title  # the float16 checkpoint, named
    summary = report.seed_recovery
    assert (summary["recovered"], summary["drawn"], summary["replays"], summary["cached"]) == (2, 2, 10, 0)
    # Only step 2 now: step 0's draw is searched again as the anchor, every candidate from the replay cache.
    again = check(JOB, tmp_path / "report", steps="2")
    assert {i.preview_file: i.settings["seed"] for i in again.items if i.settings["seed_source"] == "recovered"} == {
        "1795683058695__000000002_0.jpg": 360511942}
    assert (again.seed_recovery["replays"], again.seed_recovery["cached"], again.seed_recovery["anchors"]) == (0, 10, 1)


@pytest.mark.parametrize(("edit", "seed_search", "why"), [
    (lambda c: process(c).pop("training_seed"), 64, "not recoverable: the job has no training_seed"),
    (lambda c: process(c).update(training_seed=4321), 4, "not recovered: no candidate reproduced the preview"),
    (None, 6, "not recovered: no candidate reproduced the preview"),
], ids=["no-training-seed", "wrong-training-seed", "search-too-small"])
def test_check_without_a_clear_candidate_says_not_recovered_and_claims_no_seed(tmp_path, edit, seed_search, why):
    report = check(copy_job(tmp_path, edit), tmp_path / "report", steps="0", seed_search=seed_search)
    item = next(i for i in report.items if i.preview_file in DRAWN)
    assert (item.outcome.value, item.settings["seed"], item.settings["seed_source"]) == ("SKIPPED", None, "drawn")
    assert why in item.reason
    if report.seed_recovery is not None:
        (record,) = report.seed_recovery["previews"]
        assert (record["status"], record["seed"], record["window"]) == ("not recovered", None, [0, seed_search])
        assert record["candidates_tried"] == record["replays"] > 0
