"""One loaded OmniGen2 behind the family seam: components, quantisation, LoRA state, kernels, text-encoder variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.common import noise
from pipelines.common.files import model_fingerprint
from pipelines.common.lora import LoraPatcher, WeightManager, match_lora, read_lora
from pipelines.common.quantize import quantize_module
from pipelines.family import Done, LoadSpec, RenderRequest, WeightState
from pipelines.omnigen2 import kernels, quirks, triton_norm
from pipelines.omnigen2.loading import load_components, load_mllm
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest
from pipelines.omnigen2.transformer import RMSNorm


def first_kernels(spec: LoadSpec) -> tuple[str, str]:
    """The profile asked for, or with ``auto`` the likeliest: ai-toolkit's default GPU path where its Triton kernel
    can run (CUDA, triton importable, not --fast), else PyTorch's kernels; and why, in words."""
    if spec.kernels != "auto":
        return spec.kernels, "given with --kernels"
    if torch.device(spec.device).type != "cuda":
        return "torch", "CPU replay: PyTorch's kernels, the ones ai-toolkit uses on a CPU"
    if problem := triton_norm.available():
        return "torch", f"PyTorch's kernels: {problem} (ai-toolkit falls back to them too)"
    if spec.fast:
        return "torch", "--fast: PyTorch's kernels (its last bits differ from any trainer's anyway)"
    return kernels.format_profile("triton"), "ai-toolkit's default GPU path (Triton RMSNorm)"


class OmniGen2Session:
    """Every torch object of one OmniGen2 base load; the harness drives it through ``pipelines.family.Session``."""

    def __init__(self, spec: LoadSpec):
        self.spec = spec
        first, self.kernel_reason = first_kernels(spec)
        self.kernel_search_open = spec.kernels == "auto" and first != "torch"  # several sets worth trying
        first_set = kernels.KernelSet.parse(first)  # refused before the load when its kernels cannot run here
        dtype = getattr(torch, spec.dtype)
        components = load_components(spec.root, dtype, spec.device)
        if spec.quantize_te:
            quantize_module(components.mllm, spec.qtype_te, "text encoder")
        if spec.quantize:
            quantize_module(components.transformer, spec.qtype, "transformer")
        on_cuda = torch.device(spec.device).type == "cuda"
        graphs = spec.cuda_graphs and on_cuda and not spec.quantize  # quanto layers: not captured
        self.pipeline = OmniGen2Pipeline(components, fast=spec.fast, cuda_graphs=graphs)
        compile_fast = spec.compile if spec.compile is not None else on_cuda
        components.transformer.compile_fast = bool(spec.fast and compile_fast)
        components.transformer.use_kernels(first_set)
        self.patcher = LoraPatcher(components.transformer)
        self.weights = WeightManager(self.patcher, self.read_lora)
        self.fingerprint = model_fingerprint(Path(spec.root))
        self.timings = dict(components.timings)
        self._mllm_variants = {spec.quantize_te: components.mllm}
        self._loras: dict[Path, object] = {}

    # -- seam ------------------------------------------------------------------------------------------------
    @property
    def kernels(self) -> str:
        """The canonical spec of the transformer's kernel set."""
        return self.pipeline.c.transformer.kernels.spec

    def set_kernels(self, spec: str) -> None:
        """Install the kernel set ``spec`` names on the transformer (its ``--fast`` attention setting kept)."""
        transformer = self.pipeline.c.transformer
        transformer.use_kernels(kernels.KernelSet.parse(spec, transformer.kernels.fast_attention))

    @property
    def fast(self) -> bool:
        return self.pipeline.fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self.pipeline.fast = value

    def read_lora(self, path: Path):
        if path not in self._loras:
            self._loras[path] = read_lora(path, list(self.patcher.targets))
        return self._loras[path]

    def match_lora(self, lora):
        return match_lora(lora, self.pipeline.c.transformer)

    def set_weights(self, state: WeightState) -> None:
        self.weights.apply(state)

    def render(self, request: RenderRequest, deferred: bool = False):
        self._select_text_encoder(request.option("te_quantized", self.spec.quantize_te))
        generation = request.output_size == "generation" and (
            quirks.generation_size(request.width, request.height) != (request.width, request.height))
        output = self.pipeline(self._request(request), deferred=deferred and not generation)
        if generation:  # a server returns the image decoded at the generation size, not resized back
            w, h = output.generation_size
            with torch.no_grad():
                return Done(quirks.decode_to_pixels(self.pipeline.c.vae, output.final_latents, w, h))
        return output.pending if output.pending is not None else Done(output.pixels)

    def noise(self, request: RenderRequest, algorithm: str) -> np.ndarray:
        w, h = quirks.generation_size(request.width, request.height)
        shape = quirks.latent_shape(self.pipeline.vae_scale, self.pipeline.c.transformer.config.in_channels, w, h)
        draw = noise.draw_initial_noise(int(request.seed), shape, algorithm, dtype=self.pipeline.c.dtype)
        return draw.float().numpy().ravel()

    def kernel_candidates(self, search: int) -> list[str]:
        if not self.kernel_search_open:
            return [self.kernels]
        widths = sorted({int(m.weight.shape[0]) for m in self.pipeline.c.transformer.modules()
                         if isinstance(m, RMSNorm)})  # the norms a kernel profile changes
        return kernels.kernel_candidates(widths, search)

    # -- OmniGen2 only ---------------------------------------------------------------------------------------
    def _request(self, r: RenderRequest) -> ReplayRequest:
        negative_passes = r.option("negative_template_passes", quirks.CHAT_TEMPLATE_PASSES)
        if r.negative_prompt == "":
            negative_passes = r.option("empty_negative_template_passes", negative_passes)
        return ReplayRequest(
            prompt=r.prompt,
            negative_prompt=r.negative_prompt,
            chat_template_passes=r.option("prompt_template_passes", quirks.CHAT_TEMPLATE_PASSES),
            negative_chat_template_passes=negative_passes,
            seed=int(r.seed),
            width=int(r.width),
            height=int(r.height),
            num_inference_steps=int(r.num_inference_steps),
            guidance_scale=float(r.guidance_scale),
            reference_images=tuple(r.reference_images[:1]),
            noise_algorithm=r.noise_algorithm,
        )

    def _select_text_encoder(self, quantized: bool) -> None:
        """Swap in a quantised (or plain) text encoder when a request asks for the other one."""
        components = self.pipeline.c
        if quantized not in self._mllm_variants:
            fresh = load_mllm(components.root, components.dtype, components.device)
            if quantized:
                quantize_module(fresh, self.spec.qtype_te or "qfloat8", "text encoder")
            self._mllm_variants[quantized] = fresh
        components.mllm = self._mllm_variants[quantized]


def load_session(spec: LoadSpec) -> OmniGen2Session:
    """Load OmniGen2 for ``spec`` (the family's ``load``)."""
    return OmniGen2Session(spec)
