"""FLUX.1 replays against ai-toolkit's own previews (fixtures/oracle: flux_basic, flux_odd): pixels, not "an image
came out", plus the intermediates ai-toolkit recorded, the schedule, the LoRA key formats and the family seam.

The CPU profile 'avx2' (tests/conftest.py) makes this machine compute like the AVX2 CPU the oracle ran on.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fixtures import ORACLE_DIR
from pipelines.common.files import model_fingerprint
from pipelines.family import LoadSpec, ModelDirError, RenderRequest, WeightState
from pipelines.flux import lora_keys, quirks, rules
from pipelines.flux.family import FAMILY, check_model_dir, knob_flips, lora_targets
from pipelines.flux.scheduler import calculate_shift, flux_schedule, requested_sigmas
from pipelines.flux.session import load_session

TINY = ORACLE_DIR / "tiny_flux"
JOBS = ("flux_basic", "flux_odd")
NOISE = "torch2.13-avx2"  # the oracle's torch 2.13 drew its bf16 noise with the AVX2 kernel


def rows(job: str) -> list[dict]:
    return [json.loads(line) for line in (ORACLE_DIR / "ground_truth" / job / "samples.jsonl").open()]


def truth_pixels(job: str, row: dict) -> np.ndarray:
    return np.array(Image.open(ORACLE_DIR / "ground_truth" / job / row["png"]).convert("RGB"))


def truth_tensors(job: str, row: dict) -> dict[str, torch.Tensor]:
    return load_file(ORACLE_DIR / "ground_truth" / job / row["tensors"])


def request_for(row: dict, **changes) -> RenderRequest:
    """The preview's settings exactly as samples.jsonl records what ai-toolkit passed to its pipeline."""
    fields = dict(
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        seed=row["seed"],
        width=row["width"],
        height=row["height"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=float(row["guidance_scale"]),
        noise_algorithm=NOISE,
    )
    return RenderRequest(**{**fields, **changes})


def lora_file(job: str, step: int, source: str) -> Path:
    """A round's LoRA: the checkpoint ai-toolkit saved for it, or the fp32 LoRA it held in memory."""
    if source == "in_memory":
        return ORACLE_DIR / "ground_truth" / job / "lora_in_memory" / f"step_{step:09d}.safetensors"
    row = next(r for r in rows(job) if r["step"] == step)
    (name,) = row["lora"]["checkpoints_equal_to_in_memory_weights"]
    return ORACLE_DIR / "jobs" / job / name


def weights_for(job: str, row: dict, source: str, drift: bool = True) -> WeightState:
    """The transformer state of ``row``'s preview: merged rounds carry every earlier merged round (its merge and
    merge-out drifted the base); the step-0 round is the base (its zero LoRA merges to nothing)."""
    step = row["step"]
    if step == 0:
        return WeightState()
    mode = "merged" if row["lora_merged"] else "hooks"
    history = ()
    if mode == "merged" and drift:
        earlier = sorted({r["step"] for r in rows(job) if 0 < r["step"] < step and r["lora_merged"]})
        history = tuple((lora_file(job, s, source), 1.0) for s in earlier)
    return WeightState(lora_file(job, step, source), float(row["network_multiplier"]), mode, history)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a.cpu()), bits(b))


@pytest.fixture(scope="module")
def session():
    # One thread: on this shared 2-core machine oneDNN's AVX2 bf16 GEMM spins with two (~12 ms a tiny matmul
    # against ~1.7 ms); measured: every replay here is pixel-identical with one thread and with two (the oracle's).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_session(LoadSpec(root=TINY, dtype="bfloat16", device="cpu"))
    torch.set_num_threads(threads)


