"""The OmniGen2 diffusion transformer, in one file, read from embedding to output.

State-dict names equal the released checkpoint's (``OmniGen2/OmniGen2``, ``transformer/``) so it loads without
conversion. The numerics follow OmniGen2 as ai-toolkit runs it for previews without triton or flash-attn: block
norms through ``torch.rms_norm``, query/key norms computed in float32 then rounded (diffusers' RMSNorm), attention
through SDPA with a boolean key mask and repeated KV heads, SwiGLU as ``silu(x.float()).to(dtype) * y``.

Data flow of one forward (batch of independent sequences, usually batch 1):

1. timestep -> sinusoidal embedding -> MLP (``time_caption_embed.timestep_embedder``): ``temb``;
   text features -> RMSNorm -> Linear (``time_caption_embed.caption_embedder``);
2. ``context_refiner`` blocks refine the text alone (no modulation);
3. the noisy latent is patchified (2x2) and embedded (``x_embedder``), refined alone by ``noise_refiner``;
   reference-image latents likewise by ``ref_image_patch_embedder`` + ``image_index_embedding`` +
   ``ref_image_refiner``;
4. the sequence ``[text | reference images | image]`` runs through the joint ``layers``;
5. ``norm_out`` (adaptive LayerNorm + projection) and unpatchify give the velocity.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.common.lora import has_hooks
from pipelines.omnigen2 import kernels
from pipelines.omnigen2.rope import (
    apply_rotation,
    apply_rotation_real,
    frequency_tables,
    gather_rotations,
    position_ids,
    real_tables,
)

CONFIG_CLASS_NAME = "OmniGen2Transformer2DModel"


@dataclass
class OmniGen2Config:
    """The transformer's ``config.json`` (diffusers ``OmniGen2Transformer2DModel``)."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int | None = None
    hidden_size: int = 2520
    num_layers: int = 32
    num_refiner_layers: int = 2
    num_attention_heads: int = 21
    num_kv_heads: int = 7
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    axes_dim_rope: list[int] = field(default_factory=lambda: [40, 40, 40])
    axes_lens: list[int] = field(default_factory=lambda: [10000, 10000, 10000])
    text_feat_dim: int = 2048
    timestep_scale: float = 1000.0

    @classmethod
    def from_dict(cls, data: dict) -> OmniGen2Config:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> OmniGen2Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {"_class_name": CONFIG_CLASS_NAME, **asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        inner = 4 * self.hidden_size
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * ((inner + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.head_dim != sum(self.axes_dim_rope):
            raise ValueError(
                f"hidden_size // num_attention_heads ({self.head_dim}) must equal sum(axes_dim_rope) "
                f"({sum(self.axes_dim_rope)})"
            )
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_kv_heads")


class RMSNorm(nn.Module):
    """Block RMSNorm (``torch.nn.RMSNorm`` semantics: one fused kernel in the input dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = kernels.KernelSet()  # set by OmniGen2Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.kernels)


class HeadRMSNorm(nn.Module):
    """Query/key RMSNorm over the head dim, computed in float32 and rounded before the weight (diffusers')."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embedding and query/key norms."""

    def __init__(self, cfg: OmniGen2Config):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.to_q = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.norm_q = HeadRMSNorm(self.head_dim, eps=1e-5)
        self.norm_k = HeadRMSNorm(self.head_dim, eps=1e-5)
        # ``to_out.0`` in the checkpoint: index 1 was a dropout with no weights.
        self.to_out = nn.ModuleList([nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)])
        self.kernels = kernels.KernelSet()  # set by OmniGen2Transformer.use_kernels

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.norm_q(self.to_q(x).view(batch, seq, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(x).view(batch, seq, self.kv_heads, self.head_dim))
        v = self.to_v(x).view(batch, seq, self.kv_heads, self.head_dim)
        q = apply_rotation(q, rotations)
        k = apply_rotation(k, rotations)
        out = kernels.attention(q, k, v, key_mask, self.scale, self.kernels)
        return self.to_out[0](out.reshape(batch, seq, self.heads * self.head_dim).type_as(q))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``linear_2(silu(linear_1 x) * linear_3 x)``."""

    def __init__(self, cfg: OmniGen2Config):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.linear_2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)
        self.linear_3 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.kernels = kernels.KernelSet()  # set by OmniGen2Transformer.use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(kernels.swiglu(self.linear_1(x), self.linear_3(x), self.kernels))


class ModulatedNorm(nn.Module):
    """``norm1`` of a modulated block: RMSNorm scaled by ``1 + scale_msa`` plus three more modulations."""

    def __init__(self, cfg: OmniGen2Config):
        super().__init__()
        self.linear = nn.Linear(min(cfg.hidden_size, 1024), 4 * cfg.hidden_size, bias=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(F.silu(temb)).chunk(4, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class Block(nn.Module):
    """A transformer block; ``modulated`` blocks take the timestep embedding (all but the context refiner)."""

    def __init__(self, cfg: OmniGen2Config, modulated: bool):
        super().__init__()
        self.modulated = modulated
        self.attn = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.norm1 = ModulatedNorm(cfg) if modulated else RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, key_mask, rotations, temb=None):
        if self.modulated:
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
            x = x + gate_msa.unsqueeze(1).tanh() * self.norm2(self.attn(h, key_mask, rotations))
            mlp = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
            return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(mlp)
        x = x + self.norm2(self.attn(self.norm1(x), key_mask, rotations))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeCaptionEmbed(nn.Module):
    FREQ_DIM = 256

    def __init__(self, cfg: OmniGen2Config):
        super().__init__()
        self.timestep_scale = cfg.timestep_scale
        self.timestep_embedder = TimestepEmbedder(self.FREQ_DIM, min(cfg.hidden_size, 1024))
        self.caption_embedder = nn.Sequential(
            RMSNorm(cfg.text_feat_dim, cfg.norm_eps), nn.Linear(cfg.text_feat_dim, cfg.hidden_size)
        )

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, dtype: torch.dtype):
        proj = sinusoidal_embedding(timestep, self.FREQ_DIM, self.timestep_scale).to(dtype)
        return self.timestep_embedder(proj), self.caption_embedder(text)


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(s*t*f_k), sin(s*t*f_k)]`` with ``f_k = max_period**(-k/(dim/2))``, in float32 (diffusers' order)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = scale * (t[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class OutputNorm(nn.Module):
    """``norm_out``: LayerNorm (no affine) scaled by ``1 + linear_1(silu(temb))``, then ``linear_2``."""

    def __init__(self, cfg: OmniGen2Config, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(min(cfg.hidden_size, 1024), cfg.hidden_size)
        self.linear_2 = nn.Linear(cfg.hidden_size, out_dim)

    def forward(self, x, temb):
        scale = self.linear_1(F.silu(temb).to(x.dtype))
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale)[:, None, :]
        return self.linear_2(x)


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """``[C, H, W] -> [(H/p)(W/p), p*p*C]``, channels fastest (OmniGen2's ``c (h p1) (w p2) -> (h w) (p1 p2 c)``)."""
    c, h, w = latent.shape
    return latent.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a latent of size ``h x w``."""
    c = tokens.shape[-1] // (p * p)
    return tokens.reshape(h // p, w // p, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h, w)


@dataclass
class TextInput:
    """One prompt's text after the parts of the forward that depend on the text alone (caption embedder and
    context refiner): computed once per replay, reused by every step. ``length`` = valid tokens (host int)."""

    features: torch.Tensor  # [1, L, hidden]
    length: int


def text_length(text_mask: torch.Tensor) -> int:
    """Valid text tokens: the sum of the (bf16) mask, as OmniGen2 computes it. One host sync: call it once per
    encoding, never inside the denoising loop."""
    return int(text_mask.sum(dim=1).tolist()[0])


ROTATION_CACHE_SIZE = 64


class OmniGen2Transformer(nn.Module):
    """The OmniGen2 transformer. ``forward`` takes one sample (batch 1) with any number of reference latents.

    The denoising loop uses the stages separately (``prepare_text`` once per prompt, ``guided_velocities`` per
    step): the same kernels on the same inputs as ``forward``, without recomputing what does not change and
    without host syncs. ``batched_velocities`` is the ``--fast`` path (one batch for every text). The kernels it
    runs are a ``kernels.KernelSet`` it holds (PyTorch's until ``use_kernels`` says otherwise).
    """

    def __init__(self, cfg: OmniGen2Config):
        super().__init__()
        cfg.validate()
        self.config = cfg
        p, hidden = cfg.patch_size, cfg.hidden_size
        out_channels = cfg.out_channels or cfg.in_channels
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, hidden)
        self.ref_image_patch_embedder = nn.Linear(p * p * cfg.in_channels, hidden)
        self.time_caption_embed = TimeCaptionEmbed(cfg)
        self.noise_refiner = nn.ModuleList([Block(cfg, True) for _ in range(cfg.num_refiner_layers)])
        self.ref_image_refiner = nn.ModuleList([Block(cfg, True) for _ in range(cfg.num_refiner_layers)])
        self.context_refiner = nn.ModuleList([Block(cfg, False) for _ in range(cfg.num_refiner_layers)])
        self.layers = nn.ModuleList([Block(cfg, True) for _ in range(cfg.num_layers)])
        self.norm_out = OutputNorm(cfg, p * p * out_channels)
        self.image_index_embedding = nn.Parameter(torch.zeros(5, hidden))
        self._tables: list[torch.Tensor] | None = None
        self._device_cache: dict[tuple, object] = {}
        self._fast_fns = None
        self.compile_fast = False  # --fast: torch.compile the block halves around attention
        self.compile_mode: str | None = None  # torch.compile's mode for them (None: its default)
        # exact mode on CUDA: the unconditional pass runs on a second stream beside the conditional one (the same
        # kernels on the same inputs: the same bits; the GPU fills the other pass's wave tails)
        self.concurrent_texts = True
        self._side_stream = None
        self.hooks_epoch = 0  # bumped by LoraPatcher when forward hooks change (CUDA graphs are then stale)
        self.kernels = kernels.KernelSet()  # the kernels every forward runs (use_kernels)
        self.attention_fallback = kernels.AttentionFallback()  # --fast attention's failed backend, once it fails
        self.use_kernels(self.kernels)

    def use_kernels(self, kset: kernels.KernelSet) -> None:
        """Run every later forward with ``kset``: the block norms, attention and feed-forwards get it, a plain
        attribute each (torch.compile guards on it). A new ``--fast`` attention setting tries its backend afresh."""
        if kset.fast_attention != self.kernels.fast_attention:
            self.attention_fallback = kernels.AttentionFallback()
        self.kernels = kset
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, FeedForward)):
                module.kernels = kset

    def rotation_tables(self) -> list[torch.Tensor]:
        """The complex128 frequency tables, built once (on the CPU, like OmniGen2) and cached."""
        if self._tables is None:
            self._tables = frequency_tables(self.config.axes_dim_rope, self.config.axes_lens)
        return self._tables

    # -- per-shape constants, built once on the CPU and kept on the device ------------------------------------
    def _cached(self, key: tuple, build):
        value = self._device_cache.get(key)
        if value is None:
            if len(self._device_cache) >= ROTATION_CACHE_SIZE:
                self._device_cache.pop(next(iter(self._device_cache)))
            value = self._device_cache[key] = build()
        return value

    def rotations(self, text_len: int, ref_grids: tuple, image_grid: tuple, device) -> torch.Tensor:
        """Complex128 rotations ``[1, text_len + refs + image, D/2]`` on ``device`` (cached per shape)."""

        def build():
            ids = position_ids(text_len, list(ref_grids), image_grid)
            return gather_rotations(self.rotation_tables(), ids).unsqueeze(0).to(device)

        return self._cached(("rot", text_len, ref_grids, image_grid, str(device)), build)

    def text_rotations(self, text_len: int, padded_len: int, device) -> torch.Tensor:
        """Rotations of the (padded) text for the context refiner: zero past the valid tokens."""

        def build():
            ids = position_ids(text_len, [], (0, 0))
            rot = gather_rotations(self.rotation_tables(), ids)
            out = torch.zeros(1, padded_len, rot.shape[-1], dtype=rot.dtype)
            out[:, :text_len] = rot
            return out.to(device)

        return self._cached(("text_rot", text_len, padded_len, str(device)), build)

    def ones_mask(self, n: int, device) -> torch.Tensor:
        return self._cached(("ones", n, str(device)), lambda: torch.ones(1, n, dtype=torch.bool, device=device))

    # -- stages -----------------------------------------------------------------------------------------------
    def time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        embed = self.time_caption_embed
        return embed.timestep_embedder(sinusoidal_embedding(timestep, embed.FREQ_DIM, embed.timestep_scale).to(dtype))

    def prepare_text(self, text: torch.Tensor, text_mask: torch.Tensor, text_len: int | None = None) -> TextInput:
        """Caption embedder and context refiner: they see the text alone, so one prompt's result serves every
        step of a replay. ``text_len`` defaults to :func:`text_length` (a host sync)."""
        if text_len is None:
            text_len = text_length(text_mask)
        features = self.time_caption_embed.caption_embedder(text)
        rot = self.text_rotations(text_len, text.shape[1], text.device)
        key_mask = text_mask.bool()
        for block in self.context_refiner:
            features = block(features, key_mask, rot)
        return TextInput(features, text_len)

    def _image_tokens(self, latent, temb, rotations, image_rot, ref_latents, text_len):
        """The noise refiner on the image tokens and the reference refiner on each reference image."""
        p = self.config.patch_size
        device = latent.device
        tokens = self.x_embedder(patchify(latent[0], p).unsqueeze(0))
        for block in self.noise_refiner:
            tokens = block(tokens, self.ones_mask(tokens.shape[1], device), image_rot, temb)
        refs = []
        offset = text_len
        for index, ref in enumerate(ref_latents):
            n = (ref.shape[1] // p) * (ref.shape[2] // p)
            ref_tokens = self.ref_image_patch_embedder(patchify(ref, p).unsqueeze(0))
            ref_tokens = ref_tokens + self.image_index_embedding[index]
            for block in self.ref_image_refiner:
                ref_tokens = block(ref_tokens, self.ones_mask(n, device), rotations[:, offset : offset + n], temb)
            refs.append(ref_tokens)
            offset += n
        return tokens, refs

    def _grids(self, latent, ref_latents):
        p = self.config.patch_size
        _, _, h, w = latent.shape
        ref_grids = tuple((r.shape[1] // p, r.shape[2] // p) for r in ref_latents)
        return (h // p, w // p), ref_grids

    def guided_velocities(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        texts: list[TextInput],
        ref_latents: list[list[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Velocities for several texts at one step (e.g. the conditional and unconditional pass), each exactly
        what ``forward`` gives for it. What does not depend on the text (timestep embedding, image and
        reference refiners) is computed once per distinct reference list: same kernels, same inputs, same bits.
        ``ref_latents[i]`` are text ``i``'s reference latents. No host syncs."""
        p = self.config.patch_size
        dtype, device = latent.dtype, latent.device
        _, _, h, w = latent.shape
        temb = self.time_embedding(timestep, dtype)
        image_grid, _ = self._grids(latent, [])
        image_len = image_grid[0] * image_grid[1]
        shared: dict[tuple, tuple] = {}
        inputs = []
        for text, refs_in in zip(texts, ref_latents, strict=True):
            _, ref_grids = self._grids(latent, refs_in)
            ref_len = sum(rh * rw for rh, rw in ref_grids)
            rotations = self.rotations(text.length, ref_grids, image_grid, device)
            # the image tokens' positions shift with the text length: share only between equal shifts
            key = (tuple(id(r) for r in refs_in), text.length)
            if key not in shared:
                image_rot = rotations[:, text.length + ref_len :]
                shared[key] = self._image_tokens(latent, temb, rotations, image_rot, refs_in, text.length)
            inputs.append((text, rotations, shared[key]))
        main = side = None
        if self.concurrent_texts and latent.is_cuda and len(texts) > 1:
            main = torch.cuda.current_stream(device)
            if self._side_stream is None or self._side_stream.device != device:
                self._side_stream = torch.cuda.Stream(device)
            side = self._side_stream
            side.wait_stream(main)  # everything above is main's
        out = []
        for i, (text, rotations, (tokens, refs)) in enumerate(inputs):
            with torch.cuda.stream(side) if side is not None and i > 0 else contextlib.nullcontext():
                joint = torch.cat([text.features[:, : text.length], *refs, tokens], dim=1)
                joint_mask = self.ones_mask(joint.shape[1], device)
                for block in self.layers:
                    joint = block(joint, joint_mask, rotations, temb)
                velocity = self.norm_out(joint, temb)[0, -image_len:]
                out.append(unpatchify(velocity, p, h, w).unsqueeze(0))
        if side is not None:
            main.wait_stream(side)
            for tensor in out[1:]:
                tensor.record_stream(main)
        return out

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ref_latents: list[torch.Tensor] | None = None,
        text_len: int | None = None,
    ) -> torch.Tensor:
        """Velocity for ``latent`` ``[1, C, H, W]``.

        ``timestep`` ``[1]`` in the model dtype (0 = noise, 1 = data), ``text`` ``[1, L, text_feat_dim]``,
        ``text_mask`` ``[1, L]`` (any dtype; nonzero = valid token), ``ref_latents`` a list of ``[C, h, w]``.
        ``text_len`` (valid tokens) saves the host sync that reading it from the mask costs.
        """
        if latent.shape[0] != 1:
            raise ValueError("OmniGen2Transformer.forward takes one sample at a time")
        text_input = self.prepare_text(text, text_mask, text_len)
        return self.guided_velocities(latent, timestep, [text_input], [list(ref_latents or [])])[0]

    # -- --fast -------------------------------------------------------------------------------------------------
    def real_rotations(self, lengths: tuple, padded: int, ref_grids: tuple, image_grid: tuple, device):
        """``--fast``: float32 (cos, sin) ``[B, padded + refs + image, D/2]``, each sample left-padded with zeros."""

        def build():
            parts = []
            for n in lengths:
                ids = position_ids(n, list(ref_grids), image_grid)
                rot = gather_rotations(self.rotation_tables(), ids)
                parts.append(torch.cat([torch.zeros(padded - n, rot.shape[-1], dtype=rot.dtype), rot]))
            return real_tables(torch.stack(parts).to(device))

        return self._cached(("real", lengths, padded, ref_grids, image_grid, str(device)), build)

    def _fast_blocks(self, blocks, x, temb, cos, sin, starts):
        pre, post = self.fast_functions()
        for block in blocks:
            q, k, v, gate_msa, scale_mlp, gate_mlp = pre(block, x, temb, cos, sin)
            attn = kernels.attention_fast(q, k, v, starts, block.attn.scale, self.kernels, self.attention_fallback)
            x = post(block, x, attn, gate_msa, scale_mlp, gate_mlp)
        return x

    def fast_functions(self):
        """The two halves of a modulated block around attention, compiled when ``compile_fast`` is set and no
        forward hook is attached (an unmerged LoRA: a graph traced without it would skip it, ``has_hooks``)."""
        if self.compile_fast and has_hooks(self):
            return _fast_pre, _fast_post
        if self._fast_fns is None:
            if self.compile_fast:
                import torch._dynamo

                # one compiled graph serves every block (parameters are inputs); shapes go dynamic on the 2nd size
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                mode = self.compile_mode
                self._fast_fns = (torch.compile(_fast_pre, dynamic=None, mode=mode),
                                  torch.compile(_fast_post, dynamic=None, mode=mode))
            else:
                self._fast_fns = (_fast_pre, _fast_post)
        return self._fast_fns

    def batched_velocities(
        self, latent: torch.Tensor, timestep: torch.Tensor, texts: list[TextInput], ref_latents: list[torch.Tensor]
    ) -> torch.Tensor:
        """``--fast``: velocities ``[B, C, H, W]`` for B texts sharing the latent and the reference images, in one
        batch: sequences ``[left padding | text | references | image]``, attention with no mask (each sample over
        its valid slice when the texts differ in length), float32 real rotary. Differs from ``forward`` in the
        last bits."""
        p = self.config.patch_size
        dtype, device = latent.dtype, latent.device
        _, _, h, w = latent.shape
        temb = self.time_embedding(timestep, dtype)
        image_grid, ref_grids = self._grids(latent, ref_latents)
        image_len = image_grid[0] * image_grid[1]
        ref_len = sum(rh * rw for rh, rw in ref_grids)
        lengths = tuple(t.length for t in texts)
        padded = max(lengths)
        # Rotations per sample of the joint sequence (one row when the texts are equally long). The image and
        # reference tokens are refined once for every text, at the first text's positions: their positions move
        # with the text length on the first rotary axis only, by the same amount for every token, and rotating
        # both queries and keys by one angle leaves their products unchanged (so the refiners' outputs do not
        # depend on it, up to rounding).
        cos, sin = self.real_rotations(lengths[:1] if len(set(lengths)) == 1 else lengths, padded, ref_grids,
                                       image_grid, device)
        image_at = padded + ref_len
        tokens = self.x_embedder(patchify(latent[0], p).unsqueeze(0))
        tokens = self._fast_blocks(self.noise_refiner, tokens, temb, cos[:1, image_at:], sin[:1, image_at:], None)
        refs, offset = [], padded
        for index, ref in enumerate(ref_latents):
            n = (ref.shape[1] // p) * (ref.shape[2] // p)
            ref_tokens = self.ref_image_patch_embedder(patchify(ref, p).unsqueeze(0)) + self.image_index_embedding[index]
            window = slice(offset, offset + n)
            refs.append(self._fast_blocks(self.ref_image_refiner, ref_tokens, temb, cos[:1, window], sin[:1, window], None))
            offset += n
        texts_padded = []
        for text in texts:
            pad = text.features.new_zeros(1, padded - text.length, text.features.shape[-1])
            texts_padded.append(torch.cat([pad, text.features[:, : text.length]], dim=1))
        joint = torch.cat([torch.cat(texts_padded), *[r.expand(len(texts), -1, -1) for r in refs],
                           tokens.expand(len(texts), -1, -1)], dim=1)
        starts = None if len(set(lengths)) == 1 else tuple(padded - n for n in lengths)
        joint = self._fast_blocks(self.layers, joint, temb, cos, sin, starts)
        velocity = self.norm_out(joint, temb)[:, -image_len:]
        return torch.stack([unpatchify(v, p, h, w) for v in velocity])


def _fast_pre(block: Block, x, temb, cos, sin):
    """``--fast``: modulation, norm, projections, query/key norms and real rotary of a modulated block."""
    h, gate_msa, scale_mlp, gate_mlp = block.norm1(x, temb)
    attn = block.attn
    batch, seq, _ = h.shape
    q = attn.norm_q(attn.to_q(h).view(batch, seq, attn.heads, attn.head_dim))
    k = attn.norm_k(attn.to_k(h).view(batch, seq, attn.kv_heads, attn.head_dim))
    v = attn.to_v(h).view(batch, seq, attn.kv_heads, attn.head_dim)
    return apply_rotation_real(q, cos, sin), apply_rotation_real(k, cos, sin), v, gate_msa, scale_mlp, gate_mlp


def _fast_post(block: Block, x, attn_out, gate_msa, scale_mlp, gate_mlp):
    """``--fast``: output projection, gated residuals and the SwiGLU MLP of a modulated block."""
    batch, seq = attn_out.shape[:2]
    out = block.attn.to_out[0](attn_out.reshape(batch, seq, -1).type_as(x))
    x = x + gate_msa.unsqueeze(1).tanh() * block.norm2(out)
    mlp = block.feed_forward(block.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
    return x + gate_mlp.unsqueeze(1).tanh() * block.ffn_norm2(mlp)
