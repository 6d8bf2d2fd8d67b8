"""The denoising loop of a replay: exact (the default) or ``--fast``, eagerly or through CUDA graphs.

One step = the transformer's velocity for each text (conditional, and unconditional with CFG), the guidance
combination and the Euler step. Exact mode calls the same kernels as ai-toolkit on the same inputs, in the same
order of arithmetic: ``guided_velocities`` gives what two ``forward`` calls give, and the step's timesteps stay
on the device, so the loop never waits for the GPU.

On CUDA each step is captured once per shape as a CUDA graph (``StepGraphs``) and replayed: the same kernels
with the same arguments, without the ~1,500 launches per pass. The graph reads its inputs from static buffers
and the weights by address, so LoRA merges and restores (in-place copies) are seen; forward hooks are not, so
``LoraPatcher`` bumps ``transformer.hooks_epoch`` whenever it adds or removes them, which retires every graph.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from pipelines.omnigen2 import quirks
from pipelines.omnigen2.scheduler import euler_step
from pipelines.omnigen2.transformer import OmniGen2Transformer, TextInput


class StepGraphs:
    """CUDA graphs of whole denoising steps, one per shape key, sharing one memory pool (they never run at once).

    ``run`` captures a key the first time it is seen (after one eager run on the same static inputs, whose
    result it returns) and replays it afterwards. The returned tensor is the graph's own output buffer: it is
    valid until the same graph runs again.
    """

    def __init__(self, limit: int = 32):
        self.limit = limit
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.pool = None
        self.disabled: str | None = None  # why capture failed once (then every step runs eagerly)
        self.captures = 0
        self.replays = 0

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None

    def run(self, key: tuple, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.disabled is not None:
            return fn(*inputs)
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            graph, static_in, static_out = entry
            for buffer, value in zip(static_in, inputs, strict=True):
                if buffer is not value:
                    buffer.copy_(value)
            graph.replay()
            self.replays += 1
            return static_out
        static_in = [x.clone() for x in inputs]
        result = fn(*static_in)  # eager: the real step, and the warm-up the capture needs
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = fn(*static_in)
        except Exception as exc:  # an op that cannot be captured: run eagerly from now on
            self.disabled = f"{type(exc).__name__}: {exc}"
            self.clear()
            torch.cuda.synchronize()
            return result
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, static_in, static_out)
        self.captures += 1
        while len(self.graphs) > self.limit:
            self.graphs.popitem(last=False)
        return result


def denoise(
    transformer: OmniGen2Transformer,
    latents: torch.Tensor,
    grid: torch.Tensor,
    texts: list[TextInput],
    refs: list[list[torch.Tensor]],
    guidance_scale: float,
    fast: bool = False,
    graphs: StepGraphs | None = None,
) -> torch.Tensor:
    """Run ``len(grid) - 1`` steps from ``latents``. ``texts[0]`` is the prompt, ``texts[1]`` (with CFG) the
    negative; ``refs[i]`` the reference latents text ``i`` sees. Returns the final latents (a fresh tensor)."""
    use_cfg = len(texts) > 1
    lengths = tuple(t.length for t in texts)
    pool: list[torch.Tensor] = []
    ref_index = []
    for ref_list in refs:
        indices = []
        for ref in ref_list:
            match = next((j for j, r in enumerate(pool) if r is ref), None)
            if match is None:
                pool.append(ref)
                match = len(pool) - 1
            indices.append(match)
        ref_index.append(tuple(indices))
    n_text = len(texts)

    def step(
        sample: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *tensors: torch.Tensor
    ) -> torch.Tensor:
        feats, ref_pool = tensors[:n_text], tensors[n_text:]
        text_inputs = [TextInput(f, n) for f, n in zip(feats, lengths, strict=True)]
        ref_lists = [[ref_pool[j] for j in indices] for indices in ref_index]
        timestep = t.expand(1).to(sample.dtype)
        if fast and len(set(ref_index)) == 1:
            both = transformer.batched_velocities(sample, timestep, text_inputs, ref_lists[0])
            velocities = [both[i : i + 1] for i in range(n_text)]
        elif fast:
            velocities = [
                transformer.batched_velocities(sample, timestep, [ti], rl)
                for ti, rl in zip(text_inputs, ref_lists, strict=True)
            ]
        else:
            velocities = transformer.guided_velocities(sample, timestep, text_inputs, ref_lists)
        v = quirks.cfg_combine(velocities[0], velocities[1], guidance_scale) if use_cfg else velocities[0]
        return euler_step(v, sample, t, t_next)

    extra = [t.features for t in texts] + pool
    key = (
        tuple(latents.shape),
        latents.dtype,
        str(latents.device),
        lengths,
        tuple(t.features.shape for t in texts),
        tuple(tuple(r.shape) for r in pool),
        tuple(ref_index),
        float(guidance_scale),
        fast,
        transformer.hooks_epoch,
        transformer.kernels,  # a graph holds the kernels it was captured with (--fast attention's too)
    )
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        if graphs is not None:
            latents = graphs.run(key, step, [latents, t, t_next, *extra])
        else:
            latents = step(latents, t, t_next, *extra)
    return latents.clone() if graphs is not None else latents
