"""parity lora: every oracle checkpoint applies in full; renamed keys fail with their names; other formats are
recognised; a bad file is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fixtures import ORACLE_DIR
from parity.cli import main
from parity.errors import EnvironmentProblem, InputError
from parity.lora_report import inspect_lora

TINY = ORACLE_DIR / "tiny_omnigen2"
CHECKPOINTS = sorted((ORACLE_DIR / "jobs").glob("og2_*/*.safetensors"))  # the FLUX.1 ones: test_flux_family.py
ORIGINAL = ORACLE_DIR / "jobs" / "og2_odd" / "og2_odd_000000002.safetensors"


def step_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1]) if path.stem[-9:].isdigit() else 6  # the final file is step 6


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def rewrite(tmp_path: Path, name: str, rename, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of an oracle checkpoint with every key passed through ``rename`` (None drops the key)."""
    tensors, metadata = load(ORIGINAL)
    renamed = {rename(k): v for k, v in tensors.items() if rename(k) is not None}
    path = tmp_path / name
    save_file(renamed | (extra or {}), str(path), metadata=metadata)
    return path


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The console entry point in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["parity", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_oracle_has_six_checkpoints():
    assert len(CHECKPOINTS) == 6


@pytest.mark.parametrize("path", CHECKPOINTS, ids=[p.name for p in CHECKPOINTS])
def test_every_oracle_checkpoint_applies_in_full(path):
    report = inspect_lora(path, TINY)
    assert report.applies and report.problem is None
    assert (report.tensor_count, report.module_count, len(report.matched)) == (62, 31, 31)
    assert report.unmatched == report.shape_mismatches == report.unparsed_keys == report.unpaired_keys == []
    assert report.format == "ai-toolkit" and report.ranks == {4: 31}
    assert report.dtypes == (["float16"] if "basic" in path.name else ["float32"])
    assert report.alpha_keys == 0 and report.scale_convention.startswith("1 (no .alpha keys")
    meta = report.metadata
    assert meta.training_step == step_of(path) and meta.epoch is not None
    assert (meta.base_model_version, meta.software, meta.software_version) == (
        "omnigen2",
        "ai-toolkit",
        "0.12.26",
    )
    assert (meta.name, meta.version, meta.output_name) == (path.parent.name, "1.0", path.parent.name)
    assert report.layer_count == 46 and report.default_target_count == 31
    assert not report.untrained and report.notes == []
    norms = [n.delta_norm for n in report.norms]
    assert len(norms) == 31 and norms == sorted(norms, reverse=True) and norms[0] > 0


def test_module_norms_equal_the_full_product():
    report = inspect_lora(ORIGINAL, TINY)
    tensors, _ = load(ORIGINAL)
    top = report.norms[0]
    down = tensors[f"diffusion_model.{top.module}.lora_A.weight"].double()
    up = tensors[f"diffusion_model.{top.module}.lora_B.weight"].double()
    assert top.delta_norm == pytest.approx(torch.linalg.norm(up @ down).item(), rel=1e-9)
    assert (top.down_norm, top.up_norm) == pytest.approx((down.norm().item(), up.norm().item()))


@pytest.mark.parametrize(
    ("name", "args", "dtype", "step"),
    [
        ("og2_basic_000000002.safetensors", (), "float16", 2),
        ("og2_odd.safetensors", ("--top", "0"), "float32", 6),
    ],
)
def test_cli_reports_dtype_step_and_all_keys_matched(monkeypatch, capsys, name, args, dtype, step):
    path = next(p for p in CHECKPOINTS if p.name == name)
    code, out, err = run_cli(monkeypatch, capsys, "lora", path, "--base-model", TINY, *args)
    assert code == 0, err
    assert f"dtype       {dtype}" in out and f"step        {step} (epoch " in out
    assert "all 31 modules matched (62 tensors)" in out
    assert "ai-toolkit 0.12.26" in out and "omnigen2" in out
    assert "per-module norms" in out and "layers.1.feed_forward.linear_3" in out


def test_cli_json(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "lora", ORIGINAL, "--base-model", TINY, "--json")
    data = json.loads(out)
    assert code == 0 and data["applies"] is True and data["problem"] is None
    assert data["metadata"]["training_step"] == 2 and data["dtypes"] == ["float32"]
    assert len(data["matched"]) == 31 and data["ranks"] == {"4": 31} and len(data["norms"]) == 31


def test_renamed_prefix_applies_to_0_layers_and_lists_every_name(monkeypatch, capsys, tmp_path):
    path = rewrite(tmp_path, "renamed.safetensors", lambda k: k.replace("diffusion_model.", "unet.blocks."))
    report = inspect_lora(path, TINY)
    assert not report.applies and report.problem == "applies to 0 layers; 31 unmatched modules"
    assert "blocks.layers.0.attn.to_q" in report.unmatched and len(report.unmatched) == 31
    code, out, _ = run_cli(monkeypatch, capsys, "lora", path, "--base-model", TINY)
    assert code == 1
    assert "applies to 0 layers" in out
    assert sum(line.strip().startswith("unmatched: blocks.") for line in out.splitlines()) == 31


def test_renamed_modules_are_a_partial_match_that_fails(monkeypatch, capsys, tmp_path):
    path = rewrite(tmp_path, "partial.safetensors", lambda k: k.replace("attn.to_q", "attn.q_proj"))
    report = inspect_lora(path, TINY)
    assert report.problem == "applies to 27 of 31 modules; 4 unmatched modules"
    assert report.unmatched == [
        "context_refiner.0.attn.q_proj", "layers.0.attn.q_proj", "layers.1.attn.q_proj", "noise_refiner.0.attn.q_proj",
    ]  # fmt: skip
    code, out, _ = run_cli(monkeypatch, capsys, "lora", path, "--base-model", TINY)
    assert code == 1 and "unmatched: layers.1.attn.q_proj" in out


def test_unpaired_and_unrecognised_keys_fail(tmp_path):
    path = rewrite(
        tmp_path,
        "odd_keys.safetensors",
        lambda k: None if k == "diffusion_model.layers.0.attn.to_q.lora_B.weight" else k,
        {"some.other.tensor": torch.zeros(2)},
    )
    report = inspect_lora(path, TINY)
    assert not report.applies
    assert report.unpaired_keys == ["layers.0.attn.to_q (no up/B)"] and report.unparsed_keys == [
        "some.other.tensor"
    ]


def test_kohya_names_with_alpha_are_recognised_and_scaled(tmp_path):
    def kohya(key: str) -> str:
        module = key.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0]
        kind = "lora_down" if ".lora_A." in key else "lora_up"
        return f"lora_unet_{module.replace('.', '_')}.{kind}.weight"

    tensors, _ = load(ORIGINAL)
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in tensors}
    alphas = {f"lora_unet_{m.replace('.', '_')}.alpha": torch.tensor(2.0) for m in modules}
    report = inspect_lora(rewrite(tmp_path, "kohya.safetensors", kohya, alphas), TINY)
    assert report.applies and report.format == "kohya" and len(report.matched) == 31
    assert (
        report.alpha_keys == 31 and report.scales == [0.5] and report.scale_convention == "alpha/rank = 0.5"
    )
    assert any("ignores alpha" in note for note in report.notes)
    assert all(n.scale == 0.5 for n in report.norms)


