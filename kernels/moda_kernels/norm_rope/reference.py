"""The definitions of the fused norm + RoPE op and of the unit-RMS norm in plain PyTorch (what the
kernels are tested against)."""

from __future__ import annotations

import torch
from torch import Tensor


def norm_rope_reference(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    """``rope(rms_norm(x) * weight)`` over the last dim of ``x [B, T, H, d]``, in float32, cast back once.

    ``cos, sin [T_max, d]`` are the model's rotary tables (``sin`` negated on the first half), so
    position ``t`` gives ``y * cos[t] + rotate_half(y) * sin[t]`` with
    ``rotate_half(y) = [y[d/2:], y[:d/2]]``. A float64 ``x`` is computed in float64.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    T = x.shape[1]
    xf = x.to(work)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(work)
    y1, y2 = y.chunk(2, dim=-1)
    rotated = torch.cat([y2, y1], dim=-1)
    out = y * cos[:T, None, :].to(work) + rotated * sin[:T, None, :].to(work)
    return out.to(x.dtype)


def unit_rms_reference(x: Tensor, eps: float) -> Tensor:
    """``x [B, T, H, d]`` divided by its root mean square over the last dim, in float32, cast back once.
    A float64 ``x`` is computed in float64."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
