"""Unit tests of the replay's parts: scheduler timesteps and step, rotary position ids and rotation, the size
policy, patchify, LoRA key matching for every supported file format, and LoRA merge / side branch / restore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from safetensors.torch import save_file

from fixtures.tiny_model import TINY_TRANSFORMER, TINY_VAE, randomise_
from parity.plan import requested_size
from pipelines.common.lora import LoraPatcher, linear_modules, match_lora, read_lora
from pipelines.omnigen2 import quirks
from pipelines.omnigen2.rope import apply_rotation, frequency_tables, gather_rotations, position_ids
from pipelines.omnigen2.scheduler import FlowMatchEulerScheduler
from pipelines.omnigen2.transformer import OmniGen2Config, OmniGen2Transformer, patchify, unpatchify

BF16 = torch.bfloat16


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().double().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


def shifted_timesteps_f64(steps: int, num_tokens: int) -> list[float]:
    """OmniGen2's shifted grid computed independently: float32 grid points, the shift in float64, then float32."""
    m = math.sqrt(num_tokens) / 40
    grid = [float(np.float32(i / steps)) for i in range(steps)]
    return [float(np.float32(t / (m - m * t + t))) for t in grid]


# ---------------------------------------------------------------- scheduler


def test_timesteps_for_4_steps_on_an_8x8_latent_are_pinned():
    scheduler = FlowMatchEulerScheduler()
    timesteps = scheduler.set_timesteps(4, num_tokens=8 * 8)
    assert timesteps.dtype == torch.float32
    # m = sqrt(64) / 40 = 0.2: t / (0.2 - 0.2 t + t) at t = 0, 1/4, 1/2, 3/4.
    assert timesteps.tolist() == [0.0, 0.625, 0.8333333134651184, 0.9375]
    assert timesteps.tolist() == shifted_timesteps_f64(4, 64)


@pytest.mark.parametrize(("steps", "h", "w"), [(20, 8, 8), (25, 10, 8), (30, 128, 128), (7, 124, 156)])
def test_timesteps_equal_the_float64_shift_rounded_to_float32(steps, h, w):
    timesteps = FlowMatchEulerScheduler().set_timesteps(steps, num_tokens=h * w)
    assert timesteps.tolist() == shifted_timesteps_f64(steps, h * w)


def test_timesteps_differ_from_a_pure_float32_shift():
    # Why the shift runs in float64 (NumPy 2 promotion): float32 arithmetic is 1 ulp off for many points.
    timesteps = FlowMatchEulerScheduler().set_timesteps(30, num_tokens=128 * 128).numpy()
    grid = np.linspace(0, 1, 31, dtype=np.float32)[:-1]
    m = np.float32(math.sqrt(128 * 128) / 40)
    pure_f32 = grid / (m - m * grid + grid)
    assert pure_f32.dtype == np.float32
    assert 0 < np.count_nonzero(pure_f32 != timesteps) < 30


def test_timesteps_without_dynamic_shift_are_the_linear_grid():
    timesteps = FlowMatchEulerScheduler(dynamic_time_shift=False).set_timesteps(4, num_tokens=64)
    assert timesteps.tolist() == [0.0, 0.25, 0.5, 0.75]


def test_step_is_fp32_sample_plus_bf16_product_and_ends_at_one():
    scheduler = FlowMatchEulerScheduler()
    timesteps = scheduler.set_timesteps(4, num_tokens=64).tolist()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=generator).to(BF16)
    grid = [*timesteps, 1.0]
    for i in range(4):
        v = torch.randn(1, 16, 8, 8, generator=generator).to(BF16)
        dt = torch.tensor(grid[i + 1], dtype=torch.float32) - torch.tensor(grid[i], dtype=torch.float32)
        # The 0-dim float32 dt is rounded to bf16 first; the exact float32 product is rounded to bf16.
        product = (dt.to(BF16).float() * v.float()).to(BF16)
        expected = (x.float() + product.float()).to(BF16)
        x = scheduler.step(v, x)
        assert x.dtype == BF16
        assert torch.equal(x, expected), f"step {i}"
    assert grid[-1] - grid[-2] == 1.0 - 0.9375


