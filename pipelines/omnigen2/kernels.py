"""The three kernels whose choice changes the last bits of a replay: RMSNorm, attention and SwiGLU.

ai-toolkit picks them at import time: a Triton RMSNorm when ``triton`` imports, flash-attn's varlen attention
and fused SwiGLU when ``flash_attn`` imports, otherwise ``torch.rms_norm``, SDPA with a boolean key mask and
``silu(x.float()).to(dtype) * y``. A previews' CPU run (and any machine without those packages) uses the
PyTorch set, which is the default here. ``set_kernel_profile("flash")`` switches attention and SwiGLU to
flash-attn's own kernels when that package is importable, to match a trainer that had it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNEL_PROFILES = {
    "torch": "torch.rms_norm, SDPA with a boolean key mask and repeated KV heads, SwiGLU via float32 SiLU",
    "flash": "flash-attn varlen attention and fused SwiGLU (needs the flash_attn package and CUDA)",
}

_profile = "torch"


def set_kernel_profile(name: str) -> None:
    """Choose the kernel set for every later forward (see ``KERNEL_PROFILES``)."""
    global _profile
    if name not in KERNEL_PROFILES:
        raise ValueError(f"unknown kernel profile {name!r}; choose one of {', '.join(KERNEL_PROFILES)}")
    if name == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("kernel profile 'flash' needs the flash_attn package") from exc
    _profile = name


def kernel_profile() -> str:
    return _profile


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def swiglu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if _profile == "flash":
        from flash_attn.ops.activations import swiglu as fused

        return fused(x, y)
    # OmniGen2's fallback: SiLU in float32, rounded, then the product in the model dtype.
    return F.silu(x.float()).to(x.dtype) * y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float):
    """``q`` ``[B, S, H, D]``, ``k``/``v`` ``[B, S, KV, D]``, ``key_mask`` ``[B, S]`` bool -> ``[B, S, H, D]``."""
    batch, seq, heads, dim = q.shape
    repeat = heads // k.shape[2]
    if _profile == "flash":
        return _flash_varlen(q, k, v, key_mask, scale, repeat)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # KV heads are repeated explicitly (not enable_gqa): SDPA's GQA path picks another kernel.
    k = k.repeat_interleave(repeat, -3)
    v = v.repeat_interleave(repeat, -3)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask.view(batch, 1, 1, seq), scale=scale)
    return out.transpose(1, 2)


def _flash_varlen(q, k, v, key_mask, scale, repeat):
    from flash_attn import flash_attn_varlen_func

    batch, seq, heads, dim = q.shape
    lengths = key_mask.sum(dim=-1, dtype=torch.int32)
    index = torch.nonzero(key_mask.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    q_u = q.reshape(batch * seq, heads, dim)[index]
    k_u = k.reshape(batch * seq, -1, dim)[index].repeat_interleave(repeat, 1)
    v_u = v.reshape(batch * seq, -1, dim)[index].repeat_interleave(repeat, 1)
    out_u = flash_attn_varlen_func(
        q_u, k_u, v_u, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
        dropout_p=0.0, causal=False, softmax_scale=scale,
    )
    out = q.new_zeros(batch * seq, heads, dim)
    out[index] = out_u
    return out.view(batch, seq, heads, dim)
