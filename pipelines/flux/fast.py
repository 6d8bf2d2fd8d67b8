"""``--fast`` for FLUX.1: the transformer's forward rewritten for speed, same weights and same math, last bits free.

The exact replay (``pipeline.py``) calls diffusers' ``FluxTransformer2DModel`` once per text per step, as
ai-toolkit does. :class:`FastForward` runs the same blocks with:

- every text of a step in one batch (true CFG: prompt and negative in one batch-2 forward);
- fused projections: each attention's q, k, v (and in a single block also ``proj_mlp``, which reads the same
  input) as one GEMM (FLUX's original ``linear1`` layout). On first use their weights move into one tensor per
  group and each module keeps a view of its rows (:func:`fuse_in_place`): no memory added, a LoRA merged or
  merged out later is in the fused GEMM at once, and calling a module computes exactly what it did. Not used
  while forward hooks are attached (an unmerged LoRA hooks ``to_q``/``to_k``/``to_v``: the fused GEMM would
  bypass them);
- the single blocks run on one joint ``[text | image]`` sequence instead of concatenating and splitting it in
  every block, and the rotary tables are computed once per replay instead of once per step;
- on CUDA, each block type compiled with ``torch.compile`` (one graph serves every block of a type: parameters
  are inputs). Not while hooks are attached (dynamo does not guard on module hooks by default, so a graph traced
  without them would silently keep running without them) and not on a quantised transformer.

The modules keep their names and values (the fused views included), so switching ``fast`` off gives the exact
replay bit for bit; :meth:`FastForward.unfuse` gives each module its own tensors back. With every part off
(:data:`EXACT_PARTS`) it computes what diffusers' forward computes, bit for bit (``tests/test_flux_fast.py``), so
each part's drift is its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.common.lora import has_hooks


@dataclass(frozen=True)
class FastParts:
    """Which ``--fast`` speed-ups run (each can be switched off alone: the benchmark measures them one by one).

    ``batch_cfg``: prompt and negative in one batch. ``fuse``: fused q/k/v (+ proj_mlp) GEMMs. ``t5_sdpa``: T5
    attention through SDPA instead of eager (the text encoding only). ``compile``: ``torch.compile`` the blocks
    (``compile_backend``/``compile_mode`` as ``torch.compile`` takes them).
    """

    batch_cfg: bool = True
    fuse: bool = True
    # Off by default: on an H200 (benchmarks/RESULTS.md, session 5) a T5-XXL-shaped encoder ran slower through SDPA
    # (0.0345 s vs 0.0309 s per prompt, once per prompt anyway) and changed its output far beyond the last bits.
    t5_sdpa: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None


EXACT_PARTS = FastParts(batch_cfg=False, fuse=False, t5_sdpa=False, compile=False)


@contextlib.contextmanager
def t5_attention(t5, implementation: str):
    """Run T5 with ``implementation`` ("sdpa", "eager") inside the block and put its own back after. transformers
    picks T5's attention function from the config on every forward, so the switch costs nothing."""
    before = t5.config._attn_implementation
    if implementation == before:
        yield
        return
    t5.set_attn_implementation(implementation)
    try:
        yield
    finally:
        t5.set_attn_implementation(before)