def replay(session, job: str, source: str, drift: bool = True, intermediates: bool = False) -> dict[tuple, tuple]:
    """(step, prompt_index) -> (max, mean) abs pixel difference to the preview, for every preview of ``job``;
    with ``intermediates`` every recorded tensor of the preview is checked bit for bit too."""
    out = {}
    for row in rows(job):
        session.set_weights(weights_for(job, row, source, drift))
        output = session.pipeline(request_for(row))
        diff = np.abs(output.pixels.astype(int) - truth_pixels(job, row))
        out[row["step"], row["prompt_index"]] = (int(diff.max()), float(diff.mean()))
        if intermediates:
            recorded = truth_tensors(job, row)
            mine = {
                "noise": output.noise,
                "packed_initial_latents": output.packed_latents,
                "cond_prompt_embeds": output.cond.embeds,
                "cond_pooled_prompt_embeds": output.cond.pooled,
                "vae_input_latents": output.vae_input,
                "vae_output_image": output.vae_output,
            }
            for name, tensor in mine.items():
                assert bit_equal(tensor, recorded[name]), (job, row["file"], name)
    return out


# ------------------------------------------------------------------------------------------- fidelity


def test_flux_odd_hooks_from_float32_checkpoints_all_identical(session):
    """Unmerged LoRA (multipliers 0.7, 1, 1.3 in one round), float32 checkpoints, the final round from
    flux_odd.safetensors: every preview and every recorded intermediate identical."""
    results = replay(session, "flux_odd", "checkpoint", intermediates=True)
    assert len(results) == 20
    assert {key: r[0] for key, r in results.items()} == dict.fromkeys(results, 0)


def test_flux_basic_in_memory_loras_with_drift_history_all_identical(session):
    """Merged rounds from the fp32 LoRAs ai-toolkit held, each on the base drifted by the earlier rounds' merge
    and merge-out: all 12 identical, intermediates included (ai-toolkit's own self-replay, without the drift,
    misses steps 4 and 6)."""
    results = replay(session, "flux_basic", "in_memory", intermediates=True)
    assert len(results) == 12
    assert {key: r[0] for key, r in results.items()} == dict.fromkeys(results, 0)


def test_flux_basic_without_drift_history_misses_the_later_rounds(session):
    """The drift matters: the same fp32 LoRAs merged on the pristine base reproduce the step-2 round only."""
    results = replay(session, "flux_basic", "in_memory", drift=False)
    assert {key for key, r in results.items() if r[0]} == {(s, i) for s in (4, 6) for i in range(3)}


def test_flux_basic_from_float16_checkpoints_leaves_a_rounding_residual(session):
    """The checkpoints are the fp32 LoRA rounded to float16, so the merged weights differ by a bf16 step here
    and there: step 0 identical, every later preview off by max 5-7 levels, mean ~0.5 (measured on 0-255)."""
    results = replay(session, "flux_basic", "checkpoint")
    assert all(results[0, i] == (0, 0.0) for i in range(3))
    later = [r for (step, _), r in results.items() if step > 0]
    assert len(later) == 9
    assert max(r[0] for r in later) == 7 and min(r[0] for r in later) == 5
    assert all(0.45 < r[1] < 0.57 for r in later)


def test_negative_prompt_encodings_match_the_recorded_uncond(session):
    """generate_images encodes the negative prompt too (unused without true CFG): ours is the same."""
    for job in JOBS:
        for row in rows(job)[:5]:
            recorded = truth_tensors(job, row)
            uncond = session.pipeline.encode_prompt(row["negative_prompt"], attn_masking=False)
            assert bit_equal(uncond.embeds, recorded["uncond_prompt_embeds"])
            assert bit_equal(uncond.pooled, recorded["uncond_pooled_prompt_embeds"])


def test_session_noise_is_the_recorded_draw(session):
    row = rows("flux_odd")[4]
    drawn = session.noise(request_for(row), NOISE)
    assert drawn.dtype == np.float32
    np.testing.assert_array_equal(drawn, truth_tensors("flux_odd", row)["noise"].float().numpy())


