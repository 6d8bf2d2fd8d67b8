"""FLUX.1 ``--fast`` (pipelines/flux/fast.py) on the oracle's tiny FLUX.1: close to exact, never in the way of it.

Measured here (CPU, --cpu-profile avx2, every step-0 preview of flux_odd and flux_basic): --fast against exact mode
SSIM 0.99918-0.99963, max 5-15 levels, mean 0.46-0.85 with true CFG on or off. Each part alone: the batch-2 true-CFG
forward and T5 through SDPA drift, the fused projections give the same pixels on this CPU.
"""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_flux_pipeline import TINY, request_for, rows, truth_pixels, weights_for

from fixtures import ORACLE_DIR
from parity.scores import compute_metrics
from pipelines.common.lora import has_hooks
from pipelines.family import LoadSpec, WeightState
from pipelines.flux.fast import EXACT_PARTS, FastParts
from pipelines.flux.session import FluxSession, load_session

TRUE_CFG = (("true_cfg", True),)


@pytest.fixture(scope="module")
def session():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_flux_pipeline.py: one thread computes the oracle's pixels, faster here
    fast = load_session(LoadSpec(root=TINY, dtype="bfloat16", device="cpu", fast=True))
    yield fast
    fast.fast = True
    fast.pipeline.fast_parts = FastParts()
    torch.set_num_threads(threads)


@pytest.fixture
def fast_session(session):
    """The module's session in --fast mode with every CPU part on, whatever a test left."""
    session.fast = True
    session.pipeline.fast_parts = FastParts()
    session.set_weights(WeightState())
    return session


def both(session, request):
    """(fast, exact) pixels of ``request`` on the same session, fast first."""
    session.fast = True
    fast = session.render(request).wait()
    session.fast = False
    try:
        exact = session.render(request).wait()
    finally:
        session.fast = True
    return fast, exact


def test_fast_session_defaults_and_compile_only_on_cuda(fast_session):
    assert fast_session.fast and fast_session.pipeline.fast
    assert fast_session.pipeline.fast_parts == FastParts(compile=False)  # CPU: no torch.compile by default
    c = fast_session.c
    for device, compile_, expected in (("cuda", None, True), ("cpu", True, True), ("cuda", False, False)):
        spec = LoadSpec(root=TINY, dtype="bfloat16", device=device, fast=True, compile=compile_)
        assert FluxSession(c, spec).pipeline.fast_parts.compile is expected, (device, compile_)
    fast_session.fast = False
    assert not fast_session.pipeline.fast


def test_fast_true_cfg_replay_is_close_to_exact_and_exact_mode_comes_back(fast_session):
    """A true-CFG preview replayed fast (one batch-2 forward per step, fused projections): close
    to the exact replay, not equal; exact mode on the same session afterwards gives the oracle's own pixels."""
    odd = rows("flux_odd")
    fast, exact = both(fast_session, request_for(odd[3], options=TRUE_CFG))
    metrics = compute_metrics(exact, fast)[0]
    assert not np.array_equal(fast, exact)
    assert metrics.ssim > 0.999 and metrics.max_abs_diff <= 16 and metrics.mean_abs_diff < 1.0, metrics
    # the step-0 previews (plain FLUX.1, the base model): exact after fast is ai-toolkit's preview bit for bit
    for row in (odd[0], odd[3]):
        fast, exact = both(fast_session, request_for(row))
        np.testing.assert_array_equal(exact, truth_pixels("flux_odd", row))
        assert compute_metrics(exact, fast)[0].ssim > 0.999


def test_true_cfg_runs_one_batched_forward_per_step(fast_session):
    forward = fast_session.pipeline.fast_forward
    batches = []
    original = forward.velocities

    def counting(prepared, latents, timestep, guidance, pooled, embeds):
        batches.append((pooled.shape[0], embeds.shape[0]))
        return original(prepared, latents, timestep, guidance, pooled, embeds)

    forward.velocities = counting
    try:
        request = request_for(rows("flux_odd")[3], options=TRUE_CFG)
        fast_session.render(request).wait()
        assert batches == [(2, 2)] * request.num_inference_steps
        batches.clear()
        fast_session.pipeline.fast_parts = dataclasses.replace(FastParts(), batch_cfg=False)
        fast_session.render(request).wait()
        assert batches == [(1, 1)] * (2 * request.num_inference_steps)
    finally:
        del forward.velocities


def test_fast_forward_with_every_part_off_is_diffusers_forward_bit_for_bit(fast_session):
    """Our rewritten forward (joint sequence through the single blocks, rotary once per replay) computes what
    diffusers' FluxTransformer2DModel computes: with every part off the fast path gives the exact pixels, so
    each part's drift is its own. The fused projections alone change nothing on this CPU either."""
    for options in ((), TRUE_CFG):
        request = request_for(rows("flux_odd")[3], options=options)
        for parts in (EXACT_PARTS, dataclasses.replace(EXACT_PARTS, fuse=True)):
            fast_session.pipeline.fast_parts = parts
            fast, exact = both(fast_session, request)
            np.testing.assert_array_equal(fast, exact)