def is_quantized(module: nn.Module) -> bool:
    """Whether any Linear is a subclass (quanto's QLinear): then no fused projections and no compile."""
    return any(isinstance(m, nn.Linear) and type(m) is not nn.Linear for m in module.modules())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary on ``x [B, S, H, D]`` with float32 ``cos``/``sin [S, D]`` (interleaved pairs), computed in
    float32 and cast back: diffusers' ``apply_rotary_emb(..., use_real_unbind_dim=-1, sequence_dim=1)``."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _attention(q, k, v):
    """``[B, S, H, D]`` queries, keys, values -> ``[B, S, H * D]`` (SDPA over heads, no mask)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def _project(x, fused, modules):
    """``x`` through ``modules`` (Linears on the same input): one GEMM on the fused ``(weight, bias)`` when given,
    else each module called (its hooks run)."""
    if fused is None:
        return [m(x) for m in modules]
    weight, bias, sizes = fused
    return F.linear(x, weight, bias).split(sizes, dim=-1)


def _heads(x, head_dim):
    return x.unflatten(-1, (-1, head_dim))


def double_block(block, fused, added, hidden, context, temb, cos, sin):
    """One ``FluxTransformerBlock`` (image stream ``hidden``, text stream ``context``) -> (hidden, context).
    ``fused``/``added``: the fused (weight, bias, sizes) of the image/text q, k, v, or None."""
    attn = block.attn
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden, emb=temb)
    norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(context, emb=temb)
    q, k, v = (_heads(t, attn.head_dim) for t in _project(norm_h, fused, (attn.to_q, attn.to_k, attn.to_v)))
    cq, ck, cv = (_heads(t, attn.head_dim)
                  for t in _project(norm_c, added, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)))
    q = torch.cat([attn.norm_added_q(cq), attn.norm_q(q)], dim=1)
    k = torch.cat([attn.norm_added_k(ck), attn.norm_k(k)], dim=1)
    v = torch.cat([cv, v], dim=1)
    out = _attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
    context_out, hidden_out = out.split([context.shape[1], hidden.shape[1]], dim=1)
    hidden = hidden + gate_msa.unsqueeze(1) * attn.to_out[0](hidden_out.contiguous())
    normed = block.norm2(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    hidden = hidden + gate_mlp.unsqueeze(1) * block.ff(normed)
    context = context + c_gate_msa.unsqueeze(1) * attn.to_add_out(context_out.contiguous())
    normed = block.norm2_context(context) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context = context + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)
    if context.dtype == torch.float16:
        context = context.clip(-65504, 65504)
    return hidden, context


def single_block(block, fused, joint, temb, cos, sin):
    """One ``FluxSingleTransformerBlock`` on the joint ``[text | image]`` sequence. ``fused``: the fused
    (weight, bias, sizes) of q, k, v and proj_mlp, or None."""
    attn = block.attn
    normed, gate = block.norm(joint, emb=temb)
    q, k, v, mlp = _project(normed, fused, (attn.to_q, attn.to_k, attn.to_v, block.proj_mlp))
    q = attn.norm_q(_heads(q, attn.head_dim))
    k = attn.norm_k(_heads(k, attn.head_dim))
    out = _attention(rotate(q, cos, sin), rotate(k, cos, sin), _heads(v, attn.head_dim))
    joint = joint + gate.unsqueeze(1) * block.proj_out(torch.cat([out, block.act_mlp(mlp)], dim=2))
    if joint.dtype == torch.float16:
        joint = joint.clip(-65504, 65504)
    return joint


def _alignment(device: torch.device) -> int:
    """Byte alignment every row block of a fused tensor keeps: what a fresh allocation gives the kernels that
    read it (cuBLAS picks its kernels by pointer alignment up to 256 bytes; 64 on a CPU)."""
    return 256 if device.type == "cuda" else 64


@torch.no_grad()
def fuse_in_place(modules: tuple[nn.Linear, ...]):
    """Move the weights (and biases) of Linears that read the same input into one contiguous tensor each and give
    every module a view of its rows: the same values in the same shapes, so calling a module computes what it
    computed before (the exact replay keeps its bits: tests/test_flux_fast.py), and ``F.linear`` on the whole
    tensor computes all of them in one GEMM. Returns (weight, bias, sizes), or None where it cannot be done
    without changing a module: mixed biases, other dtypes or devices, or a row block that would start at a less
    aligned address than a fresh tensor."""
    weights = [m.weight for m in modules]
    biases = [m.bias for m in modules]
    if len({b is None for b in biases}) > 1 or len({(w.dtype, w.device, w.shape[1]) for w in weights}) > 1:
        return None
    align = _alignment(weights[0].device)
    rows = [w.shape[0] for w in weights]
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    size = weights[0].element_size()
    if any(o * weights[0].shape[1] * size % align or (biases[0] is not None and o * size % align) for o in offsets):
        return None
    weight = torch.cat(weights)
    bias = torch.cat(biases) if biases[0] is not None else None
    for module, start, n in zip(modules, offsets, rows, strict=True):
        module.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            module.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
    return weight, bias, rows


def still_fused(modules, weight, bias, sizes) -> bool:
    """Whether every module still reads its rows of ``weight``/``bias`` (nothing replaced its tensors since)."""
    start = 0
    for module, n in zip(modules, sizes, strict=True):
        if module.weight.data_ptr() != weight[start].data_ptr() or module.weight.shape[0] != n:
            return False
        if bias is not None and module.bias.data_ptr() != bias[start].data_ptr():
            return False
        start += n
    return True


@dataclass
class Prepared:
    """One replay's ``--fast`` forward: block functions, fused weights per block (None: unfused) and rotary."""

    transformer: nn.Module
    double: object
    single: object
    fused_double: list  # per double block: (image q/k/v, text q/k/v) fused, or (None, None)
    fused_single: list  # per single block: q/k/v/proj_mlp fused, or None
    rotary: tuple[torch.Tensor, torch.Tensor]
    fused: bool  # every projection group fused
    compiled: bool


