"""parity lint: every rule on an injected-fault copy of an oracle job folder; clean folders get only the expected
informational rules; the rules parity check reports keep their behaviour."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fixtures import ORACLE_DIR
from parity.causes import item_causes, lora_keys_cause
from parity.cli import main
from parity.lint import RULES, LintReport, lint
from parity.plan import build_plan

TINY = ORACLE_DIR / "tiny_omnigen2"
TINY_FLUX = ORACLE_DIR / "tiny_flux"
JOBS = ORACLE_DIR / "jobs"

# What the unedited oracle folders are expected to show: informational findings only.
CLEAN_CODES = {
    "og2_basic": {
        "lora_saved_fp16",  # save.dtype float16
        "final_round_uses_final_file",  # step 6 = train.steps
        "merge_drift",  # steps 4 and 6 follow the merged step-2 round
        "trigger_word_absent",  # prompt 1 has no "sks"
        "flag_quotes_kept",  # --n "blurry"
        "server_empty_negative_once",  # neg ''
        "server_jpeg_q95",
        "server_defaults_differ",  # 4-5 steps, 64 px
        "server_seed_default",  # prompt 1: --seed 7
        "server_no_flag_parsing",
    },
    "og2_odd": {
        "size_not_multiple_of_16",  # 72x88, 88x64, 104x72
        "final_round_uses_final_file",
        "multipliers_differ_in_round",  # 1, 1, 1, 0.5, 1.5
        "seed_carried_over",  # samples[1].seed 1234 carries to prompts 2, 3
        "trigger_word_absent",
        "size_floored_to_8",  # 88x40 -> 88x64, 100x60 -> 96x64
        "server_empty_negative_once",
        "server_size_floor16",
        "server_jpeg_q95",
        "server_defaults_differ",
        "server_seed_default",
        "server_no_flag_parsing",
        "server_single_multiplier",
    },
    "flux_basic": {
        "lora_saved_fp16",
        "final_round_uses_final_file",
        "merge_drift",
        "trigger_word_absent",
        "flux_guidance_embedding",  # guidance 3.5, 4 into the embedding
        "server_jpeg_q95",
        "server_defaults_differ",
        "server_seed_default",  # prompt 1: --seed 7
        "server_no_flag_parsing",
        "server_lora_peft_bf16",  # steps 2, 4, 6
        "server_base_model",  # tiny_flux, not FLUX.1-dev
    },
}


# ---------------------------------------------------------------------------------------------------------
# building injected-fault job folders


def copy_job(tmp_path: Path, job: str) -> Path:
    target = tmp_path / job
    shutil.copytree(JOBS / job, target, ignore=shutil.ignore_patterns("optimizer.pt"))
    return target


def edit_process(job_dir: Path, change: Callable[[dict], None]) -> None:
    """Edit the training process of config.yaml in place, as a user editing it after training would."""
    config_file = job_dir / "config.yaml"
    raw = yaml.safe_load(config_file.read_text())
    change(raw["config"]["process"][0])
    config_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def setting(*path_and_value):
    *path, key, value = path_and_value

    def change(process: dict) -> None:
        node = process
        for part in path:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(key)
        else:
            node[key] = value

    return lambda job_dir: edit_process(job_dir, change)


DELETE = object()


def preview(job_dir: Path, step: int, index: int) -> Path:
    return next((job_dir / "samples").glob(f"*__{step:09d}_{index}.*"))


def rewrite_lora(job_dir: Path, file: str, change: Callable[[str, object], tuple[str, object]]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = job_dir / file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = dict(change(k, handle.get_tensor(k)) for k in handle.keys())
    save_file(tensors, str(path), metadata=metadata)


def rename_prefix(key, tensor):
    return key.replace("diffusion_model.", "unet.blocks."), tensor


def rename_layer_0_query(key, tensor):
    return key.replace("layers.0.attn.to_q", "layers.0.attn.q_proj"), tensor


def zero_up(key, tensor):
    return key, tensor.zero_() if ".lora_B." in key else tensor


def nan_in_one_up(key, tensor):
    if key == "diffusion_model.layers.0.attn.to_q.lora_B.weight":
        tensor = tensor.clone()
        tensor.view(-1)[:3] = float("nan")
    return key, tensor


def truncate(job_dir: Path, file: str) -> None:
    path = job_dir / file
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)


def prompts(job_dir: Path, change: Callable[[list], None]) -> None:
    edit_process(job_dir, lambda p: change(p["sample"]["prompts"]))


def ctrl_img(job_dir: Path, value: str, key: str = "ctrl_img") -> None:
    edit_process(job_dir, lambda p: p["sample"]["samples"][0].update({key: value}))


def resized_reference(job_dir: Path) -> None:
    Image.new("RGB", (50, 40), (200, 30, 30)).save(job_dir / "ref.png")
    ctrl_img(job_dir, "ref.png")


def resave(job_dir: Path, size: tuple[int, int] | None = None, **options) -> None:
    path = preview(job_dir, 2, 0)
    with Image.open(path) as im:
        image = im.convert("RGB")
    (image.resize(size) if size else image).save(path, **options)


def copy_step0_over_last(job_dir: Path) -> None:
    shutil.copyfile(preview(job_dir, 0, 0), preview(job_dir, 6, 0))


def base_for(job_dir: Path) -> Path:
    """The tiny model of the job's family (the oracle folders are named after it)."""
    return TINY_FLUX if Path(job_dir).name.startswith("flux") else TINY