def test_scheduler_gives_every_recorded_schedule():
    for job in JOBS:
        for row in rows(job):
            generation = row["generation"]
            seq_len = generation["prepare_latents"]["packed_latents"]["shape"][1]
            (recorded,) = generation["scheduler_set_timesteps"]
            steps = row["num_inference_steps"]
            timesteps, sigmas = flux_schedule(steps, seq_len)
            assert requested_sigmas(steps).tolist() == recorded["sigmas_in"]
            assert calculate_shift(seq_len) == recorded["mu"]
            assert timesteps.tolist() == recorded["timesteps"]
            assert sigmas.tolist() == recorded["sigmas"]


def test_transformer_gets_the_recorded_timestep_and_guidance():
    """t / 1000 in bf16 (e.g. 0.828125) and the guidance embedding value as float32."""
    row = rows("flux_odd")[3]
    calls = row["generation"]["transformer_calls"]
    timesteps, _ = flux_schedule(row["num_inference_steps"], 20)
    for call, t in zip(calls, timesteps, strict=True):
        assert quirks.model_timestep(t, torch.bfloat16).tolist() == call["timestep"]["values"]
    assert calls[0]["guidance"]["values"] == [5.0] and calls[0]["guidance"]["dtype"] == "torch.float32"


# ------------------------------------------------------------------------------------------- options