class FastForward:
    """The ``--fast`` transformer forward over one or several texts sharing the latents (see the module doc).

    :meth:`prepare` once per replay (after the weights are set), then :meth:`velocities` every step. Groups of
    projections are fused in place on first use (kept until :meth:`unfuse`); compiled block functions are made
    once per compile setting. Not thread-safe, like the session that owns it.
    """

    def __init__(self):
        self._fused: dict[nn.Module, tuple] = {}  # first module of a group -> (group, (weight, bias, sizes))
        self._compiled: dict[tuple, tuple] = {}
        self.last: Prepared | None = None  # the latest replay's (what ran: fused, compiled)

    def block_functions(self, parts: FastParts, compiled: bool):
        """(double, single) block functions: ``torch.compile``d when ``compiled``."""
        if not compiled:
            return double_block, single_block
        key = (parts.compile_backend, parts.compile_mode)
        if key not in self._compiled:
            import torch._dynamo

            # one graph per block type serves every block; a second image size makes its shapes dynamic
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._compiled[key] = tuple(
                torch.compile(fn, backend=parts.compile_backend, mode=parts.compile_mode, dynamic=None)
                for fn in (double_block, single_block))
        return self._compiled[key]

    @torch.no_grad()
    def fused(self, modules: tuple[nn.Linear, ...]):
        """``modules``' weights and biases as one (weight, bias, sizes): on first use their tensors are moved into
        one contiguous tensor each, every module keeping a view of its rows (:func:`fuse_in_place`), so a LoRA
        merged into a module later is in the fused GEMM too, and no memory is added. None where they cannot be
        fused."""
        entry = self._fused.get(modules[0])
        if entry is None or entry[0] != modules or not still_fused(modules, *entry[1]):
            fused = fuse_in_place(modules)
            if fused is None:
                return None
            entry = self._fused[modules[0]] = (modules, fused)
        return entry[1]

    @torch.no_grad()
    def unfuse(self) -> None:
        """Give every fused module its own weight and bias tensors again (copies of its rows)."""
        for modules, _ in self._fused.values():
            for module in modules:
                module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
                if module.bias is not None:
                    module.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        self._fused.clear()

    @torch.no_grad()
    def prepare(self, transformer, parts: FastParts, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Prepared:
        """Everything a replay's steps share: which parts can run on the transformer as it is now (no fused
        projections and no compile while hooks are attached or on a quantised transformer), the fused weights for
        the current weights, and the rotary tables for ``[text | image]``."""
        plain = not has_hooks(transformer) and not is_quantized(transformer)
        fuse, compiled = parts.fuse and plain, parts.compile and plain
        double, single = self.block_functions(parts, compiled)
        fused_double, fused_single = [], []
        for block in transformer.transformer_blocks:
            a = block.attn
            fused_double.append((self.fused((a.to_q, a.to_k, a.to_v)),
                                 self.fused((a.add_q_proj, a.add_k_proj, a.add_v_proj))) if fuse else (None, None))
        for block in transformer.single_transformer_blocks:
            a = block.attn
            fused_single.append(self.fused((a.to_q, a.to_k, a.to_v, block.proj_mlp)) if fuse else None)
        rotary = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        fuse = fuse and all(f is not None for pair in fused_double for f in pair) and all(
            f is not None for f in fused_single)
        self.last = Prepared(transformer, double, single, fused_double, fused_single, rotary, fuse, compiled)
        return self.last

    @torch.no_grad()
    def velocities(self, p: Prepared, latents, timestep, guidance, pooled, embeds):
        """Velocities ``[B, N, C]`` of the packed ``latents [1, N, C]`` for B texts (``pooled [B, D]``, ``embeds
        [B, L, d]``) at ``timestep`` (``[1]``, in the latents' dtype and / 1000, as the exact call gets it). The
        guidance embedding is whatever ``time_text_embed`` does now (ai-toolkit's bypass included)."""
        transformer = p.transformer
        batch = embeds.shape[0]
        hidden = transformer.x_embedder(latents.expand(batch, -1, -1))
        timestep = timestep.expand(batch).to(hidden.dtype) * 1000
        if guidance is None:
            temb = transformer.time_text_embed(timestep, pooled)
        else:
            temb = transformer.time_text_embed(timestep, guidance.expand(batch).to(hidden.dtype) * 1000, pooled)
        context = transformer.context_embedder(embeds)
        cos, sin = p.rotary
        for block, (fused, added) in zip(transformer.transformer_blocks, p.fused_double, strict=True):
            hidden, context = p.double(block, fused, added, hidden, context, temb, cos, sin)
        text_len = context.shape[1]
        joint = torch.cat([context, hidden], dim=1)
        for block, fused in zip(transformer.single_transformer_blocks, p.fused_single, strict=True):
            joint = p.single(block, fused, joint, temb, cos, sin)
        return transformer.proj_out(transformer.norm_out(joint[:, text_len:], temb))
