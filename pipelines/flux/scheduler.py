"""ai-toolkit's FLUX.1 sampling schedule: flow matching with FLUX.1's resolution-dependent ("dynamic") shift.

toolkit/sampler.py ``get_sampler('flowmatch', arch='flux')`` builds CustomFlowMatchEulerDiscreteScheduler (which
keeps diffusers' ``set_timesteps`` and ``step``) from ai-toolkit's own ``flux_config``, not from the model
folder's scheduler. For ``n`` steps on ``seq`` packed latent tokens ((H/16) * (W/16)), FluxPipeline asks for::

    s_i   = linspace(1, 1/n, n)                                  float64, then rounded to float32
    mu    = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)     float64
    s_i'  = e^mu / (e^mu + (1 / s_i - 1))                        float32 (e^mu rounded to float32)
    t_i   = 1000 * s_i'                                          float32, followed by the final sigma 0

and each Euler step is ``x' = bf16(float32(x) + bf16(dt * v))`` with ``dt = s_{i+1} - s_i`` a 0-dim float32
tensor: the product takes ``v``'s dtype, only the sum is float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# toolkit/sampler.py flux_config (shift 3.0 there is unused: use_dynamic_shifting is true).
BASE_IMAGE_SEQ_LEN = 256
MAX_IMAGE_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15
NUM_TRAIN_TIMESTEPS = 1000


def requested_sigmas(num_steps: int) -> np.ndarray:
    """The sigmas FluxPipeline passes to ``set_timesteps``: ``linspace(1, 1/n, n)`` in float64."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def calculate_shift(image_seq_len: int) -> float:
    """``mu``: linear in the packed token count, 0.5 at 256 tokens and 1.15 at 4096 (float64)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_IMAGE_SEQ_LEN - BASE_IMAGE_SEQ_LEN)
    return image_seq_len * slope + (BASE_SHIFT - slope * BASE_IMAGE_SEQ_LEN)


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Exponential time shift ``e^mu / (e^mu + (1/s - 1))`` computed in float32, as NumPy does for a Python
    float against a float32 array (``(1/s - 1) ** 1.0`` of diffusers is exact and left out)."""
    sigmas = np.asarray(sigmas, dtype=np.float32)
    exp_mu = np.float32(math.exp(mu))
    return exp_mu / (exp_mu + (np.float32(1) / sigmas - np.float32(1)))


def flux_schedule(num_steps: int, image_seq_len: int, device: torch.device | str = "cpu"):
    """``(timesteps, sigmas)`` as float32 tensors on ``device``: ``n`` timesteps and ``n + 1`` sigmas (last 0)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    shifted = time_shift(calculate_shift(image_seq_len), requested_sigmas(num_steps).astype(np.float32))
    sigmas = torch.from_numpy(shifted).to(dtype=torch.float32, device=device)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return timesteps, torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """One flow-matching Euler step between the 0-dim float32 sigmas; returns the sample in ``velocity.dtype``."""
    return (sample.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)