def test_true_cfg_matches_diffusers_true_cfg_under_the_guidance_bypass(session):
    """FluxWithCFGPipeline's numerics: diffusers' own FluxPipeline true CFG (same formula, same schedule) run
    with ai-toolkit's guidance bypass gives our true-CFG replay bit for bit."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from pipelines.flux.scheduler import BASE_SHIFT, MAX_SHIFT

    c = session.c
    session.set_weights(WeightState())
    row = rows("flux_odd")[3]
    request = request_for(row, options=(("true_cfg", True),))
    ours = session.pipeline(request)
    assert ours.uncond is not None
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=BASE_SHIFT, max_shift=MAX_SHIFT)
    pipe = FluxPipeline(scheduler, c.vae, c.text_encoder, c.tokenizer, c.text_encoder_2, c.tokenizer_2, c.transformer)
    pipe.set_progress_bar_config(disable=True)
    with quirks.guidance_bypassed(c.transformer):
        image = pipe(
            prompt_embeds=ours.cond.embeds,
            pooled_prompt_embeds=ours.cond.pooled,
            negative_prompt_embeds=ours.uncond.embeds,
            negative_pooled_prompt_embeds=ours.uncond.pooled,
            true_cfg_scale=request.guidance_scale,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            latents=ours.packed_latents,
            output_type="np",
        ).images[0]
    np.testing.assert_array_equal((image * 255).round().astype("uint8"), ours.pixels)
    plain = session.pipeline(request_for(row))
    assert np.abs(plain.pixels.astype(int) - ours.pixels).max() > 10


def test_true_cfg_at_guidance_one_bypasses_the_embedding_without_a_negative_pass(session):
    session.set_weights(WeightState())
    row = rows("flux_odd")[3]
    at_one = session.pipeline(request_for(row, guidance_scale=1.0, options=(("true_cfg", True),)))
    assert at_one.uncond is None
    plain = session.pipeline(request_for(row, guidance_scale=1.0))
    assert not np.array_equal(at_one.pixels, plain.pixels)


def test_guidance_bypass_is_the_embedding_without_its_guidance_term(session):
    """With the guidance embedder's output forced to exact zeros the original sum and the bypass agree bit for
    bit, so the bypass drops that term and nothing else."""
    embed = session.c.transformer.time_text_embed
    timestep = torch.tensor([0.828125], dtype=torch.bfloat16) * 1000
    guidance = torch.tensor([4000.0], dtype=torch.bfloat16)
    pooled = session.pipeline.encode_prompt("a red circle", False).pooled
    linear = embed.guidance_embedder.linear_2
    saved = linear.weight.clone(), linear.bias.clone()
    try:
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
            original = embed(timestep, guidance, pooled)
            with quirks.guidance_bypassed(session.c.transformer):
                bypassed = embed(timestep, guidance, pooled)
    finally:
        with torch.no_grad():
            linear.weight.copy_(saved[0])
            linear.bias.copy_(saved[1])
    assert bit_equal(bypassed, original)
    assert "forward" not in vars(embed)


def test_attn_masking_zeroes_only_the_padded_t5_positions(session):
    plain = session.pipeline.encode_prompt("a blue square", attn_masking=False).embeds
    masked = session.pipeline.encode_prompt("a blue square", attn_masking=True).embeds
    length = len(session.c.tokenizer_2("a blue square").input_ids)
    assert bit_equal(masked[:, :length], plain[:, :length])
    assert not masked[:, length:].any() and plain[:, length:].any()


def test_knob_flips_name_options_the_pipeline_honours(session):
    flips = knob_flips(object())
    assert {f.code for f in flips} == {
        "flux_true_cfg_on", "flux_true_cfg_off", "flux_attn_masking_on", "flux_attn_masking_off"
    }
    flags = {"use_flux_cfg": True, "attn_masking": False}
    assert [f.code for f in knob_flips(object(), flags)] == ["flux_true_cfg_off", "flux_attn_masking_on"]
    session.set_weights(WeightState())
    row = rows("flux_basic")[0]
    base = session.render(request_for(row)).wait()
    for flip in knob_flips(object()):
        pixels = session.render(request_for(row, options=flip.options)).wait()
        changes = dict(flip.options) in ({"true_cfg": True}, {"attn_masking": True})
        assert (not np.array_equal(pixels, base)) == changes, flip.code


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 15}, "width and height"),
        ({"height": 8}, "width and height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"noise_algorithm": "torch9"}, "noise_algorithm"),
        ({"seed": 2**64}, "seed"),
        ({"output_size": "huge"}, "output_size"),
        ({"options": (("chat_template_passes", 1),)}, "unknown option"),
    ],
)
def test_check_inputs_names_the_bad_argument(session, changes, message):
    with pytest.raises(ValueError, match=message):
        session.pipeline.check_inputs(request_for(rows("flux_basic")[0], **changes))


# ------------------------------------------------------------------------------------------- weights


def transformer_bits(session) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in session.c.transformer.state_dict().items()}


def test_weights_come_back_bit_for_bit_and_the_next_merged_round_is_incremental(session):
    pristine = transformer_bits(session)
    rounds = [r for r in rows("flux_basic") if r["prompt_index"] == 0]
    for row in rounds:  # the incremental path: merge-out of the previous round, then the merge
        session.set_weights(weights_for("flux_basic", row, "in_memory"))
    incremental = transformer_bits(session)
    session.set_weights(WeightState(lora_file("flux_odd", 4, "checkpoint"), 0.7, "hooks"))
    session.set_weights(weights_for("flux_basic", rounds[-1], "in_memory"))  # restore + replay of the history
    replayed = transformer_bits(session)
    assert all(bit_equal(incremental[k], replayed[k]) for k in pristine)
    assert any(not bit_equal(incremental[k], pristine[k]) for k in pristine)
    session.set_weights(WeightState())
    assert all(bit_equal(v, pristine[k]) for k, v in transformer_bits(session).items())
    assert not session.patcher._hooks


# ------------------------------------------------------------------------------------------- LoRA keys

# ai-toolkit's (diffusers) module -> (original module, its row block) for the tiny model's two blocks.
DOUBLE_PARTS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE_PARTS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}


def fused_original_layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ai-toolkit's per-module LoRA fused the way BFL's layout needs it: the parts' downs stacked (rank r*k) and
    their ups block-diagonal, so each part's rows of ``up @ down`` are that part's own delta."""
    fused = {}
    for prefix, target_prefix, table in (
        ("double_blocks.0", "transformer_blocks.0", DOUBLE_PARTS),
        ("single_blocks.0", "single_transformer_blocks.0", SINGLE_PARTS),
    ):
        for original, parts in table.items():
            downs = [tensors[f"transformer.{target_prefix}.{p}.lora_A.weight"] for p in parts]
            ups = [tensors[f"transformer.{target_prefix}.{p}.lora_B.weight"] for p in parts]
            fused[f"{prefix}.{original}"] = (torch.cat(downs), torch.block_diag(*ups))
    return fused


