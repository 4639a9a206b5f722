"""What the kernel tests compare: an op's output, both log-sum-exps and its gradients, against the reference.

Inputs are ``[q, k, v, depth_k, depth_v]``, or with a sixth, ``q_depth`` (the query of the depth
logits): then the op is called through :func:`with_q_depth` and ``dq_depth`` is checked too.
"""

from __future__ import annotations

import torch
from _tolerance import check_close
from torch import Tensor

from moda_kernels.moda_attn import moda_attn_reference

NAMES = ["o", "lse", "lse_depth", "dq", "dk", "dv", "d_depth_k", "d_depth_v"]
NAMES_Q_DEPTH = [*NAMES, "dq_depth"]


def with_q_depth(fn):
    """``fn`` taking ``q_depth`` as a sixth positional input, the way :func:`outputs_and_grads` passes inputs."""

    def call(q, k, v, depth_k, depth_v, q_depth, **kw):
        return fn(q, k, v, depth_k, depth_v, q_depth=q_depth, **kw)

    return call


def outputs_and_grads(fn, inputs: list[Tensor], do: Tensor, **kw) -> list[Tensor]:
    """Output, both LSEs and one gradient per input (zeros where an input is unused)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    o, lse, lse_depth = fn(*xs, return_lse=True, **kw)
    grads = torch.autograd.grad(o, xs, do.to(o.dtype), allow_unused=True)
    return [o, lse, lse_depth, *[torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]]


def check_against_reference(out: list[Tensor], inputs: list[Tensor], do: Tensor, *, floor: float, **kw) -> None:
    """``out`` (from :func:`outputs_and_grads`) within the tolerance rule of the float64 reference."""
    ref = moda_attn_reference if len(inputs) == 5 else with_q_depth(moda_attn_reference)
    ref64 = outputs_and_grads(ref, [x.double() for x in inputs], do.double(), **kw)
    ref_lowp = outputs_and_grads(ref, inputs, do, **kw)
    assert len(out) == len(ref64), f"{len(out)} results to check, the reference gives {len(ref64)}"
    for name, a, r64, rl in zip(NAMES_Q_DEPTH, out, ref64, ref_lowp):
        check_close(name, a, r64, rl, floor=floor)