def test_step_product_is_not_taken_in_float32():
    # Pins the bf16 product: a float32 product would round only once, at the end.
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(3, num_tokens=10 * 10)
    v = torch.randn(1, 16, 10, 10, generator=torch.Generator().manual_seed(1)).to(BF16)
    x = torch.zeros_like(v)
    dt = scheduler.timesteps[1] - scheduler.timesteps[0]
    out = scheduler.step(v, x)
    assert not torch.equal(out, (v.float() * dt).to(BF16))
    assert torch.equal(out, (v.float() * dt.to(BF16).float()).to(BF16))


# ---------------------------------------------------------------- rotary embedding


def test_text_only_position_ids_are_diagonal_then_the_image_grid():
    ids = position_ids(3, [], (2, 3))
    assert ids.dtype == torch.int64
    assert ids.tolist() == [
        [0, 0, 0], [1, 1, 1], [2, 2, 2],
        [3, 0, 0], [3, 0, 1], [3, 0, 2], [3, 1, 0], [3, 1, 1], [3, 1, 2],
    ]  # fmt: skip


def test_one_reference_image_shifts_the_target_by_its_larger_side():
    ids = position_ids(4, [(2, 3)], (2, 2))
    assert ids[:4].tolist() == [[i, i, i] for i in range(4)]
    assert ids[4:10].tolist() == [[4, r, c] for r in range(2) for c in range(3)]
    assert ids[10:].tolist() == [[4 + 3, r, c] for r in range(2) for c in range(2)]


def test_two_reference_images_shift_by_max_h_w_each_and_the_target_comes_last():
    ids = position_ids(5, [(2, 4), (3, 1)], (2, 2))
    assert len(ids) == 5 + 8 + 3 + 4
    assert ids[5:13].tolist() == [[5, r, c] for r in range(2) for c in range(4)]
    assert ids[13:16].tolist() == [[5 + 4, r, 0] for r in range(3)]
    assert ids[16:].tolist() == [[5 + 4 + 3, r, c] for r in range(2) for c in range(2)]


def test_reference_image_of_the_target_size_shifts_the_target():
    # Equal literals are one tuple object; grids built at run time (as the transformer does) are distinct ones.
    for ids in (position_ids(5, [(4, 4)], (4, 4)), position_ids(5, [tuple([4, 4])], tuple([4, 4]))):
        assert ids[5:21, 0].unique().tolist() == [5]
        assert ids[21:, 0].unique().tolist() == [9]


def test_frequency_tables_are_complex128_exp_i_pos_theta_powers():
    tables = frequency_tables([8, 8, 8], [1024, 1664, 1664])
    assert [t.dtype for t in tables] == [torch.complex128] * 3
    assert [tuple(t.shape) for t in tables] == [(1024, 4), (1664, 4), (1664, 4)]
    pos = torch.arange(1664, dtype=torch.float64)[:, None]
    inv_freq = torch.tensor([10000.0 ** (-2 * k / 8) for k in range(4)], dtype=torch.float64)
    angles = pos * inv_freq
    assert torch.allclose(tables[1].real, torch.cos(angles), rtol=0, atol=1e-12)
    assert torch.allclose(tables[1].imag, torch.sin(angles), rtol=0, atol=1e-12)


def test_apply_rotation_matches_a_float64_reference_within_bf16_rounding():
    generator = torch.Generator().manual_seed(3)
    ids = position_ids(7, [(3, 5)], (4, 6))
    seq, heads, head_dim = len(ids), 3, 24
    x = (4 * torch.randn(1, seq, heads, head_dim, generator=generator)).to(BF16)
    rotations = gather_rotations(frequency_tables([8, 8, 8], [1024, 1664, 1664]), ids).unsqueeze(0)
    ours = apply_rotation(x, rotations)
    assert ours.dtype == BF16

    # float64 reference: each interleaved pair (x0, x1) of each axis rotated by pos_axis / 10000**(2k/8).
    inv_freq = torch.tensor([10000.0 ** (-2 * k / 8) for k in range(4)], dtype=torch.float64)
    angles = torch.cat([ids[:, axis, None].double() * inv_freq for axis in range(3)], dim=1)  # [seq, 12]
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    reference = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    # One rounding to bf16: within half a bf16 step of the exact value, and equal to rounding it directly.
    error = (ours.double() - reference).abs()
    assert (error <= _bf16_step(reference) / 2).all()
    assert torch.equal(ours, reference.to(BF16))


