"""OmniGen2 as a family behind ``pipelines.family``: its arch, preview rules, loader and diagnosis knobs.

Torch-free at import: the plan reads the rules; ``load`` imports the session (and torch) when called.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.family import Family, KnobFlip, LoadSpec, PreviewRules
from pipelines.omnigen2 import rules


def _load(spec: LoadSpec):
    from pipelines.omnigen2.session import load_session

    return load_session(spec)


def _check_model_dir(root: Path) -> None:
    from pipelines.omnigen2.loading import check_layout

    check_layout(root)


def _skeleton(root: Path | None):
    """The OmniGen2 transformer on the meta device, from ``root``'s transformer config or the released model's."""
    import torch

    from pipelines.common.files import read_config
    from pipelines.family import ModelDirError
    from pipelines.omnigen2.transformer import CONFIG_CLASS_NAME, OmniGen2Config, OmniGen2Transformer

    if root is None:
        config, source = OmniGen2Config(), "the real OmniGen2 architecture (OmniGen2/OmniGen2 transformer config)"
    else:
        config_file = root / "transformer" / "config.json"
        name = read_config(config_file).get("_class_name")
        if name != CONFIG_CLASS_NAME:
            raise ModelDirError(config_file, f"transformer class is {name!r}, not {CONFIG_CLASS_NAME}")
        try:
            config = OmniGen2Config.from_file(config_file)
        except (ValueError, TypeError) as exc:
            raise ModelDirError(config_file, f"not a usable transformer config ({exc})") from None
        source = f"base model {root} (transformer config)"
    try:
        with torch.device("meta"):
            return OmniGen2Transformer(config), source
    except (ValueError, TypeError) as exc:
        raise ModelDirError(root or "OmniGen2", f"transformer config does not build an OmniGen2 transformer: {exc}") from None


def _knob_flips(item, model_flags: dict) -> list[KnobFlip]:
    """The chat template applied once instead of twice: the mistake an inference script most often makes."""
    return [
        KnobFlip("negative_template_once", "negative templated once", (("negative_template_passes", 1),)),
        KnobFlip("prompt_template_once", "prompt templated once", (("prompt_template_passes", 1),)),
    ]


FAMILY = Family(
    name="omnigen2",
    label="OmniGen2",
    archs=("omnigen2",),
    rules=PreviewRules(rules.generation_size, rules.saved_size, rules.uses_negative, rules.QUIRKS),
    load=_load,
    check_model_dir=_check_model_dir,
    knob_flips=_knob_flips,
    server_profile="ai-toolkit-inference-omnigen2",
    skeleton=_skeleton,
    lora_base_versions=("omnigen2",),
    lora_key_hints=("noise_refiner", "context_refiner", "ref_image_refiner", "layers."),
    lora_target_parts=("noise_refiner", "context_refiner", "layers"),
    fast_changes="batched CFG, maskless attention, float32 rotary and (on CUDA) torch.compile",
)
