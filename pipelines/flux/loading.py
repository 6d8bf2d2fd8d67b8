"""Load FLUX.1 from a diffusers-layout folder (``transformer/ vae/ text_encoder/ text_encoder_2/ tokenizer/
tokenizer_2/``), offline and from safetensors only, the way ai-toolkit's ``load_model`` does it for arch
``flux`` (toolkit/stable_diffusion_model.py, is_flux branch): every part ``from_pretrained`` in the train dtype
and then ``.to(device, dtype=dtype)`` again, which also casts anything ``from_pretrained`` kept in float32."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.common.files import stopwatch
from pipelines.common.quantize import quantize_module
from pipelines.family import ModelDirError
from pipelines.flux.family import check_model_dir, safetensors_weights


@dataclass
class Components:
    """A loaded FLUX.1: every model in ``dtype`` on ``device`` (quantised parts keep quanto's weights)."""

    root: Path
    transformer: torch.nn.Module  # diffusers FluxTransformer2DModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    text_encoder_2: torch.nn.Module  # transformers T5EncoderModel
    tokenizer: object  # CLIPTokenizer
    tokenizer_2: object  # T5TokenizerFast
    dtype: torch.dtype
    device: torch.device
    quantized: bool = False  # the transformer
    quantized_te: bool = False  # T5
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the load

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _loaded(folder: Path, what: str, load):
    safetensors_weights(folder)
    try:
        return load()
    except ModelDirError:
        raise
    except Exception as exc:
        raise ModelDirError(folder, f"cannot load the {what} ({type(exc).__name__}: {exc})") from None


def load_transformer(root: Path, dtype: torch.dtype, device: torch.device, qtype: str | None = None):
    """FluxTransformer2DModel in ``dtype``; quantised with optimum-quanto (``qtype``) before it moves to
    ``device``, as ai-toolkit quantises it (``quantize`` then ``freeze``)."""
    from diffusers import FluxTransformer2DModel

    folder = root / "transformer"
    model = _loaded(
        folder,
        "FLUX.1 transformer",
        lambda: FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True),
    )
    model = model.to(device, dtype=dtype)
    if qtype is not None:
        quantize_module(model, qtype, "transformer")
        model = model.to(device)
    return model.eval().requires_grad_(False)


def load_vae(root: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    folder = root / "vae"
    vae = _loaded(folder, "VAE", lambda: AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True))
    return vae.to(device, dtype=dtype).eval().requires_grad_(False)


def load_t5(root: Path, dtype: torch.dtype, device: torch.device, qtype: str | None = None):
    """T5EncoderModel with eager attention: the transformers ai-toolkit ran (5.5.3) computed T5's attention
    eagerly (bf16 matmul, + position bias, softmax); newer transformers default to SDPA, whose bf16 result
    differs in the last bits of ~2/3 of the embedding values. ``from_pretrained`` keeps T5's ``wo`` in float32
    (``_keep_in_fp32_modules``); ai-toolkit's ``.to(dtype=...)`` casts it back, and so do we."""
    from transformers import T5EncoderModel

    folder = root / "text_encoder_2"
    t5 = _loaded(
        folder,
        "T5 text encoder",
        lambda: T5EncoderModel.from_pretrained(folder, dtype=dtype, attn_implementation="eager", use_safetensors=True),
    )
    t5 = t5.to(device, dtype=dtype)
    if qtype is not None:
        quantize_module(t5, qtype, "T5 text encoder")
    return t5.eval().requires_grad_(False)


def load_clip(root: Path, dtype: torch.dtype, device: torch.device):
    """CLIPTextModel with SDPA attention, named explicitly: the trainer's transformers ran CLIP through SDPA
    (measured: eager attention changes the pooled embedding of every oracle prompt)."""
    from transformers import CLIPTextModel

    folder = root / "text_encoder"
    clip = _loaded(
        folder,
        "CLIP text encoder",
        lambda: CLIPTextModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", use_safetensors=True),
    )
    return clip.to(device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizers(root: Path):
    """(CLIPTokenizer, T5TokenizerFast): the classes ai-toolkit loads."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    tokenizers = []
    for sub, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", T5TokenizerFast)):
        try:
            tokenizers.append(cls.from_pretrained(root / sub))
        except Exception as exc:
            raise ModelDirError(root / sub, f"cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
    return tuple(tokenizers)


def quiet_libraries() -> None:
    """Silence diffusers/transformers load chatter (progress bars, fp32-module hints): we report ourselves."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def load_components(
    root: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    qtype: str | None = None,
    qtype_te: str | None = None,
) -> Components:
    """Load every part of FLUX.1 once from the folder ``root`` (never downloaded). ``qtype``: quantise the
    transformer; ``qtype_te``: quantise T5 (CLIP never is). Errors are :class:`ModelDirError`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(root).expanduser()
    check_model_dir(root)
    device = torch.device(device)
    timings: dict[str, float] = {}
    timed = stopwatch(timings)

    timed("libraries", quiet_libraries)
    transformer = timed("transformer", load_transformer, root, dtype, device, qtype)
    vae = timed("vae", load_vae, root, dtype, device)
    text_encoder_2 = timed("t5", load_t5, root, dtype, device, qtype_te)
    text_encoder = timed("clip", load_clip, root, dtype, device)
    tokenizer, tokenizer_2 = timed("tokenizers", load_tokenizers, root)
    return Components(
        root=root,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        dtype=dtype,
        device=device,
        quantized=qtype is not None,
        quantized_te=qtype_te is not None,
        timings=timings,
    )