def deltas(lora) -> dict[str, torch.Tensor]:
    return {name: m.scale * (m.up @ m.down) for name, m in lora.modules.items()}


@pytest.mark.parametrize("layout", ["kohya", "original", "original_comfy", "peft"])
def test_lora_key_formats_map_to_the_same_modules_and_deltas(session, tmp_path, layout):
    source = lora_file("flux_odd", 6, "checkpoint")
    tensors = load_file(source)
    out = {}
    if layout == "peft":
        out = {k.replace("transformer.", "base_model.model.", 1): v for k, v in tensors.items()}
    else:
        for name, (down, up) in fused_original_layout(tensors).items():
            rank = down.shape[0]
            if layout == "kohya":
                stem = "lora_unet_" + name.replace(".", "_")
                out |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
                # alpha = rank / 2 halves the scale: the ups are doubled to keep the same deltas
                out[f"{stem}.lora_up.weight"] = up * 2
                out[f"{stem}.alpha"] = torch.tensor(rank / 2)
            else:
                stem = ("diffusion_model." if layout == "original_comfy" else "") + name
                out |= {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
    path = tmp_path / f"{layout}.safetensors"
    save_file(out, path)
    expected, converted = session.read_lora(source), session.read_lora(path)
    assert session.match_lora(converted).ok and len(converted.modules) == 20
    assert set(converted.modules) == set(expected.modules)
    if layout == "kohya":
        assert converted.format == "kohya"
    mine, theirs = deltas(converted), deltas(expected)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-6, atol=1e-9)


def test_final_layer_modulation_swaps_shift_and_scale():
    """BFL's final adaLN outputs (shift, scale), diffusers' norm_out.linear (scale, shift)."""
    down, up = torch.randn(2, 8), torch.randn(6, 2)
    converted = lora_keys.convert(
        {"final_layer.adaLN_modulation.1.lora_A.weight": down, "final_layer.adaLN_modulation.1.lora_B.weight": up}
    )
    assert set(converted) == {"transformer.norm_out.linear.lora_A.weight", "transformer.norm_out.linear.lora_B.weight"}
    assert torch.equal(converted["transformer.norm_out.linear.lora_B.weight"], torch.cat([up[3:], up[:3]]))


def test_every_original_module_maps_to_a_flux1_dev_linear():
    """Names checked against diffusers' FluxTransformer2DModel built with FLUX.1-dev's config (19 + 38 blocks)."""
    targets = set(lora_targets(None))
    mapped = set()
    for table, kind, count in ((lora_keys.DOUBLE_BLOCK, "double_blocks", 19), (lora_keys.SINGLE_BLOCK, "single_blocks", 38)):
        for leaf in table:
            for flattened in (False, True):
                name = f"{kind}_{count - 1}_{leaf.replace('.', '_')}" if flattened else f"{kind}.{count - 1}.{leaf}"
                mapped.update(lora_keys.original_targets(name, flattened)[1])
    for name in lora_keys.TOP_LEVEL:
        mapped.update(lora_keys.original_targets(name, False)[1])
        mapped.update(lora_keys.original_targets(name.replace(".", "_"), True)[1])
    assert mapped <= targets
    assert len(targets) == 19 * 14 + 38 * 6 + 10 and "single_transformer_blocks.37.proj_mlp" in targets


# ------------------------------------------------------------------------------------------- family seam


def test_rules_generation_and_saved_sizes():
    assert [rules.generation_size(w, h) for w, h in ((72, 88), (96, 64), (120, 72), (64, 64), (80, 64))] == [
        (64, 80), (96, 64), (112, 64), (64, 64), (80, 64)
    ]
    for job in JOBS:
        for row in rows(job):
            size = (row["width_generated"], row["height_generated"])
            assert rules.generation_size(row["width"], row["height"]) == size == rules.saved_size(row["width"], row["height"])