def run_lint(job_dir: Path, **kwargs) -> LintReport:
    return lint(job_dir, base_model=str(base_for(job_dir)), **kwargs)


def flux_attn_masking(job_dir: Path) -> None:
    """model.attn_masking, with the legacy is_flux key ai-toolkit checks it against."""
    edit_process(job_dir, lambda p: p["model"].update(is_flux=True, attn_masking=True))


# (rule code, severity, oracle job, fault injected (None: the clean folder shows it), text in the finding)
CASES = [
    ("size_not_multiple_of_16", "info", "og2_basic", setting("sample", "width", 72), "72x64 is not a multiple"),
    ("above_1mp", "info", "og2_basic", lambda d: edit_process(d, lambda p: p["sample"].update(width=1280, height=1024)),
     "1280x1024 is above 1 MP"),
    ("seed_random", "warning", "og2_basic", setting("sample", "seed", -1), "seed -1"),
    ("checkpoint_deleted", "warning", "og2_basic",
     lambda d: (d / "og2_basic_000000002.safetensors").unlink(), "step 2 was deleted"),
    ("quantized_text_encoder", "warning", "og2_basic", setting("model", "quantize_te", True), "qfloat8-quantised"),
    ("quantized_base", "warning", "og2_basic", setting("model", "quantize", True), "LoRA ran unmerged"),
    ("lora_saved_fp16", "info", "og2_basic", None, "rounded to float16"),
    ("negative_multiplier_merged", "warning", "og2_basic", setting("sample", "network_multiplier", -1),
     "multiplier -1 was merged"),
    ("checkpoint_never_saved", "warning", "og2_basic",
     lambda d: (setting("save", "save_every", 4)(d), (d / "og2_basic_000000002.safetensors").unlink()),
     "no checkpoint was saved at step 2"),
    ("checkpoint_wrong_step", "error", "og2_basic",
     lambda d: shutil.copyfile(d / "og2_basic_000000004.safetensors", d / "og2_basic_000000002.safetensors"),
     "og2_basic_000000002.safetensors holds step 4, not 2"),
    ("final_checkpoint_missing", "warning", "og2_basic", lambda d: (d / "og2_basic.safetensors").unlink(),
     "og2_basic.safetensors is missing"),
    ("step_not_sampled", "warning", "og2_basic", setting("sample", "sample_every", 3), "step 2 is not a sampling"),
    ("final_round_uses_final_file", "info", "og2_odd", None, "step-6 previews pair with og2_odd.safetensors"),
    ("merge_drift", "info", "og2_basic", None, "earlier merged rounds"),
    ("layer_offloading", "warning", "og2_basic", setting("model", "layer_offloading", True), "LoRA ran unmerged"),
    ("preview_dtype_not_bf16", "warning", "og2_basic", setting("train", "dtype", "fp32"), "in fp32, not bf16"),
    ("ema_previews", "info", "og2_basic", setting("train", "ema_config", {"use_ema": True}), "EMA weights"),
    ("multipliers_differ_in_round", "info", "og2_basic", lambda d: prompts(d, lambda p: p.__setitem__(0, p[0] + " --m 0.5")),
     "multipliers 0.5, 1, 1"),
    ("seed_carried_over", "info", "og2_odd", None, "sample prompts 2, 3 use seed 1234"),
    ("walk_seed_random_start", "warning", "og2_basic", setting("sample", "seed", -1),
     "prompt 0 is random but the others are fixed (sample prompt 2: seed 1)"),
    ("negative_not_text", "error", "og2_basic", setting("sample", "neg", DELETE), "not text"),
    ("prompt_not_in_config", "error", "og2_basic", lambda d: prompts(d, lambda p: p.pop()), "prompt 2 is not in"),
    ("trigger_left_literal", "warning", "og2_basic", lambda d: edit_process(d, lambda p: p.pop("trigger_word")),
     "'[trigger]' stayed literally in sample prompts 0, 2"),
    ("trigger_word_absent", "info", "og2_odd", None, "'sks' is not in sample prompts 1, 2, 3"),
    ("unknown_flags_dropped", "warning", "og2_basic", lambda d: prompts(d, lambda p: p.__setitem__(0, p[0] + " --foo 3")),
     "sample prompt 0: --foo"),
    ("flag_quotes_kept", "info", "og2_basic", None, 'sample prompt 1: --n "blurry"'),
    ("size_floored_to_8", "info", "og2_odd", None, "88x40 -> 88x64, 100x60 -> 96x64"),
    ("ctrl_img_numbered_ignored", "warning", "og2_odd", lambda d: ctrl_img(d, "other.png", "ctrl_img_2"),
     "sample.samples[0]: ctrl_img_2"),
    ("reference_image_missing", "warning", "og2_odd", lambda d: ctrl_img(d, "/nowhere/ref.png"),
     "/nowhere/ref.png not found"),
    ("ctrl_img_resized", "warning", "og2_odd", resized_reference, "ref.png is 50x40; the preview used it resized to 72x88"),
    ("preview_unreadable", "error", "og2_basic", lambda d: preview(d, 2, 0).write_bytes(b"not a jpeg"), "cannot be read"),
    ("preview_size_mismatch", "error", "og2_basic", lambda d: resave(d, (32, 32)), "32x32 but the config makes it 64x64"),
    ("preview_reencoded", "warning", "og2_basic", lambda d: resave(d, quality=95), "quality 95"),
    ("preview_barely_changes", "warning", "og2_basic", copy_step0_over_last, "sample prompt 0 (step 0 vs 6: SSIM 1.000)"),
    ("lora_keys_unmatched", "error", "og2_basic",
     lambda d: rewrite_lora(d, "og2_basic_000000002.safetensors", rename_prefix),
     "match nothing in og2_basic_000000002.safetensors"),
    ("checkpoint_unreadable", "error", "og2_basic", lambda d: truncate(d, "og2_basic_000000004.safetensors"),
     "og2_basic_000000004.safetensors cannot be read"),
    ("lora_untrained", "warning", "og2_basic", lambda d: rewrite_lora(d, "og2_basic_000000004.safetensors", zero_up),
     "every B matrix is zero"),
    ("lora_nonfinite", "error", "og2_basic", lambda d: rewrite_lora(d, "og2_basic_000000004.safetensors", nan_in_one_up),
     "og2_basic_000000004.safetensors: 1 tensor holds NaN/Inf values (3 in all)"),
    ("server_empty_negative_once", "info", "og2_odd", None, "sample prompts 0, 1, 2, 4 have an empty negative"),
    ("server_size_floor16", "info", "og2_odd", None, "72x88 -> 64x80"),
    ("server_jpeg_q95", "info", "og2_basic", None, "q75"),
    ("server_defaults_differ", "info", "og2_basic", None, "steps 4, 5 (default 25); cfg 3 (default 4); size 64x64, 96x64"),
    ("server_seed_default", "info", "og2_odd", None, "sample prompt 4: 99"),
    ("server_no_flag_parsing", "info", "og2_odd", None, "'--' flags in sample prompts 2, 4"),
    ("server_single_multiplier", "info", "og2_odd", None, "sample prompt 3: 0.5"),
    # FLUX.1
    ("flux_size_floored_to_16", "info", "flux_odd", None, "72x88 is not a multiple of 16"),
    ("flux_negative_unused", "warning", "flux_odd", None, "'blurry, noise' never reached the preview"),
    ("flux_guidance_embedding", "info", "flux_basic", None, "guidance 3.5, 4 went into the guidance embedding"),
    ("flux_true_cfg", "warning", "flux_basic", setting("model", "use_flux_cfg", True), "true CFG"),
    ("flux_attn_masking", "info", "flux_basic", flux_attn_masking, "T5 padding zeroed"),
    ("flux_quantized_lora_hooks", "warning", "flux_basic", setting("model", "quantize", True),
     "transformer quantised (qfloat8)"),
    ("server_lora_peft_bf16", "info", "flux_basic", None, "steps 2, 4, 6 would run as a bf16 PEFT adapter"),
    ("server_no_true_cfg", "info", "flux_basic", setting("model", "use_flux_cfg", True), "never does"),
    ("server_no_attn_masking", "info", "flux_basic", flux_attn_masking, "zeroed T5's padding"),
    ("server_no_quantization", "info", "flux_basic", setting("model", "quantize", True),
     "qfloat8-quantised transformer"),
    ("server_no_te_quantization", "info", "flux_basic", setting("model", "quantize_te", True),
     "quantised text encoder"),
    ("server_base_model", "info", "flux_basic", None, "serves black-forest-labs/FLUX.1-dev"),
]  # fmt: skip


