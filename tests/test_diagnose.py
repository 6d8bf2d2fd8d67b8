"""Diagnosis: job folders with one injected fault each get the right top-ranked cause; clean ones get none."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures import ORACLE_DIR
from parity.check import CheckOptions, run_check
from parity.diagnose import floor_cause, noise_floor
from parity.replay import ReplayOptions
from parity.results import PreviewResult
from parity.scores import score_replay

TINY = ORACLE_DIR / "tiny_omnigen2"


def section(key, value):
    def edit(process):
        process["sample"][key] = value

    return edit


def rename_lora_keys(job: Path) -> None:
    path = job / "og2_odd_000000002.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    save_file({k.replace(".layers.", ".blocks."): v for k, v in tensors.items()}, path, metadata=metadata)


def swap_checkpoint(job: Path) -> None:
    shutil.copy(job / "og2_odd_000000004.safetensors", job / "og2_odd_000000002.safetensors")


def delete_checkpoint(job: Path) -> None:
    (job / "og2_odd_000000004.safetensors").unlink()


def one_preview(job: Path) -> Path:
    return next((job / "samples").glob("*__000000002_2.jpg"))


def resave_larger(job: Path) -> None:
    path = one_preview(job)
    image = Image.open(path)
    image.resize((image.width * 2, image.height * 2)).save(path)


def resave_quality(job: Path) -> None:
    path = one_preview(job)
    image = Image.open(path)
    image.load()
    image.save(path, quality=95)


# name: (job, config edit, file edit, steps replayed, expected top cause)
FAULTS = {
    "seed": ("og2_odd", section("seed", 43), None, "0", "seed_changed"),
    "walk_seed": ("og2_basic", section("walk_seed", False), None, "0", "walk_seed_changed"),
    "size": ("og2_basic", section("width", 80), None, "0", "size_changed"),
    "steps": ("og2_odd", section("sample_steps", 6), None, "0", "steps_changed"),
    "guidance": ("og2_odd", section("guidance_scale", 5), None, "0", "guidance_changed"),
    "negative": ("og2_odd", section("neg", "ugly"), None, "0", "negative_changed"),
    "trigger_word": ("og2_odd", lambda p: p.__setitem__("trigger_word", "xyz"), None, "0", "trigger_word_changed"),
    "multiplier": ("og2_odd", lambda p: p["sample"]["samples"][3].__setitem__("network_multiplier", 1.0), None, "2",
                   "multiplier_changed"),
    "checkpoint_swapped": ("og2_odd", None, swap_checkpoint, "2", "checkpoint_wrong_step"),
    "checkpoint_deleted": ("og2_odd", None, delete_checkpoint, "4", "checkpoint_deleted"),
    "lora_keys_renamed": ("og2_odd", None, rename_lora_keys, "2", "lora_keys_unmatched"),
    "preview_resized": ("og2_odd", None, resave_larger, "2", "preview_size_mismatch"),
    "preview_requality": ("og2_odd", None, resave_quality, "2", "preview_reencoded"),
    "te_quantization": ("og2_odd", lambda p: p["model"].__setitem__("quantize_te", True), None, "0",
                        "quantized_text_encoder"),
}


def injected(tmp_path: Path, job: str, edit, files) -> Path:
    folder = tmp_path / job
    shutil.copytree(ORACLE_DIR / "jobs" / job, folder)
    if edit is not None:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        edit(config["config"]["process"][0])
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if files is not None:
        files(folder)
    return folder


def check(folder: Path, steps: str, out: Path):
    options = CheckOptions(replay=ReplayOptions(base_model=str(TINY), noise_algorithm="torch2.13-avx2"),
                           steps=steps, out_dir=out)
    return run_check(folder, options)


def mismatch_causes(report) -> list:
    return [c for item in report.items for c in item.causes if c.severity in ("error", "warning")]


@pytest.mark.parametrize("fault", FAULTS)
def test_injected_fault_gets_the_right_top_cause(fault, tmp_path):
    job, edit, files, steps, expected = FAULTS[fault]
    report = check(injected(tmp_path, job, edit, files), steps, tmp_path / "out")
    affected = [i for i in report.items if i.outcome.value != "EXACT"]
    assert affected, "the fault changed nothing"
    tops = [i.causes[0].code for i in affected if i.causes]
    assert tops and all(top == expected for top in tops), (expected, [(i.preview_file, [c.code for c in i.causes])
                                                                      for i in affected])


@pytest.mark.parametrize("job", ["og2_basic", "og2_odd"])
def test_clean_job_folders_get_no_mismatch_cause(job, tmp_path):
    report = check(ORACLE_DIR / "jobs" / job, "all", tmp_path)
    assert mismatch_causes(report) == []


def test_explained_causes_carry_their_evidence(tmp_path):
    job, edit, files, steps, _ = FAULTS["seed"]
    report = check(injected(tmp_path, job, edit, files), steps, tmp_path / "out")
    cause = report.items[0].causes[0]
    assert cause.evidence["flip"] == "seed 42 instead of 43" and cause.evidence["exact"] is True
    assert cause.evidence["ssim_before"] < 0.3 and cause.evidence["ssim_after"] == 1.0
    assert "SSIM rises from" in cause.explanation


def test_lora_effect_is_measured_and_said_plainly(tmp_path):
    job, edit, files, steps, _ = FAULTS["multiplier"]
    report = check(injected(tmp_path, job, edit, files), steps, tmp_path / "out")
    # every checked round: its first preview replayed with the LoRA off against the replay with it
    assert [e["step"] for e in report.lora_effects] == [2]
    effect = report.lora_effects[0]
    assert 0 < effect["ssim_on_vs_off"] < 0.98 and effect["max_abs_diff"] > 0 and not effect["barely"]
    said = [c for i in report.items for c in i.causes if c.code == "lora_effect"]
    assert said and said[0].severity == "info" and said[0].evidence["ssim_on_vs_off"] == effect["ssim_on_vs_off"]
    # the multiplier fault is explained by its own flip, not by a "LoRA barely changes" note
    assert not [c for i in report.items for c in i.causes if c.code == "lora_barely_changes"]


def test_noise_floor_names_hardware_drift(tmp_path):
    """A later round that drifts no more than the base-only step-0 previews is hardware, not the LoRA."""
    preview = ORACLE_DIR / "ground_truth" / "og2_odd" / "png"
    files = sorted(preview.glob("*.png"))
    truth = np.array(Image.open(files[0]).convert("RGB"))
    noisy = np.clip(truth.astype(int) + np.random.default_rng(0).integers(-2, 3, truth.shape), 0, 255).astype(np.uint8)
    step0 = PreviewResult(files[0].name, 0, 0, score=score_replay(files[0], noisy))
    later = PreviewResult(files[0].name, 6, 0, score=score_replay(files[0], noisy))
    floor = noise_floor([step0, later])
    cause = floor_cause(later, floor)
    assert cause is not None and cause.code == "within_noise_floor" and "step 6" in cause.title
    assert floor_cause(step0, floor) is None


# Which FACTS §6 departures of ai-toolkit-inference apply to each oracle preview (derived from the configs):
# empty negative with CFG, size not a multiple of 16, "--" flags, a seed the server would default to 42 + i,
# per-prompt multipliers, the bf16 fp16-file LoRA fuse (LoRA rounds) and the JPEG quality (always).
SERVER_EXPECTED = {
    ("og2_basic", 0): {"server_empty_negative_once"},
    ("og2_basic", 1): {"server_no_flag_parsing"},
    ("og2_basic", 2): {"server_empty_negative_once"},
    ("og2_odd", 0): {"server_empty_negative_once", "server_size_floor16"},
    ("og2_odd", 1): {"server_empty_negative_once", "server_size_floor16"},
    ("og2_odd", 2): {"server_empty_negative_once", "server_no_flag_parsing", "server_seed_default"},
    ("og2_odd", 3): {"server_seed_default", "server_size_floor16", "server_single_multiplier@lora"},
    ("og2_odd", 4): {"server_empty_negative_once", "server_no_flag_parsing", "server_size_floor16",
                     "server_single_multiplier@lora"},
}


@pytest.mark.parametrize("job", ["og2_basic", "og2_odd"])
def test_server_profile_flags_exactly_the_departures_that_apply(job, tmp_path):
    options = CheckOptions(replay=ReplayOptions(base_model=str(TINY), noise_algorithm="torch2.13-avx2"),
                           steps="0,2", out_dir=tmp_path, pipeline="server")
    report = run_check(ORACLE_DIR / "jobs" / job, options)
    for item in report.items:
        flagged = {c.code for c in item.causes if c.code.startswith("server_")}
        expected = {"server_jpeg_q95"} | {
            code.removesuffix("@lora") for code in SERVER_EXPECTED[(job, item.prompt_index)]
            if not code.endswith("@lora") or item.step > 0
        }
        if item.step > 0:
            expected.add("server_lora_fuse_fp16")
        assert flagged == expected, (item.preview_file, sorted(flagged), sorted(expected))
        assert all({"ssim_training", "ssim_with_departure"} <= set(c.evidence)
                   for c in item.causes if c.code.startswith("server_"))


def outside_images(tmp_path: Path, job: str, steps: tuple[int, ...], knobs) -> Path:
    """Images 'made elsewhere': our replays with one known departure, saved as PNG named like the previews."""
    from parity.plan import build_plan
    from parity.replay import Replayer

    plan = build_plan(ORACLE_DIR / "jobs" / job)
    replayer = Replayer(plan, ReplayOptions(base_model=str(TINY), noise_algorithm="torch2.13-avx2"))
    folder = tmp_path / "outside"
    folder.mkdir()
    for item in plan.items:
        if item.step in steps:
            pixels = replayer.replay(item, knobs=knobs).pixels
            Image.fromarray(pixels).save(folder / f"{Path(item.file).stem}.png")
    return folder


def test_outside_images_are_scored_and_their_departure_named(tmp_path):
    from parity.replay import Knobs

    images = outside_images(tmp_path, "og2_basic", (0,), Knobs(options=(("negative_template_passes", 1),)))
    options = CheckOptions(replay=ReplayOptions(base_model=str(TINY), noise_algorithm="torch2.13-avx2"),
                           steps="0", out_dir=tmp_path / "out", images_dir=images)
    report = run_check(ORACLE_DIR / "jobs" / "og2_basic", options)
    assert all(i.outcome.value in ("DRIFT", "FAIL") for i in report.items)
    assert {i.causes[0].code for i in report.items} == {"negative_template_once"}


def test_outside_images_without_the_lora_are_called_out(tmp_path):
    from parity.replay import Knobs

    images = outside_images(tmp_path, "og2_odd", (6,), Knobs(lora=False))
    options = CheckOptions(replay=ReplayOptions(base_model=str(TINY), noise_algorithm="torch2.13-avx2"),
                           steps="6", out_dir=tmp_path / "out", images_dir=images)
    report = run_check(ORACLE_DIR / "jobs" / "og2_odd", options)
    flagged = [i for i in report.items if i.outcome.value != "EXACT"]
    assert flagged
    for item in flagged:
        effect = next(c for c in item.causes if c.code == "lora_effect")
        assert "WITHOUT the LoRA" in effect.title and effect.severity == "error"
