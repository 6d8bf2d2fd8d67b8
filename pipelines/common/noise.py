"""The initial latent noise of ai-toolkit's OmniGen2 previews, drawn the way each torch version drew it.

ai-toolkit draws it with ``torch.manual_seed(seed); torch.randn((1, 16, h, w), dtype=torch.bfloat16)`` on the
CPU. The VALUES of that draw depend on the torch version and on the CPU path (pytorch issue #166853): torch
<= 2.11 computed bf16 normals in bf16 from 8-bit uniforms, torch 2.13 computes them in float32 and rounds, and the
float32 Box-Muller differs between the vectorised (AVX2/AVX512) and the scalar (``default``) kernel. This module
re-implements each of those kernels in NumPy on the raw mt19937 stream of a seeded ``torch.Generator``, so a replay
reproduces a preview's noise whatever torch is installed. See ``NOISE.md`` for the algorithms and measurements.

Public API: :class:`NoiseAlgorithm`, :data:`ALGORITHMS`, :func:`draw_noise`, :func:`draw_initial_noise`,
:func:`detect_native_algorithm`, :func:`mt19937_uint32`.
"""

from __future__ import annotations

import enum
import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "ALGORITHMS",
    "NoiseAlgorithm",
    "detect_native_algorithm",
    "draw_initial_noise",
    "draw_noise",
    "mt19937_uint32",
]


class NoiseAlgorithm(enum.StrEnum):
    """Which CPU ``randn`` kernel to reproduce."""

    TORCH211_AVX512 = "torch2.11-avx512"
    TORCH211_SCALAR = "torch2.11-scalar"
    TORCH213_AVX2 = "torch2.13-avx2"
    TORCH213_SCALAR = "torch2.13-scalar"
    NATIVE = "native"


ALGORITHMS: dict[str, str] = {
    "torch2.11-avx512": "torch <= 2.11 on an AVX2/AVX512 CPU: bf16 Box-Muller computed in bf16 from 8-bit "
    "uniforms (values within +-3.33); fp32 by the AVX2 kernel (avx_mathfun log/sincos, GCC-fused FMAs).",
    "torch2.11-scalar": "torch <= 2.11 with ATEN_CPU_CAPABILITY=default (or no AVX2): the same bf16 draw as "
    "torch2.11-avx512; fp32 by the scalar kernel (glibc logf/sinf/cosf).",
    "torch2.13-avx2": "torch 2.13 on an AVX2/AVX512 CPU: bf16 = round(AVX2-kernel fp32 Box-Muller), 16 uniforms "
    "drawn per block; fp32 identical to torch2.11-avx512.",
    "torch2.13-scalar": "torch 2.13 with ATEN_CPU_CAPABILITY=default: bf16 = round(scalar-kernel fp32 "
    "Box-Muller), 16 uniforms per block; fp32 identical to torch2.11-scalar.",
    "native": "whatever the installed torch draws: torch.randn on the given generator.",
}

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)
_F32 = np.float32
_F64 = np.float64

# ====================================================================================== mt19937 (torch's engine)

_MT_N = 624