def test_every_registered_rule_has_a_case_and_a_unique_code():
    codes = [r.code for r in RULES]
    assert len(codes) == len(set(codes))
    assert sorted(codes) == sorted(case[0] for case in CASES)
    for r in RULES:
        assert r.kind.explanation and r.kind.fix and r.scope in ("job", "preview")


@pytest.mark.parametrize("job", sorted(CLEAN_CODES))
def test_clean_oracle_folder_gets_only_the_expected_informational_rules(job):
    report = run_lint(JOBS / job)
    assert set(report.codes) == CLEAN_CODES[job]
    assert {f.cause.severity for f in report.findings} == {"info"}
    assert report.lora_checked_against == f"base model {base_for(JOBS / job)} (transformer config)"


@pytest.mark.parametrize(("code", "severity", "job", "inject", "text"), CASES, ids=[c[0] for c in CASES])
def test_rule_finds_its_injected_fault(tmp_path, code, severity, job, inject, text):
    job_dir = copy_job(tmp_path, job) if inject else JOBS / job
    if inject:
        assert code not in CLEAN_CODES[job]
        inject(job_dir)
    findings = [f for f in run_lint(job_dir).findings if f.cause.code == code]
    assert findings, f"{code} not found"
    assert any(text in f.cause.title for f in findings), [f.cause.title for f in findings]
    assert {f.cause.severity for f in findings} == {severity}


