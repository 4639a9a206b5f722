"""Triton kernels of the fused norm + RoPE op, and of the plain unit-RMS norm: one pass each way.

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

The same kernels with ``SCALE`` and ``ROTATE`` off give ``out = x r`` (a depth slot's key under
``depth_keys="reader"``: unit RMS, no gain, no rotation), ``dx = r * (dout - x r * mean(dout * x r))``.
"""

from __future__ import annotations

import torch
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
    SCALE: tl.constexpr,
    ROTATE: tl.constexpr,
):  # fmt: skip
    """``OUT [B*T*H, D]`` (contiguous) and ``RSTD [B*T*H]`` from ``X [B, T, H, D]`` (any strides);
    without ``SCALE`` no gain ``W``, without ``ROTATE`` no rotation (``COS``, ``SIN`` unread)."""
    b, t, h, mask_r = _rows(tl.program_id(0), T, H, n_rows, BLOCK_R)
    offs_d = tl.arange(0, D)
    ptr_x = X + b[:, None] * stride_xb + t[:, None] * stride_xt + h[:, None] * stride_xh
    # [BLOCK_R, D]
    b_x = tl.load(ptr_x + offs_d[None, :] * stride_xd, mask=mask_r[:, None], other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_out = b_x * rstd[:, None]
    if SCALE:
        b_out = b_out * tl.load(W + offs_d).to(tl.float32)[None, :]
    if ROTATE:
        offs_swap = (offs_d + D // 2) % D  # rotate-half partner of each channel
        # [BLOCK_R, D]: each row with its halves swapped, normed the same way
        b_x_swap = tl.load(ptr_x + offs_swap[None, :] * stride_xd, mask=mask_r[:, None], other=0.0).to(tl.float32)
        b_y_swap = b_x_swap * rstd[:, None]
        if SCALE:
            b_y_swap = b_y_swap * tl.load(W + offs_swap).to(tl.float32)[None, :]
        # [BLOCK_R, D]: the rotary tables at each row's token
        b_cos = tl.load(COS + t[:, None] * stride_cos + offs_d[None, :], mask=mask_r[:, None], other=0.0)
        b_sin = tl.load(SIN + t[:, None] * stride_sin + offs_d[None, :], mask=mask_r[:, None], other=0.0)
        b_out = b_out * b_cos + b_y_swap * b_sin
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(OUT + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :], b_out.to(OUT.dtype.element_ty), mask=mask_r[:, None])
    tl.store(RSTD + offs_r, rstd, mask=mask_r)


@triton.jit
def norm_rope_bwd_kernel(
    X, W, COS, SIN, RSTD, DOUT, DX, DW_PARTIAL,
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_cos, stride_sin,
    T, H, n_rows,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SCALE: tl.constexpr,
    ROTATE: tl.constexpr,
):  # fmt: skip
    """``DX [B*T*H, D]`` (contiguous) and, with ``SCALE``, this program's share of the weight gradient,
    ``DW_PARTIAL[pid]``."""
    pid_r = tl.program_id(0)
    b, t, h, mask_r = _rows(pid_r, T, H, n_rows, BLOCK_R)
    offs_d = tl.arange(0, D)
    offs_r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    # [BLOCK_R, D]
    b_x = tl.load(X + b[:, None] * stride_xb + t[:, None] * stride_xt + h[:, None] * stride_xh + offs_d[None, :] * stride_xd,
                  mask=mask_r[:, None], other=0.0).to(tl.float32)  # fmt: skip
    rstd = tl.load(RSTD + offs_r, mask=mask_r, other=0.0)
    # [BLOCK_R, D]: the output gradient
    b_dy = tl.load(DOUT + offs_r[:, None] * D + offs_d[None, :], mask=mask_r[:, None], other=0.0).to(tl.float32)
    if ROTATE:
        offs_swap = (offs_d + D // 2) % D
        # [BLOCK_R, D]: the output gradient with its halves swapped (P is its own inverse), the tables
        b_dout_swap = tl.load(DOUT + offs_r[:, None] * D + offs_swap[None, :], mask=mask_r[:, None], other=0.0).to(tl.float32)
        b_cos = tl.load(COS + t[:, None] * stride_cos + offs_d[None, :], mask=mask_r[:, None], other=0.0)
        b_sin_swap = tl.load(SIN + t[:, None] * stride_sin + offs_swap[None, :], mask=mask_r[:, None], other=0.0)
        b_dy = b_dy * b_cos + b_dout_swap * b_sin_swap
    b_x_hat = b_x * rstd[:, None]
    b_dx_hat = b_dy
    if SCALE:
        tl.store(DW_PARTIAL + pid_r * D + offs_d, tl.sum(b_dy * b_x_hat, axis=0))
        b_dx_hat = b_dy * tl.load(W + offs_d).to(tl.float32)[None, :]
    b_dx = rstd[:, None] * (b_dx_hat - b_x_hat * (tl.sum(b_dx_hat * b_x_hat, axis=1) / D)[:, None])
    tl.store(DX + offs_r[:, None] * D + offs_d[None, :], b_dx.to(DX.dtype.element_ty), mask=mask_r[:, None])


BLOCK_R = 32  # rows per program: enough to amortise the weight loads, few enough partial weight-gradient rows


def _optional_inputs(x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None) -> tuple:
    """The gain and rotary-table arguments of both kernels: (pointers, table strides, switches). What
    is not given is switched off, and ``x`` stands in for its pointer (the kernels never read it)."""
    rotate = cos is not None
    pointers = (x if weight is None else weight, cos if rotate else x, sin if rotate else x)
    strides = (cos.stride(0), sin.stride(0)) if rotate else (0, 0)
    return pointers, strides, dict(SCALE=weight is not None, ROTATE=rotate)


def norm_rope_fwd(
    x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(out [B, T, H, d] contiguous, rstd [B*T*H] float32)``. Without ``weight`` no gain, without
    ``cos``/``sin`` no rotation."""
    B, T, H, d = x.shape
    n_rows = B * T * H
    out = torch.empty(B, T, H, d, device=x.device, dtype=x.dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    pointers, strides, switches = _optional_inputs(x, weight, cos, sin)
    norm_rope_fwd_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
        x, *pointers, out, rstd, *x.stride(), *strides, T, H, n_rows, eps,
        D=d, BLOCK_R=BLOCK_R, **switches, num_warps=4,
    )  # fmt: skip
    return out, rstd


def norm_rope_bwd(
    x: Tensor, weight: Tensor | None, cos: Tensor | None, sin: Tensor | None, rstd: Tensor, dout: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``(dx, dweight)`` as :func:`norm_rope_fwd` took them; ``dweight`` None without ``weight``."""
    B, T, H, d = x.shape
    n_rows = B * T * H
    dx = torch.empty(B, T, H, d, device=x.device, dtype=x.dtype)
    grid = triton.cdiv(n_rows, BLOCK_R)
    dw_partial = None if weight is None else torch.empty(grid, d, device=x.device, dtype=torch.float32)
    pointers, strides, switches = _optional_inputs(x, weight, cos, sin)
    norm_rope_bwd_kernel[(grid,)](
        x, *pointers, rstd, dout.contiguous(), dx, x if dw_partial is None else dw_partial, *x.stride(), *strides,
        T, H, n_rows, D=d, BLOCK_R=BLOCK_R, **switches, num_warps=4,
    )  # fmt: skip
    return dx, None if dw_partial is None else dw_partial.sum(0).to(weight.dtype)
