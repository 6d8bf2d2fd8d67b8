"""CPU kernel profiles: make this CPU compute like the trainer's.

PyTorch picks CPU kernels by the processor's instruction set (ATen's vector width, oneDNN's ISA for bf16
matmuls and convolutions, MKL's code path), and each choice changes the last bits of a bf16 replay. A preview
made on an AVX2-only CPU is reproduced bit for bit on an AVX-512/AMX CPU only when all three are held to the
AVX2 paths. They are read once, when torch loads its kernels, so a profile must be applied before ``import
torch`` (the CLI does it first thing; the tests in ``tests/conftest.py``). No torch import in this module.
"""

from __future__ import annotations

import os
import sys

CPU_PROFILES: dict[str, dict[str, str]] = {
    # Whatever this CPU does natively.
    "native": {},
    # An AVX2-only x86 CPU (the oracle previews were made on one): ATen AVX2 kernels, oneDNN capped at AVX2,
    # MKL's conditional-numerical-reproducibility path that such a CPU takes.
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"},
}


def apply_cpu_profile(name: str) -> None:
    """Set the environment of profile ``name``; refuses once torch is imported with other settings."""
    if name not in CPU_PROFILES:
        raise ValueError(f"unknown CPU profile {name!r}; choose one of {', '.join(CPU_PROFILES)}")
    wanted = CPU_PROFILES[name]
    if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in wanted.items()):
        raise RuntimeError(f"CPU profile {name!r} must be applied before torch is imported")
    os.environ.update(wanted)


def active_cpu_profile() -> str:
    """The profile whose settings the environment holds now ('native' if none fully does)."""
    for name, env in CPU_PROFILES.items():
        if env and all(os.environ.get(k) == v for k, v in env.items()):
            return name
    return "native"
