"""The FLUX.1 family as the harness sees it (torch-free at import: the plan reads the rules without torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.common import files
from pipelines.family import Family, KnobFlip, LoadSpec, ModelDirError, PreviewRules, Session
from pipelines.flux import rules

TRANSFORMER_CLASS = "FluxTransformer2DModel"
WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# black-forest-labs/FLUX.1-dev transformer/config.json: what a LoRA is checked against without a model folder.
FLUX1_DEV_CONFIG: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


def safetensors_weights(folder: Path) -> list[Path]:
    """The folder's safetensors files (one or shards); ModelDirError for pickle-only or empty folders."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelDirError(pickles[0], "pickle checkpoint: parity loads safetensors only (convert it first)")
    raise ModelDirError(folder, "no safetensors weights found")


def transformer_config(root: Path) -> dict[str, Any]:
    """``transformer/config.json`` of ``root``, checked to be a FluxTransformer2DModel."""
    return files.transformer_config(root, TRANSFORMER_CLASS, "not a FLUX.1 model")


def check_model_dir(root: Path) -> None:
    """Raise ModelDirError (one line) unless ``root`` is a diffusers-layout FLUX.1 folder with safetensors
    weights for the transformer, VAE, CLIP and T5, and both tokenizers."""
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(root, "model folder not found", missing=True)
    expected = ", ".join(WEIGHT_FOLDERS + TOKENIZER_FOLDERS)
    for sub in WEIGHT_FOLDERS + TOKENIZER_FOLDERS:
        if not (root / sub).is_dir():
            raise ModelDirError(root / sub, f"missing subfolder '{sub}' (a FLUX.1 folder has {expected})")
    transformer_config(root)
    for sub in WEIGHT_FOLDERS:
        safetensors_weights(root / sub)
    for sub in TOKENIZER_FOLDERS:
        if not any((root / sub).iterdir()):
            raise ModelDirError(root / sub, "empty tokenizer folder")


def knob_flips(item: Any, model_flags: dict | None = None) -> list[KnobFlip]:
    """FLUX.1 settings a preview may have been made with that the job's config does not say plainly.

    With ``model_flags`` (the job's model: flags, ``ReplayPlan.model_flags``) only the opposite of each setting is
    offered, else both ways. Options read by the pipeline: ``true_cfg``, ``attn_masking``.
    """
    model_kwargs = model_flags
    flips = []
    for key, on, off in (("use_flux_cfg", _TRUE_CFG_ON, _TRUE_CFG_OFF), ("attn_masking", _MASK_ON, _MASK_OFF)):
        if isinstance(model_kwargs, dict):
            flips.append(off if model_kwargs.get(key) else on)
        else:
            flips.extend((on, off))
    return flips


_TRUE_CFG_ON = KnobFlip("flux_true_cfg_on", "true CFG on (model.use_flux_cfg)", (("true_cfg", True),))
_TRUE_CFG_OFF = KnobFlip("flux_true_cfg_off", "true CFG off (guidance embedding only)", (("true_cfg", False),))
_MASK_ON = KnobFlip("flux_attn_masking_on", "T5 padding zeroed (model.attn_masking)", (("attn_masking", True),))
_MASK_OFF = KnobFlip("flux_attn_masking_off", "T5 padding kept (no attn_masking)", (("attn_masking", False),))


def skeleton(root: Path | None):
    """The FLUX.1 transformer on the meta device (no weights read), from ``root``'s transformer config or, when
    ``root`` is None, FLUX.1-dev's (19 double + 38 single blocks, 3072 wide); and what it was built from."""
    config = FLUX1_DEV_CONFIG if root is None else transformer_config(Path(root))
    import torch
    from diffusers import FluxTransformer2DModel

    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**fields)
    except (TypeError, ValueError) as exc:
        where = "FLUX.1-dev config" if root is None else Path(root) / "transformer" / "config.json"
        raise ModelDirError(where, f"cannot build the transformer ({exc})") from None
    source = ("the real FLUX.1-dev architecture (black-forest-labs/FLUX.1-dev transformer config)" if root is None
              else f"base model {root} (transformer config)")
    return model, source


def lora_targets(root: Path | None) -> list[str]:
    """Every Linear module path of the FLUX.1 transformer (:func:`skeleton`'s)."""
    import torch

    return [name for name, module in skeleton(root)[0].named_modules() if isinstance(module, torch.nn.Linear)]


def _convert(tensors):
    from pipelines.flux.lora_keys import convert

    return convert(tensors)


def _load(spec: LoadSpec) -> Session:
    from pipelines.flux.session import load_session

    return load_session(spec)


FAMILY = Family(
    name="flux",
    label="FLUX.1",
    archs=("flux",),
    rules=PreviewRules(
        generation_size=rules.generation_size,
        saved_size=rules.saved_size,
        uses_negative=rules.uses_negative,
        quirks=rules.QUIRKS,
    ),
    load=_load,
    check_model_dir=check_model_dir,
    knob_flips=knob_flips,
    server_profile="ai-toolkit-inference-flux_dev",  # src/pipelines/flux_dev.py (parity/server.py)
    skeleton=skeleton,
    lora_convert=_convert,
    lora_base_versions=("flux.1", "flux", "flux.1-dev", "flux.1-schnell", "flux1"),
    lora_key_hints=("double_blocks", "single_blocks", "single_transformer_blocks", "add_q_proj", "ff_context",
                    "img_attn", "txt_attn"),
    lora_target_parts=("transformer_blocks", "single_transformer_blocks"),
    fast_changes="true CFG's prompt and negative in one batch, fused q/k/v projections and (on CUDA) torch.compile",
)
