"""The three kernels whose choice changes the last bits of a replay: RMSNorm, attention and SwiGLU.

ai-toolkit picks them at import time: a Triton RMSNorm when ``triton`` imports (any CUDA torch on Linux),
flash-attn's varlen attention and fused SwiGLU when ``flash_attn`` imports, otherwise ``torch.rms_norm``, SDPA
with a boolean key mask and ``silu(x.float()).to(dtype) * y``. A previews' CPU run (and any machine without those
packages) uses the PyTorch set: profile ``torch``, the default. ``triton`` is ai-toolkit's default GPU path: our
own Triton RMSNorm with its numerics (``triton_norm.py``) for the block norms, SDPA otherwise. ``flash`` switches
attention and SwiGLU to flash-attn's own kernels when that package is importable.

ai-toolkit autotunes its Triton RMSNorm per process: the warp count per row width is whatever timed fastest, and
it sets the order of the float32 sum of squares. So the ``triton`` profile carries the warp counts:
``triton`` (16 warps for every width, what the tuner picked for the released model on an H100), ``triton:8``
(every width) or ``triton:2520=16,2048=4`` (per width, 16 elsewhere). ``parity check`` chooses among them from
the step-0 previews (``kernel_candidates``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNEL_PROFILES = {
    "torch": "torch.rms_norm, SDPA with a boolean key mask and repeated KV heads, SwiGLU via float32 SiLU",
    "triton": "ai-toolkit's default GPU path: Triton RMSNorm (warps per width) for the block norms, otherwise as torch",
    "flash": "flash-attn varlen attention and fused SwiGLU (needs the flash_attn package and CUDA)",
}
# Warp counts ai-toolkit's autotuner tries (1..32), most often picked first (H100, benchmarks/RESULTS.md).
TRITON_WARPS = (16, 4, 8, 32, 2, 1)
DEFAULT_TRITON_WARPS = 16

_profile = "torch"
_triton_warps: dict[int, int] = {}
_triton_default = DEFAULT_TRITON_WARPS


def parse_profile(spec: str) -> tuple[str, dict[int, int], int]:
    """``"triton:2520=16,2048=4"`` -> ``("triton", {2520: 16, 2048: 4}, 16)``; ``"triton:8"`` -> every width 8.
    Raises ValueError with the problem in words."""
    name, _, rest = spec.strip().partition(":")
    if name not in KERNEL_PROFILES:
        raise ValueError(f"unknown kernel profile {name!r}; choose one of {', '.join(KERNEL_PROFILES)}")
    warps: dict[int, int] = {}
    default = DEFAULT_TRITON_WARPS
    if rest and name != "triton":
        raise ValueError(f"kernel profile {name!r} takes no settings, got {spec!r}")
    for part in filter(None, (p.strip() for p in rest.split(","))):
        width, eq, count = part.partition("=")
        try:
            if eq:
                warps[int(width)] = int(count)
            else:
                default = int(width)
        except ValueError:
            raise ValueError(f"triton warps must be N or WIDTH=N, got {part!r} in {spec!r}") from None
    for count in [default, *warps.values()]:
        if count not in TRITON_WARPS:
            raise ValueError(f"triton warp counts are 1, 2, 4, 8, 16 or 32, got {count} in {spec!r}")
    return name, warps, default


def format_profile(name: str, warps: dict[int, int] | None = None, default: int = DEFAULT_TRITON_WARPS) -> str:
    """The canonical spec string (the inverse of ``parse_profile``)."""
    if name != "triton":
        return name
    warps = {w: n for w, n in (warps or {}).items() if n != default}
    parts = ([] if default == DEFAULT_TRITON_WARPS and warps else [str(default)])
    parts += [f"{w}={n}" for w, n in sorted(warps.items())]
    return "triton:" + ",".join(parts)


def set_kernel_profile(spec: str) -> None:
    """Choose the kernel set for every later forward (see ``KERNEL_PROFILES`` and ``parse_profile``)."""
    global _profile, _triton_default
    name, warps, default = parse_profile(spec)
    if name == "flash":
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("kernel profile 'flash' needs the flash_attn package") from exc
    if name == "triton":
        from pipelines.omnigen2 import triton_norm

        triton_norm.require()
    _profile = name
    _triton_warps.clear()
    _triton_warps.update(warps)
    _triton_default = default


def kernel_profile() -> str:
    """The active profile as a canonical spec (warp counts included)."""
    return format_profile(_profile, _triton_warps, _triton_default)


# How often ai-toolkit's autotuner picks each warp count, roughly (H100 runs in benchmarks/RESULTS.md): orders the
# candidates, nothing more.
_WARP_PRIOR = {16: 0.4, 4: 0.2, 8: 0.15, 32: 0.15, 2: 0.05, 1: 0.05}


def effective_warps(width: int, warps: int) -> int:
    """The warp count that sets the kernel's arithmetic for rows of ``width``: a row's power-of-two block spread over
    more than one element per thread is summed per thread, then across lanes and warps; once the warps outnumber
    the block's 32-element slices, the extra threads hold copies and the reduction tree stops changing. Measured on
    an H100 (benchmarks/RESULTS.md): widths 64 and 72 give 1, 2 and >= 4 warps apart at most, 2048 and 2520 six
    distinct results."""
    block = 1 << max(0, (int(width) - 1).bit_length())
    return min(int(warps), max(1, block // 32))


def kernel_candidates(widths: list[int], budget: int) -> list[str]:
    """Kernel profiles worth trying for a model whose block norms have these row widths, likeliest first: ai-toolkit's
    GPU default with the warps its tuner usually picks, PyTorch's kernels, then other warp counts per width (each width
    tuned independently, as the autotuner does; counts that give the same arithmetic at a width tried once), at most
    ``budget``."""
    import itertools

    widths = sorted(set(widths))
    classes = []  # per width: {effective count: (likelihood, the likeliest count giving it)}
    for width in widths:
        merged: dict[int, tuple[float, int]] = {}
        for count in TRITON_WARPS:
            key = effective_warps(width, count)
            likelihood, best = merged.get(key, (0.0, count))
            merged[key] = (likelihood + _WARP_PRIOR[count], best)
        classes.append(list(merged.values()))
    combos = []
    for choice in itertools.product(*classes):
        likelihood = 1.0
        for p, _ in choice:
            likelihood *= p
        combos.append((-likelihood, tuple(count for _, count in choice)))
    out = []
    for _, counts in sorted(combos):
        if len(set(counts)) == 1:
            out.append(format_profile("triton", {}, counts[0]))
        else:
            out.append(format_profile("triton", dict(zip(widths, counts, strict=True))))
        if len(out) == 1:
            out.append("torch")
    return list(dict.fromkeys(out))[: max(1, budget)]


def describe_profile(spec: str) -> str:
    name, warps, default = parse_profile(spec)
    if name != "triton":
        return KERNEL_PROFILES[name]
    per = ", ".join(f"width {w}: {n}" for w, n in sorted(warps.items()))
    return f"Triton RMSNorm for the block norms ({default} warps{'; ' + per if per else ''}), SDPA attention"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _profile == "triton" and x.is_cuda and not torch.compiler.is_compiling():
        from pipelines.omnigen2 import triton_norm

        return triton_norm.rms_norm(x, weight, eps, _triton_warps.get(x.shape[-1], _triton_default))
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
