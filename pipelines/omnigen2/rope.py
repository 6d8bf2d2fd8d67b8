"""OmniGen2's 3-axis rotary position embedding.

Every token carries a position id triple ``(a, row, col)``:

- text token ``i``: ``(i, i, i)``;
- reference image ``k`` (patch grid ``h x w``): ``(shift_k, row, col)``, where ``shift_0`` is the valid text
  length and each image moves the shift on by ``max(h, w)``;
- the target image: ``(shift, row, col)`` with the shift after the last reference image.

The frequency tables are complex128 (float64 angles), one table per axis; a token's rotation is the three
tables gathered at its ids and concatenated. Rotation multiplies the query/key, viewed as complex pairs of
interleaved channels, by that table in complex128 and rounds the result back to the activation dtype once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def frequency_tables(axes_dim: Sequence[int], axes_lens: Sequence[int], theta: float = 10000.0) -> list[torch.Tensor]:
    """One complex128 table ``[axes_len, axes_dim // 2]`` per axis: ``exp(i * pos / theta**(2k/d))``."""
    tables = []
    for dim, length in zip(axes_dim, axes_lens, strict=True):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(length), inv_freq)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return tables


def position_ids(text_len: int, ref_grids: Sequence[tuple[int, int]], image_grid: tuple[int, int]) -> torch.Tensor:
    """Position ids ``[text_len + sum(ref tokens) + image tokens, 3]`` (int64) for one sequence.

    ``ref_grids`` and ``image_grid`` are patch grids ``(rows, cols)``.
    """
    parts = [torch.arange(text_len, dtype=torch.int64).unsqueeze(1).expand(text_len, 3)]
    shift = text_len
    for rows, cols in ref_grids:
        parts.append(_grid_ids(shift, rows, cols))
        shift += max(rows, cols)
    parts.append(_grid_ids(shift, *image_grid))
    return torch.cat(parts, dim=0)


def _grid_ids(shift: int, rows: int, cols: int) -> torch.Tensor:
    row_ids = torch.arange(rows, dtype=torch.int64).repeat_interleave(cols)
    col_ids = torch.arange(cols, dtype=torch.int64).repeat(rows)
    return torch.stack([torch.full_like(row_ids, shift), row_ids, col_ids], dim=1)


def gather_rotations(tables: Sequence[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Complex128 rotations ``[..., sum(axes_dim) // 2]`` for position ids ``[..., 3]``."""
    return torch.cat([table[ids[..., axis]] for axis, table in enumerate(tables)], dim=-1)


def apply_rotation(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[batch, seq, heads, head_dim]`` by ``rotations`` ``[batch, seq, head_dim // 2]``.

    Channel pairs (0,1), (2,3), ... are the complex numbers. The product is taken in complex128 (the tables'
    precision, as OmniGen2 does) and rounded once to ``x.dtype``.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))
    rotated = torch.view_as_real(pairs * rotations.unsqueeze(2)).flatten(3)
    return rotated.type_as(x)


def real_tables(rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``--fast``: the complex128 rotations as float32 ``(cos, sin)`` for :func:`apply_rotation_real`."""
    return rotations.real.to(torch.float32).contiguous(), rotations.imag.to(torch.float32).contiguous()


def apply_rotation_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``--fast`` rotary: the same rotation in float32 real arithmetic (``cos``/``sin`` ``[batch, seq, D/2]``).

    One fused kernel under ``torch.compile`` instead of complex128 promotion, product and two casts; it differs
    from :func:`apply_rotation` in the last bits (float32 instead of float64 products).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)
