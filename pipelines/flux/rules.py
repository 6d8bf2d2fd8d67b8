"""FLUX.1 preview rules, torch-free: the size the pipeline generates and saves, whether the negative prompt
matters, and the list of every ai-toolkit quirk the replay reproduces (read by the plan without torch).

The quirks themselves are implemented where they act: ``quirks.py`` (prompt encoding, noise, ids, guidance,
decode), ``scheduler.py`` (sampling schedule), ``loading.py`` (dtypes, quantisation), ``pipeline.py`` (true
CFG) and ``pipelines/common/lora.py`` (merge and hook rules).
"""

from __future__ import annotations

# FluxPipeline packs 2x2 latent patches of the /8 VAE: each side is floored to a multiple of 2 * 8.
PATCH_PIXELS = 16

# toolkit/pipelines.py FluxWithCFGPipeline.__call__: the unconditional pass runs only above this scale.
TRUE_CFG_THRESHOLD = 1.00001

QUIRKS: tuple[str, ...] = (
    "size: FluxPipeline.prepare_latents floors each side to a multiple of 16 and the preview is saved at that "
    "size, never resized back (diffusers pipeline_flux.py, called by toolkit/stable_diffusion_model.py "
    "generate_images)",
    "scheduler: not the model folder's, ai-toolkit's flux_config (dynamic shift 0.5..1.15 over 256..4096 "
    "tokens) built by toolkit/sampler.py get_sampler('flowmatch', arch='flux')",
    "noise: torch.manual_seed(seed), then randn in bf16 directly on the CPU from the global generator "
    "(toolkit/stable_diffusion_model.py generate_images -> FluxPipeline.prepare_latents)",
    "guidance: only the guidance embedding gets guidance_scale, no true CFG, the negative prompt is encoded "
    "and dropped (toolkit/stable_diffusion_model.py generate_images passes prompt_embeds only)",
    "true CFG only with model.use_flux_cfg: guidance embedding bypassed and uncond + g * (cond - uncond) "
    "above g = 1.00001 (toolkit/pipelines.py FluxWithCFGPipeline, toolkit/models/flux.py bypass_flux_guidance)",
    "CLIP: padded to 77, no attention mask, pooled output at argmax(input_ids) (toolkit/train_tools.py "
    "encode_prompts_flux)",
    "T5: padded to 512 (hard-coded max_length), no attention mask; model.attn_masking zeroes the padded "
    "positions of the output only (toolkit/train_tools.py encode_prompts_flux)",
    "attn_masking needs the legacy is_flux: true key: it is validated before arch is read (toolkit/"
    "config_modules.py ModelConfig.__init__)",
    "latents cast to the transformer dtype after every step (toolkit/stable_diffusion_model.py "
    "generate_images callback_on_step_end; absent in FluxWithCFGPipeline)",
    "decode: latents / scaling + shift, VAE and [-1, 1] -> [0, 1] clamp in bf16, then float, *255, round "
    "(FluxPipeline + VaeImageProcessor.postprocess)",
    "T5 is quantised with model.qtype, not qtype_te (toolkit/stable_diffusion_model.py load_model, is_flux "
    "branch)",
    "quantised transformer: LoRA never merged, run by forward hooks (toolkit/network_mixins.py merge_in skips "
    "quantised weights)",
)


def generation_size(width: int, height: int) -> tuple[int, int]:
    """The size FluxPipeline generates at: each side (after ai-toolkit's floor-8/min-64) floored to 16."""
    return width // PATCH_PIXELS * PATCH_PIXELS, height // PATCH_PIXELS * PATCH_PIXELS


def saved_size(width: int, height: int) -> tuple[int, int]:
    """The saved preview's size: the generation size (FLUX.1 previews are not resized back)."""
    return generation_size(width, height)


def uses_negative(guidance: float, model_kwargs: dict) -> bool:
    """Whether the negative prompt reaches the picture: only with ``use_flux_cfg`` and guidance > 1.00001."""
    return bool(model_kwargs.get("use_flux_cfg")) and guidance > TRUE_CFG_THRESHOLD
