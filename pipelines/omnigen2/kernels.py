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


# --fast attention: which SDPA backend ("auto" = PyTorch's own order) and whether SDPA repeats the KV heads itself
FAST_SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
# Default: cuDNN with unrepeated KV heads on CUDA (fastest measured on an H100, benchmarks/RESULTS.md); PyTorch's own
# choice with repeated heads on the CPU or wherever cuDNN attention is unavailable.
_fast_attention = {"backend": "cudnn", "gqa": True, "fallback": True}


def set_fast_attention(backend: str = "auto", gqa: bool = False) -> None:
    """Choose the SDPA backend of ``--fast`` attention (see ``FAST_SDPA_BACKENDS``); ``gqa``: pass the KV heads
    unrepeated (``enable_gqa``) instead of repeating them first."""
    if backend not in FAST_SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r}; choose one of {', '.join(FAST_SDPA_BACKENDS)}")
    _fast_attention.update(backend=backend, gqa=bool(gqa), fallback=False)


def fast_attention_setting() -> dict:
    return dict(_fast_attention)


def _sdpa_context(backend: str):
    if backend == "auto":
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return sdpa_kernel([getattr(SDPBackend, names[backend])])


def attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts, scale: float) -> torch.Tensor:
    """``--fast`` attention: SDPA with no mask and, by default, cuDNN's kernel with the KV heads unrepeated
    (``set_fast_attention``). ``starts`` is None when nothing is padded, else each sample's first valid token
    (sequences are left-padded): each sample then attends over its own valid slice, still maskless. Padded rows
    come back as zeros. Shapes as :func:`attention`."""
    backend, gqa = _fast_attention["backend"], _fast_attention["gqa"]
    if _fast_attention["fallback"] and (not q.is_cuda or _fast_attention.get("failed")):
        backend, gqa = "auto", False
    try:
        return _attention_fast(q, k, v, starts, scale, backend, gqa)
    except RuntimeError:
        if not _fast_attention["fallback"] or backend == "auto":
            raise
        _fast_attention["failed"] = True  # no cuDNN attention here: PyTorch's own choice from now on
        return _attention_fast(q, k, v, starts, scale, "auto", False)


def _attention_fast(q, k, v, starts, scale: float, backend: str, gqa: bool) -> torch.Tensor:
    heads = q.shape[2]
    repeat = heads // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = gqa and repeat > 1
    if not gqa:
        k = k.repeat_interleave(repeat, -3)
        v = v.repeat_interleave(repeat, -3)
    extra = {"enable_gqa": True} if gqa else {}
    with _sdpa_context(backend):
        if starts is None or not any(starts):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **extra).transpose(1, 2)
        out = q.new_zeros(q.shape)
        for i, start in enumerate(starts):
            out[i : i + 1, :, start:] = F.scaled_dot_product_attention(
                q[i : i + 1, :, start:], k[i : i + 1, :, start:], v[i : i + 1, :, start:], scale=scale, **extra
            )
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