def test_fused_projections_follow_lora_merges_and_step_aside_for_hooks(fast_session):
    """Fused q/k/v (+ proj_mlp): the modules' weights live in one tensor per group, each module a view of its rows,
    so a merged LoRA applies through the fused GEMM; exact mode on those views is still ai-toolkit's preview bit
    for bit, and so it is after unfusing. Not used while an unmerged LoRA's hooks are attached to the modules."""
    forward = fast_session.pipeline.fast_forward
    transformer = fast_session.c.transformer
    ids = torch.zeros(1, 3)
    basic = rows("flux_basic")
    row = next(r for r in basic if r["step"] == 6)
    request = request_for(row)
    base = fast_session.render(request).wait()
    fast_session.set_weights(weights_for("flux_basic", row, "in_memory"))  # merged, with two rounds of drift
    prepared = forward.prepare(transformer, fast_session.pipeline.fast_parts, ids, ids)
    attn = transformer.transformer_blocks[0].attn
    weight, bias, sizes = prepared.fused_double[0][0]
    assert prepared.fused and sizes == [attn.to_q.out_features] * 3
    assert attn.to_k.weight.data_ptr() == weight[sizes[0]].data_ptr()  # a view: no copy, merges land in it
    assert torch.equal(weight, torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert torch.equal(bias, torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
    single = transformer.single_transformer_blocks[0]
    assert single.proj_mlp.weight.data_ptr() == prepared.fused_single[0][0][sum(prepared.fused_single[0][2][:3])].data_ptr()
    fused, exact = both(fast_session, request)
    fast_session.pipeline.fast_parts = dataclasses.replace(FastParts(), fuse=False)
    unfused = fast_session.render(request).wait()
    np.testing.assert_array_equal(fused, unfused)
    np.testing.assert_array_equal(exact, truth_pixels("flux_basic", row))
    assert np.abs(fused.astype(int) - base).max() > 10  # the LoRA's effect came through the fused GEMMs
    forward.unfuse()
    assert attn.to_k.weight.untyped_storage().data_ptr() != attn.to_q.weight.untyped_storage().data_ptr()
    fast_session.fast = False
    np.testing.assert_array_equal(fast_session.render(request).wait(), exact)

    odd = rows("flux_odd")
    row = next(r for r in odd if r["step"] == 2 and r["network_multiplier"] == 0.7)
    fast_session.pipeline.fast_parts = FastParts()
    fast_session.set_weights(weights_for("flux_odd", row, "checkpoint"))  # hooks
    assert has_hooks(transformer)
    prepared = forward.prepare(transformer, fast_session.pipeline.fast_parts, ids, ids)
    assert not prepared.fused and prepared.fused_double[0] == (None, None)
    fast, exact = both(fast_session, request_for(row))
    np.testing.assert_array_equal(exact, truth_pixels("flux_odd", row))
    assert compute_metrics(exact, fast)[0].ssim > 0.999
    fast_session.set_weights(WeightState())
    assert np.abs(fast_session.render(request_for(row)).wait().astype(int) - fast).max() > 10


def test_t5_runs_through_sdpa_only_in_fast_mode(fast_session):
    """--fast encodes T5 with SDPA (the last bits of many values move); T5 is back on eager attention afterwards
    and exact mode gives the recorded embeddings bit for bit."""
    pipeline = fast_session.pipeline
    row = rows("flux_odd")[2]
    t5 = fast_session.c.text_encoder_2
    sdpa = pipeline.encode_prompt(row["prompt"], False, t5_sdpa=True).embeds
    assert t5.config._attn_implementation == "eager"
    eager = pipeline.encode_prompt(row["prompt"], False).embeds
    recorded = load_file(ORACLE_DIR / "ground_truth" / "flux_odd" / row["tensors"])["cond_prompt_embeds"]
    assert torch.equal(eager.view(torch.int16), recorded.view(torch.int16))
    changed = int((sdpa != eager).sum())
    assert 0.3 * eager.numel() < changed < eager.numel()
    assert (sdpa.float() - eager.float()).abs().max() < 0.05 * eager.float().abs().max()


def test_compiled_blocks_trace_whole_and_match_eager(fast_session):
    """torch.compile of the two block functions (backend 'eager' here: tracing without code generation): no graph
    break, one graph per block type, the same pixels as uncompiled; with hooks attached nothing is compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    request = request_for(rows("flux_odd")[3], options=TRUE_CFG)
    plain = fast_session.render(request).wait()
    torch._dynamo.reset()
    counters.clear()
    fast_session.pipeline.fast_parts = FastParts(compile=True, compile_backend="eager")
    compiled = fast_session.render(request).wait()
    np.testing.assert_array_equal(compiled, plain)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2
    odd = rows("flux_odd")
    fast_session.set_weights(weights_for("flux_odd", next(r for r in odd if r["step"] == 2), "checkpoint"))
    prepared = fast_session.pipeline.fast_forward.prepare(
        fast_session.c.transformer, fast_session.pipeline.fast_parts, torch.zeros(1, 3), torch.zeros(1, 3))
    assert not prepared.compiled
    torch._dynamo.reset()
