"""Every ai-toolkit FLUX.1 preview quirk the pipeline reproduces op for op, each in one named place.

``rules.QUIRKS`` lists them (with the ai-toolkit file each comes from); the schedule is in ``scheduler.py``,
the LoRA merge and hook rules in ``pipelines/common/lora.py``, the CPU noise algorithms in
``pipelines/common/noise.py``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipelines.common import noise

# toolkit/stable_diffusion_model.py encode_prompt passes max_length=512 to encode_prompts_flux, whatever the
# model (FLUX.1-schnell's own pipeline would use 256).
T5_MAX_LENGTH = 512

# FluxPipeline packs 2x2 latent patches into one token.
PACK = 2


@torch.no_grad()
def encode_clip(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    """Pooled CLIP embedding ``(1, D)`` in CLIP's dtype: tokens padded/truncated to the tokenizer's
    model_max_length (77), no attention mask; ``pooler_output`` is taken at argmax(input_ids) for configs with
    the legacy ``eos_token_id: 2`` (FLUX.1-dev's), i.e. at the highest token id (toolkit/train_tools.py
    encode_prompts_flux)."""
    ids = tokenizer(
        [prompt],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_overflowing_tokens=False,
        return_length=False,
        return_tensors="pt",
    ).input_ids
    output = text_encoder(ids.to(text_encoder.device), output_hidden_states=False)
    return output.pooler_output.to(dtype=text_encoder.dtype, device=text_encoder.device)


@torch.no_grad()
def encode_t5(tokenizer, text_encoder, prompt: str, attn_masking: bool = False) -> torch.Tensor:
    """T5 last hidden state ``(1, 512, d)`` in T5's dtype: padded/truncated to 512 tokens and encoded without an
    attention mask; with ``attn_masking`` the padded positions of the OUTPUT are multiplied by 0 (the encoder
    still attended to them; toolkit/train_tools.py encode_prompts_flux)."""
    tokens = tokenizer(
        [prompt],
        padding="max_length",
        max_length=T5_MAX_LENGTH,
        truncation=True,
        return_length=False,
        return_overflowing_tokens=False,
        return_tensors="pt",
    )
    device = text_encoder.device
    embeds = text_encoder(tokens.input_ids.to(device), output_hidden_states=False)[0]
    embeds = embeds.to(dtype=text_encoder.dtype, device=device)
    if attn_masking:
        mask = tokens["attention_mask"].unsqueeze(-1).expand(embeds.shape)
        embeds = embeds * mask.to(dtype=embeds.dtype, device=embeds.device)
    return embeds


def seed_everything(seed: int) -> torch.Generator:
    """ai-toolkit seeds the global CPU (and CUDA) generators and hands FluxPipeline the global CPU one."""
    generator = torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    return generator


def latent_grid(width: int, height: int, vae_scale: int) -> tuple[int, int]:
    """The unpacked latent ``(h, w)``: ``2 * (side // (2 * vae_scale))`` (FluxPipeline.prepare_latents)."""
    return PACK * (height // (PACK * vae_scale)), PACK * (width // (PACK * vae_scale))


def draw_noise(generator: torch.Generator, shape: tuple[int, ...], algorithm: str, dtype: torch.dtype):
    """The raw draw ``(1, C, h, w)``: ``randn_tensor`` with a CPU generator is ``torch.randn`` on the CPU, directly
    in the transformer's dtype (bf16: not a float32 draw rounded), moved to the device afterwards."""
    return noise.draw_noise(generator, shape, algorithm, dtype=dtype)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h/2 * w/2, 4C)``: each 2x2 patch becomes one token, channels-major."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for the latent grid ``(h, w)``."""
    b, _, dim = tokens.shape
    c = dim // (PACK * PACK)
    patches = tokens.view(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, h, w)


def image_ids(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rotary positions of the packed tokens, rows ``(0, row, col)``: built in float32 and cast to the
    transformer's dtype (bf16 holds every integer up to 256 exactly)."""
    ids = torch.zeros(h // PACK, w // PACK, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // PACK)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // PACK)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rotary positions of the text tokens: all zero, in the CLIP encoder's dtype (FluxPipeline.encode_prompt)."""
    return torch.zeros(length, 3).to(device=device, dtype=dtype)


def guidance_value(transformer, guidance_scale: float, device: torch.device) -> torch.Tensor | None:
    """The guidance embedding's input: ``torch.full([1], g, float32)`` for guidance-distilled models (dev),
    None for the others (schnell)."""
    if not transformer.config.guidance_embeds:
        return None
    return torch.full([1], guidance_scale, device=device, dtype=torch.float32)


def model_timestep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the transformer gets for the float32 timestep ``t``: cast to the latents' dtype, then divided by
    1000 in that dtype (the transformer multiplies by 1000 again, also in bf16)."""
    return t.expand(1).to(dtype) / 1000


def _time_text_embed_without_guidance(embed, timestep, guidance, pooled_projection):
    """CombinedTimestepGuidanceTextProjEmbeddings with the guidance term left out (``guidance`` unused)."""
    timesteps_emb = embed.timestep_embedder(embed.time_proj(timestep).to(dtype=pooled_projection.dtype))
    return timesteps_emb + embed.text_embedder(pooled_projection)


@contextlib.contextmanager
def guidance_bypassed(transformer, active: bool = True):
    """ai-toolkit's ``use_flux_cfg`` bypass of the guidance embedding (toolkit/models/flux.py
    bypass_flux_guidance): the conditioning is time + pooled text only. No-op for models without one."""
    embed = transformer.time_text_embed
    if not active or not hasattr(embed, "guidance_embedder"):
        yield
        return
    embed.forward = lambda timestep, guidance, pooled: _time_text_embed_without_guidance(
        embed, timestep, guidance, pooled
    )
    try:
        yield
    finally:
        del embed.forward


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """FluxWithCFGPipeline's combination, three ops in the model dtype: ``uncond + g * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def vae_input(vae, latents: torch.Tensor) -> torch.Tensor:
    """Unpacked latents -> the VAE's input: ``latents / scaling_factor + shift_factor`` in the latents' dtype."""
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's input -> its output image in [-1, 1] (roughly), ``(1, 3, H, W)`` in the VAE's dtype."""
    return vae.decode(latents, return_dict=False)[0]


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """VaeImageProcessor's ``(x * 0.5 + 0.5).clamp(0, 1)``, still in bf16 (in float32 it would round differently)."""
    return (image * 0.5 + 0.5).clamp(0, 1)


def host_image_to_pixels(image: torch.Tensor) -> np.ndarray:
    """VaeImageProcessor ``pt_to_numpy`` + ``numpy_to_pil``: float32, *255, round half to even, uint8 [H, W, 3]."""
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype("uint8")[0]
