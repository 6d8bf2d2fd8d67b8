"""OmniGen2's flow-match Euler scheduler with dynamic time shift.

Time runs from 0 (pure noise) to 1 (data). For ``N`` steps on a latent of ``h x w``::

    t_i = i / N                          (float32, i = 0..N-1)
    m   = sqrt(h * w) / 40               (float64: NumPy 2 promotes the float32 grid to float64 here)
    t_i = t_i / (m - m * t_i + t_i)      (then rounded to float32), followed by t_N = 1.0

and one Euler step is ``x_next = float32(x) + (t_next - t) * v``, where the product is taken in ``v``'s dtype
(a 0-dim float32 tensor times a bf16 tensor is bf16) and only the sum is float32, rounded back to ``v``'s dtype.
"""

from __future__ import annotations

import numpy as np
import torch


class FlowMatchEulerScheduler:
    """``set_timesteps`` then ``step`` for each timestep in ``timesteps``."""

    def __init__(self, num_train_timesteps: int = 1000, dynamic_time_shift: bool = True):
        self.num_train_timesteps = num_train_timesteps
        self.dynamic_time_shift = dynamic_time_shift
        self.timesteps = torch.empty(0)
        self._grid = torch.empty(0)
        self._index = 0

    @classmethod
    def from_config(cls, config: dict) -> FlowMatchEulerScheduler:
        return cls(
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            dynamic_time_shift=bool(config.get("dynamic_time_shift", True)),
        )

    def set_timesteps(
        self, num_inference_steps: int, num_tokens: int | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Timesteps for ``num_inference_steps``; ``num_tokens`` = latent height x width (for the shift).

        They live on ``device`` like OmniGen2's, so the step's 0-dim arithmetic runs where the sample is.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        grid = np.linspace(0, 1, num_inference_steps + 1, dtype=np.float32)[:-1]
        if self.dynamic_time_shift and num_tokens is not None:
            m = np.sqrt(num_tokens) / 40
            grid = grid / (m - m * grid + grid)
        self.timesteps = torch.from_numpy(np.asarray(grid)).to(dtype=torch.float32, device=device)
        self._grid = torch.cat([self.timesteps, torch.ones(1, device=device)])
        self._index = 0
        return self.timesteps

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from the current timestep to the next; returns the sample in ``velocity.dtype``."""
        t, t_next = self._grid[self._index], self._grid[self._index + 1]
        self._index += 1
        return euler_step(velocity, sample, t, t_next)

    @property
    def grid(self) -> torch.Tensor:
        """The timesteps followed by 1.0 (on the timesteps' device): step ``i`` goes from ``grid[i]`` to ``grid[i+1]``."""
        return self._grid


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step between the 0-dim float32 timesteps ``t`` and ``t_next`` (device tensors: no host sync)."""
    return (sample.to(torch.float32) + (t_next - t) * velocity).to(velocity.dtype)
