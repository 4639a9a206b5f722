"""What the kernel tests compare: an op's output, both log-sum-exps and its five gradients, against the reference."""

from __future__ import annotations

import torch
from _tolerance import check_close
from torch import Tensor

from moda_kernels.moda_attn import moda_attn_reference

NAMES = ["o", "lse", "lse_depth", "dq", "dk", "dv", "d_depth_k", "d_depth_v"]


def outputs_and_grads(fn, inputs: list[Tensor], do: Tensor, **kw) -> list[Tensor]:
    """Output, both LSEs and the five gradients (zeros where a depth input is unused)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    o, lse, lse_depth = fn(*xs, return_lse=True, **kw)
    grads = torch.autograd.grad(o, xs, do.to(o.dtype), allow_unused=True)
    return [o, lse, lse_depth, *[torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]]


def check_against_reference(out: list[Tensor], inputs: list[Tensor], do: Tensor, *, floor: float, **kw) -> None:
    """``out`` (from :func:`outputs_and_grads`) within the tolerance rule of the float64 reference."""
    ref64 = outputs_and_grads(moda_attn_reference, [x.double() for x in inputs], do.double(), **kw)
    ref_lowp = outputs_and_grads(moda_attn_reference, inputs, do, **kw)
    for name, a, r64, rl in zip(NAMES, out, ref64, ref_lowp):
        check_close(name, a, r64, rl, floor=floor)
