"""Replay one OmniGen2 training preview, the way ai-toolkit sampled it.

``OmniGen2Pipeline.__call__`` reads top to bottom as numbered steps: check inputs, seed, encode the prompt and
the negative prompt, encode the reference image, draw the noise, set the timesteps, denoise, decode. The quirks
it follows are named in ``quirks.py``; the LoRA is applied to the transformer beforehand (``lora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from pipelines.common import noise
from pipelines.common.render import PendingPixels
from pipelines.omnigen2 import quirks
from pipelines.omnigen2.denoise import StepGraphs, denoise
from pipelines.omnigen2.loading import Components
from pipelines.omnigen2.transformer import text_length


@dataclass(frozen=True)
class ReplayRequest:
    """What one preview was made with. ``width``/``height`` are the requested size after ai-toolkit's floor-to-8."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    reference_images: tuple[Image.Image, ...] = ()
    chat_template_passes: int = quirks.CHAT_TEMPLATE_PASSES
    negative_chat_template_passes: int = quirks.CHAT_TEMPLATE_PASSES
    noise_algorithm: str = "native"


@dataclass
class TextEncoding:
    text: str
    embeds: torch.Tensor
    mask: torch.Tensor
    length: int | None = None  # valid tokens (the mask's sum), read once per encoding

    def valid_length(self) -> int:
        if self.length is None:
            self.length = text_length(self.mask)
        return self.length


@dataclass
class ReplayOutput:
    pixels: np.ndarray | None  # None when deferred: see ``pending``
    generation_size: tuple[int, int]
    initial_latents: torch.Tensor
    cond: TextEncoding
    uncond: TextEncoding | None
    final_latents: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    pending: PendingPixels | None = None


class OmniGen2Pipeline:
    """Text-to-image (and one reference image) replays on loaded ``Components``."""

    def __init__(self, components: Components, fast: bool = False, cuda_graphs: bool | None = None):
        """``fast``: batched CFG, maskless attention, real rotary (last bits differ from ai-toolkit's).
        ``cuda_graphs``: capture each denoising step as a CUDA graph (default: on CUDA devices)."""
        self.c = components
        self.vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self._text_cache: dict[tuple[str, int, int], TextEncoding] = {}
        self.fast = fast
        if cuda_graphs is None:
            cuda_graphs = torch.device(components.device).type == "cuda"
        self.graphs = StepGraphs() if cuda_graphs else None

    def check_inputs(self, r: ReplayRequest) -> None:
        if r.width < 16 or r.height < 16:
            raise ValueError(f"width and height must be >= 16, got {r.width}x{r.height}")
        if r.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {r.num_inference_steps}")
        if r.noise_algorithm not in noise.ALGORITHMS:
            raise ValueError(f"noise_algorithm must be one of {', '.join(noise.ALGORITHMS)}, got {r.noise_algorithm!r}")

    @torch.no_grad()
    def encode_text(self, prompt: str, passes: int = quirks.CHAT_TEMPLATE_PASSES) -> TextEncoding:
        """Prompt -> (last hidden states, mask), both in the model dtype. Cached per text encoder (a quantised one
        is another object): the encoding does not depend on the LoRA."""
        key = (prompt, passes, id(self.c.mllm))
        if key not in self._text_cache:
            text = quirks.chat_text(self.c.tokenizer, prompt, passes)
            tokens = self.c.tokenizer(
                [text], padding="longest", max_length=quirks.MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt"
            )
            ids = tokens.input_ids.to(self.c.device)
            mask = tokens.attention_mask.to(self.c.device)
            hidden = self.c.mllm(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            # ai-toolkit casts the embeddings AND the mask to the model dtype before the transformer.
            encoding = TextEncoding(text, hidden.to(self.c.dtype), mask.to(self.c.dtype))
            encoding.valid_length()  # the one host sync per encoding
            self._text_cache[key] = encoding
        return self._text_cache[key]

    @torch.no_grad()
    def __call__(self, r: ReplayRequest, latents: torch.Tensor | None = None, deferred: bool = False) -> ReplayOutput:
        """Replay ``r``; ``latents`` replaces the drawn initial noise when given (same shape). ``deferred``: return
        as soon as the decode is queued, with ``pending`` instead of ``pixels``."""
        c = self.c
        # 1. check inputs; the generation size is the 1 MP-capped, floor-16 size
        self.check_inputs(r)
        gen_w, gen_h = quirks.generation_size(r.width, r.height)

        # 2. seed the global generators, as ai-toolkit does before every preview
        generator = quirks.seed_everything(r.seed)

        # 3. prompt and negative prompt, encoded separately (batch 1 each)
        use_cfg = r.guidance_scale > 1.0
        cond = self.encode_text(r.prompt, r.chat_template_passes)
        uncond = self.encode_text(r.negative_prompt, r.negative_chat_template_passes) if use_cfg else None

        # 4. reference image: resized, VAE-sampled from the global RNG just before the noise
        refs = []
        for image in r.reference_images[:1]:
            pixels = quirks.reference_pixels(quirks.resize_reference(image, r.width, r.height))
            refs.append(quirks.encode_reference(c.vae, pixels)[0])

        # 5. initial noise, drawn on the CPU in the model dtype at the generation size
        shape = quirks.latent_shape(self.vae_scale, c.transformer.config.in_channels, gen_w, gen_h)
        if latents is None:
            latents = noise.draw_noise(generator, shape, r.noise_algorithm, dtype=c.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"injected latents have shape {tuple(latents.shape)}, expected {shape}")
        initial = latents.clone()
        latents = latents.to(c.device, c.dtype)

        # 6. timesteps with the dynamic shift for this latent size
        scheduler = c.scheduler()
        scheduler.set_timesteps(r.num_inference_steps, shape[-2] * shape[-1], device=c.device)

        # 7. denoise: a conditional and (with CFG) an unconditional pass per step (denoise.py). The caption
        #    embedder and context refiner see the text alone: computed once here, not at every step.
        uncond_refs = refs if quirks.UNCOND_KEEPS_REFERENCE else []
        texts = [c.transformer.prepare_text(cond.embeds, cond.mask, cond.valid_length())]
        ref_lists = [refs]
        if use_cfg:
            texts.append(c.transformer.prepare_text(uncond.embeds, uncond.mask, uncond.valid_length()))
            ref_lists.append(uncond_refs)
        latents = denoise(
            c.transformer, latents, scheduler.grid, texts, ref_lists, r.guidance_scale, self.fast, self.graphs
        ).to(c.dtype)

        # 8. decode and resize back to the requested size
        image = quirks.decode_on_device(c.vae, latents, r.width, r.height)
        if deferred:
            return ReplayOutput(None, (gen_w, gen_h), initial, cond, uncond, final_latents=latents,
                                pending=PendingPixels(image, quirks.host_image_to_pixels))
        pixels = quirks.host_image_to_pixels(image.cpu())
        return ReplayOutput(pixels, (gen_w, gen_h), initial, cond, uncond, final_latents=latents)
