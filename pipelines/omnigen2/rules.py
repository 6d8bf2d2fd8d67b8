"""OmniGen2's preview rules that decide sizes and prompts, torch-free: the plan reads them without loading torch.

Each line of ``QUIRKS`` names one ai-toolkit behaviour the replay reproduces and where it comes from; the torch
side of each lives in ``quirks.py`` (and the LoRA rules in ``pipelines/common/lora.py``).
"""

from __future__ import annotations

# OmniGen2's pipeline caps the generated area at 1024*1024 pixels before flooring each side to 16.
MAX_PIXELS = 1024 * 1024

# ai-toolkit's OmniGen2 wrapper templates the prompt, then OmniGen2's encode_prompt templates it again.
CHAT_TEMPLATE_PASSES = 2

QUIRKS = (
    "prompt and negative chat-templated twice (ai-toolkit's OmniGen2 wrapper, then OmniGen2's encode_prompt)",
    "prompt truncated right at 256 tokens (encode_prompt max_sequence_length): a long prompt loses <|im_end|>",
    "generation size: area capped at 1 MP, each side floored to 16; decoded image resized back (bilinear) in bf16",
    "initial noise drawn in bf16 on the CPU from the global generator (torch version decides the values)",
    "denormalisation (x*0.5+0.5, clamp) in bf16 before the float32 *255 and round",
    "unconditional pass keeps the reference image latents (ai-toolkit's OmniGen2 pipeline; upstream drops them)",
    "reference image resized bilinear to the sample size, then OmniGen2's LANCZOS floor-16 preprocessing",
    "CFG only when guidance_scale > 1: uncond + g * (cond - uncond) in the model dtype",
)


def generation_size(width: int, height: int) -> tuple[int, int]:
    """The size OmniGen2 generates at: area capped at 1 MP, each side truncated to a multiple of 16."""
    ratio = min((MAX_PIXELS / (height * width)) ** 0.5, 1.0)  # the pipeline's own arithmetic, not math.sqrt
    return int(width * ratio) // 16 * 16, int(height * ratio) // 16 * 16


def saved_size(width: int, height: int) -> tuple[int, int]:
    """OmniGen2 resizes the decoded image back to the requested size: the preview has it."""
    return width, height


def uses_negative(guidance_scale: float, model_kwargs: dict) -> bool:
    """The negative prompt is encoded and used whenever CFG runs (guidance > 1)."""
    return guidance_scale > 1.0
