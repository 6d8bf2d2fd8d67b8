"""Kernel profiles (issue 3): the ``triton`` profile that reproduces ai-toolkit's default GPU path, its settings,
the automatic choice from step-0 previews and what the report says about it.

The Triton kernel itself needs CUDA (``gpu`` tests). Against ai-toolkit's own Triton RMSNorm the check needs
``AI_TOOLKIT_PATH`` too (an ai-toolkit checkout, never committed here): its kernel file is loaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixtures import ORACLE_DIR
from parity.check import CheckOptions, run_check
from parity.replay import ReplayOptions
from pipelines.omnigen2 import kernels, triton_norm

JOBS = ORACLE_DIR / "jobs"
TINY = ORACLE_DIR / "tiny_omnigen2"
AITK_PATH = os.environ.get("AI_TOOLKIT_PATH")
AITK_NORM = Path(AITK_PATH or ".") / "extensions_built_in/diffusion_models/omnigen2/src/ops/triton/layer_norm.py"


# ------------------------------------------------------------------------------------------- settings (CPU)


@pytest.mark.parametrize(
    "spec, parsed, canonical",
    [
        ("torch", ("torch", {}, 16), "torch"),
        ("triton", ("triton", {}, 16), "triton:16"),
        ("triton:8", ("triton", {}, 8), "triton:8"),
        ("triton:2520=16,2048=4", ("triton", {2520: 16, 2048: 4}, 16), "triton:2048=4"),
        ("triton:2,64=32", ("triton", {64: 32}, 2), "triton:2,64=32"),
    ],
)
def test_profile_specs_round_trip(spec, parsed, canonical):
    assert kernels.parse_profile(spec) == parsed
    assert kernels.format_profile(*kernels.parse_profile(spec)) == canonical
    assert kernels.parse_profile(canonical) == kernels.parse_profile(spec) or parsed[1].get(2520) == 16

    def value(text):  # KernelSet.parse without its can-it-run-here checks
        name, warps, default = kernels.parse_profile(text)
        return kernels.KernelSet(name, tuple(warps.items()), default)

    assert value(spec) == value(canonical) and value(spec).spec == canonical


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("tritn", "unknown kernel profile 'tritn'"),
        ("triton:3", "1, 2, 4, 8, 16 or 32, got 3"),
        ("triton:64=x", "must be N or WIDTH=N"),
        ("torch:4", "takes no settings"),
    ],
)
def test_bad_profile_specs_say_why(spec, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        kernels.parse_profile(spec)


def test_candidates_start_with_aitoolkits_usual_gpu_path_then_pytorch():
    got = kernels.kernel_candidates([2520, 2048], 40)
    assert got[:2] == ["triton:16", "torch"]
    assert len(got) == len(set(got)) == 37  # every warp pair once, plus torch
    # one width off the usual count comes before both off
    assert got.index("triton:2048=4") < got.index("triton:4")
    assert kernels.kernel_candidates([2520, 2048], 5) == got[:5]
    # narrow rows: counts beyond a row's 32-element slices add copies, not another sum order
    assert kernels.kernel_candidates([64], 8) == ["triton:16", "torch", "triton:1"]
    assert kernels.kernel_candidates([64, 72], 9) == [
        "triton:16", "torch", "triton:72=1", "triton:72=2", "triton:64=1", "triton:1", "triton:64=1,72=2"]


@pytest.mark.parametrize("width, distinct", [(64, [1, 2]), (72, [1, 2, 4]), (2048, [1, 2, 4, 8, 16, 32]),
                                             (2520, [1, 2, 4, 8, 16, 32])])
def test_effective_warps_match_the_measured_distinct_results(width, distinct):
    assert sorted({kernels.effective_warps(width, w) for w in kernels.TRITON_WARPS}) == distinct


def test_triton_profile_needs_cuda_and_says_so():
    if triton_norm.available() is None:
        pytest.skip("triton and CUDA are here")
    with pytest.raises(RuntimeError, match="kernel profile 'triton': "):
        kernels.KernelSet.parse("triton:16")
    assert kernels.KernelSet.parse("torch") == kernels.KernelSet()


def test_kernel_sets_are_values_equal_when_their_choices_are():
    """Warps equal to the default are dropped and the rest sorted: one value per choice, usable as a key."""
    a = kernels.KernelSet("triton", ((2520, 16), (2048, 4)), 16)
    b = kernels.KernelSet("triton", {2048: 4})
    assert a == b and hash(a) == hash(b) and a.warps == ((2048, 4),)
    assert a.spec == "triton:2048=4" and (a.warps_for(2048), a.warps_for(2520)) == (4, 16)
    assert a.describe() == "Triton RMSNorm for the block norms (16 warps; width 2048: 4), SDPA attention"
    assert kernels.KernelSet("torch", ((64, 4),), 8) == kernels.KernelSet()
    assert kernels.KernelSet().describe() == kernels.KERNEL_PROFILES["torch"]
    with pytest.raises(ValueError, match="unknown kernel profile 'tritn'"):
        kernels.KernelSet("tritn")


def test_fast_attention_is_part_of_the_value_but_not_of_the_spec():
    default = kernels.KernelSet()
    pinned = default.with_fast_attention("math", gqa=True)
    assert pinned.fast_attention == kernels.FastAttention("math", True, fallback=False)
    assert pinned != default and pinned.spec == default.spec == "torch"
    assert default.fast_attention == kernels.FastAttention("cudnn", True, True)
    assert kernels.KernelSet.parse("torch", pinned.fast_attention) == pinned
    with pytest.raises(ValueError, match="unknown SDPA backend 'cudnn2'"):
        default.with_fast_attention("cudnn2")


def tiny_transformer():
    from pipelines.omnigen2.transformer import OmniGen2Config, OmniGen2Transformer

    return OmniGen2Transformer(OmniGen2Config.from_file(TINY / "transformer" / "config.json"))


def test_each_transformer_runs_the_kernel_set_it_was_given():
    """The set is the transformer's: its norms, attention and feed-forwards get it; another transformer keeps its own.
    A new --fast attention setting starts with no failed backend."""
    from pipelines.omnigen2.transformer import Attention, FeedForward, RMSNorm

    a, b = tiny_transformer(), tiny_transformer()
    holders = [m for m in a.modules() if isinstance(m, (RMSNorm, Attention, FeedForward))]
    assert len(holders) == 5 * 6 + 1 and all(m.kernels is a.kernels for m in holders)  # 5 blocks, caption norm
    triton = kernels.KernelSet("triton", ((72, 2),))
    a.attention_fallback.failed = True
    a.use_kernels(triton)
    assert a.kernels is triton and all(m.kernels is triton for m in holders)
    assert a.attention_fallback.failed  # same --fast attention: what failed here still fails
    assert b.kernels == kernels.KernelSet() and not b.attention_fallback.failed
    assert all(m.kernels == kernels.KernelSet() for m in b.modules() if isinstance(m, RMSNorm))
    a.use_kernels(triton.with_fast_attention("math"))
    assert not a.attention_fallback.failed


def test_two_sessions_keep_their_own_kernels():
    """A session's kernels are its transformer's: setting them in one leaves another as it was; a set that cannot run
    here is refused and changes nothing."""
    from pipelines.family import LoadSpec
    from pipelines.omnigen2.session import load_session

    first, second = (load_session(LoadSpec(root=TINY, dtype="bfloat16", device="cpu")) for _ in range(2))
    pinned = kernels.KernelSet().with_fast_attention("math")
    first.pipeline.c.transformer.use_kernels(pinned)
    first.set_kernels("torch")  # the profile again: --fast attention's setting stays
    assert first.pipeline.c.transformer.kernels == pinned and first.kernels == "torch"
    assert second.pipeline.c.transformer.kernels == kernels.KernelSet()
    if triton_norm.available() is not None:
        with pytest.raises(RuntimeError, match="kernel profile 'triton': "):
            second.set_kernels("triton:8")
        assert second.kernels == "torch"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True)


def test_cli_rejects_bad_kernel_settings_in_one_line(tmp_path):
    job, out = str(JOBS / "og2_basic"), str(tmp_path / "r")
    bad = run_cli("check", job, "--base-model", str(TINY), "--kernels", "triton:3", "--out", out)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --kernels: triton warp counts are 1, 2, 4, 8, 16 or 32, "
                                               "got 3 in 'triton:3'"]
    search = run_cli("check", job, "--kernel-search", "0", "--out", out)
    assert search.returncode == 2 and search.stderr.strip() == "error: --kernel-search must be at least 1, got 0"
    if triton_norm.available():
        missing = run_cli("check", job, "--base-model", str(TINY), "--kernels", "triton", "--out", out)
        assert missing.returncode == 3
        assert missing.stderr.strip().splitlines() == [f"error: --kernels triton: {triton_norm.available()}"]
    assert not (tmp_path / "r").exists()


def test_cpu_check_reports_kernels_and_step0_drift(tmp_path):
    """--kernels auto on a CPU: PyTorch's kernels, said why; the header shows the measured step-0 drift."""
    report = run_check(JOBS / "og2_basic", CheckOptions(
        replay=ReplayOptions(base_model=str(TINY)), steps="0", out_dir=tmp_path, diagnose=False))
    assert report.kernels == "torch"
    assert report.kernels_reason.startswith("CPU replay: PyTorch's kernels")
    assert report.kernel_trials == []
    assert report.base_drift == {"previews": 3, "identical": 3, "max_abs_diff": 0, "ssim_min": 1.0, "proven_wrong": 0}
    data = report.to_dict()
    assert data["kernels"]["profile"] == "torch" and data["measured_drift"]["fast"] is None
    from reports import write_reports

    write_reports(report, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "step-0 previews (base model: only kernels and noise set them): 3/3 identical" in html
    assert "CPU replay: PyTorch&#39;s kernels" in html or "CPU replay: PyTorch's kernels" in html


def test_fast_check_measures_its_drift_from_exact(tmp_path):
    report = run_check(JOBS / "og2_basic", CheckOptions(
        replay=ReplayOptions(base_model=str(TINY), fast=True), steps="0", out_dir=tmp_path, diagnose=False))
    drift = report.fast_drift
    assert drift["what"] == "--fast vs exact mode" and len(drift["previews"]) == 1
    assert 0.99 <= drift["ssim_min"] < 1.0 or drift["max_abs_diff"] == 0
    assert drift["previews"][0]["preview"].endswith((".jpg", ".png", ".webp"))
    from reports import write_reports

    write_reports(report, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "--fast vs exact mode on 1 preview(s): SSIM ≥" in html
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["measured_drift"]["fast"] == drift


# ------------------------------------------------------------------------------------------------ CUDA


def random_rows(n: int, rows: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 3).to("cuda", torch.bfloat16)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to("cuda", torch.bfloat16)
    return x, w


@pytest.mark.gpu
@pytest.mark.parametrize("width", [64, 72, 2048, 2520])
def test_triton_norm_is_an_rms_norm_rounded_once(width):
    """Every warp count: the float32 result rounded once, so at most one bf16 step from torch.rms_norm."""
    x, w = random_rows(width)
    exact = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w.float())
    for warps in kernels.TRITON_WARPS:
        y = triton_norm.rms_norm(x, w, 1e-5, warps)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape
        step = exact.abs().clamp_min(1e-30) * 2.0**-7  # one bf16 ulp or less
        assert bool(((y.float() - exact).abs() <= step).all()), warps
    # a 3-d input with a strided view goes through unchanged in meaning
    y3 = triton_norm.rms_norm(x.view(8, -1, width)[:, ::2], w, 1e-5, 4)
    assert torch.equal(y3, triton_norm.rms_norm(x.view(8, -1, width)[:, ::2].contiguous(), w, 1e-5, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not AITK_NORM.is_file(), reason="set AI_TOOLKIT_PATH to an ai-toolkit checkout")
@pytest.mark.parametrize("width", [64, 72, 2048, 2520])
def test_triton_norm_equals_aitoolkits_kernel_at_every_warp_count(width):
    """ai-toolkit's autotuned Triton RMSNorm pinned to one warp count at a time vs ours: bit for bit."""
    import triton

    spec = importlib.util.spec_from_file_location("aitk_triton_layer_norm", AITK_NORM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tuner = module._layer_norm_fwd_1pass_kernel
    x, w = random_rows(width, seed=width)
    for warps in kernels.TRITON_WARPS:
        tuner.configs = [triton.Config({}, num_warps=warps)]
        tuner.cache.clear()
        theirs = module.rms_norm_fn(x, w, None, eps=1e-5)
        assert torch.equal(triton_norm.rms_norm(x, w, 1e-5, warps), theirs), (width, warps)


def gpu_previews(tmp_path, made_with: str) -> Path:
    """A copy of og2_basic whose step-0 previews are replays made on this GPU with ``made_with`` (PNG)."""
    from parity.plan import build_plan
    from parity.replay import Replayer

    job = tmp_path / "job"
    shutil.copytree(JOBS / "og2_basic", job)
    replayer = Replayer(build_plan(job), ReplayOptions(base_model=str(TINY), device="cuda",
                                                       kernel_profile=made_with, noise_algorithm="torch2.13-avx2"))
    for item in replayer.step0_probes():
        pixels = replayer.replay(item).pixels
        target = job / "samples" / item.file
        Image.fromarray(pixels).save(target.with_suffix(".png"))
        if target.suffix != ".png":
            target.unlink()
    return job


@pytest.mark.gpu
def test_auto_choice_finds_the_warps_that_made_a_gpu_preview(tmp_path):
    """Previews made by the Triton path at 2 warps: --kernels auto replays candidates until one is identical."""
    job = gpu_previews(tmp_path, "triton:2")
    report = run_check(job, CheckOptions(
        replay=ReplayOptions(base_model=str(TINY), device="cuda", noise_algorithm="torch2.13-avx2",
                             kernel_search=8),
        steps="0", out_dir=tmp_path / "r", diagnose=False))
    trials = report.kernel_trials
    assert trials[-1]["identical"] and report.kernels == trials[-1]["kernels"]
    assert all(not t["identical"] for t in trials[:-1])
    assert report.kernels_reason.startswith("reproduces all 3 step-0 preview(s) bit for bit")
    assert report.base_drift == {"previews": 3, "identical": 3, "max_abs_diff": 0, "ssim_min": 1.0, "proven_wrong": 0}
    assert [t["kernels"] for t in trials][:2] == ["triton:16", "torch"][: len(trials)]
    for t in trials[:-1]:  # a wrong set stops at its first differing preview
        assert t["probes_identical"] + 1 == t["probes_tried"] and t["max_abs_diff"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("made_with", ["triton:16", "triton:72=2"])
def test_torchrun_chooses_the_kernels_one_process_chooses(tmp_path, made_with):
    """Two ranks (on however many GPUs there are) choose the same kernels as one process and replay EXACT."""
    job = gpu_previews(tmp_path, made_with)
    common = ["-m", "parity", "check", str(job), "--base-model", str(TINY), "--device", "cuda", "--steps", "0",
              "--no-diagnose"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    first, second = (json.loads((tmp_path / name / "parity.json").read_text()) for name in ("one", "two"))
    assert first["kernels"]["profile"] == second["kernels"]["profile"]
    assert [p["outcome"] for p in first["previews"]] == [p["outcome"] for p in second["previews"]] == ["EXACT"] * 3
