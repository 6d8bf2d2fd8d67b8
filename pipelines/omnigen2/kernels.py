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

A choice is a value, ``KernelSet`` (the profile, its warp counts and ``--fast`` attention's SDPA setting), owned by
the transformer that runs it (``OmniGen2Transformer.use_kernels``) and passed to the kernels here as an argument:
this module holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


# --fast attention: which SDPA backend ("auto" = PyTorch's own order) and whether SDPA repeats the KV heads itself
FAST_SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


@dataclass(frozen=True)
class FastAttention:
    """The SDPA setting of ``--fast`` attention. The default, cuDNN with the KV heads unrepeated (``gqa``), was the
    fastest measured on an H100 (benchmarks/RESULTS.md); with ``fallback`` PyTorch's own choice with repeated heads
    runs instead on the CPU or wherever cuDNN attention fails (``AttentionFallback`` remembers that it did)."""

    backend: str = "cudnn"  # one of FAST_SDPA_BACKENDS
    gqa: bool = True  # pass the KV heads unrepeated (``enable_gqa``) instead of repeating them first
    fallback: bool = True

    def __post_init__(self):
        if self.backend not in FAST_SDPA_BACKENDS:
            raise ValueError(f"unknown SDPA backend {self.backend!r}; choose one of {', '.join(FAST_SDPA_BACKENDS)}")


@dataclass
class AttentionFallback:
    """Mutable, one per transformer: set once ``--fast`` attention's backend has failed there, so that PyTorch's own
    choice runs from then on without trying again."""

    failed: bool = False


@dataclass(frozen=True)
class KernelSet:
    """One choice of kernels: the profile (``KERNEL_PROFILES``), the ``triton`` profile's warp counts and ``--fast``
    attention's setting. A value (hashable, compared by content): a transformer runs the one it was given
    (``OmniGen2Transformer.use_kernels``). ``KernelSet()`` is PyTorch's set; ``KernelSet.parse`` reads a spec.

    ``warps`` holds ``(row width, warp count)`` pairs, sorted, only where the count differs from ``default_warps``;
    profiles other than ``triton`` have none (the constructor normalises both, so equal choices are equal values)."""

    name: str = "torch"
    warps: tuple[tuple[int, int], ...] = ()
    default_warps: int = DEFAULT_TRITON_WARPS
    fast_attention: FastAttention = field(default_factory=FastAttention)

    def __post_init__(self):
        if self.name not in KERNEL_PROFILES:
            raise ValueError(f"unknown kernel profile {self.name!r}; choose one of {', '.join(KERNEL_PROFILES)}")
        if self.name != "triton":
            object.__setattr__(self, "default_warps", DEFAULT_TRITON_WARPS)
        pairs = dict(self.warps).items() if self.name == "triton" else ()
        object.__setattr__(self, "warps", tuple(sorted((int(w), int(n)) for w, n in pairs if n != self.default_warps)))

    @classmethod
    def parse(cls, spec: str, fast_attention: FastAttention | None = None) -> KernelSet:
        """The set a spec names (``parse_profile``'s syntax; ValueError with the problem in words). RuntimeError when
        its kernels cannot run here: ``flash`` without the flash_attn package, ``triton`` without Triton or CUDA."""
        name, warps, default = parse_profile(spec)
        if name == "flash":
            try:
                import flash_attn  # noqa: F401
            except ImportError as exc:
                raise RuntimeError("kernel profile 'flash' needs the flash_attn package") from exc
        if name == "triton":
            from pipelines.omnigen2 import triton_norm

            triton_norm.require()
        return cls(name, tuple(warps.items()), default, fast_attention or FastAttention())

    @property
    def spec(self) -> str:
        """The canonical spec (warp counts included; ``--fast`` attention is not part of it)."""
        return format_profile(self.name, dict(self.warps), self.default_warps)

    def describe(self) -> str:
        if self.name != "triton":
            return KERNEL_PROFILES[self.name]
        per = ", ".join(f"width {w}: {n}" for w, n in self.warps)
        return f"Triton RMSNorm for the block norms ({self.default_warps} warps{'; ' + per if per else ''}), SDPA attention"

    def warps_for(self, width: int) -> int:
        """The Triton RMSNorm's warp count for rows of ``width``."""
        for w, n in self.warps:
            if w == width:
                return n
        return self.default_warps

    def with_fast_attention(self, backend: str = "auto", gqa: bool = False) -> KernelSet:
        """This set with ``--fast`` attention pinned to ``backend`` (``FAST_SDPA_BACKENDS``; no fallback) and ``gqa``
        (pass the KV heads unrepeated)."""
        return replace(self, fast_attention=FastAttention(backend, bool(gqa), fallback=False))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kset: KernelSet) -> torch.Tensor:
    if kset.name == "triton" and x.is_cuda and not torch.compiler.is_compiling():
        from pipelines.omnigen2 import triton_norm

        return triton_norm.rms_norm(x, weight, eps, kset.warps_for(x.shape[-1]))
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def swiglu(x: torch.Tensor, y: torch.Tensor, kset: KernelSet) -> torch.Tensor:
    if kset.name == "flash":
        from flash_attn.ops.activations import swiglu as fused

        return fused(x, y)
    # OmniGen2's fallback: SiLU in float32, rounded, then the product in the model dtype.
    return F.silu(x.float()).to(x.dtype) * y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
              kset: KernelSet) -> torch.Tensor:
    """``q`` ``[B, S, H, D]``, ``k``/``v`` ``[B, S, KV, D]``, ``key_mask`` ``[B, S]`` bool -> ``[B, S, H, D]``."""
    batch, seq, heads, dim = q.shape
    repeat = heads // k.shape[2]
    if kset.name == "flash":
        return _flash_varlen(q, k, v, key_mask, scale, repeat)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    # KV heads are repeated explicitly (not enable_gqa): SDPA's GQA path picks another kernel.
    k = k.repeat_interleave(repeat, -3)
    v = v.repeat_interleave(repeat, -3)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask.view(batch, 1, 1, seq), scale=scale)
    return out.transpose(1, 2)


def _sdpa_context(backend: str):
    if backend == "auto":
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return sdpa_kernel([getattr(SDPBackend, names[backend])])


def attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts, scale: float, kset: KernelSet,
                   state: AttentionFallback) -> torch.Tensor:
    """``--fast`` attention: SDPA with no mask and, by default, cuDNN's kernel with the KV heads unrepeated
    (``kset.fast_attention``). ``starts`` is None when nothing is padded, else each sample's first valid token
    (sequences are left-padded): each sample then attends over its own valid slice, still maskless. Padded rows
    come back as zeros. Shapes as :func:`attention`. ``state`` is the transformer's record of a failed backend
    (written here)."""
    setting = kset.fast_attention
    backend, gqa = setting.backend, setting.gqa
    if setting.fallback and (not q.is_cuda or state.failed):
        backend, gqa = "auto", False
    try:
        return _attention_fast(q, k, v, starts, scale, backend, gqa)
    except RuntimeError:
        if not setting.fallback or backend == "auto":
            raise
        state.failed = True  # no cuDNN attention here: PyTorch's own choice from now on
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
