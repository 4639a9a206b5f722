"""Depth gradients added into caller-owned tensors instead of returned through autograd.

A depth slot is read by every later layer, so its gradient is a sum over readers. A caller
that keeps that sum in one buffer (the model's depth stream) passes views of it as
``depth_grad_into``: the fused kernel adds each reader's gradient straight into the buffer,
one read-modify-write, where returning it would cost a write plus a separate add pass.
Paths without that fusion (the reference, the registered op under ``torch.compile``) use
:func:`add_grad_into`, which gives the same result the plain way.

``depth_grad_into`` is the pair of tensors, or a function returning it that is called in
backward: the buffer then need not exist during the forward pass, whose end (the logits) is
where a training step's memory usually peaks. For slot lists it may also be a
:class:`SlotGradSums`, one sum per slot, the form a compiled graph can mutate in place.

With the depth stream given as lists of ``S`` slots ``[B, T, Hk, d]``, the pair is still two
``[B, T, S, Hk, d]`` tensors (slot ``s`` of the list adds into ``[:, :, s]``); slot-major memory
(``[S, B, T, Hk, d]`` seen as ``[B, T, S, Hk, d]``) keeps each slot's part one dense block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor

class SlotGradSums(NamedTuple):
    """Per-slot gradient sums of a depth stream given as lists, for the compiled graph.

    Under ``torch.compile`` a stream's slots are plain tensors and autograd would sum each slot's
    gradients over its readers; the compiler then keeps every reader's slot gradients until the
    slot's writer needs their sum, memory that grows with depth squared (docs/model.md). With
    these sums each read's backward adds its slot gradients into ``keys[s]``, ``values[s]``
    (one zero-filled tensor per slot, shaped like it), and the read that came first, and so runs
    last in backward, hands the slots it was first to read (``first_unread`` on) their finished
    sums as their gradients.
    """

    keys: list[Tensor]
    values: list[Tensor]
    first_unread: int


GradInto = Union[tuple[Tensor, Tensor], Callable[[], tuple[Tensor, Tensor]], SlotGradSums]


DepthKeys = Union[Tensor, Sequence[Tensor]]  # the depth stream's keys: [B, T, S, Hk, d], or S slots [B, T, Hk, d]


def _stream_shape(depth_k: DepthKeys) -> tuple[list[int], str]:
    """The ``[B, T, S, Hk, d]`` shape of the keys' gradient, and how the keys were given (for messages)."""
    if isinstance(depth_k, Tensor):
        return list(depth_k.shape), f"depth_k ({list(depth_k.shape)}"
    B, T, Hk, d = depth_k[0].shape
    shape = [B, T, len(depth_k), Hk, d]
    return shape, f"the {len(depth_k)} depth_k slots stacked at dim 2 ({shape}"


def check_grad_into(grad_into: tuple[Tensor, Tensor], depth_k: DepthKeys) -> tuple[Tensor, Tensor]:
    """Return ``grad_into`` as a pair after checking that it can hold ``depth_k``'s gradient."""
    if len(grad_into) != 2:
        raise ValueError("moda_attention: depth_grad_into must be a pair (keys, values) of tensors.")
    like = depth_k if isinstance(depth_k, Tensor) else depth_k[0]
    shape, described = _stream_shape(depth_k)
    for name, t in zip(("keys", "values"), grad_into):
        if list(t.shape) != shape or t.dtype != like.dtype or t.device != like.device:
            raise ValueError(
                f"moda_attention: depth_grad_into {name} must match {described}, "
                f"{like.dtype}, {like.device}); got {list(t.shape)}, {t.dtype}, {t.device}."
            )
    return grad_into[0], grad_into[1]


def resolve_grad_into(grad_into: GradInto, depth_k: DepthKeys) -> tuple[Tensor, Tensor]:
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


class _AddGradIntoSlots(torch.autograd.Function):
    """:class:`_AddGradInto` for a depth stream given as lists: slot ``s`` adds into ``[:, :, s]``."""

    @staticmethod
    def forward(ctx, grad_into: GradInto, num_slots: int, *slots: Tensor) -> tuple[Tensor, ...]:
        ctx.grad_into, ctx.num_slots = grad_into, num_slots
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*slots[:num_slots])  # the keys, for the check: references, no memory
        return tuple(t.view_as(t) for t in slots)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple:
        into_k, into_v = resolve_grad_into(ctx.grad_into, list(ctx.saved_tensors))
        S = ctx.num_slots
        for into, slot_grads in ((into_k, grads[:S]), (into_v, grads[S:])):
            for s, g in enumerate(slot_grads):
                if g is not None:
                    into[:, :, s].add_(g)
        return None, None, *[None] * len(grads)


def add_grad_into(
    depth_k: Tensor | Sequence[Tensor], depth_v: Tensor | Sequence[Tensor], grad_into: GradInto
) -> tuple[Tensor, Tensor] | tuple[list[Tensor], list[Tensor]]:
    """``depth_k, depth_v`` unchanged (tensors or lists of slots), with their gradients routed into
    ``grad_into`` (added)."""
    if not callable(grad_into):
        check_grad_into(grad_into, depth_k)
    if not torch.is_grad_enabled():
        return depth_k, depth_v
    if isinstance(depth_k, Tensor):
        return _AddGradInto.apply(depth_k, depth_v, grad_into)
    views = _AddGradIntoSlots.apply(grad_into, len(depth_k), *depth_k, *depth_v)
    return list(views[: len(depth_k)]), list(views[len(depth_k) :])
