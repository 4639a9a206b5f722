"""Depth gradients added into caller-owned tensors instead of returned through autograd.

A depth slot is read by every later layer, so its gradient is a sum over readers. A caller
that keeps that sum in one buffer (the model's depth stream) passes views of it as
``depth_grad_into``: the fused kernel adds each reader's gradient straight into the buffer,
one read-modify-write, where returning it would cost a write plus a separate add pass.
Paths without that fusion (the reference, the registered op under ``torch.compile``) use
:func:`add_grad_into`, which gives the same result the plain way.

``depth_grad_into`` is the pair of tensors, or a function returning it that is called in
backward: the buffer then need not exist during the forward pass, whose end (the logits) is
where a training step's memory usually peaks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
from torch import Tensor

GradInto = Union[tuple[Tensor, Tensor], Callable[[], tuple[Tensor, Tensor]]]


def check_grad_into(grad_into: tuple[Tensor, Tensor], depth_k: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``grad_into`` as a pair after checking that it can hold ``depth_k``'s gradient."""
    if len(grad_into) != 2:
        raise ValueError("moda_attention: depth_grad_into must be a pair (keys, values) of tensors.")
    for name, t in zip(("keys", "values"), grad_into):
        if t.shape != depth_k.shape or t.dtype != depth_k.dtype or t.device != depth_k.device:
            raise ValueError(
                f"moda_attention: depth_grad_into {name} must match depth_k ({list(depth_k.shape)}, "
                f"{depth_k.dtype}, {depth_k.device}); got {list(t.shape)}, {t.dtype}, {t.device}."
            )
    return grad_into[0], grad_into[1]


def resolve_grad_into(grad_into: GradInto, depth_k: Tensor) -> tuple[Tensor, Tensor]:
    """The pair itself (calling ``grad_into`` if it is a function), checked against ``depth_k``."""
    return check_grad_into(grad_into() if callable(grad_into) else grad_into, depth_k)


class _AddGradInto(torch.autograd.Function):
    """Identity on ``depth_k, depth_v``; backward adds their gradients into ``grad_into`` and returns none."""

    @staticmethod
    def forward(ctx, depth_k: Tensor, depth_v: Tensor, grad_into: GradInto) -> tuple[Tensor, Tensor]:
        ctx.grad_into = grad_into
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(depth_k)  # a view of the caller's buffer: costs no memory
        return depth_k.view_as(depth_k), depth_v.view_as(depth_v)

    @staticmethod
    def backward(ctx, grad_k: Tensor | None, grad_v: Tensor | None) -> tuple:
        into_k, into_v = resolve_grad_into(ctx.grad_into, *ctx.saved_tensors)
        if grad_k is not None:
            into_k.add_(grad_k)
        if grad_v is not None:
            into_v.add_(grad_v)
        return None, None, None


def add_grad_into(depth_k: Tensor, depth_v: Tensor, grad_into: GradInto) -> tuple[Tensor, Tensor]:
    """``depth_k, depth_v`` unchanged, with their gradients routed into ``grad_into`` (added)."""
    if not callable(grad_into):
        check_grad_into(grad_into, depth_k)
    if not torch.is_grad_enabled():
        return depth_k, depth_v
    return _AddGradInto.apply(depth_k, depth_v, grad_into)
