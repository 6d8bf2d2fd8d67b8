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

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.omnigen2 import kernels
from pipelines.omnigen2.rope import apply_rotation, frequency_tables, gather_rotations, position_ids

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.norm_q(self.to_q(x).view(batch, seq, self.heads, self.head_dim))
        k = self.norm_k(self.to_k(x).view(batch, seq, self.kv_heads, self.head_dim))
        v = self.to_v(x).view(batch, seq, self.kv_heads, self.head_dim)
        q = apply_rotation(q, rotations)
        k = apply_rotation(k, rotations)
        out = kernels.attention(q, k, v, key_mask, self.scale)
        return self.to_out[0](out.reshape(batch, seq, self.heads * self.head_dim).type_as(q))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``linear_2(silu(linear_1 x) * linear_3 x)``."""

    def __init__(self, cfg: OmniGen2Config):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)
        self.linear_2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=False)
        self.linear_3 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(kernels.swiglu(self.linear_1(x), self.linear_3(x)))


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


class OmniGen2Transformer(nn.Module):
    """The OmniGen2 transformer. ``forward`` takes one sample (batch 1) with any number of reference latents."""

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

    def rotation_tables(self) -> list[torch.Tensor]:
        """The complex128 frequency tables, built once (on the CPU, like OmniGen2) and cached."""
        if self._tables is None:
            self._tables = frequency_tables(self.config.axes_dim_rope, self.config.axes_lens)
        return self._tables

    def forward(
        self,
        latent: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        ref_latents: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity for ``latent`` ``[1, C, H, W]``.

        ``timestep`` ``[1]`` in the model dtype (0 = noise, 1 = data), ``text`` ``[1, L, text_feat_dim]``,
        ``text_mask`` ``[1, L]`` (any dtype; nonzero = valid token), ``ref_latents`` a list of ``[C, h, w]``.
        """
        if latent.shape[0] != 1:
            raise ValueError("OmniGen2Transformer.forward takes one sample at a time")
        p = self.config.patch_size
        ref_latents = ref_latents or []
        dtype, device = latent.dtype, latent.device

        # 1. timestep and caption embeddings
        temb, text = self.time_caption_embed(timestep, text, dtype)

        # 2. position ids and rotations: the valid text length comes from the mask (a float sum in OmniGen2)
        text_len = int(text_mask.sum(dim=1).tolist()[0])
        _, _, h, w = latent.shape
        image_grid = (h // p, w // p)
        ref_grids = [(r.shape[1] // p, r.shape[2] // p) for r in ref_latents]
        ids = position_ids(text_len, ref_grids, image_grid)
        rotations = gather_rotations(self.rotation_tables(), ids).unsqueeze(0).to(device)
        ref_len = sum(rh * rw for rh, rw in ref_grids)
        image_len = image_grid[0] * image_grid[1]
        text_rot = torch.zeros(1, text.shape[1], rotations.shape[-1], dtype=rotations.dtype, device=device)
        text_rot[:, :text_len] = rotations[:, :text_len]

        # 3. context refiner on the text alone
        text_key_mask = text_mask.bool()
        for block in self.context_refiner:
            text = block(text, text_key_mask, text_rot)

        # 4. image tokens, refined alone; reference images refined one by one
        tokens = self.x_embedder(patchify(latent[0], p).unsqueeze(0))
        image_rot = rotations[:, text_len + ref_len :]
        image_mask = torch.ones(1, image_len, dtype=torch.bool, device=device)
        for block in self.noise_refiner:
            tokens = block(tokens, image_mask, image_rot, temb)
        refs = []
        offset = text_len
        for index, (ref, grid) in enumerate(zip(ref_latents, ref_grids, strict=True)):
            n = grid[0] * grid[1]
            ref_tokens = self.ref_image_patch_embedder(patchify(ref, p).unsqueeze(0))
            ref_tokens = ref_tokens + self.image_index_embedding[index]
            ref_mask = torch.ones(1, n, dtype=torch.bool, device=device)
            for block in self.ref_image_refiner:
                ref_tokens = block(ref_tokens, ref_mask, rotations[:, offset : offset + n], temb)
            refs.append(ref_tokens)
            offset += n

        # 5. joint blocks over [text | references | image]
        joint = torch.cat([text[:, :text_len], *refs, tokens], dim=1)
        joint_mask = torch.ones(1, joint.shape[1], dtype=torch.bool, device=device)
        for block in self.layers:
            joint = block(joint, joint_mask, rotations, temb)

        # 6. output norm, projection and unpatchify
        out = self.norm_out(joint, temb)[0, -image_len:]
        return unpatchify(out, p, h, w).unsqueeze(0)
