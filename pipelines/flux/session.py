"""One loaded FLUX.1 base model and the LoRA state of its transformer: the ``Session`` of ``pipelines/family.py``.

The harness drives it with plain values: ``set_weights(WeightState)`` then ``render(RenderRequest)``. LoRAs are
patched by ``pipelines.common.lora.LoraPatcher`` (ai-toolkit's merge, merge-out and hook rules) after the FLUX.1
key mapping of ``lora_keys.py``; the base weights come back bit for bit between states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.common.files import model_fingerprint
from pipelines.common.lora import LoraFile, LoraPatcher, WeightManager, linear_modules, match_lora, read_lora
from pipelines.family import Done, LoadSpec, Rendered, RenderRequest, WeightState
from pipelines.flux import lora_keys
from pipelines.flux.fast import FastParts
from pipelines.flux.loading import Components, load_components, load_t5, load_transformer
from pipelines.flux.pipeline import FluxReplayPipeline

KERNELS = ("torch",)  # PyTorch's own kernels: what ai-toolkit's FLUX.1 path runs on a CPU and on a GPU
MODES = ("merged", "hooks", "server", "adapter")


class FluxSession:
    """A FLUX.1 base load, its LoRA state and its replay pipeline. Not thread-safe: one render at a time.

    ``fast`` (``--fast``, switchable on the loaded session): replays whose last bits may differ from ai-toolkit's
    (``fast.py``): true CFG's prompt and negative in one batched transformer forward per step, fused q/k/v
    projections and, on CUDA (``spec.compile`` None or True), the blocks under ``torch.compile``.
    Off, every replay runs ai-toolkit's exact numerics, bit for bit, whatever ran fast before.

    A request's options ``transformer_quantized`` / ``te_quantized`` (default: the job's ``model.quantize`` /
    ``quantize_te``) pick the transformer / T5 with or without quanto: the other one is loaded once, on first
    use, and the weight state is applied to whichever transformer renders.
    """

    def __init__(self, components: Components, spec: LoadSpec):
        self.c = components
        self.spec = spec
        on_cuda = torch.device(spec.device).type == "cuda"
        self.pipeline = FluxReplayPipeline(
            components,
            true_cfg=bool(spec.model_kwargs.get("use_flux_cfg", False)),
            attn_masking=bool(spec.model_kwargs.get("attn_masking", False)),
            fast=spec.fast,
            fast_parts=FastParts(compile=bool(spec.compile if spec.compile is not None else on_cuda)),
        )
        self.patcher = LoraPatcher(components.transformer)
        self.module_names = list(linear_modules(components.transformer))
        self.fingerprint = model_fingerprint(Path(components.root))
        self.timings = dict(components.timings)
        self.kernels = "torch"
        self.kernel_reason = "PyTorch's kernels: ai-toolkit's FLUX.1 path has no kernel of its own"
        self.weights = WeightManager(self.patcher, self.read_lora)
        self._loras: dict[tuple[str, int, int], LoraFile] = {}
        self._state = WeightState()
        self._transformers = {components.quantized: (components.transformer, self.weights)}
        self._t5s = {components.quantized_te: components.text_encoder_2}

    @property
    def fast(self) -> bool:
        return self.pipeline.fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self.pipeline.fast = bool(value)

    # ------------------------------------------------------------------------------------------- LoRA files

    def read_lora(self, path: Path) -> LoraFile:
        """Parse a LoRA file of any FLUX.1 format onto this transformer's module names (cached per file)."""
        path = Path(path)
        stat = path.stat() if path.is_file() else None
        key = (str(path.resolve()), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)
        if key not in self._loras:
            self._loras[key] = read_lora(path, self.module_names, convert=lora_keys.convert)
        return self._loras[key]

    def match_lora(self, lora: LoraFile):
        """Which of ``lora``'s modules load where (``KeyReport``)."""
        return match_lora(lora, self.c.transformer)

    # ------------------------------------------------------------------------------------------- weights

    def set_weights(self, state: WeightState) -> None:
        """Put the transformer in ``state``. "merged": ai-toolkit's fp32 merge on the base drifted by
        ``history`` (each earlier round merged and merged out); "hooks": an unmerged side branch; "server":
        the OmniGen2 server's fuse; "adapter": ai-toolkit-inference's FLUX.1 PEFT adapter. A quantised transformer
        runs hooks (or the adapter) on an undrifted base: ai-toolkit cannot merge into it (network_mixins.py
        merge_in). Nothing is redone when ``state`` is unchanged."""
        if state.mode not in MODES:
            raise ValueError(f"WeightState.mode must be one of {', '.join(MODES)}, got {state.mode!r}")
        self._state = state
        self._apply_state()

    def _apply_state(self) -> None:
        state = self._state
        if self.c.quantized and state.lora is None:
            state = WeightState()
        elif self.c.quantized:
            state = WeightState(state.lora, state.multiplier, "adapter" if state.mode == "adapter" else "hooks", ())
        self.weights.apply(state)

    def _select_models(self, request: RenderRequest) -> None:
        """The transformer and T5, quantised or not, that ``request`` asks for (loaded once when first asked)."""
        c, spec = self.c, self.spec
        quantized = bool(request.option("transformer_quantized", spec.quantize))
        if quantized not in self._transformers:
            transformer = load_transformer(c.root, c.dtype, c.device, spec.qtype if quantized else None)
            self._transformers[quantized] = (transformer, WeightManager(LoraPatcher(transformer), self.read_lora))
        transformer, weights = self._transformers[quantized]
        if transformer is not c.transformer:
            c.transformer, c.quantized, self.weights, self.patcher = transformer, quantized, weights, weights.patcher
            self._apply_state()
        te_quantized = bool(request.option("te_quantized", spec.quantize_te))
        if te_quantized not in self._t5s:  # model.qtype, as load_session quantises T5
            self._t5s[te_quantized] = load_t5(c.root, c.dtype, c.device, spec.qtype if te_quantized else None)
        c.text_encoder_2, c.quantized_te = self._t5s[te_quantized], te_quantized

    # ------------------------------------------------------------------------------------------- rendering

    def render(self, request: RenderRequest, deferred: bool = False) -> Rendered:
        """Replay ``request`` on the current weights; ``deferred``: return once the decode is queued."""
        self._select_models(request)
        output = self.pipeline(request, deferred=deferred)
        return output.pending if deferred else Done(output.pixels)

    def noise(self, request: RenderRequest, algorithm: str) -> np.ndarray:
        """The raw initial noise ``(1, 16, h, w)`` ``request`` starts from with ``algorithm``, as float32."""
        return self.pipeline.initial_noise(request, algorithm).float().numpy()

    def kernel_candidates(self, search: int) -> list[str]:
        """Only PyTorch's kernels: ai-toolkit's FLUX.1 path has no kernel of its own to reproduce."""
        return list(KERNELS)

    def set_kernels(self, spec: str) -> None:
        if spec not in KERNELS:
            raise ValueError(f"FLUX.1 replays run on {', '.join(KERNELS)} kernels only, got {spec!r}")
        self.kernels = spec


def load_session(spec: LoadSpec) -> FluxSession:
    """Load FLUX.1 for ``spec``. ``model.quantize`` quantises the transformer with ``qtype``, ``quantize_te``
    quantises T5 with ``qtype`` too: ai-toolkit's is_flux branch passes model.qtype, not qtype_te. ``spec.fast``:
    ``--fast`` (see ``FluxSession``); ``spec.compile``: ``torch.compile`` its blocks (None: on CUDA only; never in
    exact mode). CUDA graphs are not used for FLUX.1 (``spec.cuda_graphs`` is ignored)."""
    try:
        dtype = getattr(torch, spec.dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {spec.dtype!r}") from None
    components = load_components(
        spec.root,
        dtype=dtype,
        device=spec.device,
        qtype=spec.qtype if spec.quantize else None,
        qtype_te=spec.qtype if spec.quantize_te else None,
    )
    session = FluxSession(components, spec)
    session.set_kernels("torch" if spec.kernels == "auto" else spec.kernels)
    return session