def test_rotation_at_position_zero_is_the_identity():
    x = torch.randn(1, 1, 3, 24, generator=torch.Generator().manual_seed(4)).to(BF16)
    rotations = gather_rotations(frequency_tables([8, 8, 8], [16, 16, 16]), position_ids(1, [], (0, 0)))
    assert torch.equal(apply_rotation(x, rotations.unsqueeze(0)), x)


# ---------------------------------------------------------------- size policy


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (72, 88, (64, 80)),
        (88, 64, (80, 64)),
        (64, 64, (64, 64)),
        (1000, 1000, (992, 992)),
        (1536, 1024, (1248, 832)),
        (1024, 1536, (832, 1248)),
        (1024, 1024, (1024, 1024)),
        (2048, 2048, (1024, 1024)),
    ],
)
def test_generation_size_caps_at_1mp_and_floors_to_16_in_width_height_order(width, height, expected):
    assert quirks.generation_size(width, height) == expected


def test_noise_shape_uses_the_generation_size():
    # FACTS: 72x88 (width x height) gives latents (1, 16, 10, 8).
    assert quirks.latent_shape(8, 16, *quirks.generation_size(72, 88)) == (1, 16, 10, 8)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (88, 64, (88, 64)),
        (64, 64, (64, 64)),
        (100, 60, (96, 64)),
        (71, 65, (64, 64)),
        (7, 300, (64, 296)),
        (1001, 1023, (1000, 1016)),
    ],
)
def test_requested_size_floors_to_8_with_a_minimum_of_64(width, height, expected):
    assert requested_size(width, height) == expected


def _gradient_image(width: int, height: int) -> Image.Image:
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(255, 0, width, dtype=np.float32)[None, :]
    return Image.fromarray(
        np.stack([rows + 0 * cols, 0 * rows + cols, (rows + cols) / 2], -1).astype(np.uint8)
    )


def test_reference_pixels_equal_the_image_processors_values():
    # OmniGen2's image processor is diffusers' VaeImageProcessor: [0, 1] floats, NCHW, then 2x - 1.
    image = _gradient_image(64, 80)
    expected = VaeImageProcessor.normalize(
        VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(image))
    )
    assert torch.equal(quirks.reference_pixels(image), expected)


def test_reference_pixels_take_the_image_processors_memory_layout_into_the_vae():
    image = _gradient_image(64, 80)
    expected = VaeImageProcessor.normalize(
        VaeImageProcessor.numpy_to_pt(VaeImageProcessor.pil_to_numpy(image))
    )
    ours = quirks.reference_pixels(image)
    with torch.random.fork_rng(devices=[]):
        vae = AutoencoderKL(**TINY_VAE)
    randomise_(vae, 11)
    vae = vae.to(BF16).eval()
    latents = []
    for pixels in (ours, expected):
        torch.manual_seed(0)
        with torch.no_grad():
            latents.append(quirks.encode_reference(vae, pixels))
    assert torch.equal(latents[0], latents[1])
    assert ours.stride() == expected.stride()


# ---------------------------------------------------------------- patchify


def test_patchify_is_row_major_patches_with_channels_fastest():
    latent = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    tokens = patchify(latent, 2)
    assert tokens.shape == (2 * 3, 2 * 2 * 3)
    for h in range(2):
        for w in range(3):
            expected = [
                latent[c, 2 * h + p1, 2 * w + p2] for p1 in range(2) for p2 in range(2) for c in range(3)
            ]
            assert tokens[h * 3 + w].tolist() == torch.stack(expected).tolist()


@pytest.mark.parametrize(("c", "h", "w"), [(16, 8, 8), (16, 10, 8), (4, 2, 14)])
def test_unpatchify_inverts_patchify(c, h, w):
    latent = torch.randn(c, h, w, generator=torch.Generator().manual_seed(5)).to(BF16)
    assert torch.equal(unpatchify(patchify(latent, 2), 2, h, w), latent)