def test_rules_negative_prompt_only_with_flux_cfg_above_one():
    assert not rules.uses_negative(4.0, {})
    assert not rules.uses_negative(4.0, {"use_flux_cfg": False})
    assert rules.uses_negative(4.0, {"use_flux_cfg": True})
    assert not rules.uses_negative(1.00001, {"use_flux_cfg": True})
    assert FAMILY.rules.uses_negative is rules.uses_negative and len(FAMILY.rules.quirks) >= 10


def test_check_model_dir_accepts_flux_and_names_what_is_wrong(tmp_path):
    check_model_dir(TINY)
    with pytest.raises(ModelDirError, match="not FluxTransformer2DModel"):
        (tmp_path / "other").mkdir()
        for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            (tmp_path / "other" / sub).mkdir()
        (tmp_path / "other" / "transformer" / "config.json").write_text('{"_class_name": "OmniGen2Transformer2DModel"}')
        check_model_dir(tmp_path / "other")
    with pytest.raises(ModelDirError, match="missing subfolder 'text_encoder'"):
        check_model_dir(ORACLE_DIR / "tiny_omnigen2")
    pickled = tmp_path / "pickled"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        (pickled / sub).mkdir(parents=True)
        for file in (TINY / sub).iterdir():
            target = pickled / sub / (file.stem + ".bin" if file.suffix == ".safetensors" and sub == "vae" else file.name)
            target.write_bytes(file.read_bytes())
    with pytest.raises(ModelDirError, match="pickle checkpoint"):
        check_model_dir(pickled)
    with pytest.raises(ModelDirError, match="not found") as missing:
        check_model_dir(tmp_path / "nowhere")
    assert missing.value.missing


def test_lora_targets_of_a_folder_are_the_session_modules(session):
    assert lora_targets(TINY) == session.module_names
    assert len(session.module_names) == 14 + 6 + 10


def test_session_seam_values(session):
    assert session.fingerprint == model_fingerprint(TINY) and len(session.fingerprint) == 64
    assert session.kernel_candidates(8) == ["torch"] and session.kernels == "torch"
    with pytest.raises(ValueError, match="torch"):
        session.set_kernels("triton:16")
    assert {"transformer", "vae", "t5", "clip"} <= set(session.timings)
    assert FAMILY.archs == ("flux",) and FAMILY.server_profile == "ai-toolkit-inference-flux_dev"


def test_deferred_render_gives_the_same_pixels(session):
    session.set_weights(WeightState())
    request = request_for(rows("flux_odd")[1])
    assert np.array_equal(session.render(request, deferred=True).wait(), session.render(request).wait())


def test_quantised_transformer_runs_the_lora_by_hooks_on_an_undrifted_base():
    """model.quantize: qfloat8 QLinears (T5 too with quantize_te); ai-toolkit cannot merge into them, so a
    "merged" round runs as hooks and the earlier rounds leave no drift."""
    pytest.importorskip("optimum.quanto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = LoadSpec(root=TINY, dtype="bfloat16", device="cpu", quantize=True, quantize_te=True)
        quantised = load_session(spec)
        row = rows("flux_basic")[-1]
        state = weights_for("flux_basic", row, "in_memory")
        assert state.mode == "merged" and state.history
        quantised.set_weights(state)
        assert len(quantised.patcher._hooks) == 20 and not quantised.patcher._pristine
        assert type(quantised.c.transformer.transformer_blocks[0].attn.to_q).__name__ == "QLinear"
        assert type(quantised.c.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
        with_lora = quantised.render(request_for(row)).wait()
        quantised.set_weights(WeightState())
        assert not quantised.patcher._hooks
        without = quantised.render(request_for(row)).wait()
        assert with_lora.shape == without.shape == truth_pixels("flux_basic", row).shape
        assert np.abs(with_lora.astype(int) - without).max() > 5
    finally:
        torch.set_num_threads(threads)