def test_findings_are_ordered_errors_first_and_preview_findings_list_their_previews(tmp_path):
    job_dir = copy_job(tmp_path, "og2_basic")
    (job_dir / "og2_basic_000000002.safetensors").unlink()
    edit_process(job_dir, lambda p: p["sample"].update(width=72))
    report = run_lint(job_dir)
    ranks = [("error", "warning", "info").index(f.cause.severity) for f in report.findings]
    assert ranks == sorted(ranks)
    deleted = next(f for f in report.findings if f.cause.code == "checkpoint_deleted")
    assert deleted.scope == "preview" and len(deleted.previews) == 3
    assert all("__000000002_" in p for p in deleted.previews)
    # width 72 adds size_not_multiple_of_16 and server_size_floor16, and no longer fits the 64 px previews
    assert report.codes[0] == "preview_size_mismatch"
    assert report.counts == {"info": len(CLEAN_CODES["og2_basic"]) + 2, "warning": 1, "error": 1}


def test_partial_key_rename_is_a_warning_that_names_the_modules(tmp_path):
    job_dir = copy_job(tmp_path, "og2_basic")
    rewrite_lora(job_dir, "og2_basic.safetensors", rename_layer_0_query)
    finding = next(f for f in run_lint(job_dir).findings if f.cause.code == "lora_keys_unmatched")
    assert finding.cause.severity == "warning"
    assert "1 unmatched modules: layers.0.attn.q_proj" in finding.cause.evidence["problem"]