# ---------------------------------------------------------------- LoRA files and key matching

TARGETS = ["layers.0.attn.to_q", "layers.1.feed_forward.linear_2", "noise_refiner.0.norm1.linear", "context_refiner.0.attn.to_out.0"]  # fmt: skip
RANK = 4


@pytest.fixture(scope="module")
def transformer() -> OmniGen2Transformer:
    model = OmniGen2Transformer(OmniGen2Config(**TINY_TRANSFORMER))
    randomise_(model, 7)
    return model.to(BF16).eval().requires_grad_(False)


@pytest.fixture
def pristine(transformer):
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    yield state
    transformer.load_state_dict(state)


def lora_pair(transformer, path: str, seed: int, scale: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) in float32 for the Linear at ``path``."""
    out_features, in_features = linear_modules(transformer)[path].weight.shape
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, in_features, generator=generator) * scale
    up = torch.randn(out_features, RANK, generator=generator) * scale
    return down, up


def ai_toolkit_tensors(transformer, seed: int = 0, targets=TARGETS, prefix="diffusion_model.") -> dict:
    tensors = {}
    for i, path in enumerate(targets):
        down, up = lora_pair(transformer, path, seed + i)
        tensors[f"{prefix}{path}.lora_A.weight"] = down
        tensors[f"{prefix}{path}.lora_B.weight"] = up
    return tensors


def write(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def read(transformer, path):
    return read_lora(path, list(linear_modules(transformer)))


def test_ai_toolkit_lora_matches_every_module_with_scale_one(transformer, tmp_path):
    lora = read(transformer, write(tmp_path, "aitk", ai_toolkit_tensors(transformer)))
    report = match_lora(lora, transformer)
    assert lora.format == "ai-toolkit"
    assert report.ok and report.problem() is None
    assert report.matched == sorted(TARGETS)
    assert {m.scale for m in lora.modules.values()} == {1.0}
    down, up = lora_pair(transformer, TARGETS[0], 0)
    assert torch.equal(lora.modules[TARGETS[0]].down, down) and torch.equal(lora.modules[TARGETS[0]].up, up)


def test_diffusers_peft_lora_with_transformer_prefix_matches(transformer, tmp_path):
    lora = read(transformer, write(tmp_path, "peft", ai_toolkit_tensors(transformer, prefix="transformer.")))
    assert lora.format == "diffusers/peft"
    assert match_lora(lora, transformer).matched == sorted(TARGETS)


def test_lora_down_up_with_alpha_scales_by_alpha_over_rank(transformer, tmp_path):
    tensors = {}
    for i, path in enumerate(TARGETS):
        down, up = lora_pair(transformer, path, i)
        tensors[f"{path}.lora_down.weight"] = down
        tensors[f"{path}.lora_up.weight"] = up
        tensors[f"{path}.alpha"] = torch.tensor(float(i + 1))
    lora = read(transformer, write(tmp_path, "downup", tensors))
    assert lora.format == "lora_down/lora_up"
    assert match_lora(lora, transformer).matched == sorted(TARGETS)
    assert {name: m.scale for name, m in lora.modules.items()} == {
        p: (i + 1) / RANK for i, p in enumerate(TARGETS)
    }


def test_kohya_lora_unet_names_resolve_to_dotted_module_paths(transformer, tmp_path):
    tensors = {}
    for i, path in enumerate(TARGETS):
        down, up = lora_pair(transformer, path, i)
        flat = "lora_unet_" + path.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = down
        tensors[f"{flat}.lora_up.weight"] = up
        tensors[f"{flat}.alpha"] = torch.tensor(float(RANK))
    down, up = lora_pair(transformer, TARGETS[0], 9)
    tensors["lora_unet_layers_7_attn_to_q.lora_down.weight"] = down
    tensors["lora_unet_layers_7_attn_to_q.lora_up.weight"] = up
    lora = read(transformer, write(tmp_path, "kohya", tensors))
    report = match_lora(lora, transformer)
    assert lora.format == "kohya"
    assert report.matched == sorted(TARGETS)
    assert report.unmatched == ["lora_unet_layers_7_attn_to_q"]
    assert {m.scale for m in lora.modules.values() if m.path in TARGETS} == {1.0}


def test_renamed_keys_are_listed_as_unmatched_by_name(transformer, tmp_path):
    tensors = ai_toolkit_tensors(transformer)
    tensors = {k.replace("layers.0.attn.", "layers.0.attention."): v for k, v in tensors.items()}
    tensors["diffusion_model.layers.0.attn.to_q.weight"] = torch.zeros(72, 72)
    lora = read(transformer, write(tmp_path, "renamed", tensors))
    report = match_lora(lora, transformer)
    assert report.unmatched == ["layers.0.attention.to_q"]
    assert report.unparsed_keys == ["diffusion_model.layers.0.attn.to_q.weight"]
    assert report.matched == sorted(TARGETS[1:])
    assert not report.ok
    assert "1 unmatched modules: layers.0.attention.to_q" in report.problem()
    assert "1 unrecognised keys: diffusion_model.layers.0.attn.to_q.weight" in report.problem()


def test_a_without_b_is_listed_as_unpaired(transformer, tmp_path):
    tensors = ai_toolkit_tensors(transformer)
    del tensors["diffusion_model.layers.1.feed_forward.linear_2.lora_B.weight"]
    del tensors["diffusion_model.layers.0.attn.to_q.lora_A.weight"]
    report = match_lora(read(transformer, write(tmp_path, "unpaired", tensors)), transformer)
    assert report.unpaired_keys == [
        "layers.0.attn.to_q (no down/A)",
        "layers.1.feed_forward.linear_2 (no up/B)",
    ]
    assert report.matched == sorted(TARGETS[2:])
    assert "2 unpaired keys" in report.problem()


def test_wrong_shape_is_listed_as_a_mismatch(transformer, tmp_path):
    tensors = ai_toolkit_tensors(transformer)
    tensors["diffusion_model.layers.0.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 64)
    report = match_lora(read(transformer, write(tmp_path, "shape", tensors)), transformer)
    assert report.shape_mismatches == ["layers.0.attn.to_q (LoRA (72, 4)@(4, 64), layer 72x72)"]
    assert "layers.0.attn.to_q" not in report.matched
    assert report.problem().startswith("1 shape mismatches: layers.0.attn.to_q")


def test_lora_matching_nothing_says_it_applies_to_0_layers(transformer, tmp_path):
    tensors = ai_toolkit_tensors(transformer, prefix="diffusion_model.unet.")
    report = match_lora(read(transformer, write(tmp_path, "none", tensors)), transformer)
    assert report.matched == [] and len(report.unmatched) == len(TARGETS)
    assert report.problem().startswith("applies to 0 layers")


# ---------------------------------------------------------------- merge, side branch, restore


def _load(transformer, tmp_path, name: str, seed: int, targets=TARGETS):
    return read(transformer, write(tmp_path, name, ai_toolkit_tensors(transformer, seed, targets)))


def test_restore_after_swapping_loras_is_bit_identical(transformer, pristine, tmp_path):
    first, second = _load(transformer, tmp_path, "one", 0), _load(transformer, tmp_path, "two", 100)
    patcher = LoraPatcher(transformer)
    assert patcher.merge(first, 1.0) == len(TARGETS)
    assert not torch.equal(
        transformer.state_dict()["layers.0.attn.to_q.weight"], pristine["layers.0.attn.to_q.weight"]
    )
    patcher.restore()
    patcher.merge(second, 0.7)
    patcher.merge_out(second, 0.7)
    patcher.attach(first, 1.5)
    patcher.restore()
    state = transformer.state_dict()
    assert [k for k in pristine if not torch.equal(state[k], pristine[k])] == []
    x = torch.randn(1, 5, 72, generator=torch.Generator().manual_seed(0)).to(BF16)
    layer = linear_modules(transformer)["layers.0.attn.to_q"]
    assert torch.equal(layer(x), F.linear(x, pristine["layers.0.attn.to_q.weight"]))


def test_merge_is_the_float32_sum_rounded_once(transformer, pristine, tmp_path):
    lora = _load(transformer, tmp_path, "one", 0)
    LoraPatcher(transformer).merge(lora, 0.8)
    down, up = lora_pair(transformer, TARGETS[1], 1)
    expected = (pristine[TARGETS[1] + ".weight"].float() + 0.8 * (up @ down)).to(BF16)
    assert torch.equal(linear_modules(transformer)[TARGETS[1]].weight, expected)


@pytest.mark.parametrize("multiplier", [1.0, -0.6])
def test_side_branch_adds_exactly_bf16_of_the_float32_branch(transformer, pristine, tmp_path, multiplier):
    lora = _load(transformer, tmp_path, "one", 0)
    patcher = LoraPatcher(transformer)
    assert patcher.attach(lora, multiplier) == len(TARGETS)
    x = (3 * torch.randn(2, 5, 72, generator=torch.Generator().manual_seed(1))).to(BF16)
    for path in ["layers.0.attn.to_q", "noise_refiner.0.norm1.linear"]:
        layer = linear_modules(transformer)[path]
        down, up = lora_pair(transformer, path, TARGETS.index(path))
        base = F.linear(x, layer.weight, layer.bias)
        branch = (F.linear(F.linear(x.float(), down), up) * multiplier).to(BF16)
        assert torch.equal(layer(x), base + branch), path
        assert not torch.equal(layer(x), base), path
    patcher.restore()
    assert torch.equal(
        linear_modules(transformer)[TARGETS[0]](x), F.linear(x, pristine[TARGETS[0] + ".weight"])
    )


def test_side_branch_with_multiplier_zero_is_skipped(transformer, tmp_path):
    patcher = LoraPatcher(transformer)
    assert patcher.attach(_load(transformer, tmp_path, "one", 0), 0.0) == 0
    assert not any(m._forward_hooks for m in linear_modules(transformer).values())


def test_merge_of_a_zero_b_changes_nothing(transformer, pristine, tmp_path):
    tensors = ai_toolkit_tensors(transformer)
    for key in tensors:
        if key.endswith("lora_B.weight"):
            tensors[key] = torch.zeros_like(tensors[key])
    lora = read(transformer, write(tmp_path, "zero", tensors))
    patcher = LoraPatcher(transformer)
    assert patcher.merge(lora, 1.0) == 0
    assert patcher.merge_out(lora, 1.0) == 0
    state = transformer.state_dict()
    assert all(torch.equal(state[k], pristine[k]) for k in pristine)
    assert patcher.drift() == {"max_abs": 0.0, "tensors_changed": 0}


def test_merge_then_merge_out_drifts_at_most_one_bf16_step(transformer, pristine, tmp_path):
    lora = _load(transformer, tmp_path, "one", 0)
    patcher = LoraPatcher(transformer)
    patcher.merge(lora, 1.0)
    merged = {p: linear_modules(transformer)[p].weight.clone() for p in TARGETS}
    patcher.merge_out(lora, 1.0)
    drifted = 0
    for path in TARGETS:
        before, after = pristine[path + ".weight"], linear_modules(transformer)[path].weight
        drift = (after.float() - before.float()).abs()
        # One step of the merged value's binade (= one step of the weight's own when the delta is smaller).
        step = _bf16_step(torch.maximum(before.float().abs(), merged[path].float().abs()))
        assert (drift <= step).all(), path
        drifted += int((drift > 0).sum())
    assert drifted > 0
    assert 0 < patcher.drift()["max_abs"] <= 2.0**-7
    patcher.restore()
    assert all(torch.equal(transformer.state_dict()[k], pristine[k]) for k in pristine)


def test_negative_multiplier_is_added_twice_by_merge_out(transformer, pristine, tmp_path):
    # ai-toolkit merges out with -|m|: a negative m is applied twice and never removed.
    lora = _load(transformer, tmp_path, "one", 0, targets=TARGETS[:1])
    patcher = LoraPatcher(transformer)
    patcher.merge(lora, -0.5)
    patcher.merge_out(lora, -0.5)
    down, up = lora_pair(transformer, TARGETS[0], 0)
    weight = linear_modules(transformer)[TARGETS[0]].weight.float()
    expected = pristine[TARGETS[0] + ".weight"].float() - 1.0 * (up @ down)
    assert (weight - expected).abs().max() <= 2 * _bf16_step(expected).max()
