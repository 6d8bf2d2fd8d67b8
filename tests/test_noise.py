"""Our re-implementations of torch's CPU randn kernels against the oracle draws of torch 2.11 and 2.13.

Every algorithm is bit exact on every oracle key, so no tolerance is pinned anywhere (see NOISE.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pipelines.common.noise import (
    ALGORITHMS,
    NoiseAlgorithm,
    _expected_native,
    _glibc_logf,
    _glibc_sincosf,
    _torch_version,
    detect_native_algorithm,
    draw_initial_noise,
    draw_noise,
    mt19937_uint32,
)

ORACLE_FILES = {
    "torch-2.11.0-avx512.safetensors": (NoiseAlgorithm.TORCH211_AVX512, "2.11.0", "AVX512"),
    "torch-2.11.0-default.safetensors": (NoiseAlgorithm.TORCH211_SCALAR, "2.11.0", "DEFAULT"),
    "torch-2.13.0-avx2.safetensors": (NoiseAlgorithm.TORCH213_AVX2, "2.13.0", "AVX2"),
    "torch-2.13.0-default.safetensors": (NoiseAlgorithm.TORCH213_SCALAR, "2.13.0", "DEFAULT"),
}
KEY = re.compile(r"seed(\d+)_(\d+(?:x\d+)*)_(bf16|fp32)$")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ON_TORCH_213 = _torch_version() == (2, 13)
VECTOR_CPU = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so -0 != +0 and the comparison is exact."""
    return t.contiguous().view(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def assert_bit_equal(ours: torch.Tensor, ref: torch.Tensor, what: str):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    diff = bits(ours) != bits(ref)
    if diff.any():
        worst = (ours.float() - ref.float()).abs().max().item()
        pytest.fail(f"{what}: {int(diff.sum())} of {diff.numel()} differ, max |diff| {worst}")


@pytest.mark.parametrize("name", sorted(ORACLE_FILES))
def test_every_oracle_key_is_reproduced_bit_for_bit(oracle_dir, name):
    algorithm, version, capability = ORACLE_FILES[name]
    with safe_open(str(oracle_dir / "noise" / name), "pt") as f:
        meta = f.metadata()
        assert meta["torch"].startswith(version) and meta["cpu_capability"] == capability
        keys = list(f.keys())
        assert len(keys) == 36
        for key in keys:
            seed, shape, dtype = KEY.match(key).groups()
            shape = tuple(int(s) for s in shape.split("x"))
            ours = draw_initial_noise(int(seed), shape, algorithm, DTYPES[dtype])
            assert_bit_equal(ours, f.get_tensor(key), f"{name} {key}")


def test_bf16_of_torch_211_is_the_same_on_both_paths_and_bounded():
    a = draw_initial_noise(7, (1, 16, 40, 24), "torch2.11-avx512")
    b = draw_initial_noise(7, (1, 16, 40, 24), "torch2.11-scalar")
    assert_bit_equal(a, b, "2.11 bf16 avx512 vs scalar")
    assert a.float().abs().max().item() <= 3.34  # 8-bit uniforms: sqrt(-2 ln 2^-8) = 3.33


def test_the_paths_really_differ():
    """Guards against a test that passes because two algorithms collapsed into one."""
    shape = (1, 16, 128, 128)
    old = draw_initial_noise(0, shape, "torch2.11-avx512")
    new_vec = draw_initial_noise(0, shape, "torch2.13-avx2")
    new_scalar = draw_initial_noise(0, shape, "torch2.13-scalar")
    assert (bits(old) != bits(new_vec)).float().mean() > 0.9
    assert 0 < int((bits(new_vec) != bits(new_scalar)).sum()) < 200  # ~1 in 10k bf16 values
    f_vec = draw_initial_noise(0, shape, "torch2.13-avx2", torch.float32)
    f_scalar = draw_initial_noise(0, shape, "torch2.11-scalar", torch.float32)
    assert (bits(f_vec) != bits(f_scalar)).float().mean() > 0.2


@pytest.mark.parametrize("seed", [0, 42, 1234, 2**32 + 5, 2**64 - 1])
def test_own_mt19937_is_torchs_stream(seed):
    g = torch.Generator().manual_seed(seed)
    low24 = (torch.rand(2000, generator=g).double() * 2**24).numpy().astype(np.uint32)
    assert np.array_equal(mt19937_uint32(seed, 2000) & np.uint32(0xFFFFFF), low24)


@pytest.mark.parametrize("algorithm", [a for a in NoiseAlgorithm if a is not NoiseAlgorithm.NATIVE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (1, 3, 5, 7), (17,)])
def test_generator_is_advanced_like_the_kernel(algorithm, dtype, shape):
    size = int(np.prod(shape))
    tail = 16 if size % 16 else 0
    per_block_bf16 = dtype == torch.bfloat16 and algorithm.value.startswith("torch2.13")
    expected_draws = size // 16 * 16 + tail if per_block_bf16 else size + tail
    ours = torch.Generator().manual_seed(3)
    draw_noise(ours, shape, algorithm, dtype)
    ref = torch.Generator().manual_seed(3)
    torch.rand(expected_draws, generator=ref)
    assert torch.equal(ours.get_state(), ref.get_state())


@pytest.mark.skipif(not (ON_TORCH_213 and VECTOR_CPU), reason="needs torch 2.13 on an AVX2/AVX512 CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 16, 10, 8), (1, 3, 5, 7), (2, 3, 11), (16,), (1, 16, 1, 1)])
def test_native_213_vector_draws_and_state_including_tails(dtype, shape):
    """The oracle has only multiples of 16; the installed torch 2.13 checks the tail handling and the state."""
    vae_shape = (1, 16, 2, 3)  # a CPU VAE sample drawn from the same generator first
    g_native = torch.Generator().manual_seed(99)
    torch.randn(vae_shape, generator=g_native)
    native = torch.randn(shape, dtype=dtype, generator=g_native)
    g_ours = torch.Generator().manual_seed(99)
    torch.randn(vae_shape, generator=g_ours)
    ours = draw_noise(g_ours, shape, NoiseAlgorithm.TORCH213_AVX2, dtype)
    assert_bit_equal(ours, native, f"{shape} {dtype}")
    assert torch.equal(g_ours.get_state(), g_native.get_state())


@pytest.mark.skipif(not ON_TORCH_213, reason="needs torch 2.13")
def test_native_213_scalar_tails_in_a_default_capability_process(tmp_path):
    shapes = [(1, 3, 5, 7), (2, 3, 11), (1, 16, 10, 8)]
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
        "out = {}\n"
        f"for i, shape in enumerate({shapes!r}):\n"
        "    for name, dtype in (('bf16', torch.bfloat16), ('fp32', torch.float32)):\n"
        "        torch.manual_seed(2**64 - 1)\n"
        "        out[f'{i}_{name}'] = torch.randn(shape, dtype=dtype)\n"
        "save_file(out, sys.argv[1])\n"
    )
    path = tmp_path / "scalar.safetensors"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
    with safe_open(str(path), "pt") as f:
        for i, shape in enumerate(shapes):
            for name, dtype in DTYPES.items():
                ours = draw_initial_noise(2**64 - 1, shape, NoiseAlgorithm.TORCH213_SCALAR, dtype)
                assert_bit_equal(ours, f.get_tensor(f"{i}_{name}"), f"scalar {shape} {name}")


def test_draw_initial_noise_seeds_and_advances_the_global_generator():
    shape = (1, 16, 8, 10)
    ours = draw_initial_noise(2**64 - 1, shape, "native")
    after_ours = torch.get_rng_state()
    torch.manual_seed(2**64 - 1)
    ref = torch.randn(shape, dtype=torch.bfloat16)
    assert_bit_equal(ours, ref, "native")
    assert torch.equal(after_ours, torch.get_rng_state())
    if _expected_native() is not None:
        draw_initial_noise(2**64 - 1, shape, _expected_native())
        assert torch.equal(after_ours, torch.get_rng_state())


def test_detect_native_algorithm_here():
    expected = _expected_native()
    if expected is None:
        pytest.skip(f"torch {torch.__version__} has no measured algorithm")
    assert detect_native_algorithm(probe=False) is expected
    assert detect_native_algorithm() is expected
    assert detect_native_algorithm(torch.float32) is expected


def test_algorithm_names_and_errors():
    assert list(ALGORITHMS) == [a.value for a in NoiseAlgorithm]
    with pytest.raises(ValueError):
        draw_initial_noise(0, (1, 16, 8, 8), "torch2.12")
    with pytest.raises(ValueError):
        draw_initial_noise(0, (3, 4), "torch2.13-avx2")
    with pytest.raises(ValueError):
        draw_initial_noise(0, (1, 16, 8, 8), "torch2.13-avx2", torch.float16)


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc"
    or not (2, 28) <= tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 41),
    reason="compares the logf/sinf/cosf port with the host glibc (2.28-2.40 have these algorithms)",
)
def test_glibc_port_matches_the_host_libm():
    libm = ctypes.CDLL("libm.so.6")
    rng = np.random.default_rng(0)
    inputs = {
        "logf": rng.uniform(2.0**-24, 1.0, 4000).astype(np.float32),
        "sinf": rng.uniform(0.0, 2 * np.pi, 4000).astype(np.float32),
        "cosf": rng.uniform(0.0, 2 * np.pi, 4000).astype(np.float32),
    }
    ours = {
        "logf": _glibc_logf,
        "sinf": lambda x: _glibc_sincosf(x, False),
        "cosf": lambda x: _glibc_sincosf(x, True),
    }
    for name, x in inputs.items():
        fn = getattr(libm, name)
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
        host = np.array([fn(float(v)) for v in x], dtype=np.float32)
        assert np.array_equal(ours[name](x).view(np.uint32), host.view(np.uint32)), name
