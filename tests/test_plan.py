"""The replay plan: every rule of FACTS §1-§3 that decides a preview's settings, one test each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from test_jobfolder import job_config, make_job

from parity.errors import InputError
from parity.plan import build_plan, requested_size, split_prompt_flags
from pipelines.omnigen2.rules import generation_size

GROUND_TRUTH_FIELDS = (
    "step",
    "prompt_index",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "network_multiplier",
    "lora_merged",
)


def assert_plan_matches_ground_truth(plan: dict, rows: list[dict]) -> None:
    """Every preview of the plan agrees with the oracle's samples.jsonl on every field recorded there."""
    items = {item["file"]: item for item in plan["items"]}
    assert sorted(items) == sorted(row["file"] for row in rows)
    for row in rows:
        item = items[row["file"]]
        for name in GROUND_TRUTH_FIELDS:
            assert item[name] == row[name], (row["file"], name)
        assert [item["height"], item["width"]] == [
            row["height_passed_to_pipeline"],
            row["width_passed_to_pipeline"],
        ]
        assert [item["gen_height"], item["gen_width"]] == row["generation"]["internal_latent_request_hw"]
        assert item["round"] == ("first_sample" if row["is_first_sample_config"] else "sample")
        assert item["replayable"] is True


def ground_truth(oracle_dir, job: str) -> list[dict]:
    lines = (oracle_dir / "ground_truth" / job / "samples.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("job", ["og2_basic", "og2_odd"])
def test_plan_agrees_with_oracle_ground_truth(oracle_dir, job):
    plan = json.loads(build_plan(oracle_dir / "jobs" / job).to_json())
    assert_plan_matches_ground_truth(plan, ground_truth(oracle_dir, job))


def test_oracle_checkpoints_pair_with_their_rounds(oracle_dir):
    plan = build_plan(oracle_dir / "jobs" / "og2_basic")
    pairs = {(item.step, item.weights, item.checkpoint) for item in plan.items}
    assert pairs == {
        (0, "base", None),
        (2, "checkpoint", "og2_basic_000000002.safetensors"),
        (4, "checkpoint", "og2_basic_000000004.safetensors"),
        (6, "final", "og2_basic.safetensors"),
    }


def test_plan_json_follows_its_schema(oracle_dir):
    jsonschema = pytest.importorskip("jsonschema")
    from importlib.resources import files

    schema = json.loads(files("parity.schemas").joinpath("plan.schema.json").read_text())
    for job in ("og2_basic", "og2_odd"):
        data = json.loads(build_plan(oracle_dir / "jobs" / job).to_json())
        jsonschema.validate(data, schema)
        assert data["schema_version"] == 1
        assert data["summary"] == {"previews": len(data["items"]), "replayable": len(data["items"]),
                                   "seeds_to_recover": 0}


def test_plan_modules_do_not_import_torch():
    code = "import sys, parity.plan, parity.jobfolder, parity.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------------
# constructed examples


def plan_for(tmp_path, sample: dict, previews=None, **overrides):
    """The plan of a job with this sample section and one step-0 preview per prompt (unless given)."""
    if previews is None:
        count = len(sample.get("samples", sample.get("prompts", [])))
        previews = [(0, i) for i in range(count)]
    return build_plan(make_job(tmp_path, job_config(sample=sample, **overrides), previews=previews))


def test_flags_keep_quotes_and_unknown_flags_are_dropped(tmp_path):
    sample = {"prompts": ['a cat --n "blurry, dark" --foo bar --w 96 --neg ugly'], "neg": ""}
    (item,) = plan_for(tmp_path, sample).items
    assert item.prompt == "a cat"
    assert item.negative_prompt == '"blurry, dark"'
    assert item.width == 96
    assert item.unknown_flags == ("--foo", "--neg")


def test_literal_double_dash_truncates_the_prompt():
    assert split_prompt_flags("  a cat -- with a hat  ") == ("a cat", [("", "with a hat")])
    assert split_prompt_flags("a--b c") == ("a", [("b", "c")])
    assert split_prompt_flags("") == ("", [])


def test_flag_aliases_set_the_same_setting_and_flags_win(tmp_path):
    sample = {
        "neg": "",
        "guidance_scale": 4,
        "sample_steps": 4,
        "samples": [
            {"prompt": "a --d 5 --l 2 --s 9 --m 0.5", "seed": 3, "guidance_scale": 6},
            {"prompt": "b --seed 6 --cfg 2.5 --steps 7 --network_multiplier 1.5 --h 100"},
            {"prompt": "c --w 80 --w 120"},
        ],
    }
    a, b, c = plan_for(tmp_path, sample).items
    assert (a.seed, a.guidance_scale, a.num_inference_steps, a.network_multiplier) == (5, 2.0, 9, 0.5)
    assert (b.seed, b.guidance_scale, b.num_inference_steps, b.network_multiplier) == (6, 2.5, 7, 1.5)
    assert b.height == 96  # flags are floored to 8 like every size
    assert c.width == 120  # the last flag wins


def test_walk_seed_adds_the_prompt_index(tmp_path):
    sample = {"prompts": ["a", "b", "c"], "neg": "", "seed": 42, "walk_seed": True}
    assert [i.seed for i in plan_for(tmp_path, sample).items] == [42, 43, 44]


def test_item_seed_carries_over_when_walk_seed_is_off(tmp_path):
    sample = {
        "neg": "",
        "seed": 42,
        "samples": [{"prompt": "a"}, {"prompt": "b", "seed": 7}, {"prompt": "c"}],
    }
    assert [i.seed for i in plan_for(tmp_path, sample).items] == [42, 7, 7]


def test_item_seed_does_not_carry_over_with_walk_seed(tmp_path):
    sample = {
        "neg": "",
        "seed": 42,
        "walk_seed": True,
        "samples": [{"prompt": "a"}, {"prompt": "b", "seed": 7}, {"prompt": "c"}],
    }
    assert [i.seed for i in plan_for(tmp_path, sample).items] == [42, 7, 44]


def test_flag_seed_does_not_carry_over(tmp_path):
    sample = {"neg": "", "seed": 42, "prompts": ["a --seed 9", "b"]}
    assert [i.seed for i in plan_for(tmp_path, sample).items] == [9, 42]


def test_seeds_restart_every_round(tmp_path):
    sample = {
        "neg": "",
        "seed": 42,
        "sample_every": 2,
        "samples": [{"prompt": "a"}, {"prompt": "b", "seed": 7}],
    }
    plan = plan_for(tmp_path, sample, previews=[(0, 0), (0, 1), (2, 0), (2, 1)])
    assert [(i.step, i.seed) for i in plan.items] == [(0, 42), (0, 7), (2, 42), (2, 7)]


def test_trigger_is_replaced_everywhere_in_the_raw_prompt(tmp_path):
    sample = {"neg": "", "prompts": ["[trigger] at night --n no [trigger]", "plain"]}
    first, second = plan_for(tmp_path, sample, trigger_word="sks").items
    assert (first.prompt, first.negative_prompt) == ("sks at night", "no sks")
    assert second.prompt == "plain"  # never added when absent


def test_trigger_stays_literal_without_trigger_word(tmp_path):
    (item,) = plan_for(tmp_path, {"neg": "", "prompts": ["[trigger] at night"]}).items
    assert item.prompt == "[trigger] at night"


def test_default_neg_false_is_not_replayable(tmp_path):
    (item,) = plan_for(tmp_path, {"prompts": ["a"]}).items
    assert item.negative_prompt is None
    assert item.replayable is False
    assert "negative prompt is False" in item.reason and "cannot come from this config" in item.reason


def test_empty_neg_none_is_not_replayable(tmp_path):
    (item,) = plan_for(tmp_path, {"prompts": ["a"], "neg": None}).items
    assert not item.replayable and "negative prompt is None" in item.reason


def test_neg_false_overridden_by_a_flag_is_replayable(tmp_path):
    (item,) = plan_for(tmp_path, {"prompts": ["a --n blurry"], "neg": False}).items
    assert (item.negative_prompt, item.replayable) == ("blurry", True)


def test_section_seed_minus_one_is_random_for_every_prompt(tmp_path):
    items = plan_for(tmp_path, {"neg": "", "seed": -1, "prompts": ["a", "b"]}).items
    assert [(i.seed, i.replayable) for i in items] == [(None, False), (None, False)]
    assert "seed -1" in items[0].reason


def test_item_seed_minus_one_is_random_and_carries_over(tmp_path):
    sample = {
        "neg": "",
        "seed": 3,
        "samples": [{"prompt": "a"}, {"prompt": "b", "seed": -1}, {"prompt": "c"}],
    }
    items = plan_for(tmp_path, sample).items
    assert [(i.seed, i.replayable) for i in items] == [(3, True), (None, False), (None, False)]


def test_walk_seed_from_minus_one_is_random_only_for_the_first_prompt(tmp_path):
    sample = {"neg": "", "seed": -1, "walk_seed": True, "prompts": ["a", "b", "c"]}
    assert [i.seed for i in plan_for(tmp_path, sample).items] == [None, 0, 1]


def test_flag_seed_minus_one_is_the_fixed_seed_two_to_the_64_minus_one(tmp_path):
    (item,) = plan_for(tmp_path, {"neg": "", "prompts": ["a --seed -1"]}).items
    assert (item.seed, item.replayable) == (2**64 - 1, True)


def test_flag_seed_overrides_a_random_section_seed(tmp_path):
    (item,) = plan_for(tmp_path, {"neg": "", "seed": -1, "prompts": ["a --seed 5"]}).items
    assert (item.seed, item.replayable) == (5, True)


@pytest.mark.parametrize(
    "width, height, requested, generated",
    [
        (88, 40, (88, 64), (80, 64)),
        (72, 88, (72, 88), (64, 80)),
        (100, 60, (96, 64), (96, 64)),
        (1000, 1000, (1000, 1000), (992, 992)),
        (1536, 1024, (1536, 1024), (1248, 832)),
        (1024, 1536, (1024, 1536), (832, 1248)),
    ],
)
def test_sizes_floor_to_8_then_cap_at_1mp_and_floor_to_16(tmp_path, width, height, requested, generated):
    assert requested_size(width, height) == requested
    assert generation_size(*requested) == generated
    (item,) = plan_for(tmp_path, {"neg": "", "width": width, "height": height, "prompts": ["a"]}).items
    assert ((item.width, item.height), (item.gen_width, item.gen_height)) == (requested, generated)


def test_lora_merged_needs_one_multiplier_per_round_and_an_unquantised_base(tmp_path):
    same = {"neg": "", "samples": [{"prompt": "a", "network_multiplier": 1}, {"prompt": "b --m 1.0"}]}
    mixed = {"neg": "", "samples": [{"prompt": "a"}, {"prompt": "b --m 0.5"}]}
    quantised = {"name_or_path": "m", "arch": "omnigen2", "quantize": True}
    offloaded = {"name_or_path": "m", "arch": "omnigen2", "layer_offloading": True}
    assert {i.lora_merged for i in plan_for(tmp_path / "1", same).items} == {True}
    assert {i.lora_merged for i in plan_for(tmp_path / "2", mixed).items} == {False}
    assert {i.lora_merged for i in plan_for(tmp_path / "3", same, model=quantised).items} == {False}
    assert {i.lora_merged for i in plan_for(tmp_path / "4", same, model=offloaded).items} == {False}


def test_merge_is_decided_by_every_prompt_of_the_round_not_the_files_present(tmp_path):
    sample = {"neg": "", "samples": [{"prompt": "a"}, {"prompt": "b", "network_multiplier": 0.5}]}
    (item,) = plan_for(tmp_path, sample, previews=[(0, 0)]).items
    assert item.lora_merged is False


def test_deleted_and_never_saved_checkpoints_are_not_replayable(tmp_path):
    sample = {"neg": "", "sample_every": 2, "prompts": ["a"]}
    config = job_config(
        sample=sample,
        train={"steps": 10, "dtype": "bf16"},
        save={"save_every": 4, "max_step_saves_to_keep": 1},
    )
    previews = [(0, 0), (2, 0), (4, 0), (6, 0), (8, 0), (10, 0)]
    plan = build_plan(make_job(tmp_path, config, previews=previews, checkpoints=[8], final_step=10))
    by_step = {item.step: item for item in plan.items}
    assert [(s, by_step[s].weights, by_step[s].replayable) for s in sorted(by_step)] == [
        (0, "base", True),
        (2, "none", False),
        (4, "none", False),
        (6, "none", False),
        (8, "checkpoint", True),
        (10, "final", True),
    ]
    assert "no checkpoint was saved at step 2 (save.save_every=4)" in by_step[2].reason
    assert "checkpoint deleted: job_000000004.safetensors is gone" in by_step[4].reason
    assert by_step[10].checkpoint == "job.safetensors"


def test_missing_or_mismatched_final_checkpoint_is_not_replayable(tmp_path):
    config = job_config(sample={"neg": "", "sample_every": 2, "prompts": ["a"]})
    missing = build_plan(make_job(tmp_path / "1", config, previews=[(6, 0)]))
    assert "final checkpoint job.safetensors is missing" in missing.items[0].reason
    stale = build_plan(make_job(tmp_path / "2", config, previews=[(6, 0)], final_step=4))
    assert "job.safetensors is from step 4, not 6" in stale.items[0].reason


def test_unscheduled_round_is_not_replayable(tmp_path):
    config = job_config(sample={"neg": "", "sample_every": 2, "prompts": ["a"]})
    plan = build_plan(make_job(tmp_path, config, previews=[(3, 0)], checkpoints=[3]))
    assert not plan.items[0].replayable
    assert "step 3 is not a sampling step of this config" in plan.items[0].reason


def test_first_sample_round_comes_first_at_step_0(tmp_path):
    config = job_config(sample={"neg": "", "seed": 1, "prompts": ["main a", "main b"]})
    config["config"]["process"][0]["first_sample"] = {
        "neg": "",
        "seed": 100,
        "prompts": ["first a", "first b"],
    }
    previews = [(0, 0), (0, 1), (0, 0), (0, 1)]
    plan = build_plan(make_job(tmp_path, config, previews=previews))
    assert [(i.round, i.prompt, i.seed, i.weights) for i in plan.items] == [
        ("first_sample", "first a", 100, "base"),
        ("first_sample", "first b", 100, "base"),
        ("sample", "main a", 1, "base"),
        ("sample", "main b", 1, "base"),
    ]
    assert plan.items[0].ms_time < plan.items[2].ms_time


def test_prompt_index_beyond_the_config_is_not_replayable(tmp_path):
    (item,) = plan_for(tmp_path, {"neg": "", "prompts": ["a"]}, previews=[(0, 3)]).items
    assert item.prompt is None and not item.replayable
    assert "prompt index 3 is not in the config's sample section (1 prompts)" in item.reason


def test_items_without_prompt_shift_settings_like_ai_toolkit(tmp_path):
    sample = {"neg": "", "samples": [{"width": 256}, {"prompt": "a", "width": 128}]}
    (item,) = plan_for(tmp_path, sample, previews=[(0, 0)]).items
    assert (item.prompt, item.width) == ("a", 256)  # prompt 0 takes samples[0]'s settings


def test_reference_image_is_found_as_recorded_then_in_assets_then_in_the_job_folder(tmp_path):
    recorded = tmp_path / "ref_here.png"
    Image.new("RGB", (8, 8)).save(recorded)  # the header is read: a reference image must be an image
    assets = tmp_path / "assets" / "nested"
    assets.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(assets / "ref_assets.png")
    sample = {
        "neg": "",
        "samples": [
            {"prompt": "a", "ctrl_img": str(recorded)},
            {"prompt": "b", "ctrl_img": "C:\\Users\\me\\refs\\ref_assets.png"},
            {"prompt": "c --ctrl_img /home/trainer/refs/ref_job.png"},
            {"prompt": "d", "ctrl_img": "/home/trainer/refs/gone.png"},
            {"prompt": "e", "ctrl_img_1": "/home/trainer/refs/gone.png"},
        ],
    }
    job_dir = make_job(tmp_path, job_config(sample=sample), previews=[(0, i) for i in range(5)])
    (job_dir / "refs").mkdir()
    Image.new("RGB", (8, 8)).save(job_dir / "refs" / "ref_job.png")
    a, b, c, d, e = build_plan(job_dir, assets_dir=tmp_path / "assets").items
    assert a.ctrl_img == str(recorded.resolve())
    assert b.ctrl_img == str((assets / "ref_assets.png").resolve())
    assert c.ctrl_img == str((job_dir / "refs" / "ref_job.png").resolve())
    assert (c.ctrl_img_recorded, c.replayable) == ("/home/trainer/refs/ref_job.png", True)
    assert (d.ctrl_img, d.replayable) == (None, False)
    assert "reference image '/home/trainer/refs/gone.png' not found" in d.reason
    # omnigen2 reads only ctrl_img: ctrl_img_1 alone is plain text-to-image
    assert (e.ctrl_img, e.ctrl_img_recorded, e.replayable) == (None, None, True)


@pytest.mark.parametrize("flag", ["--w abc", "--h 9.5", "--seed x", "--cfg high", "--m one", "--steps 4.0"])
def test_unparseable_flag_is_an_input_error_naming_the_config(tmp_path, flag):
    job_dir = make_job(tmp_path, job_config(sample={"neg": "", "prompts": ["ok", f"a cat {flag}"]}))
    with pytest.raises(InputError) as err:
        build_plan(job_dir)
    assert err.value.path == str(job_dir / "config.yaml")
    assert err.value.problem.startswith(f"sample prompt 1: {flag.split()[0]} ")


def test_ui_job_plan_from_job_config_json(tmp_path):
    config = job_config(
        name="ui_job", sample={"neg": "", "walk_seed": True, "seed": 42, "samples": [{"prompt": "a"}]}
    )
    config["config"]["process"][0]["type"] = "diffusion_trainer"
    plan = build_plan(make_job(tmp_path, config, config_name=".job_config.json"))
    assert (plan.config_file, plan.job_name, plan.items[0].seed) == (".job_config.json", "ui_job", 42)


def test_job_level_facts_are_carried(tmp_path):
    model = {
        "name_or_path": "org/tr",
        "extras_name_or_path": "org/extras",
        "arch": "omnigen2",
        "quantize_te": True,
    }
    plan = plan_for(tmp_path, {"neg": "", "prompts": ["a"], "format": "png"}, model=model, trigger_word="sks")
    assert (plan.base_model, plan.extras_model, plan.train_dtype) == ("org/tr", "org/extras", "bf16")
    assert (plan.quantize, plan.quantize_te, plan.qtype_te, plan.save_dtype) == (
        False,
        True,
        "qfloat8",
        "float16",
    )
    assert (plan.trigger_word, plan.sample_format, plan.job_name) == ("sks", "png", "job")


def test_replayable_items_name_the_known_drift_sources(oracle_dir, tmp_path):
    merged = {i.step: i.reason for i in build_plan(oracle_dir / "jobs" / "og2_basic").items}
    assert merged[0] == "step 0: base model only"
    assert "rounded to float16" in merged[2] and "merged round" in merged[2]
    unmerged = {i.step: i.reason for i in build_plan(oracle_dir / "jobs" / "og2_odd").items}
    assert unmerged[2] == "step 2: og2_odd_000000002.safetensors"
    config = job_config(sample={"neg": "", "sample_every": 2, "network_multiplier": -1, "prompts": ["a"]})
    (item,) = build_plan(make_job(tmp_path, config, previews=[(2, 0)], checkpoints=[2])).items
    assert item.replayable and "negative multiplier" in item.reason
