"""One catalogue of causes (parity/catalogue.py): lint, the server profile, diagnosis and check draw every cause
from it; lint's findings order diagnosis's experiments; ``parity causes`` explains a code."""

from __future__ import annotations

import ast
import io
import json
import string
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures import ORACLE_DIR
from parity import catalogue, check, diagnose, lint, server
from parity.cli import app, main
from parity.jobfolder import read_job_folder
from parity.plan import build_plan
from parity.progress import ProgressLines, Tick
from pipelines.registry import families

ROOT = Path(__file__).resolve().parents[1]
JOBS = ORACLE_DIR / "jobs"


def fields_of(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_every_kind_is_complete_and_found_some_way():
    for k in catalogue.KINDS:
        assert k.explanation.endswith(".") and k.fix, k.code
        assert catalogue.found_by(k.code), f"{k.code}: nothing in parity finds it"
        names = {f.name for f in families()}
        assert set(k.families) <= names, k.code
        for suspect in k.suspects:
            assert "diagnosis" in catalogue.found_by(suspect), (k.code, suspect)
        if "diagnosis" in catalogue.found_by(k.code):
            assert k.title, f"{k.code}: an experiment's cause needs a title"


def test_every_registry_draws_from_the_catalogue():
    assert {r.code for r in lint.RULES} <= set(catalogue.CATALOGUE)
    assert set(server.DEPARTURES) <= set(catalogue.CATALOGUE)
    assert set(diagnose.experiment_codes()) <= set(catalogue.CATALOGUE)
    assert set(check.OUTCOMES) <= set(catalogue.CATALOGUE)
    # lint and the server profile name one phenomenon with one code
    both = {r.code for r in lint.RULES} & set(server.DEPARTURES)
    assert {"server_no_flag_parsing", "server_seed_default", "server_jpeg_q95", "server_no_true_cfg"} <= both


def test_no_cause_is_defined_outside_the_catalogue():
    """A Cause is built by catalogue.cause only: no module of parity/ calls the Cause constructor itself."""
    offenders = []
    for path in sorted((ROOT / "parity").glob("*.py")):
        if path.name in ("catalogue.py", "results.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Cause":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_a_cause_takes_the_kinds_texts_and_fills_its_title():
    cause = catalogue.cause("seed_changed", seed=42, evidence={"flip": "seed 42 instead of 43"})
    kind = catalogue.kind("seed_changed")
    assert (cause.title, cause.severity, cause.fix) == ("the preview was made with seed 42", "error", kind.fix)
    assert cause.evidence == {"flip": "seed 42 instead of 43"}
    assert catalogue.cause("trigger_word_changed", word="ohwx").fix.endswith("('ohwx').")
    with pytest.raises(ValueError, match="not in parity's catalogue"):
        catalogue.cause("no_such_cause")


def test_a_lint_rule_says_only_when_and_what_it_found():
    rule = lint.get_rule("seed_carried_over")
    assert not hasattr(rule, "explanation") and rule.severity == catalogue.kind("seed_carried_over").severity
    cause = rule.cause(lint.Finding("sample prompts 2, 3 use seed 1234", {"seed": 1234}))
    assert cause.explanation == catalogue.kind("seed_carried_over").explanation
    assert cause.title == "sample prompts 2, 3 use seed 1234"


def test_lint_findings_put_the_experiments_they_point_to_first():
    plan = build_plan(JOBS / "og2_odd")
    job = read_job_folder(plan.job_dir)
    codes = lint.job_codes(plan, lint.LintContext(job=job))
    assert {"multipliers_differ_in_round", "seed_carried_over", "size_floored_to_8"} <= set(codes)
    suspects = catalogue.suspects_of(codes)
    assert suspects["seed_changed"] == "seed_carried_over" and suspects["multiplier_changed"] == "multipliers_differ_in_round"
    item = next(i for i in plan.items if i.step == 2 and i.prompt_index == 3)  # a LoRA round, multiplier 0.5
    flips = diagnose.candidate_flips(plan, job, item, (item.width, item.height), "torch2.13-avx2")
    # the same picture, drifted: composition knobs first, the multiplier lint suspects before the rest of them
    related = diagnose.order_flips(flips, 0.8, suspects)
    assert [f.knob for f in related[:2]] == ["lora_off", "multiplier_changed"]  # the LoRA's effect stays first
    assert diagnose.order_by_likelihood(flips, 0.8)[0].knob != "multiplier_changed"
    # an unrelated picture: picture knobs first, the seed lint suspects first among them; a hint never outranks it
    unrelated = diagnose.order_flips(flips, 0.1, suspects)
    assert unrelated[0].knob == "seed_changed"
    assert {f.knob for f in unrelated[:3]} <= set(diagnose.PICTURE_KNOBS)


def test_a_proven_cause_names_the_finding_that_suggested_it():
    flip = diagnose.Flip("seed_changed", "seed 42 instead of 43", None, fields={"seed": 42})
    result = diagnose.FlipResult(flip, 1.0, float("inf"), True, "EXACT")
    cause = diagnose.rank_causes([result], 0.1, None, "EXACT", {"seed_changed": "seed_carried_over"})[0]
    assert cause.evidence["suggested_by"] == "seed_carried_over" and cause.title.endswith("seed 42")


def test_parity_causes_lists_and_explains():
    runner = CliRunner()
    listed = runner.invoke(app, ["causes", "--json"])
    assert listed.exit_code == 0
    rows = json.loads(listed.stdout)["causes"]
    assert len(rows) == len(catalogue.KINDS)
    one = runner.invoke(app, ["causes", "server_no_flag_parsing"])
    assert one.exit_code == 0 and "found by lint, server" in one.stdout and "Fix: Strip the flags" in one.stdout
    flux = json.loads(runner.invoke(app, ["causes", "--family", "flux", "--json"]).stdout)["causes"]
    assert "flux_true_cfg" in {r["code"] for r in flux} and "negative_template_once" not in {r["code"] for r in flux}


def test_parity_causes_unknown_code_is_one_line_exit_2(capsys):
    for args, text in ((["causes", "seed_changd"], "unknown cause code 'seed_changd'; did you mean seed_changed"),
                       (["causes", "--family", "sdxl"], "--family 'sdxl': parity knows omnigen2, flux")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        out = capsys.readouterr()
        assert exit_info.value.code == 2 and out.out == ""
        assert len(out.err.strip().splitlines()) == 1 and text in out.err


def test_counted_phases_show_the_time_left():
    now = [0.0]
    stream = io.StringIO()
    lines = ProgressLines(total=2, stream=stream, clock=lambda: now[0])
    for n in range(1, 4):
        lines(Tick("diagnosing", n, 3, f"p{n}.jpg"))
        now[0] += 10
    lines.beat()
    lines("choosing the kernels")
    lines(Tick("measuring the LoRA's effect", 1, 2, "step 2"))
    now[0] += 4
    lines(Tick("measuring the LoRA's effect", 2, 2, "step 4"))
    assert stream.getvalue().splitlines() == [
        "[0:00] diagnosing 1/3 p1.jpg",
        "[0:10] diagnosing 2/3 p2.jpg (about 0:20 left)",
        "[0:20] diagnosing 3/3 p3.jpg (about 0:10 left)",
        "[0:30] still diagnosing 3/3 p3.jpg: 0:10 so far",
        "[0:30] choosing the kernels",
        "[0:30] measuring the LoRA's effect 1/2 step 2",
        "[0:34] measuring the LoRA's effect 2/2 step 4 (about 0:04 left)",
    ]
    assert Tick("diagnosing", 1, 3, "x.jpg") == "diagnosing 1/3 x.jpg"  # a plain label to any other consumer


def test_a_section_seed_proven_wrong_is_not_carried_to_a_prompt_with_its_own_seed():
    plan = build_plan(JOBS / "og2_basic")  # walk_seed; prompt 1 has --seed 7
    step0 = {i.prompt_index: i for i in plan.items if i.step == 0}
    assert [step0[n].seed_from for n in (0, 1, 2)] == ["walk", "flag", "walk"]
    flip = diagnose.Flip("seed_changed", "seed 41 instead of 42", diagnose.replace(plan, step0[0], seed=41),
                         fields={"seed": 41})
    carried = diagnose.analogue(flip, step0[0], step0[2], plan)
    assert carried.item.seed == 43 and carried.title == "the preview was made with seed 43"
    assert diagnose.analogue(flip, step0[0], step0[1], plan) is None


def test_a_runs_summary_line_says_what_its_findings_share():
    assert catalogue.summary_title("lora_effect", ["the LoRA's effect at step 2: SSIM 0.920 with vs without it"] * 2) \
        == "the LoRA's effect at step 2: SSIM 0.920 with vs without it"
    assert catalogue.summary_title("lora_effect", ["the LoRA's effect at step 2: SSIM 0.920 with vs without it",
                                                   "the LoRA's effect at step 4: SSIM 0.896 with vs without it"]) \
        == "the LoRA's effect at step …: SSIM … with vs without it"
    assert catalogue.summary_title("size_not_multiple_of_16", ["72x88 is not a multiple of 16", "88x64 is not a "
                                   "multiple of 16", "72x88 is not a multiple of 16"]) \
        == "72x88 is not a multiple of 16 (and 1 other finding(s) of this kind)"