def test_without_a_base_model_the_tiny_checkpoints_do_not_fit_the_real_architecture():
    report = lint(JOBS / "og2_odd")
    unmatched = [f for f in report.findings if f.cause.code == "lora_keys_unmatched"]
    assert len(unmatched) == 3 and all(f.cause.severity == "error" for f in unmatched)
    assert "shape mismatches" in unmatched[0].cause.evidence["problem"]
    assert report.lora_checked_against.startswith("the real OmniGen2 architecture")


def test_a_job_that_matches_the_server_defaults_gets_no_ir_rule_but_jpeg(tmp_path):
    job_dir = copy_job(tmp_path, "og2_basic")

    def server_like(process):
        process["sample"].update(width=1024, height=1024, sample_steps=25, guidance_scale=4, neg="blurry")
        process["sample"]["prompts"] = ["[trigger] a cat", "[trigger] a dog", "[trigger] a bird"]

    edit_process(job_dir, server_like)
    codes = {c for c in run_lint(job_dir).codes if c.startswith("server_")}
    assert codes == {"server_jpeg_q95"}


def test_item_causes_keeps_the_check_rules_and_their_order():
    basic = build_plan(JOBS / "og2_basic")
    for item in basic.items:
        assert [c.code for c in item_causes(basic, item)] == ([] if item.step == 0 else ["lora_saved_fp16"])
    odd = build_plan(JOBS / "og2_odd")
    first = next(i for i in odd.items if i.width == 72)
    (cause,) = item_causes(odd, first)
    assert cause.code == "size_not_multiple_of_16" and cause.evidence == {
        "requested": [72, 88],
        "generated": [64, 80],
    }
    assert cause.title == "72x88 is not a multiple of 16: the preview was generated at 64x80"


def test_lora_keys_cause_is_an_error_only_at_zero_layers():
    zero = lora_keys_cause("applies to 0 layers; 2 unmatched modules: a, b", "x.safetensors")
    assert (zero.code, zero.severity) == ("lora_keys_unmatched", "error")
    assert zero.title == "LoRA keys that match nothing in x.safetensors"
    assert zero.evidence == {
        "problem": "applies to 0 layers; 2 unmatched modules: a, b",
        "file": "x.safetensors",
    }
    partial = lora_keys_cause("1 unmatched modules: a", None)
    assert partial.severity == "warning" and partial.title.endswith("in the LoRA")


def run_parity(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "parity", *map(str, args)], capture_output=True, text=True, env=env
    )


def test_cli_lint_prints_findings_and_exits_0(tmp_path):
    job_dir = copy_job(tmp_path, "og2_basic")
    (job_dir / "og2_basic_000000002.safetensors").unlink()
    result = run_parity("lint", job_dir, "--base-model", TINY)
    assert result.returncode == 0, result.stderr
    assert "checkpoint_deleted" in result.stdout and "warning" in result.stdout
    assert "Raise save.max_step_saves_to_keep" in result.stdout
    assert "1 warning" in result.stdout


def test_cli_lint_json_and_bad_input(monkeypatch, capsys, tmp_path):
    def run(*args):
        monkeypatch.setattr(sys, "argv", ["parity", "lint", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out = capsys.readouterr()
        return exit_info.value.code, out.out, out.err

    code, out, _ = run(JOBS / "og2_odd", "--base-model", TINY, "--json")
    data = json.loads(out)
    assert code == 0 and {f["code"] for f in data["findings"]} == CLEAN_CODES["og2_odd"]
    serving = [r for r in RULES if r.kind.concerns("omnigen2")]  # og2_odd's family
    assert data["counts"]["info"] == len(data["findings"]) and data["rules_checked"] == len(serving) < len(RULES)
    code, out, err = run(tmp_path / "nope")
    assert code == 2 and "no such job folder" in err and out == ""
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(JOBS / "og2_odd", "--base-model", tmp_path / "nowhere")
    assert code == 3 and "base model not found" in err
