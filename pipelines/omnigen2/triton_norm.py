"""Our own Triton RMSNorm with the numerics of ai-toolkit's default GPU path (kernel profile ``triton``).

ai-toolkit normalises the transformer's blocks with a Triton kernel whenever ``triton`` imports. Its arithmetic,
which this kernel follows so that the last bits agree: one program per row of the input seen as ``[M, N]``; the
row loaded over a power-of-two block, masked lanes zero, in float32; ``var = sum(x * x) / N``;
``rstd = 1 / sqrt(var + eps)``; ``y = x * rstd * w`` in float32 and rounded once to the input dtype. The one free
parameter is the warp count: it sets the shape of ``tl.sum``'s reduction tree, so a different count rounds the
sum of squares differently. ai-toolkit autotunes it per process (``kernels.TRITON_WARPS``); it is passed in here.
The generated code is the installed Triton's: the trainer's Triton version matters too (3.6.0 was measured).
"""

from __future__ import annotations

import functools

import torch


def available() -> str | None:
    """None when the kernel can run here, else why not (in words)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not importable"
    if not torch.cuda.is_available():
        return "Triton kernels need a CUDA device"
    return None


def require() -> None:
    problem = available()
    if problem:
        raise RuntimeError(f"kernel profile 'triton': {problem}")


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rows(X, Y, W, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        inside = cols < N
        x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
        squares = tl.where(inside, x * x, 0.0)
        var = tl.sum(squares, axis=0) / N
        rstd = 1 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=inside).to(tl.float32)
        tl.store(Y + row * stride_y + cols, x * rstd * w, mask=inside)

    return rms_norm_rows, triton.next_power_of_2


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, num_warps: int) -> torch.Tensor:
    """RMSNorm over the last dim of CUDA tensor ``x`` with ``num_warps`` warps per row; same shape and dtype."""
    kernel, next_power_of_2 = _kernel()
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    width = rows.shape[1]
    if rows.shape[0]:
        kernel[(rows.shape[0],)](
            rows, out, weight, rows.stride(0), out.stride(0), width, eps,
            BLOCK_N=next_power_of_2(width), num_warps=num_warps,
        )
    return out.reshape(shape)
