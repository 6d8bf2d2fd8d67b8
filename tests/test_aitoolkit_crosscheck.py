"""Cross-check against ai-toolkit's own OmniGen2 code: same tiny weights and inputs, identical tensors.

Skipped unless ``AI_TOOLKIT_PATH`` points at an ai-toolkit checkout. Nothing of ai-toolkit is copied here: its
OmniGen2 modules (``extensions_built_in/diffusion_models/omnigen2/src``) are imported at run time, without the
rest of ai-toolkit. They use relative imports up to a package named ``src`` inside another package, so the test
makes a throwaway package ``aitkog2`` whose ``src`` is a link to that folder.

    AI_TOOLKIT_PATH=/path/to/ai-toolkit pytest tests/test_aitoolkit_crosscheck.py
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import ORACLE_DIR
from pipelines.omnigen2 import denoise
from pipelines.omnigen2.loading import load_components
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest

AITK_PATH = os.environ.get("AI_TOOLKIT_PATH")
OG2_SRC = Path(AITK_PATH or ".") / "extensions_built_in" / "diffusion_models" / "omnigen2" / "src"
TINY = ORACLE_DIR / "tiny_omnigen2"
BF16 = torch.bfloat16

pytestmark = pytest.mark.skipif(
    not AITK_PATH or not OG2_SRC.is_dir(),
    reason="set AI_TOOLKIT_PATH to an ai-toolkit checkout (with extensions_built_in/diffusion_models/omnigen2/src)",
)

MODULES = {
    "transformer": "aitkog2.src.models.transformers.transformer_omnigen2",
    "pipeline": "aitkog2.src.pipelines.omnigen2.pipeline_omnigen2",
    "scheduler": "aitkog2.src.schedulers.scheduling_flow_match_euler_discrete",
    "rope": "aitkog2.src.models.transformers.repo",
}


@pytest.fixture(scope="module")
def aitk(tmp_path_factory):
    """ai-toolkit's OmniGen2 modules, imported from the checkout through a temporary parent package."""
    pytest.importorskip("einops", reason="ai-toolkit's OmniGen2 code needs einops")
    root = tmp_path_factory.mktemp("aitk_import")
    package = root / "aitkog2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "src").symlink_to(OG2_SRC.resolve(), target_is_directory=True)
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            # "Cannot import triton / flash_attn": the fallbacks are what a CPU preview runs.
            warnings.simplefilter("ignore", UserWarning)
            modules = {name: importlib.import_module(path) for name, path in MODULES.items()}
        yield types.SimpleNamespace(
            Transformer=modules["transformer"].OmniGen2Transformer2DModel,
            Pipeline=modules["pipeline"].OmniGen2Pipeline,
            Scheduler=modules["scheduler"].FlowMatchEulerDiscreteScheduler,
            RotaryPosEmbed=modules["rope"].OmniGen2RotaryPosEmbed,
        )
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "aitkog2" or m.startswith("aitkog2.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def ours():
    return OmniGen2Pipeline(load_components(TINY, dtype=BF16, device="cpu"))


class TokenizerOnlyProcessor:
    """Text-to-image needs only the processor's tokenizer (the Qwen2.5-VL processor class needs torchvision)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


@pytest.fixture(scope="module")
def theirs(aitk, ours):
    """ai-toolkit's pipeline on the same checkpoint, loaded the way its OmniGen2 wrapper loads it."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2_5_VLForConditionalGeneration

    transformer = aitk.Transformer.from_pretrained(TINY, subfolder="transformer", torch_dtype=BF16)
    vae = AutoencoderKL.from_pretrained(TINY, subfolder="vae", torch_dtype=BF16)
    mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(TINY, subfolder="mllm", torch_dtype=BF16)
    pipeline = aitk.Pipeline(
        transformer=transformer.to("cpu", dtype=BF16).eval(),
        vae=vae.to("cpu", dtype=BF16).eval(),
        scheduler=aitk.Scheduler(dynamic_time_shift=True, num_train_timesteps=1000),
        mllm=mllm.to("cpu", dtype=BF16).eval(),
        processor=TokenizerOnlyProcessor(ours.c.tokenizer),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def their_prompt_embeds(pipeline, prompt: str):
    """ai-toolkit's ``get_prompt_embeds``: template once, then ``encode_prompt`` templates again; cast to bf16."""
    templated = pipeline._apply_chat_template(prompt)
    embeds, mask, _, _ = pipeline.encode_prompt(
        prompt=[templated],
        do_classifier_free_guidance=False,
        device=torch.device("cpu"),
        max_sequence_length=256,
    )
    return embeds.to(BF16), mask.to(BF16)


@pytest.mark.parametrize(
    "prompt",
    ["a photo of a cat", "", "sks dog wearing a blue hat in the snow " * 30],
    ids=["short", "empty", "truncated"],
)
def test_prompt_encoding_equals_ai_toolkits_double_template(ours, theirs, prompt):
    embeds, mask = their_prompt_embeds(theirs, prompt)
    encoding = ours.encode_text(prompt)
    assert embeds.shape == encoding.embeds.shape
    assert torch.equal(embeds, encoding.embeds)
    assert torch.equal(mask, encoding.mask)


@pytest.mark.parametrize(
    ("prompt", "latent_hw", "ref_hw", "t"),
    [
        ("a photo of a cat", (8, 8), None, 0.0),
        ("a photo of a cat", (10, 8), None, 0.625),
        ("blurry", (6, 14), None, 0.9375),
        ("sks dog wearing a blue hat in the snow " * 4, (8, 12), None, 0.3),
        ("a photo of a cat", (8, 8), (8, 8), 0.5),
        ("a watercolor painting", (10, 8), (6, 12), 0.2),
    ],
    ids=["8x8", "10x8", "6x14", "long-text", "ref-8x8", "ref-6x12"],
)
def test_transformer_output_equals_ai_toolkits_bit_for_bit(aitk, ours, theirs, prompt, latent_hw, ref_hw, t):
    generator = torch.Generator().manual_seed(sum(latent_hw) + len(prompt))
    latent = torch.randn(1, 16, *latent_hw, generator=generator).to(BF16)
    refs = [torch.randn(16, *ref_hw, generator=generator).to(BF16)] if ref_hw else []
    timestep = torch.tensor([t]).to(BF16)
    text = ours.encode_text(prompt)
    config = theirs.transformer.config
    freqs_cis = aitk.RotaryPosEmbed.get_freqs_cis(config.axes_dim_rope, config.axes_lens, theta=10000)
    with torch.no_grad():
        expected = theirs.transformer(
            latent, timestep, text.embeds, freqs_cis, text.mask, ref_image_hidden_states=[refs or None]
        )
        actual = ours.c.transformer(latent, timestep, text.embeds, text.mask, refs)
    assert actual.dtype == expected.dtype == BF16
    assert actual.abs().sum() > 0
    assert torch.equal(actual, expected)


def _record_outputs(monkeypatch, owner, attribute: str, sink: list) -> None:
    """Wrap ``owner.attribute`` so that every tensor it returns (first of a tuple) is appended to ``sink``."""
    original = getattr(owner, attribute)

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        sink.append((out[0] if isinstance(out, tuple) else out).clone())
        return out

    monkeypatch.setattr(owner, attribute, recording)


def _reference_image() -> Image.Image:
    rows = np.linspace(0, 255, 50, dtype=np.float32)[:, None]
    cols = np.linspace(255, 0, 70, dtype=np.float32)[None, :]
    rgb = np.stack([rows + 0 * cols, 0 * rows + cols, (rows + cols) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


REQUESTS = [
    pytest.param(
        ReplayRequest("a photo of a cat", "", seed=0, width=64, height=64, num_inference_steps=4, guidance_scale=3.0),
        id="64x64-cfg3",
    ),
    pytest.param(
        ReplayRequest("sks dog", "blurry", seed=42, width=72, height=88, num_inference_steps=3, guidance_scale=2.5),
        id="72x88-negative",
    ),
    pytest.param(
        ReplayRequest("a lake", "", seed=7, width=96, height=64, num_inference_steps=3, guidance_scale=1.0),
        id="96x64-no-cfg",
    ),
    pytest.param(
        ReplayRequest(
            "a watercolor painting", "", seed=1234, width=64, height=80, num_inference_steps=3, guidance_scale=2.0,
            reference_images=(_reference_image(),),
        ),
        id="64x80-reference",
    ),
]  # fmt: skip


@pytest.mark.parametrize("request_", REQUESTS)
def test_denoising_latents_and_image_equal_ai_toolkits_at_every_step(monkeypatch, ours, theirs, request_):
    r = request_
    their_steps, our_steps, their_noise = [], [], []
    _record_outputs(monkeypatch, theirs.scheduler, "step", their_steps)
    _record_outputs(monkeypatch, denoise, "euler_step", our_steps)  # our loop's Euler step (denoise.py)
    _record_outputs(monkeypatch, theirs, "prepare_latents", their_noise)

    cond, uncond = ours.encode_text(r.prompt), ours.encode_text(r.negative_prompt)
    input_images = []
    for image in r.reference_images[:1]:
        # ai-toolkit's OmniGen2 wrapper: RGB, resized bilinear to exactly the sample size.
        image = image.convert("RGB")
        if image.size != (r.width, r.height):
            image = image.resize((r.width, r.height), Image.BILINEAR)
        input_images.append(image)
    expected = theirs(
        prompt_embeds=cond.embeds,
        prompt_attention_mask=cond.mask,
        negative_prompt_embeds=uncond.embeds,
        negative_prompt_attention_mask=uncond.mask,
        height=r.height,
        width=r.width,
        num_inference_steps=r.num_inference_steps,
        text_guidance_scale=r.guidance_scale,
        image_guidance_scale=1.0,
        align_res=False,
        generator=torch.manual_seed(r.seed),
        input_images=input_images,
    ).images[0]

    actual = ours(r)

    assert torch.equal(actual.initial_latents, their_noise[0])
    assert len(our_steps) == len(their_steps) == r.num_inference_steps
    for i, (a, b) in enumerate(zip(our_steps, their_steps, strict=True)):
        assert torch.equal(a, b), f"latents differ after step {i}"
    assert expected.size == (r.width, r.height)
    assert np.array_equal(actual.pixels, np.asarray(expected))
