"""``--pipeline server`` for FLUX.1: ai-toolkit-inference's flux_dev rendering (parity/server.py), each departure
from ai-toolkit's preview path measured ALONE on the oracle (fixtures/oracle: flux_basic, flux_odd).

The settings the oracle jobs did not use (true CFG, attn_masking, quantisation) are measured on the same previews
with the job's config claiming them: the training-side render then has them, the server's does not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fixtures import ORACLE_DIR
from parity import catalogue
from parity.check import CheckOptions, run_check
from parity.jobfolder import read_job_folder
from parity.plan import build_plan
from parity.replay import Replayer, ReplayOptions
from parity.scores import Thresholds, compute_metrics
from parity.server import departure_causes, departures_for, server_request

TINY_FLUX = ORACLE_DIR / "tiny_flux"
NOISE = "torch2.13-avx2"  # the oracle's draw (tests/conftest.py holds the CPU to AVX2)
SHARED = ("server_no_flag_parsing", "server_seed_default", "server_single_multiplier", "server_no_te_quantization",
          "server_jpeg_q95")
FLUX_OWN = ("server_lora_peft_bf16", "server_no_true_cfg", "server_no_attn_masking", "server_no_quantization")
TRAINING_ONLY = {  # departure -> the job setting that makes it apply
    "server_no_true_cfg": "use_flux_cfg",
    "server_no_attn_masking": "attn_masking",
    "server_no_quantization": "quantize",
    "server_no_te_quantization": "quantize_te",
}


def job(name: str):
    plan = build_plan(ORACLE_DIR / "jobs" / name)
    return plan, read_job_folder(plan.job_dir)


def item_at(plan, step: int, prompt: int):
    return next(i for i in plan.items if (i.step, i.prompt_index) == (step, prompt))


def with_training_only_settings(plan):
    """The plan as if the job had trained with true CFG, attn_masking and a quantised transformer and T5."""
    flags = {**plan.model_flags, "use_flux_cfg": True, "attn_masking": True}
    return dataclasses.replace(plan, model_flags=flags, quantize=True, quantize_te=True)


# ---------------------------------------------------------------------------------------------------------
# the catalogue and its applicability tests (no torch)


def test_flux_catalogue_adds_its_own_and_leaves_omnigen2s_as_it_was():
    assert departures_for("omnigen2") == (
        "server_size_floor16", "server_empty_negative_once", "server_no_flag_parsing", "server_seed_default",
        "server_lora_fuse_fp16", "server_single_multiplier", "server_no_te_quantization", "server_jpeg_q95")
    assert set(departures_for("flux")) == set(SHARED + FLUX_OWN)
    assert all(catalogue.kind(code).families == ("flux",) for code in FLUX_OWN)


# (step, prompt) of flux_odd -> what the full server request departs by (beyond JPEG q95, always; and the
# bf16 PEFT adapter on every LoRA round). Prompt 2 carries --w/--h, prompt 4 --seed 99 --m 1.3 --cfg 2.5 --n;
# prompt 4's flags become text, so its seed falls back to 42 + 4 and its multiplier to the section's 1.0.
ODD_FULL_REQUEST = {
    0: set(),
    1: set(),  # its own seed (1234) goes into the request
    2: {"server_no_flag_parsing"},
    3: {"server_single_multiplier@lora"},  # 0.7 -> the request's 1.0
    4: {"server_no_flag_parsing", "server_seed_default"},
}


def test_full_server_request_of_each_flux_odd_preview():
    plan, folder = job("flux_odd")
    for item in plan.items:
        request = server_request(plan, folder, item)
        expected = {"server_jpeg_q95"} | {c.removesuffix("@lora") for c in ODD_FULL_REQUEST[item.prompt_index]
                                          if not c.endswith("@lora") or item.step > 0}
        if item.step > 0:
            expected.add("server_lora_peft_bf16")
        assert set(request.departures) == expected, (item.file, request.departures)
        if "server_no_flag_parsing" not in expected:  # FLUX.1's floor-16 is the training path's too
            assert (request.item.width // 16 * 16, request.item.height // 16 * 16) == (item.gen_width,
                                                                                      item.gen_height)
        if item.step > 0:
            assert request.knobs.merge_mode == "adapter"
    prompt4 = server_request(plan, folder, item_at(plan, 6, 4)).item
    assert prompt4.prompt.endswith("--seed 99 --m 1.3 --cfg 2.5 --n lowres")
    assert (prompt4.seed, prompt4.network_multiplier, prompt4.guidance_scale) == (46, 1.0, 4.0)


def test_training_only_settings_apply_only_when_the_job_had_them_and_each_turns_off_alone():
    plan, folder = job("flux_basic")
    item = item_at(plan, 2, 0)
    assert not set(TRAINING_ONLY) & set(server_request(plan, folder, item).departures)
    claimed = with_training_only_settings(plan)
    request = server_request(claimed, folder, item)
    assert set(TRAINING_ONLY) <= set(request.departures)
    assert dict(request.knobs.options) == {"true_cfg": False, "attn_masking": False, "transformer_quantized": False}
    assert request.knobs.te_quantized is False
    everything = frozenset(departures_for("flux"))
    for code in TRAINING_ONLY:
        alone = server_request(claimed, folder, item, disabled=everything - {code})
        assert len(alone.knobs.changed()) == 1, (code, alone.knobs)
        assert server_request(claimed, folder, item, disabled=everything).knobs.changed() == {}


# ---------------------------------------------------------------------------------------------------------
# measured on the oracle


def test_each_oracle_departure_alone_changes_flux_odds_picture():
    """flux_odd step 6, prompt 3 (multiplier 0.7, LoRA by hooks from a float32 checkpoint: replayed exactly)."""
    plan, folder = job("flux_odd")
    replayer = Replayer(plan, ReplayOptions(base_model=str(TINY_FLUX), noise_algorithm=NOISE))
    item = item_at(plan, 6, 3)
    ssim, causes = departure_causes(replayer, plan, folder, item, ORACLE_DIR / "jobs" / "flux_odd" / "samples" /
                                    item.file, Thresholds())
    by_code = {c.code: c.evidence for c in causes}
    assert set(by_code) == {"server_jpeg_q95", "server_single_multiplier", "server_lora_peft_bf16"}
    assert all(e["ssim_training"] == 1.0 for e in by_code.values())  # training behaviour: the preview itself
    assert 0.97 < by_code["server_lora_peft_bf16"]["ssim_with_departure"] < 0.999  # measured 0.9923
    assert 0.95 < by_code["server_single_multiplier"]["ssim_with_departure"] < 0.995  # 0.9794
    assert 0.85 < by_code["server_jpeg_q95"]["ssim_with_departure"] < 0.95  # 0.9051
    assert ssim < min(e["ssim_with_departure"] for e in by_code.values())  # together: 0.9029


def test_training_only_settings_each_change_the_picture_alone():
    """flux_basic step 0, prompt 0 with the config claiming true CFG, attn_masking and quantisation: the server
    turns each off; measured against the training-side render (SSIM 0.47 / 0.66 / 0.994 / 0.9995 here)."""
    pytest.importorskip("optimum.quanto")
    plan, folder = job("flux_basic")
    claimed = with_training_only_settings(plan)
    replayer = Replayer(claimed, ReplayOptions(base_model=str(TINY_FLUX), noise_algorithm=NOISE))
    item = item_at(claimed, 0, 0)
    everything = frozenset(departures_for("flux"))
    training = replayer.replay(server_request(claimed, folder, item, disabled=everything).item).pixels
    effect = {}
    for code in TRAINING_ONLY:
        request = server_request(claimed, folder, item, disabled=everything - {code})
        alone = replayer.replay(request.item, knobs=request.knobs).pixels
        effect[code] = compute_metrics(training, alone)[0].ssim
    assert effect["server_no_true_cfg"] < 0.7
    assert effect["server_no_attn_masking"] < 0.9
    assert 0.97 < effect["server_no_quantization"] < 0.9999
    assert 0.99 < effect["server_no_te_quantization"] < 1.0
    # the quantised transformer and T5 are back for the next training-side render
    assert np.array_equal(replayer.replay(item).pixels, training)


def test_parity_check_pipeline_server_names_the_flux_departures(tmp_path):
    options = CheckOptions(replay=ReplayOptions(base_model=str(TINY_FLUX), noise_algorithm=NOISE),
                           steps="2", out_dir=tmp_path, pipeline="server")
    report = run_check(ORACLE_DIR / "jobs" / "flux_basic", options)
    assert report.pipeline_profile == "ai-toolkit-inference-flux_dev"
    flagged = {r.prompt_index: {c.code for c in r.causes if c.code.startswith("server_")} for r in report.items}
    assert flagged == {0: {"server_jpeg_q95", "server_lora_peft_bf16"},
                       1: {"server_jpeg_q95", "server_lora_peft_bf16", "server_no_flag_parsing"},
                       2: {"server_jpeg_q95", "server_lora_peft_bf16"}}
    flagged_item = next(r for r in report.items if r.prompt_index == 1)
    flags = next(c for c in flagged_item.causes if c.code == "server_no_flag_parsing")
    assert flags.severity == "error" and flags.evidence["ssim_with_departure"] < 0.2  # measured 0.088
    # FLUX.1's server returns the preview's own (floor-16) size: no resize before scoring
    assert all(r.score.metrics.ssim > 0.85 for r in report.items if r.prompt_index != 1)


@pytest.mark.parametrize(("name", "step", "prompt"), [("flux_odd", 6, 4), ("flux_basic", 2, 1)])
def test_the_profile_renders_what_diffusers_fluxpipeline_with_peft_renders(name, step, prompt):
    """Cross-check (skipped without ``peft``): flux_dev.py's call on diffusers' FluxPipeline, the LoRA loaded by
    ``load_lora_weights`` (base.py ``_load_lora``) and its scale set as ``set_lora_scale`` does, against the
    profile's full server request (flags as text, seed 42 + i, request multiplier, bf16 adapter). The pipeline's
    models are this folder's, loaded as ``from_pretrained`` gives them under the server's transformers (5.5.3: T5
    eager, every weight bf16); the scheduler is the folder's own."""
    pytest.importorskip("peft")
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    from parity.server import server_pixels
    from pipelines.flux.loading import load_components

    plan, folder = job(name)
    replayer = Replayer(plan, ReplayOptions(base_model=str(TINY_FLUX), noise_algorithm=NOISE))
    request = server_request(plan, folder, item_at(plan, step, prompt))
    ours = server_pixels(replayer, request, jpeg=False)

    c = load_components(TINY_FLUX, dtype=torch.bfloat16, device="cpu")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(TINY_FLUX / "scheduler"),
                        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                        tokenizer_2=c.tokenizer_2, transformer=c.transformer)
    pipe.set_progress_bar_config(disable=True)
    lora = replayer.lora_path(request.item.step, request.item.checkpoint)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora", local_files_only=True)
    if request.item.network_multiplier != 1.0:
        set_weights_and_activate_adapters(pipe.transformer, ["lora"], [request.item.network_multiplier])
    r = request.item
    with torch.inference_mode():
        image = pipe(prompt=r.prompt, height=r.height // 16 * 16, width=r.width // 16 * 16,
                     num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
                     generator=torch.Generator(device="cpu").manual_seed(r.seed),
                     negative_prompt=r.negative_prompt or "").images[0]
    assert np.array_equal(ours, np.array(image.convert("RGB")))
