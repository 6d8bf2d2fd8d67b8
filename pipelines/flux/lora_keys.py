"""FLUX.1 LoRA key formats -> module paths of diffusers' FluxTransformer2DModel.

Formats read (``convert`` is the ``convert=`` hook of ``pipelines.common.lora.read_lora``):

- ai-toolkit / diffusers: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``: already diffusers paths;
- peft: ``base_model.model.<module>.lora_A.weight``: idem (read_lora strips the prefix);
- kohya / ComfyUI: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``.alpha``:
  Black Forest Labs' original module names with the dots flattened;
- BFL original: ``double_blocks.0.img_attn.qkv.lora_A.weight``, optionally behind ``diffusion_model.``,
  ``model.diffusion_model.`` or ``transformer.``.

The original layout fuses what diffusers keeps apart: ``img_attn.qkv`` (and ``txt_attn.qkv``) is one Linear for
to_q/to_k/to_v, a single block's ``linear1`` is to_q/to_k/to_v/proj_mlp. A LoRA on a fused Linear becomes one
LoRA per part with the same down (A) and the up (B) rows of that part: ``B_part @ A`` is exactly that part's
rows of ``B @ A``. ``.alpha`` goes with every part (the rank is unchanged, so scale = alpha / rank holds).
``final_layer.adaLN_modulation.1`` outputs (shift, scale) where diffusers' ``norm_out.linear`` outputs (scale,
shift): the up rows' halves are swapped. Names checked against diffusers' ``_convert_kohya_flux_lora_to_diffusers``.
"""

from __future__ import annotations

import re

import torch

KOHYA_PREFIX = "lora_unet_"
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}

# Original module inside double_blocks.N -> its diffusers module(s) inside transformer_blocks.N.
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
# Original module inside single_blocks.N -> diffusers module(s) inside single_transformer_blocks.N.
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
# Modules outside the blocks.
TOP_LEVEL = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}

_BLOCK = re.compile(r"^(double_blocks|single_blocks)[._](\d+)[._](.+)$")
_BLOCK_TABLES = {"double_blocks": ("transformer_blocks", DOUBLE_BLOCK), "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK)}


def _flat(name: str) -> str:
    return name.replace(".", "_")


_FLAT_LEAVES = {
    table_name: {_flat(leaf): leaf for leaf in table} for table_name, (_, table) in _BLOCK_TABLES.items()
}
_FLAT_TOP = {_flat(name): name for name in TOP_LEVEL}


def original_targets(name: str, flattened: bool) -> tuple[str, tuple[str, ...]] | None:
    """(original module name, its diffusers module paths) for an original-layout module name (dotted, or with
    ``flattened`` dots as kohya writes it), None for any other name."""
    match = _BLOCK.match(name)
    if match:
        kind, index, leaf = match.groups()
        if flattened:
            leaf = _FLAT_LEAVES[kind].get(leaf)
        prefix, table = _BLOCK_TABLES[kind]
        if leaf not in table:
            return None
        return f"{kind}.{index}.{leaf}", tuple(f"{prefix}.{index}.{part}" for part in table[leaf])
    top = _FLAT_TOP.get(name) if flattened else name
    if top in TOP_LEVEL:
        return top, TOP_LEVEL[top]
    return None


def _split_suffix(key: str) -> tuple[str, str, str] | None:
    """(stem, part, suffix) of a LoRA key: part is down, up or alpha."""
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part, suffix
    return None


def _parse(key: str) -> tuple[str, str, str, str] | None:
    """(style, original module name, part, suffix) of an original-layout key, else None."""
    split = _split_suffix(key)
    if split is None:
        return None
    stem, part, suffix = split
    if stem.startswith(KOHYA_PREFIX):
        return "kohya", stem[len(KOHYA_PREFIX) :], part, suffix
    for prefix in ORIGINAL_PREFIXES:
        if stem.startswith(prefix) and original_targets(stem[len(prefix) :], flattened=False) is not None:
            return "original", stem[len(prefix) :], part, suffix
    return None


def _row_sizes(original: str, rows: int, in_features: int, parts: int) -> list[int] | None:
    """How the fused Linear's output rows split between its diffusers parts (None: they cannot)."""
    if parts == 1:
        return [rows]
    if original.endswith("linear1"):
        # attention q, k, v (each the hidden width = the layer's input width), then the MLP's hidden rows
        mlp = rows - 3 * in_features
        return [in_features] * 3 + [mlp] if mlp > 0 else None
    return [rows // parts] * parts if rows % parts == 0 else None


def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split) original-layout FLUX.1 LoRA keys to diffusers module paths; other keys pass as they
    are. Kohya keys stay kohya-style (``lora_unet_<diffusers path with _>``: ``read_lora`` resolves them
    against the module names and reports the format); dotted original keys become ``transformer.<path>``. A
    fused module whose rows cannot be split is left as it is (reported unmatched)."""
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor, str]]] = {}
    paths_of: dict[str, tuple[str, ...]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parsed = _parse(key)
        targets = None if parsed is None else original_targets(parsed[1], flattened=parsed[0] == "kohya")
        if targets is None:
            out[key] = tensor
            continue
        style, _, part, suffix = parsed
        original, paths_of[targets[0]] = targets
        groups.setdefault((style, original), {})[part] = (key, tensor, suffix)

    for (style, original), parts in groups.items():
        paths = paths_of[original]
        sizes = None
        if "down" in parts and "up" in parts:
            sizes = _row_sizes(original, parts["up"][1].shape[0], parts["down"][1].shape[1], len(paths))
        if sizes is None:
            # unpaired or unsplittable: kept as they are, so read_lora reports them
            out.update({key: tensor for key, tensor, _ in parts.values()})
            continue
        _, down, down_suffix = parts["down"]
        _, up, up_suffix = parts["up"]
        if original in SWAPPED_HALVES:
            shift, scale = up.chunk(2, dim=0)
            up = torch.cat([scale, shift], dim=0)
        for path, up_part in zip(paths, torch.split(up, sizes, dim=0), strict=True):
            stem = KOHYA_PREFIX + _flat(path) if style == "kohya" else "transformer." + path
            out[stem + down_suffix] = down
            out[stem + up_suffix] = up_part.contiguous()
            if "alpha" in parts:
                out[stem + ".alpha"] = parts["alpha"][1]
    return out
