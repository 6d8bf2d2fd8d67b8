"""The seam between the harness and a model family: what ``parity/`` may know about a family, and nothing more.

A family lives in ``pipelines/<name>/`` and exposes one :class:`Family` in ``pipelines/<name>/family.py``
(torch-free at import: the plan reads its preview rules without torch). ``Family.load`` gives a :class:`Session`
that owns every torch object of one base load: components, LoRA patching, quantisation, kernels. The harness
drives it with plain values (:class:`LoadSpec`, :class:`WeightState`, :class:`RenderRequest`) and gets pixels
back. Adding a family is: the rules, the session, the LoRA key mapping, one line in ``pipelines/registry.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class PreviewRules:
    """How ai-toolkit turns a preview's settings into what the pipeline generates and saves (torch-free).

    ``generation_size(w, h)``: the size the model generates at, from the size after ai-toolkit's floor-8/min-64.
    ``saved_size(w, h)``: the size of the saved preview (OmniGen2 resizes back to the request; FLUX.1 does not).
    ``uses_negative(guidance, model_kwargs)``: whether the negative prompt reaches the picture at all.
    ``quirks``: one line per ai-toolkit quirk of this family, with the file and function it comes from.
    """

    generation_size: Callable[[int, int], tuple[int, int]]
    saved_size: Callable[[int, int], tuple[int, int]]
    uses_negative: Callable[[float, dict], bool]
    quirks: tuple[str, ...] = ()


@dataclass(frozen=True)
class KnobFlip:
    """A family-specific way to render a preview differently, for diagnosis (e.g. OmniGen2's chat template
    applied once): ``options`` go into :attr:`RenderRequest.options`. ``code`` names the cause it would prove in
    the harness's catalogue of causes, which says what it means and what to do."""

    code: str
    label: str
    options: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class LoadSpec:
    """Everything a base load depends on, as values."""

    root: Path  # the resolved base model folder
    dtype: str  # torch dtype name: "bfloat16", "float16", "float32"
    device: str  # "cpu", "cuda", "cuda:N"
    quantize: bool = False  # model.quantize: the transformer (LoRA then runs unmerged, by hooks)
    qtype: str = "qfloat8"
    quantize_te: bool = False  # model.quantize_te: the text encoder(s)
    qtype_te: str = "qfloat8"
    kernels: str = "torch"  # the family's kernel profile spec (only OmniGen2 on CUDA has others)
    fast: bool = False  # --fast: last bits may differ, no EXACT expected
    cuda_graphs: bool = True
    compile: bool | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the job's model: section (use_flux_cfg, ...)


@dataclass(frozen=True)
class WeightState:
    """What the transformer runs with for one preview.

    ``mode``: "merged" (ai-toolkit's fp32 merge into the base), "hooks" (unmerged side branch), "server" (the
    inference server's fuse in the model dtype), "adapter" (the inference server's unfused PEFT adapter in the
    model dtype). ``history``: earlier merged rounds (LoRA file, multiplier) whose
    merge and merge-out drifted the base before this round, oldest first.
    """

    lora: Path | None = None
    multiplier: float = 1.0
    mode: str = "merged"
    history: tuple[tuple[Path, float], ...] = ()


@dataclass(frozen=True)
class RenderRequest:
    """One preview's settings as the pipeline gets them. ``width``/``height`` are after ai-toolkit's floor-8."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    noise_algorithm: str = "native"
    reference_images: tuple[Any, ...] = ()  # PIL images
    options: tuple[tuple[str, Any], ...] = ()  # family-specific knobs (KnobFlip.options)
    output_size: str = "saved"  # "generation": return the generated image, not resized back (servers)

    def option(self, name: str, default: Any) -> Any:
        return dict(self.options).get(name, default)


class Rendered(Protocol):
    """A finished (or queued) render: ``wait()`` gives the uint8 RGB pixels [H, W, 3], from any thread."""

    def wait(self) -> np.ndarray: ...


@dataclass
class Done:
    """A render whose pixels are already on the host."""

    pixels: np.ndarray

    def wait(self) -> np.ndarray:
        return self.pixels


class Session(Protocol):
    """One loaded base model of a family. Not thread-safe: one render at a time."""

    fingerprint: str  # identity of the base model files
    timings: dict[str, float]  # seconds per part of the load
    kernels: str  # the kernel profile in force
    fast: bool

    def read_lora(self, path: Path) -> Any:
        """Parse a LoRA file onto this transformer's module names (``pipelines.common.lora.LoraFile``)."""

    def match_lora(self, lora: Any) -> Any:
        """Which of its modules load where (``pipelines.common.lora.KeyReport``)."""

    def set_weights(self, state: WeightState) -> None:
        """Put the transformer in ``state``; the base comes back bit for bit between states."""

    def render(self, request: RenderRequest, deferred: bool = False) -> Rendered:
        """Replay ``request`` on the current weights; ``deferred``: return once the decode is queued."""

    def noise(self, request: RenderRequest, algorithm: str) -> np.ndarray:
        """The initial noise ``request`` would start from with ``algorithm``, as float32 (to compare draws)."""

    def kernel_candidates(self, search: int) -> list[str]:
        """Kernel profiles worth trying to reproduce the trainer's GPU, likeliest first (one on a CPU)."""

    def set_kernels(self, spec: str) -> None:
        """Switch the kernel profile (the kernel choice tries candidates)."""


@dataclass(frozen=True)
class Family:
    """A model family: the ``arch`` values it serves, its preview rules and how to load it."""

    name: str  # "omnigen2", "flux"
    label: str  # "OmniGen2", "FLUX.1"
    archs: tuple[str, ...]
    rules: PreviewRules
    load: Callable[[LoadSpec], Session]  # imports torch lazily
    check_model_dir: Callable[[Path], None]  # raises ModelDirError for a folder that is not this family's
    # (plan item, the job's model flags) -> the family's own ways to get a preview wrong, for diagnosis
    knob_flips: Callable[[Any, dict], list[KnobFlip]] = lambda item, model_flags: []
    server_profile: str | None = None  # the inference server's pipeline this family is compared with
    # ``parity lora`` without a session: the transformer on the meta device from a model folder's config (None: the
    # released model's), and what it was built from, in words
    skeleton: Callable[[Path | None], tuple[Any, str]] | None = None
    lora_convert: Callable | None = None  # the family's LoRA key mapping (pipelines.common.lora.read_lora convert)
    lora_base_versions: tuple[str, ...] = ()  # ss_base_model_version values of LoRAs trained for this family
    lora_key_hints: tuple[str, ...] = ()  # module-name parts only this family's LoRAs have
    lora_target_parts: tuple[str, ...] = ()  # parts of the module names ai-toolkit targets by default
    fast_changes: str = ""  # what --fast (LoadSpec.fast) changes in this family's replays, in words (the report says it)


class ModelDirError(Exception):
    """A base model folder that cannot be used. ``missing`` marks "not found" (an environment problem)."""

    def __init__(self, path: str | Path, problem: str, missing: bool = False):
        self.path = str(path)
        self.problem = problem
        self.missing = missing
        super().__init__(f"{self.path}: {problem}")
