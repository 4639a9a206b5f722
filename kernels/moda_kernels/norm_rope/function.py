"""``norm_rope`` (the fused per-head RMSNorm + RoPE) and ``unit_rms`` (the per-head norm alone, no
gain) as autograd functions (CUDA, or the interpreter)."""

from __future__ import annotations

import torch
from torch import Tensor

from moda_kernels.norm_rope.kernel import norm_rope_bwd, norm_rope_fwd


def _check_heads(x: Tensor, op: str) -> None:
    d = x.shape[-1]
    if x.dim() != 4 or d & (d - 1) or d < 2:
        raise ValueError(f"{op}: x must be [B, T, H, d] with d a power of two; got {list(x.shape)}.")


class _NormRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
        out, rstd = norm_rope_fwd(x, weight, cos, sin, eps)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple:
        x, weight, cos, sin, rstd = ctx.saved_tensors
        dx, dweight = norm_rope_bwd(x, weight, cos, sin, rstd, dout)
        return dx, dweight, None, None, None


def norm_rope(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Tensor:
    """``rope(rms_norm(x) * weight)`` on ``x [B, T, H, d]`` (any strides), one kernel each way.

    Same contract as :func:`~moda_kernels.norm_rope.reference.norm_rope_reference`: ``cos, sin``
    are float32 ``[T_max, d]`` rotary tables (``sin`` negated on the first half) with
    ``T_max >= T``; the output is contiguous, in ``x``'s dtype; gradients flow to ``x`` and
    ``weight``. ``d`` must be a power of two (the head dims the attention kernels take).
    """
    _check_heads(x, "norm_rope")
    d = x.shape[-1]
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape[0] < x.shape[1] or cos.shape[1] != d:
        raise ValueError(
            f"norm_rope: cos/sin must be float32 [T_max >= {x.shape[1]}, {d}] tables; got {list(cos.shape)} {cos.dtype}."
        )
    return _NormRoPE.apply(x, weight, cos.contiguous(), sin.contiguous(), float(eps))


class _UnitRMS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        out, rstd = norm_rope_fwd(x, None, None, None, eps)
        ctx.save_for_backward(x, rstd)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple:
        x, rstd = ctx.saved_tensors
        return norm_rope_bwd(x, None, None, None, rstd, dout)[0], None


def unit_rms(x: Tensor, eps: float) -> Tensor:
    """``x [B, T, H, d]`` (any strides) divided by its root mean square over each head, without a gain
    or rotation: one kernel each way, computed in float32 and rounded once to ``x``'s dtype.

    Same contract as :func:`~moda_kernels.norm_rope.reference.unit_rms_reference`; the output is
    contiguous; ``d`` must be a power of two.
    """
    _check_heads(x, "unit_rms")
    return _UnitRMS.apply(x, float(eps))
