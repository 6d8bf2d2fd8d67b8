"""Load OmniGen2 from a diffusers-layout folder (``transformer/ vae/ mllm/ processor/ scheduler/``) or from the
Hugging Face cache, offline. Safetensors only: pickle checkpoints are refused, never unpickled."""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from pipelines.common.files import resolve_model_dir, safetensors_files, stopwatch, transformer_config
from pipelines.family import ModelDirError
from pipelines.omnigen2.scheduler import FlowMatchEulerScheduler
from pipelines.omnigen2.transformer import CONFIG_CLASS_NAME, OmniGen2Config, OmniGen2Transformer

REQUIRED_SUBFOLDERS = ("transformer", "vae", "mllm", "processor")


@dataclass
class Components:
    """A loaded OmniGen2: every part in ``dtype`` on ``device``."""

    root: Path
    transformer: OmniGen2Transformer
    vae: object
    mllm: object
    tokenizer: object
    scheduler_config: dict
    dtype: torch.dtype
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of the load (overlapped: 1 or 0)

    def scheduler(self) -> FlowMatchEulerScheduler:
        return FlowMatchEulerScheduler.from_config(self.scheduler_config)


def check_layout(root: Path) -> None:
    for sub in REQUIRED_SUBFOLDERS:
        if not (root / sub).is_dir():
            raise ModelDirError(root / sub, f"missing subfolder '{sub}' (expected {', '.join(REQUIRED_SUBFOLDERS)})")
    transformer_config(root, CONFIG_CLASS_NAME, "parity supports omnigen2")


def load_state_dict(files: list[Path], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``files``, read straight onto ``device`` (no host copy on the way to a GPU)."""
    state = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except Exception as exc:
            raise ModelDirError(file, f"unreadable safetensors file ({exc})") from None
    return state


def load_transformer(root: Path, dtype: torch.dtype, device: torch.device) -> OmniGen2Transformer:
    folder = root / "transformer"
    config = OmniGen2Config.from_file(folder / "config.json")
    try:
        with torch.device("meta"):
            model = OmniGen2Transformer(config)
    except ValueError as exc:
        raise ModelDirError(folder / "config.json", str(exc)) from None
    state = load_state_dict(safetensors_files(folder, "diffusion_pytorch_model"), device)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelDirError(folder, f"state dict does not match the OmniGen2 transformer: {detail}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ModelDirError(folder, f"shape mismatch for {key}: file {tuple(state[key].shape)}, config {tuple(shape)}")
    # Weights are cast to the model dtype once, as from_pretrained(torch_dtype=...) does.
    assign_state(model, {k: v.to(dtype) for k, v in state.items()})
    return model.to(device).eval().requires_grad_(False)


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``state``'s tensors in place of ``model``'s (meta) parameters and buffers, as
    ``load_state_dict(assign=True)`` does but without ``Module.register_parameter``: on a GPU this runs on its own
    thread while diffusers loads the VAE, and diffusers builds a model under accelerate's ``init_empty_weights``,
    which replaces ``register_parameter`` process-wide with one that moves every new parameter to the meta device:
    a parameter assigned meanwhile came out empty and the load failed ("Cannot copy out of meta tensor")."""
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def load_vae(root: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    safetensors_files(root / "vae", "diffusion_pytorch_model")
    try:
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelDirError(root / "vae", f"cannot load the VAE ({type(exc).__name__}: {exc})") from None
    return vae.to(device).eval().requires_grad_(False)


def load_mllm(root: Path, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    safetensors_files(root / "mllm", "model")
    try:
        mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "mllm", dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelDirError(root / "mllm", f"cannot load the Qwen2.5-VL encoder ({type(exc).__name__}: {exc})") from None
    # ai-toolkit casts the loaded MLLM again with .to(dtype=...), which also rounds float buffers (rotary inv_freq).
    return mllm.to(device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(root: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(root / "processor")
    except Exception as exc:
        raise ModelDirError(root / "processor", f"cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelDirError(root / "processor", "tokenizer has no chat template (OmniGen2 prompts need it)")
    return tokenizer


def quiet_libraries() -> None:
    """Silence diffusers/transformers load chatter (progress bars, the accelerate hint): we report ourselves."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def overlap_transformer_load(device: torch.device) -> bool:
    """Whether the transformer loads on its own thread: on a GPU (see ``load_components``)."""
    return device.type == "cuda"


def load_components(
    name_or_path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Components:
    """Load every part of OmniGen2 once. The MLLM, transformer and VAE all run in ``dtype`` (no autocast).

    On a GPU the transformer's weights (most of the bytes) are copied there on a second thread while this one
    imports diffusers and transformers and loads the VAE, the MLLM and the tokenizer: the copies run without
    the GIL, importing and ``from_pretrained`` mostly with it, so the two overlap. (On the CPU the weights stay
    memory-mapped, a fraction of a second: nothing to overlap.) ``Components.timings`` has each part's
    seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = resolve_model_dir(name_or_path)
    check_layout(root)
    device = torch.device(device)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    timings: dict[str, float] = {}
    timed = stopwatch(timings)

    def the_rest():
        timed("libraries", quiet_libraries)
        vae = timed("vae", load_vae, root, dtype, device)
        mllm = timed("mllm", load_mllm, root, dtype, device)
        return vae, mllm, timed("tokenizer", load_tokenizer, root)

    timings["overlapped"] = float(overlap_transformer_load(device))
    if timings["overlapped"]:
        # "cuda" means this thread's current device (torchrun's rank sets it); another thread starts on device 0.
        explicit = device
        if device.type == "cuda" and device.index is None:
            explicit = torch.device("cuda", torch.cuda.current_device())

        def transformer_on_its_thread():
            with torch.cuda.device(explicit) if explicit.type == "cuda" else contextlib.nullcontext():
                return timed("transformer", load_transformer, root, dtype, explicit)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-load") as pool:
            pending = pool.submit(transformer_on_its_thread)
            try:
                vae, mllm, tokenizer = the_rest()
            except BaseException:
                pending.result()  # its error first (the transformer is the first part checked), else ours
                raise
            transformer = pending.result()
    else:
        transformer = timed("transformer", load_transformer, root, dtype, device)
        vae, mllm, tokenizer = the_rest()
    return Components(
        root=root,
        transformer=transformer,
        vae=vae,
        mllm=mllm,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        dtype=dtype,
        device=device,
        timings=timings,
    )
