"""Triton kernels of the fused norm + RoPE op: one pass forward, one pass backward.

Unfused, a per-head RMSNorm and RoPE take about seven elementwise kernels forward (casts, the
norm, three for RoPE) and as many backward, each a full trip through memory, and torch's
norm-weight gradient reduces badly over the short head dimension. Here each row ``(b, t, h)``
of ``x [B, T, H, d]`` is read once and written once; the weight gradient is summed per program
and the partial sums added up after.

Math (``r = rsqrt(mean(x^2) + eps)``, ``y = x r w``, ``P`` the rotate-half permutation
``(P y)_j = y_{(j + d/2) mod d}``)::

    out = y * cos + (P y) * sin
    dy  = dout * cos + P(dout * sin)          (P is its own inverse)
    dw  = sum_rows dy * x r
    dx  = r * (dy w - x r * mean(dy w * x r))
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rows(pid, T, H, n_rows, BLOCK_R: tl.constexpr):
    """Rows ``pid * BLOCK_R + [0, BLOCK_R)`` as ``(b, t, h)`` (int64) and their validity."""
    r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    return r // (H * T), (r // H) % T, r % H, r < n_rows


@triton.jit
def norm_rope_fwd_kernel(
    X, W, COS, SIN, OUT, RSTD,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_cos, stride_sin,
    T, H, n_rows, eps,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``OUT [B*T*H, D]`` (contiguous) and ``RSTD [B*T*H]`` from ``X [B, T, H, D]`` (any strides)."""
    b, t, h, mask = _rows(tl.program_id(0), T, H, n_rows, BLOCK_R)
    offs = tl.arange(0, D)
    swap = (offs + D // 2) % D  # rotate-half partner of each channel
    base = X + b[:, None] * stride_xb + t[:, None] * stride_xt + h[:, None] * stride_xh
    x = tl.load(base + offs[None, :] * stride_xd, mask=mask[:, None], other=0.0).to(tl.float32)
    x_swap = tl.load(base + swap[None, :] * stride_xd, mask=mask[:, None], other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None] * tl.load(W + offs).to(tl.float32)[None, :]
    y_swap = x_swap * rstd[:, None] * tl.load(W + swap).to(tl.float32)[None, :]
    cos = tl.load(COS + t[:, None] * stride_cos + offs[None, :], mask=mask[:, None], other=0.0)
    sin = tl.load(SIN + t[:, None] * stride_sin + offs[None, :], mask=mask[:, None], other=0.0)
    out = y * cos + y_swap * sin
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(OUT + rows.to(tl.int64)[:, None] * D + offs[None, :], out.to(OUT.dtype.element_ty), mask=mask[:, None])
    tl.store(RSTD + rows, rstd, mask=mask)


@triton.jit
def norm_rope_bwd_kernel(
    X, W, COS, SIN, RSTD, DOUT, DX, DW_PARTIAL,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_cos, stride_sin,
    T, H, n_rows,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``DX [B*T*H, D]`` (contiguous) and this program's share of the weight gradient, ``DW_PARTIAL[pid]``."""
    pid = tl.program_id(0)
    b, t, h, mask = _rows(pid, T, H, n_rows, BLOCK_R)
    offs = tl.arange(0, D)
    swap = (offs + D // 2) % D
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    x = tl.load(X + b[:, None] * stride_xb + t[:, None] * stride_xt + h[:, None] * stride_xh + offs[None, :] * stride_xd,
                mask=mask[:, None], other=0.0).to(tl.float32)  # fmt: skip
    rstd = tl.load(RSTD + rows, mask=mask, other=0.0)
    dout = tl.load(DOUT + rows[:, None] * D + offs[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    dout_swap = tl.load(DOUT + rows[:, None] * D + swap[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    cos = tl.load(COS + t[:, None] * stride_cos + offs[None, :], mask=mask[:, None], other=0.0)
    sin_swap = tl.load(SIN + t[:, None] * stride_sin + swap[None, :], mask=mask[:, None], other=0.0)
    dy = dout * cos + dout_swap * sin_swap
    x_hat = x * rstd[:, None]
    w = tl.load(W + offs).to(tl.float32)
    tl.store(DW_PARTIAL + pid * D + offs, tl.sum(dy * x_hat, axis=0))
    dx_hat = dy * w[None, :]
    dx = rstd[:, None] * (dx_hat - x_hat * (tl.sum(dx_hat * x_hat, axis=1) / D)[:, None])
    tl.store(DX + rows[:, None] * D + offs[None, :], dx.to(DX.dtype.element_ty), mask=mask[:, None])


BLOCK_R = 32  # rows per program: enough to amortise the weight loads, few enough partial weight-gradient rows


def norm_rope_fwd(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float, out: Tensor, rstd: Tensor) -> None:
    B, T, H, d = x.shape
    n_rows = B * T * H
    norm_rope_fwd_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        x, weight, cos, sin, out, rstd, *x.stride(), cos.stride(0), sin.stride(0), T, H, n_rows, eps,
        D=d, BLOCK_R=BLOCK_R, num_warps=4,
    )  # fmt: skip


def norm_rope_bwd(
    x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, rstd: Tensor, dout: Tensor, dx: Tensor, dw_partial: Tensor
) -> None:
    B, T, H, d = x.shape
    n_rows = B * T * H
    norm_rope_bwd_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        x, weight, cos, sin, rstd, dout, dx, dw_partial, *x.stride(), cos.stride(0), sin.stride(0), T, H, n_rows,
        D=d, BLOCK_R=BLOCK_R, num_warps=4,
    )  # fmt: skip
