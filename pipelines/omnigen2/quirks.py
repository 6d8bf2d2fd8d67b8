"""Every ai-toolkit preview quirk the replay reproduces, each in one named place.

A replay that skips any of these gives a different picture from the preview. The LoRA merge quirks live with
the LoRA code (``lora.py``: fp32 merge sum cast to the model dtype, merge-out by ``-|m|``, all-zero modules
skipped, unmerged side branch in float32) and the CPU noise algorithms in ``noise.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.omnigen2.rules import CHAT_TEMPLATE_PASSES, MAX_PIXELS, generation_size

__all__ = ["CHAT_TEMPLATE_PASSES", "MAX_PIXELS", "generation_size"]  # the torch-free rules, re-exported here

SYSTEM_PROMPT = "You are a helpful assistant that generates high-quality images based on user instructions."

# encode_prompt's max_sequence_length: right truncation, so a long prompt loses its closing <|im_end|>.
MAX_PROMPT_TOKENS = 256

# ai-toolkit's unconditional pass keeps the reference latents (upstream OmniGen2 drops them).
UNCOND_KEEPS_REFERENCE = True

def chat_text(tokenizer, prompt: str, passes: int = CHAT_TEMPLATE_PASSES) -> str:
    """The text fed to the tokenizer: OmniGen2's chat template applied ``passes`` times (twice in previews)."""
    text = prompt
    for _ in range(passes):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return text


def resize_reference(image: Image.Image, width: int, height: int) -> Image.Image:
    """ai-toolkit opens ``ctrl_img`` as RGB and resizes it BILINEAR to exactly the sample's size first."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return image


def reference_pixels(image: Image.Image, max_pixels: int = MAX_PIXELS, max_side: int = 1024) -> torch.Tensor:
    """OmniGen2's reference preprocessing: fit in ``max_pixels`` and ``max_side``, floor to 16, LANCZOS, [-1, 1]."""
    width, height = image.size
    side_ratio = max_side / (height if height > width else width)
    ratio = min((max_pixels / (height * width)) ** 0.5, side_ratio, 1.0)
    new_w, new_h = int(width * ratio) // 16 * 16, int(height * ratio) // 16 * 16
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=Image.LANCZOS)
    array = np.array(image).astype(np.float32) / 255.0
    # NHWC -> NCHW as a view (channels-last strides), like diffusers' processor: the VAE convs pick their kernel by it.
    return 2.0 * torch.from_numpy(array).unsqueeze(0).permute(0, 3, 1, 2) - 1.0


def decode_to_pixels(vae, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Latents -> uint8 RGB ``[height, width, 3]`` exactly as the preview was made.

    Every op stays in the model dtype (bf16): unscale and unshift, VAE decode, bilinear resize to the requested
    size (always applied; exact when unchanged), and the [-1, 1] -> [0, 1] denormalisation with its clamp; only
    then float32, *255 and round-half-to-even. Denormalising in float32 instead changes ~22% of the pixels.
    """
    return host_image_to_pixels(decode_on_device(vae, latents, width, height).cpu())


def decode_on_device(vae, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The device part of :func:`decode_to_pixels`: the denormalised image ``[1, 3, height, width]`` in bf16."""
    latents = latents.to(vae.dtype)
    if vae.config.scaling_factor is not None:
        latents = latents / vae.config.scaling_factor
    if vae.config.shift_factor is not None:
        latents = latents + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    image = F.interpolate(image, size=(height, width), mode="bilinear")
    return (image * 0.5 + 0.5).clamp(0, 1)


def host_image_to_pixels(image: torch.Tensor) -> np.ndarray:
    """The host part of :func:`decode_to_pixels`: float32, *255, round half to even, uint8 ``[H, W, 3]``."""
    array = image.permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype("uint8")[0]


def encode_reference(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE-encode a reference image: ``latent_dist.sample()`` from the device's global RNG (seeded before)."""
    z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
    if vae.config.shift_factor is not None:
        z = z - vae.config.shift_factor
    if vae.config.scaling_factor is not None:
        z = z * vae.config.scaling_factor
    return z.to(dtype=vae.dtype)


def latent_shape(vae_scale: int, channels: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Noise shape ``(1, C, H/8, W/8)`` at the GENERATION size (after the 1 MP cap and floor-16)."""
    return (1, channels, height // vae_scale, width // vae_scale)


def seed_everything(seed: int) -> torch.Generator:
    """ai-toolkit seeds the global CPU (and CUDA) generators and draws the noise from the global CPU one."""
    generator = torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    return generator


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as three model-dtype ops: ``uncond + g * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)