@pytest.mark.parametrize(
    ("rename", "fmt"),
    [
        (lambda k: k.replace("diffusion_model.", "base_model.model."), "diffusers/peft"),
        (lambda k: k.replace("diffusion_model.", "transformer."), "diffusers/peft"),
        (
            lambda k: (
                k.replace("diffusion_model.", "transformer.")
                .replace("lora_A", "lora_down")
                .replace("lora_B", "lora_up")
            ),
            "lora_down/lora_up",
        ),
    ],
    ids=["peft", "diffusers", "lora_down_up"],
)
def test_other_formats_are_recognised(tmp_path, rename, fmt):
    report = inspect_lora(rewrite(tmp_path, "other.safetensors", rename), TINY)
    assert report.applies and report.format == fmt and len(report.matched) == 31


def test_untrained_lora_applies_but_says_so(tmp_path):
    tensors, metadata = load(ORIGINAL)
    path = tmp_path / "zero.safetensors"
    save_file(
        {k: v.zero_() if ".lora_B." in k else v for k, v in tensors.items()}, str(path), metadata=metadata
    )
    report = inspect_lora(path, TINY)
    assert report.applies and report.untrained
    assert report.notes == ["every B (up) matrix is zero: the LoRA is untrained and changes nothing"]
    assert all(n.delta_norm == 0 for n in report.norms)


