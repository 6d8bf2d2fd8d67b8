"""Replay one FLUX.1 training preview, the way ai-toolkit sampled it.

``FluxReplayPipeline.__call__`` reads top to bottom as numbered steps: check inputs, seed, encode the prompt
(and, with true CFG, the negative prompt), draw and pack the noise, set the timesteps, denoise, decode. It runs
diffusers' own FluxTransformer2DModel and AutoencoderKL; every ai-toolkit quirk it follows is named in
``quirks.py`` and ``scheduler.py``. The LoRA is applied to the transformer beforehand (``session.py``).

With ``fast`` (``--fast``) step 6 runs ``fast.FastForward`` instead (every text of a step in one batch, fused
projections, compiled blocks on CUDA; T5 through SDPA only when asked, ``FastParts.t5_sdpa``): the last bits differ
from ai-toolkit's. Every
other step is the same, and with ``fast`` off nothing of it runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.common import noise
from pipelines.common.render import PendingPixels
from pipelines.family import RenderRequest
from pipelines.flux import quirks, rules
from pipelines.flux.fast import FastForward, FastParts, t5_attention
from pipelines.flux.loading import Components
from pipelines.flux.scheduler import euler_step, flux_schedule

# RenderRequest.options this pipeline honours (the family's KnobFlip options), with what they switch.
OPTIONS = {
    "true_cfg": "model.use_flux_cfg: FluxWithCFGPipeline (guidance embedding bypassed, negative prompt used)",
    "attn_masking": "model.attn_masking: T5's padded output positions zeroed",
    "transformer_quantized": "model.quantize: the transformer with quanto (the session picks the model)",
    "te_quantized": "model.quantize_te: T5 with quanto (the session picks the model)",
}
OUTPUT_SIZES = ("saved", "generation")  # the same for FLUX.1: previews are saved at the generation size
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed accepts


@dataclass
class TextEncoding:
    """One prompt's embeddings in the transformer's dtype: T5 ``(1, 512, d)`` and pooled CLIP ``(1, D)``."""

    text: str
    embeds: torch.Tensor
    pooled: torch.Tensor


@dataclass
class FluxOutput:
    """A replay and its intermediates (all small next to the transformer; kept for checks)."""

    pending: PendingPixels
    generation_size: tuple[int, int]  # (width, height)
    noise: torch.Tensor  # the raw draw (1, C, h, w), on the CPU
    packed_latents: torch.Tensor  # (1, h/2 * w/2, 4C): the transformer's first input
    cond: TextEncoding
    uncond: TextEncoding | None  # only with true CFG above 1.00001
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    vae_input: torch.Tensor | None = None  # unpacked, / scaling + shift
    vae_output: torch.Tensor | None = None  # before the [0, 1] denormalisation
    extras: dict = field(default_factory=dict)

    @property
    def pixels(self) -> np.ndarray:
        return self.pending.wait()


class FluxReplayPipeline:
    """Text-to-image replays on loaded ``Components``.

    ``true_cfg`` and ``attn_masking`` are the job's ``model.use_flux_cfg`` / ``model.attn_masking``; a request's
    options of the same names override them (diagnosis). ``fast``: ``--fast`` (can be switched on the same
    pipeline: off gives the exact replay bit for bit); ``fast_parts``: which of its speed-ups run.
    """

    def __init__(self, components: Components, true_cfg: bool = False, attn_masking: bool = False,
                 fast: bool = False, fast_parts: FastParts | None = None):
        self.c = components
        self.true_cfg = bool(true_cfg)
        self.attn_masking = bool(attn_masking)
        self.fast = bool(fast)
        self.fast_parts = fast_parts or FastParts()
        self.fast_forward = FastForward()
        self._text_cache: dict[tuple, TextEncoding] = {}

    def check_inputs(self, r: RenderRequest) -> None:
        """Raise ValueError naming the first argument that cannot be replayed, and what is allowed."""
        if not isinstance(r.prompt, str) or not isinstance(r.negative_prompt, str):
            raise ValueError("prompt and negative_prompt must be strings")
        gen_w, gen_h = rules.generation_size(r.width, r.height)
        if gen_w < rules.PATCH_PIXELS or gen_h < rules.PATCH_PIXELS:
            raise ValueError(
                f"width and height must each give at least one {rules.PATCH_PIXELS}-pixel patch (>= 16), "
                f"got {r.width}x{r.height}"
            )
        if not isinstance(r.num_inference_steps, int) or r.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {r.num_inference_steps!r}")
        if not math.isfinite(r.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {r.guidance_scale!r}")
        if not isinstance(r.seed, int) or not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1], got {r.seed!r}")
        if r.noise_algorithm not in noise.ALGORITHMS:
            raise ValueError(f"noise_algorithm must be one of {', '.join(noise.ALGORITHMS)}, got {r.noise_algorithm!r}")
        if r.output_size not in OUTPUT_SIZES:
            raise ValueError(f"output_size must be one of {', '.join(OUTPUT_SIZES)}, got {r.output_size!r}")
        unknown = sorted(set(dict(r.options)) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; FLUX.1 replays take {', '.join(OPTIONS)}")

    @torch.no_grad()
    def encode_prompt(self, prompt: str, attn_masking: bool, t5_sdpa: bool = False) -> TextEncoding:
        """Prompt -> T5 and pooled CLIP embeddings cast to the transformer's dtype. Cached per text encoder (a
        quantised T5 is another object), masking and T5 attention: the encoding does not depend on the LoRA.
        ``t5_sdpa`` (``--fast``): T5's attention through SDPA, not the eager attention ai-toolkit's ran."""
        c = self.c
        key = (prompt, attn_masking, id(c.text_encoder), id(c.text_encoder_2), t5_sdpa)
        if key not in self._text_cache:
            pooled = quirks.encode_clip(c.tokenizer, c.text_encoder, prompt)
            with t5_attention(c.text_encoder_2, "sdpa") if t5_sdpa else contextlib.nullcontext():
                embeds = quirks.encode_t5(c.tokenizer_2, c.text_encoder_2, prompt, attn_masking)
            # generate_images casts both to the transformer's dtype before the pipeline call
            self._text_cache[key] = TextEncoding(prompt, embeds.to(c.device, c.dtype), pooled.to(c.device, c.dtype))
        return self._text_cache[key]

    def _denoise_fast(self, parts: FastParts, latents, timesteps, sigmas, cond, uncond, txt_ids, img_ids, guidance,
                      guidance_scale: float, true_cfg: bool) -> torch.Tensor:
        """Step 6 with ``--fast``: the same schedule, Euler steps and CFG combination on ``FastForward``'s
        velocities, the prompt and the negative in one batch (``parts.batch_cfg``) or one after the other."""
        c, forward = self.c, self.fast_forward
        prepared = forward.prepare(c.transformer, parts, txt_ids, img_ids)
        texts = [cond] if uncond is None else [cond, uncond]
        groups = [texts] if parts.batch_cfg else [[text] for text in texts]
        inputs = [(torch.cat([t.pooled for t in g]), torch.cat([t.embeds for t in g])) for g in groups]
        for i, t in enumerate(timesteps):
            timestep = quirks.model_timestep(t, latents.dtype)
            v = torch.cat([forward.velocities(prepared, latents, timestep, guidance, pooled, embeds)
                           for pooled, embeds in inputs])
            v = v[:1] if uncond is None else quirks.true_cfg(v[:1], v[1:2], guidance_scale)
            latents = euler_step(v, latents, sigmas[i], sigmas[i + 1])
            if not true_cfg:
                latents = latents.to(c.dtype)
        return latents

    def initial_noise(self, r: RenderRequest, algorithm: str | None = None) -> torch.Tensor:
        """Seed as ai-toolkit does and draw the raw noise ``(1, C, h, w)`` on the CPU with ``algorithm``."""
        c = self.c
        generator = quirks.seed_everything(r.seed)
        h, w = quirks.latent_grid(r.width, r.height, c.vae_scale)
        shape = (1, c.transformer.config.in_channels // (quirks.PACK * quirks.PACK), h, w)
        return quirks.draw_noise(generator, shape, algorithm or r.noise_algorithm, c.dtype)

    @torch.no_grad()
    def __call__(self, r: RenderRequest, deferred: bool = False) -> FluxOutput:
        """Replay ``r`` on the transformer's current weights. ``deferred``: return once the decode is queued
        (``output.pending``); otherwise the pixels are on the host when this returns."""
        c = self.c
        # 1. check inputs; FLUX.1 generates (and saves) at each side floored to 16
        self.check_inputs(r)
        gen_w, gen_h = rules.generation_size(r.width, r.height)
        true_cfg = bool(r.option("true_cfg", self.true_cfg))
        attn_masking = bool(r.option("attn_masking", self.attn_masking))
        use_negative = true_cfg and r.guidance_scale > rules.TRUE_CFG_THRESHOLD
        fast = self.fast_parts if self.fast else None
        t5_sdpa = fast is not None and fast.t5_sdpa

        # 2. seed the global generators and draw the noise from the global CPU one (nothing else draws first:
        #    prompt encoding takes no random numbers); reference images are ignored, as plain FLUX.1 ignores them
        raw_noise = self.initial_noise(r)

        # 3. prompt, and the negative prompt only where it reaches the picture (ai-toolkit encodes it always)
        cond = self.encode_prompt(r.prompt, attn_masking, t5_sdpa)
        uncond = self.encode_prompt(r.negative_prompt, attn_masking, t5_sdpa) if use_negative else None

        # 4. pack the noise into 2x2-patch tokens, with their rotary positions and the text's
        h, w = raw_noise.shape[-2:]
        latents = quirks.pack_latents(raw_noise).to(c.device)
        packed = latents
        img_ids = quirks.image_ids(h, w, c.dtype, c.device)
        txt_ids = quirks.text_ids(cond.embeds.shape[1], c.text_encoder.dtype, c.device)
        guidance = quirks.guidance_value(c.transformer, r.guidance_scale, c.device)

        # 5. timesteps: FLUX.1's dynamic shift for this many tokens
        timesteps, sigmas = flux_schedule(r.num_inference_steps, latents.shape[1], c.device)

        # 6. denoise: one conditional pass per step, and with true CFG an unconditional one (--fast: both in one
        #    batch through FastForward)
        def velocity(x: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
            return c.transformer(
                hidden_states=x,
                timestep=quirks.model_timestep(t, x.dtype),
                guidance=guidance,
                pooled_projections=text.pooled,
                encoder_hidden_states=text.embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

        with quirks.guidance_bypassed(c.transformer, active=true_cfg):
            if fast is not None:
                latents = self._denoise_fast(fast, latents, timesteps, sigmas, cond, uncond, txt_ids, img_ids,
                                             guidance, r.guidance_scale, true_cfg)
            else:
                for i, t in enumerate(timesteps):
                    v = velocity(latents, t, cond)
                    if uncond is not None:
                        v = quirks.true_cfg(v, velocity(latents, t, uncond), r.guidance_scale)
                    latents = euler_step(v, latents, sigmas[i], sigmas[i + 1])
                    if not true_cfg:
                        # generate_images' callback_on_step_end (the plain pipeline only); the step already
                        # returns the velocity's dtype, so it changes nothing unless the two dtypes differ
                        latents = latents.to(c.dtype)

        # 7. decode at the generation size and denormalise in bf16; float, *255 and round on the host
        vae_in = quirks.vae_input(c.vae, quirks.unpack_latents(latents, h, w))
        decoded = quirks.decode(c.vae, vae_in)
        output = FluxOutput(
            pending=PendingPixels(quirks.denormalize(decoded), quirks.host_image_to_pixels),
            generation_size=(gen_w, gen_h),
            noise=raw_noise,
            packed_latents=packed,
            cond=cond,
            uncond=uncond,
            timesteps=timesteps,
            sigmas=sigmas,
            vae_input=vae_in,
            vae_output=decoded,
        )
        if not deferred:
            output.pending.wait()
        return output
