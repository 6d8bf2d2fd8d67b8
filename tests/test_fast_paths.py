"""Issue 6: the exact loop's shortcuts keep every bit; ``--fast`` stays within its measured drift.

CPU, tiny oracle model. The CUDA-graph test needs a GPU (``benchmarks/perf.py`` checks the full size there).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import ORACLE_DIR
from parity.check import CheckOptions, run_check
from parity.replay import ReplayOptions
from parity.scores import compute_metrics
from pipelines.omnigen2 import quirks
from pipelines.omnigen2.loading import load_components
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest

TINY = ORACLE_DIR / "tiny_omnigen2"
REQUESTS = [
    ReplayRequest(
        "a red fox in the snow", "", seed=3, width=72, height=88, num_inference_steps=4, guidance_scale=4.0
    ),
    ReplayRequest(
        "[trigger] a blue square",
        "blurry",
        seed=7,
        width=96,
        height=64,
        num_inference_steps=5,
        guidance_scale=3.0,
    ),
    ReplayRequest("no guidance", "", seed=1, width=64, height=64, num_inference_steps=3, guidance_scale=1.0),
]


@pytest.fixture(scope="module")
def components():
    return load_components(TINY, torch.bfloat16, "cpu")


def legacy_pixels(pipe: OmniGen2Pipeline, r: ReplayRequest) -> np.ndarray:
    """The loop before issue 6: two full ``forward`` calls per step, the text length read from the mask each time."""
    from pipelines.common import noise

    c = pipe.c
    gen_w, gen_h = quirks.generation_size(r.width, r.height)
    generator = quirks.seed_everything(r.seed)
    cond = pipe.encode_text(r.prompt)
    uncond = pipe.encode_text(r.negative_prompt)
    shape = quirks.latent_shape(pipe.vae_scale, c.transformer.config.in_channels, gen_w, gen_h)
    latents = noise.draw_noise(generator, shape, r.noise_algorithm, dtype=c.dtype)
    scheduler = c.scheduler()
    with torch.no_grad():
        for t in scheduler.set_timesteps(r.num_inference_steps, shape[-2] * shape[-1]):
            timestep = t.expand(1).to(c.dtype)
            c.transformer._device_cache.clear()
            v = c.transformer(latents, timestep, cond.embeds, cond.mask, [])
            if r.guidance_scale > 1:
                v_uncond = c.transformer(latents, timestep, uncond.embeds, uncond.mask, [])
                v = quirks.cfg_combine(v, v_uncond, r.guidance_scale)
            latents = scheduler.step(v, latents).to(c.dtype)
        return quirks.decode_to_pixels(c.vae, latents, r.width, r.height)


def test_exact_loop_equals_two_full_forwards_per_step(components):
    pipe = OmniGen2Pipeline(components)
    for r in REQUESTS:
        expected = legacy_pixels(pipe, r)
        assert np.array_equal(pipe(r).pixels, expected)
        assert np.array_equal(pipe(r, deferred=True).pending.wait(), expected)


def test_guided_velocities_equal_forward_with_padding_and_references(components):
    model = components.transformer
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    latent = torch.randn(1, cfg.in_channels, 12, 10, generator=g).bfloat16()
    t = torch.tensor([0.7]).bfloat16()
    texts, masks = [], []
    for length, valid in ((24, 19), (11, 11)):
        texts.append(torch.randn(1, length, cfg.text_feat_dim, generator=g).bfloat16())
        mask = torch.zeros(1, length)
        mask[:, :valid] = 1
        masks.append(mask.bfloat16())
    ref = torch.randn(cfg.in_channels, 8, 12, generator=g).bfloat16()
    with torch.no_grad():
        expected = [model(latent, t, x, m, [ref]) for x, m in zip(texts, masks, strict=True)]
        inputs = [model.prepare_text(x, m) for x, m in zip(texts, masks, strict=True)]
        got = model.guided_velocities(latent, t, inputs, [[ref], [ref]])
    assert [i.length for i in inputs] == [19, 11]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_fast_replays_drift_little_from_exact(components):
    exact = OmniGen2Pipeline(components)
    fast = OmniGen2Pipeline(components, fast=True)
    for r in REQUESTS:
        a, b = exact(r).pixels, fast(r).pixels
        metrics, _, _ = compute_metrics(a, b)
        assert metrics.ssim >= 0.99, (r, metrics)
        assert metrics.max_abs_diff <= 16


def test_fast_check_is_marked_and_keyed_apart(tmp_path):
    job = ORACLE_DIR / "jobs" / "og2_odd"
    base = dict(base_model=str(TINY), noise_algorithm="torch2.13-avx2")
    exact = run_check(
        job, CheckOptions(replay=ReplayOptions(**base), steps="0", out_dir=tmp_path, diagnose=False)
    )
    fast = run_check(
        job,
        CheckOptions(replay=ReplayOptions(**base, fast=True), steps="0", out_dir=tmp_path, diagnose=False),
    )
    assert "--fast" in fast.pipeline_profile and fast.warnings[0].startswith("--fast")
    assert "--fast" not in exact.pipeline_profile
    assert len(list((tmp_path / "replays").glob("*.png"))) == 10  # fast replays never reuse exact ones
    assert all(i.outcome.value == "EXACT" for i in exact.items)
    for e, f in zip(exact.items, fast.items, strict=True):
        assert f.outcome.value in ("EXACT", "PASS")  # against the JPEG preview, which amplifies small changes
        a = np.array(Image.open(e.replay_png).convert("RGB"))
        b = np.array(Image.open(f.replay_png).convert("RGB"))
        assert compute_metrics(a, b)[0].ssim >= 0.99  # fast vs exact on the same preview


@pytest.mark.gpu
def test_cuda_graph_steps_equal_eager_bit_for_bit():
    comps = load_components(TINY, torch.bfloat16, "cuda")
    eager = OmniGen2Pipeline(comps, cuda_graphs=False)
    graphed = OmniGen2Pipeline(comps, cuda_graphs=True)
    for r in REQUESTS:
        expected = eager(r).pixels
        assert np.array_equal(graphed(r).pixels, expected)  # capture step
        assert np.array_equal(graphed(r).pixels, expected)  # replays only
    assert graphed.graphs.disabled is None and graphed.graphs.replays > 0


@pytest.mark.gpu
def test_concurrent_cfg_passes_equal_serial_ones_bit_for_bit():
    """The unconditional pass on a second CUDA stream: the same kernels on the same inputs, eager and graphed."""
    comps = load_components(TINY, torch.bfloat16, "cuda")
    comps.transformer.concurrent_texts = False
    serial = [OmniGen2Pipeline(comps, cuda_graphs=False)(r).pixels for r in REQUESTS]
    comps.transformer.concurrent_texts = True
    for graphs in (False, True):
        pipe = OmniGen2Pipeline(comps, cuda_graphs=graphs)
        for r, expected in zip(REQUESTS, serial, strict=True):
            assert np.array_equal(pipe(r).pixels, expected), (graphs, r)
            assert np.array_equal(pipe(r).pixels, expected), (graphs, r)
    assert comps.transformer._side_stream is not None


def test_next_merged_round_swaps_incrementally_to_the_same_weights(monkeypatch):
    """From round k's merged state, round k+1 needs only round k's merge-out and its own merge: the same weights,
    bit for bit, as restoring the base and replaying every earlier round."""
    from parity.plan import build_plan
    from parity.replay import Replayer
    from pipelines.common.lora import LoraPatcher

    plan = build_plan(ORACLE_DIR / "jobs" / "og2_basic")
    items = {step: next(i for i in plan.items if i.step == step) for step in (2, 4, 6)}
    walked = Replayer(plan, ReplayOptions(base_model=str(TINY)))
    restores = []
    walked.load()
    monkeypatch.setattr(
        LoraPatcher,
        "restore",
        lambda self, original=LoraPatcher.restore: (restores.append(1), original(self))[1],
    )
    for step in (2, 4, 6):
        walked.prepare(items[step])
    assert len(restores) == 1  # only before the first merged round
    monkeypatch.undo()
    direct = Replayer(plan, ReplayOptions(base_model=str(TINY)))
    direct.prepare(items[6])
    a = walked.session.pipeline.c.transformer.state_dict()
    b = direct.session.pipeline.c.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert walked.session.patcher.drift()["tensors_changed"] > 0


def test_compiled_fast_blocks_never_run_while_lora_hooks_are_attached(components):
    """An unmerged LoRA runs as forward hooks; dynamo does not guard on hooks, so a block graph compiled before
    they were attached would skip them: the compiled halves are used only on a transformer without hooks."""
    from pipelines.omnigen2.transformer import _fast_post, _fast_pre

    transformer = components.transformer
    before = transformer.compile_fast, transformer._fast_fns
    try:
        transformer.compile_fast, transformer._fast_fns = True, None
        compiled = transformer.fast_functions()  # torch.compile wraps lazily: nothing is traced here
        assert compiled[0] is not _fast_pre and compiled[1] is not _fast_post
        handle = transformer.layers[0].attn.to_q.register_forward_hook(lambda module, args, out: out)
        try:
            assert transformer.fast_functions() == (_fast_pre, _fast_post)
        finally:
            handle.remove()
        assert transformer.fast_functions() is compiled
    finally:
        transformer.compile_fast, transformer._fast_fns = before