def mt19937_uint32(seed: int, count: int) -> np.ndarray:
    """The first ``count`` outputs of torch's CPU mt19937 after ``manual_seed(seed)``, with no torch involved.

    Used to check that the stream read through torch (``_uniform_bits``) is the plain mt19937 stream.
    """
    state = np.empty(_MT_N, dtype=np.uint32)
    # torch seeds mt19937 with the low 32 bits only: 2**64-1 (ai-toolkit's --seed -1) acts as 0xffffffff
    prev = seed & 0xFFFFFFFF
    state[0] = prev
    for j in range(1, _MT_N):
        prev = (1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF
        state[j] = prev
    out = []
    for _ in range(-(-count // _MT_N)):
        state = _mt_twist(state)
        out.append(_mt_temper(state))
    return np.concatenate(out)[:count] if out else np.empty(0, dtype=np.uint32)


def _mt_twist(st: np.ndarray) -> np.ndarray:
    st = st.copy()
    upper, lower, mat_a, one = (
        np.uint32(0x80000000),
        np.uint32(0x7FFFFFFF),
        np.uint32(0x9908B0DF),
        np.uint32(1),
    )

    def update(lo, hi, nxt, far):
        y = (st[lo:hi] & upper) | (nxt & lower)
        st[lo:hi] = far ^ (y >> one) ^ np.where(y & one, mat_a, np.uint32(0))

    # the recurrence reads state[i+1] and state[i+397 mod 624]; split where the latter is already updated
    update(0, 227, st[1:228].copy(), st[397:624].copy())
    update(227, 454, st[228:455].copy(), st[0:227].copy())
    update(454, 623, st[455:624].copy(), st[227:396].copy())
    update(623, 624, st[0:1].copy(), st[396:397].copy())
    return st


def _mt_temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint32(11))
    y = y ^ ((y << np.uint32(7)) & np.uint32(0x9D2C5680))
    y = y ^ ((y << np.uint32(15)) & np.uint32(0xEFC60000))
    return y ^ (y >> np.uint32(18))


def _uniform_bits(generator: torch.Generator, count: int) -> np.ndarray:
    """The low 24 bits of the generator's next ``count`` 32-bit outputs, advancing it by exactly ``count``.

    ``torch.rand(float32)`` takes one 32-bit output per element and keeps ``(r & 0xffffff) * 2**-24``: exactly
    the uniform the normal kernels use, and it advances the generator as the kernel does.
    """
    u = torch.rand(count, generator=generator, dtype=torch.float32).numpy().astype(_F64)
    return (u * 2.0**24).astype(np.uint32)


# ====================================================================================== rounding helpers


def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), returned as float32. No NaNs occur here."""
    b = np.asarray(x, dtype=_F32).view(np.uint32)
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return b.view(_F32)


def _fma32(a, b, c) -> np.ndarray:
    """Correctly rounded float32 fused multiply-add (the vfmadd of the AVX2 kernel)."""
    p = np.asarray(a, _F32).astype(_F64) * np.asarray(b, _F32).astype(_F64)  # exact: 24+24 bits < 53
    c = np.asarray(c, _F32).astype(_F64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # TwoSum: p + c == s + err exactly
    # round to odd in double, then the cast to float32 is correctly rounded (53 >= 2*24 + 2)
    nudge = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(nudge, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(_F32)


# ====================================================================================== glibc logf/sinf/cosf
# The scalar kernels call std::log/std::cos/std::sin on float, i.e. glibc's logf/sinf/cosf (glibc >= 2.28,
# ARM optimized-routines algorithms, < 1 ulp but NOT correctly rounded: ~1.5 % of draws would differ in the last bit
# with a correctly rounded log/cos/sin). Ported in double precision; only the |x| < 120 branch is needed.

_LOGF_TAB = [
    ("0x1.661ec79f8f3bep+0", "-0x1.57bf7808caadep-2"),
    ("0x1.571ed4aaf883dp+0", "-0x1.2bef0a7c06ddbp-2"),
    ("0x1.49539f0f010bp+0", "-0x1.01eae7f513a67p-2"),
    ("0x1.3c995b0b80385p+0", "-0x1.b31d8a68224e9p-3"),
    ("0x1.30d190c8864a5p+0", "-0x1.6574f0ac07758p-3"),
    ("0x1.25e227b0b8eap+0", "-0x1.1aa2bc79c81p-3"),
    ("0x1.1bb4a4a1a343fp+0", "-0x1.a4e76ce8c0e5ep-4"),
    ("0x1.12358f08ae5bap+0", "-0x1.1973c5a611cccp-4"),
    ("0x1.0953f419900a7p+0", "-0x1.252f438e10c1ep-5"),
    ("0x1p+0", "0x0p+0"),
    ("0x1.e608cfd9a47acp-1", "0x1.aa5aa5df25984p-5"),
    ("0x1.ca4b31f026aap-1", "0x1.c5e53aa362eb4p-4"),
    ("0x1.b2036576afce6p-1", "0x1.526e57720db08p-3"),
    ("0x1.9c2d163a1aa2dp-1", "0x1.bc2860d22477p-3"),
    ("0x1.886e6037841edp-1", "0x1.1058bc8a07ee1p-2"),
    ("0x1.767dcf5534862p-1", "0x1.4043057b6ee09p-2"),
]
_LOGF_INVC = np.array([float.fromhex(a) for a, _ in _LOGF_TAB])
_LOGF_LOGC = np.array([float.fromhex(b) for _, b in _LOGF_TAB])
_LOGF_LN2 = float.fromhex("0x1.62e42fefa39efp-1")
_LOGF_A = [
    float.fromhex(h) for h in ("-0x1.00ea348b88334p-2", "0x1.5575b0be00b6ap-2", "-0x1.ffffef20a4123p-2")
]


def _glibc_logf(x: np.ndarray) -> np.ndarray:
    """glibc logf for normal positive float32 inputs."""
    ix = np.asarray(x, _F32).view(np.uint32)
    tmp = ix - np.uint32(0x3F330000)  # uint32 wrap-around, as in C
    i = (tmp >> np.uint32(19)) & np.uint32(15)
    k = tmp.view(np.int32) >> np.int32(23)  # arithmetic shift
    iz = ix - (tmp & np.uint32(0x1FF << 23))
    z = iz.view(_F32).astype(_F64)
    r = z * _LOGF_INVC[i] - 1.0
    y0 = _LOGF_LOGC[i] + k.astype(_F64) * _LOGF_LN2
    r2 = r * r
    y = _LOGF_A[1] * r + _LOGF_A[2]
    y = _LOGF_A[0] * r2 + y
    y = y * r2 + (y0 + r)
    return np.where(ix == np.uint32(0x3F800000), _F32(0), y.astype(_F32))  # logf(1) is exactly +0


_SC_HPI_INV = float.fromhex("0x1.45F306DC9C883p+23")  # 2/pi * 2^24 (x86-64 has TOINT_INTRINSICS == 0)
_SC_HPI = float.fromhex("0x1.921FB54442D18p0")
_SC_C = [
    float.fromhex(h)
    for h in (
        "0x1p0",
        "-0x1.ffffffd0c621cp-2",
        "0x1.55553e1068f19p-5",
        "-0x1.6c087e89a359dp-10",
        "0x1.99343027bf8c3p-16",
    )
]
_SC_S = [
    float.fromhex(h) for h in ("-0x1.555545995a603p-3", "0x1.1107605230bc4p-7", "-0x1.994eb3774cf24p-13")
]
_SC_SIGN = np.array([1.0, -1.0, -1.0, 1.0])


def _abstop12(x) -> np.ndarray:
    return (np.asarray(x, _F32).view(np.uint32) >> np.uint32(20)) & np.uint32(0x7FF)


def _sincosf_poly(x, x2, negate_cos, use_cos):
    # glibc's sinf_poly; its second table negates the cosine coefficients
    sign = np.where(negate_cos, -1.0, 1.0)
    x4 = x2 * x2
    c2 = sign * _SC_C[3] + x2 * (sign * _SC_C[4])
    c1 = sign * _SC_C[0] + x2 * (sign * _SC_C[1])
    x6 = x4 * x2
    cos_v = (c1 + x4 * (sign * _SC_C[2])) + x6 * c2
    x3 = x * x2
    s1 = _SC_S[1] + x2 * _SC_S[2]
    x7 = x3 * x2
    sin_v = (x + x3 * _SC_S[0]) + x7 * s1
    return np.where(use_cos, cos_v, sin_v)


def _glibc_sincosf(y: np.ndarray, cosine: bool) -> np.ndarray:
    y = np.asarray(y, _F32)
    top = _abstop12(y)
    if np.any(top >= _abstop12(_F32(120.0))):
        raise ValueError("only |x| < 120 is ported")
    x = y.astype(_F64)
    small = top < _abstop12(_F32(float.fromhex("0x1.921FB6p-1")))
    tiny = top < _abstop12(_F32(2.0**-12))
    # reduce_fast without TOINT_INTRINSICS: truncating int conversion of a 2^24-scaled quotient
    n = (np.trunc(x * _SC_HPI_INV).astype(np.int64) + 0x800000) >> 24
    xr = x - n.astype(_F64) * _SC_HPI
    negate = (n & 2) != 0
    quadrant_odd = (n & 1) == 1
    big = _sincosf_poly(xr * _SC_SIGN[n & 3], xr * xr, negate, quadrant_odd ^ cosine)
    near = _sincosf_poly(x, x * x, np.zeros_like(negate), np.full_like(negate, cosine))
    near = np.where(tiny, 1.0 if cosine else x, near)
    return np.where(small, near, big).astype(_F32)


# ====================================================================================== avx_mathfun (AVX2 kernel)
# ATen's normal_fill_16_AVX2 / NormalFill16<float> uses log256_ps and sincos256_ps of avx_mathfun.h (Cephes
# polynomials in float32). The kernels are compiled by GCC with -mfma and its default -ffp-contract=fast, so each
# intrinsic multiply whose only use is an add is fused into an FMA; reproducing exactly those fusions is what makes
# the port bit exact (without them ~1 % of fp32 draws differ by 1-2 ulp).

_LOG_P = [
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
]


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun log256_ps for positive normal inputs."""
    xi = np.asarray(x, _F32).view(np.int32)
    e = ((xi >> 23) - 127).astype(_F32) + _F32(1)
    x = ((xi & np.int32(~0x7F800000)) | np.int32(0x3F000000)).view(_F32)  # mantissa in [0.5, 1)
    mask = x < _F32(0.707106781186547524)
    tmp = np.where(mask, x, _F32(0))
    x = x - _F32(1)
    e = e - np.where(mask, _F32(1), _F32(0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _F32(_LOG_P[0]))
    for p in _LOG_P[1:]:
        y = _fma32(y, x, _F32(p))  # y = y*x + p, fused
    y = y * x
    y = _fma32(y, z, e * _F32(-2.12194440e-4))  # y*z + e*q1: GCC fuses the first product it meets
    y = _fma32(-z, _F32(0.5), y)  # y - 0.5*z, fused
    return _fma32(e, _F32(0.693359375), x + y)  # (x + y) + e*q2, fused


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun sincos256_ps."""
    x = np.asarray(x, _F32)
    sign_sin = np.signbit(x)
    x = np.abs(x)
    j = (x * _F32(1.27323954473516)).astype(np.int32)  # cvttps: truncation
    j = (j + 1) & ~1
    y = j.astype(_F32)
    sign_sin = sign_sin ^ ((j & 4) != 0)
    sin_poly = (j & 2) == 0
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma32(y, _F32(dp), x)  # x + y*DP, fused
    sign_cos = (~(j - 2) & 4) != 0
    z = x * x
    yc = _fma32(np.full_like(x, _F32(2.443315711809948e-005)), z, _F32(-1.388731625493765e-003))
    yc = _fma32(yc, z, _F32(4.166664568298827e-002))
    yc = yc * z
    yc = _fma32(yc, z, -(z * _F32(0.5)))  # y*z - 0.5*z: the earlier product y*z is the fused one
    yc = yc + _F32(1)
    ys = _fma32(np.full_like(x, _F32(-1.9515295891e-4)), z, _F32(8.3321608736e-3))
    ys = _fma32(ys, z, _F32(-1.6666654611e-1))
    ys = ys * z
    ys = _fma32(ys, x, x)
    s = np.where(sin_poly, ys, yc)
    c = np.where(sin_poly, yc, ys)
    return np.where(sign_sin, -s, s), np.where(sign_cos, -c, c)


# ====================================================================================== Box-Muller on 16-blocks
# Every kernel works on blocks of 16 uniforms: u[0:8] give the radius, u[8:16] the angle; outputs 0..7 are
# r*cos and 8..15 r*sin. Inputs here are arrays of shape (blocks, 8) for each half.

_TWO_PI_F64 = 2.0 * math.pi  # `2.0f * c10::pi<double>` is a double
_TWO_PI_F32 = _F32(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>) rounds it to float


def _box_muller_avx2(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(_F32(-2) * _log256_ps(_F32(1) - u1))
    sin_t, cos_t = _sincos256_ps(_TWO_PI_F32 * u2)
    # fmadd(n, std=1, mean=0) is exact except that it turns -0 into +0
    return radius * cos_t + _F32(0), radius * sin_t + _F32(0)


def _box_muller_scalar_f32(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    radius = np.sqrt(_F32(-2) * _glibc_logf(_F32(1) - u1))
    theta = (_TWO_PI_F64 * u2.astype(_F64)).astype(_F32)  # product in double, stored as float
    return radius * _glibc_sincosf(theta, True) + _F32(0), radius * _glibc_sincosf(theta, False) + _F32(0)


def _box_muller_bf16_legacy(u1: np.ndarray, u2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # normal_fill_16<BFloat16>: every c10::BFloat16 operation computes in float and rounds back to bf16
    r = _round_bf16
    one_minus = r(_F32(1) - u1)  # exact: u1 has 8 bits
    radius = r(np.sqrt(r(_F32(-2) * r(_glibc_logf(one_minus)))))
    # double -> float -> bf16: BFloat16 is built from a float
    theta = r((_TWO_PI_F64 * u2.astype(_F64)).astype(_F32))
    cos_part = r(radius * r(_glibc_sincosf(theta, True)))
    sin_part = r(radius * r(_glibc_sincosf(theta, False)))
    return cos_part + _F32(0), sin_part + _F32(0)  # `* std + mean` (1, 0): exact, -0 -> +0


# ====================================================================================== kernels


def _fill(bits: np.ndarray, size: int, transform, uniform_bits: int) -> np.ndarray:
    """Run ``transform`` on each 16-block of uniforms and place the blocks as ATen's normal_fill does.

    ``bits`` holds the low 24 bits of every draw in consumption order: first the main part (at least
    ``size // 16 * 16`` draws), then 16 more if ``size % 16`` (the last 16 outputs are recomputed from them).
    """
    mask = np.uint32((1 << uniform_bits) - 1)
    u = ((bits & mask).astype(_F64) * 2.0**-uniform_bits).astype(_F32)  # (r & mask) * 2^-digits, exact
    blocks = size // 16
    out = np.empty(size, dtype=_F32)
    main = u[: blocks * 16].reshape(blocks, 2, 8)
    cos_part, sin_part = transform(main[:, 0, :], main[:, 1, :])
    out[: blocks * 16] = np.stack([cos_part, sin_part], axis=1).reshape(-1)
    if size % 16:
        tail = u[-16:].reshape(1, 2, 8)
        cos_part, sin_part = transform(tail[:, 0, :], tail[:, 1, :])
        # overlaps the last full block, as in ATen
        out[size - 16 :] = np.concatenate([cos_part[0], sin_part[0]])
    return out


_TORCH213 = (NoiseAlgorithm.TORCH213_AVX2, NoiseAlgorithm.TORCH213_SCALAR)


def _draw_count(size: int, algorithm: NoiseAlgorithm, dtype: torch.dtype) -> int:
    tail = 16 if size % 16 else 0
    if dtype == torch.bfloat16 and algorithm in _TORCH213:
        # 2.13 draws 16 uniforms per full block into a float buffer: the size % 16 leftovers are never drawn
        return size // 16 * 16 + tail
    # everything else first fills all `size` elements with uniforms, then draws 16 more for the tail
    return size + tail


def _compute(bits: np.ndarray, size: int, algorithm: NoiseAlgorithm, dtype: torch.dtype) -> np.ndarray:
    vector = algorithm in (NoiseAlgorithm.TORCH211_AVX512, NoiseAlgorithm.TORCH213_AVX2)
    fp32_transform = _box_muller_avx2 if vector else _box_muller_scalar_f32
    if dtype == torch.float32:
        return _fill(bits, size, fp32_transform, 24)
    if algorithm in (NoiseAlgorithm.TORCH211_AVX512, NoiseAlgorithm.TORCH211_SCALAR):
        # uniform_real_distribution<BFloat16> keeps 8 bits (digits of bf16): hence |z| <= sqrt(-2 ln 2^-8) = 3.33
        return _fill(bits, size, _box_muller_bf16_legacy, 8)
    return _round_bf16(_fill(bits, size, fp32_transform, 24))


def _to_tensor(values: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        halves = (_round_bf16(values).view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.int16)
        return torch.from_numpy(halves.copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(values.copy()).reshape(shape)


def draw_noise(
    generator: torch.Generator,
    shape: Sequence[int],
    algorithm: NoiseAlgorithm | str,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``torch.randn(shape, dtype=dtype, generator=generator)`` on the CPU as ``algorithm``'s torch drew it.

    ``generator`` is a CPU generator, already seeded (and possibly advanced, e.g. by the reference-image VAE
    sample); it is advanced exactly as that torch's kernel would advance it. Returns a contiguous CPU tensor.
    """
    algorithm = NoiseAlgorithm(algorithm)
    shape = tuple(int(s) for s in shape)
    if generator.device.type != "cpu":
        raise ValueError(f"ai-toolkit draws the noise from a CPU generator, got one on {generator.device}")
    if algorithm is NoiseAlgorithm.NATIVE:
        return torch.randn(shape, dtype=dtype, generator=generator)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{algorithm.value} is reproduced for bfloat16 and float32 only, not {dtype}")
    size = math.prod(shape)
    if size < 16:
        # torch uses a different (double, cached-pair) path below 16 elements; latents always have >= 16
        raise ValueError(f"draws of fewer than 16 elements are not reproduced (shape {shape})")
    bits = _uniform_bits(generator, _draw_count(size, algorithm, dtype))
    return _to_tensor(_compute(bits, size, algorithm, dtype), shape, dtype)


def draw_initial_noise(
    seed: int,
    shape: Sequence[int],
    algorithm: NoiseAlgorithm | str,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``torch.manual_seed(seed); torch.randn(shape, dtype=dtype)`` as ``algorithm``'s torch drew it.

    Like ai-toolkit it seeds the GLOBAL generators (``torch.manual_seed``: CPU and CUDA) and leaves the global
    CPU generator where ai-toolkit's draw left it. ``seed`` may be anything ``torch.manual_seed`` accepts,
    including 2**64-1. Callers that draw something else first (a CPU VAE sample) seed themselves and use
    :func:`draw_noise` with ``torch.default_generator``.
    """
    torch.manual_seed(seed)
    return draw_noise(torch.default_generator, shape, algorithm, dtype)


# ====================================================================================== native detection

_PROBE_SHAPE = (1, 16, 128, 128)  # big enough to tell 2.13's vector and scalar bf16 draws apart (~30 differ)
_PROBE_SEED = 1234


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if not match:
        raise RuntimeError(f"cannot parse torch version {torch.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def _expected_native() -> NoiseAlgorithm | None:
    # AVX512 builds take the AVX2 kernel too (measured on 2.11 and 2.13)
    vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    version = _torch_version()
    if version <= (2, 11):
        return NoiseAlgorithm.TORCH211_AVX512 if vector else NoiseAlgorithm.TORCH211_SCALAR
    if version >= (2, 13):
        return NoiseAlgorithm.TORCH213_AVX2 if vector else NoiseAlgorithm.TORCH213_SCALAR
    return None  # 2.12 was never measured


def _bit_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def detect_native_algorithm(dtype: torch.dtype = torch.bfloat16, probe: bool = True) -> NoiseAlgorithm:
    """The algorithm the installed torch draws with, from ``torch.__version__`` and the CPU capability.

    Measured: 2.11 (AVX512 and default) and 2.13 (AVX2, AVX512 and default) on x86-64; older versions are assumed
    to be 2.11's (the bf16 kernel is years old), 2.12 and non-x86 capabilities are unknown. With ``probe`` (the
    default) a ``dtype`` draw on a private generator (the global one is untouched) confirms the choice or, if the
    expectation is missing or wrong, picks the algorithm that reproduces it (with a warning).
    """
    expected = _expected_native()
    if not probe:
        if expected is None:
            raise RuntimeError(
                f"no known noise algorithm for torch {torch.__version__}; call with probe=True"
            )
        return expected
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    native = torch.randn(_PROBE_SHAPE, dtype=dtype, generator=generator)
    matches = []
    for algorithm in NoiseAlgorithm:
        if algorithm is NoiseAlgorithm.NATIVE:
            continue
        ours = draw_noise(torch.Generator().manual_seed(_PROBE_SEED), _PROBE_SHAPE, algorithm, dtype)
        if torch.equal(_bit_view(ours), _bit_view(native)):
            matches.append(algorithm)
    if expected in matches:
        return expected
    if not matches:
        raise RuntimeError(
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}) draws {dtype} noise that no "
            "known algorithm reproduces"
        )
    warnings.warn(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}) draws like {matches[0].value}, "
        f"expected {expected.value if expected else 'an unmeasured algorithm'}",
        stacklevel=2,
    )
    return matches[0]