def test_without_a_base_model_the_real_architecture_is_used():
    report = inspect_lora(ORIGINAL)
    assert report.checked_against == "the real OmniGen2 architecture (OmniGen2/OmniGen2 transformer config)"
    assert report.layer_count == 309 and report.default_target_count == 286  # FACTS §4: 286 A/B pairs
    assert not report.applies and report.matched == [] and len(report.shape_mismatches) == 31


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def one_dimensional(folder: Path) -> Path:
    path = folder / "flat.safetensors"
    module = "diffusion_model.layers.0.attn.to_q"
    save_file({f"{module}.lora_A.weight": torch.ones(4), f"{module}.lora_B.weight": torch.ones(4)}, str(path))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.safetensors", "LoRA file not found"),
        (lambda d: d, "is a folder"),
        (lambda d: ORACLE_DIR / "jobs" / "og2_basic" / "optimizer.pt", "pickle file"),
        (lambda d: write_bytes(d / "lora.txt", b"hello"), "not a .safetensors file"),
        (lambda d: write_bytes(d / "garbage.safetensors", os.urandom(64)), "not a safetensors file"),
        (
            lambda d: write_bytes(d / "cut.safetensors", ORIGINAL.read_bytes()[:-1000]),
            "unreadable safetensors",
        ),
        (one_dimensional, "not a low-rank pair"),
    ],
    ids=["missing", "folder", "pickle", "suffix", "garbage", "truncated", "not_2d"],
)
def test_bad_files_are_one_line_and_exit_2(monkeypatch, capsys, tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message):
        inspect_lora(path, TINY)
    code, out, err = run_cli(monkeypatch, capsys, "lora", path, "--base-model", TINY)
    assert code == 2 and message in err and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_base_model_errors(monkeypatch, capsys, tmp_path):
    with pytest.raises(EnvironmentProblem, match="base model not found"):
        inspect_lora(ORIGINAL, tmp_path / "nowhere")
    code, _, err = run_cli(monkeypatch, capsys, "lora", ORIGINAL, "--base-model", tmp_path / "nowhere")
    assert code == 3 and "base model not found" in err
    (tmp_path / "not_omnigen2" / "transformer").mkdir(parents=True)
    (tmp_path / "not_omnigen2" / "transformer" / "config.json").write_text(
        '{"_class_name": "SD3Transformer2DModel"}'
    )
    code, _, err = run_cli(monkeypatch, capsys, "lora", ORIGINAL, "--base-model", tmp_path / "not_omnigen2")
    assert code == 2 and "SD3Transformer2DModel" in err and "no model family reads this folder" in err


def test_console_entry_point_lists_unmatched_names_and_exits_1(tmp_path):
    renamed = rewrite(
        tmp_path, "renamed.safetensors", lambda k: k.replace("diffusion_model.", "unet.blocks.")
    )
    failed = subprocess.run(
        [sys.executable, "-m", "parity", "lora", str(renamed), "--base-model", str(TINY)],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "unmatched: blocks.noise_refiner.0.attn.to_q" in failed.stdout
