"""The depth stream: the keys/values that earlier sublayers wrote for each token.

Sublayers ``append`` their slot as the forward pass goes down the stack and a layer asks
``read`` for what it may attend to. Nothing else in the model knows how slots are stored.

Storage is one preallocated buffer per keys and values (slot-major memory, presented as the
``[B, T, S, Hk, d]`` the op reads): each slot is written once and every layer reads a view
of the first slots in place, so memory grows linearly with depth (a naive ``torch.stack`` of
earlier slots per layer grows as L^2).
Plain autograd refuses in-place writes into a tensor that earlier readers saved, so writes
and reads have their own autograd functions: a read's slot gradients are added into one
gradient buffer (by the read's backward, or directly by an attention kernel given
``grad_buffers``), and a write's backward hands its slot of that buffer to the sublayer
that produced it. Writes are chained by tokens (each write takes the previous write's token)
and a read takes the latest token, so autograd runs every reader of a slot before its
writer, with one autograd edge per read instead of one per slot read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor


class DepthStream:
    """Depth slots of one forward pass, ``[B, T, S, Hk, d]`` as the op expects.

    Args:
        max_slots: how many slots the whole stack writes (``(L - 1) * slots_per_layer``);
            a write past it is a bug in the model, not a user error.
    """

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.slots = _SlotBuffers()
        self._tokens: list[Tensor] = []  # token of each written slot; slot s's token depends on slot s-1's
        self._cursor = 0

    def __len__(self) -> int:
        """Number of slots written so far."""
        return self._cursor

    def seek(self, slot: int) -> None:
        """Move the write cursor back to ``slot``; activation checkpointing replays a layer's
        writes from its first slot (it rewrites the same values)."""
        assert 0 <= slot <= self._cursor, f"cannot seek to slot {slot}; {self._cursor} are written"
        self._cursor = slot

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one slot: ``k, v [B, T, Hk, d]`` for every token (keys already rotated at their token)."""
        slot = self._cursor
        assert slot < self.max_slots, f"depth stream holds {self.max_slots} slots; one more was written"
        if self.slots.keys is None:
            B, T, Hk, d = k.shape
            self.slots.keys = _slot_major(k.new_empty(self.max_slots, B, T, Hk, d))
            self.slots.values = _slot_major(v.new_empty(self.max_slots, B, T, Hk, d))
        previous = self._tokens[slot - 1] if slot > 0 else None
        token = _WriteSlot.apply(self.slots, slot, k, v, previous)
        if slot < len(self._tokens):
            self._tokens[slot] = token
        else:
            self._tokens.append(token)
        self._cursor += 1

    def grad_buffers(self, n: int) -> Callable[[], tuple[Tensor, Tensor]] | None:
        """For an op that adds a read's slot gradients into the stream's gradient buffers itself
        (``depth_grad_into``): a function, called in backward, returning views of their first
        ``n`` slots. The buffers are allocated by the first call, after the forward pass and its
        peak memory. ``None`` when no gradient is recorded."""
        if not torch.is_grad_enabled() or self.slots.keys is None:
            return None
        return partial(self.slots.grad_views, n)

    def read(self) -> tuple[Tensor | None, Tensor | None, int]:
        """Every slot written so far: ``(depth_k, depth_v, num_depth)``, ``[B, T, S, Hk, d]`` views.

        The views are strided (``S`` of them hold ``max_slots`` slots apart); returns
        ``(None, None, 0)`` before the first write (layer 0 reads no depth).
        """
        n = self._cursor
        if n == 0:
            return None, None, 0
        depth_k, depth_v = _ReadSlots.apply(self.slots, n, self._tokens[n - 1])
        return depth_k, depth_v, n


class _SlotBuffers:
    """The stream's storage, apart from the stream so that autograd nodes can hold it without a
    reference cycle (stream -> token -> node -> stream would keep every step's buffers alive
    until Python's cycle collector happens to run)."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None  # [B, T, max_slots, Hk, d] (slot-major memory), allocated on the first write
        self.values: Tensor | None = None
        self.grad_keys: Tensor | None = None  # gradient buffers: every reader's slot gradients, summed
        self.grad_values: Tensor | None = None
        self.zero: Tensor | None = None  # the gradient every read hands to its token

    def grad_views(self, n: int) -> tuple[Tensor, Tensor]:
        self.ensure_grad_buffers()
        return self.grad_keys[:, :, :n], self.grad_values[:, :, :n]

    def ensure_grad_buffers(self) -> None:
        if self.grad_keys is None:
            self.grad_keys = torch.zeros_like(self.keys)  # *_like keeps the slot-major layout
            self.grad_values = torch.zeros_like(self.values)


def _slot_major(storage: Tensor) -> Tensor:
    """``[S, B, T, Hk, d]`` memory seen as ``[B, T, S, Hk, d]``.

    Slot-major memory keeps each slot, and every prefix of slots a layer reads, one dense
    block: writes, the read gradients' sums and the writes' gradients are then plain
    contiguous copies and adds rather than strided ones.
    """
    return storage.permute(1, 2, 0, 3, 4)


def run_eagerly_under_compile() -> None:
    """Make ``torch.compile`` run ``append``, ``read`` and ``grad_buffers`` eagerly between compiled regions.

    AOT autograd rejects writes into a buffer whose views autograd saved, so the stream's
    methods cannot be traced. The model calls this when it is built rather than at import time, because
    ``torch.compiler.disable`` imports torch._dynamo, which imports Triton.
    """
    for name in ("append", "read", "grad_buffers"):
        method = getattr(DepthStream, name)
        if not getattr(method, "_moda_eager", False):
            eager = torch.compiler.disable(method)
            eager._moda_eager = True
            setattr(DepthStream, name, eager)


def _detached_storage_view(buffer: Tensor) -> Tensor:
    # `.data` shares the memory but not the version counter, so later writes into other
    # slots do not invalidate the views that earlier readers saved for backward. This is
    # safe because a slot is never changed after it is written (replays write the same values).
    return buffer.data


class _WriteSlot(torch.autograd.Function):
    """Copy ``k, v`` into slot ``slot``; output a token that the next write and later reads depend on."""

    @staticmethod
    def forward(ctx, slots: _SlotBuffers, slot: int, k: Tensor, v: Tensor, previous: Tensor | None) -> Tensor:
        ctx.slots, ctx.slot, ctx.first = slots, slot, previous is None
        with torch.no_grad():
            _detached_storage_view(slots.keys)[:, :, slot].copy_(k)
            _detached_storage_view(slots.values)[:, :, slot].copy_(v)
        return k.new_empty(())  # only its autograd edge matters: no fill kernel

    @staticmethod
    def backward(ctx, grad_token: Tensor) -> tuple:
        slots: _SlotBuffers = ctx.slots
        grad_previous = None if ctx.first else grad_token
        if slots.grad_keys is None:  # no later layer read this slot with gradients
            return None, None, None, None, grad_previous
        # Every reader of this slot has already added its gradient into the buffer, and no later
        # step of backward touches this slot again, so its views are handed on without a copy.
        # Passing a gradient (not None) to the previous token keeps the earlier writes scheduled
        # after this one.
        return None, None, slots.grad_keys[:, :, ctx.slot], slots.grad_values[:, :, ctx.slot], grad_previous


class _ReadSlots(torch.autograd.Function):
    """Views of the first ``n`` slots; their gradients are added into the stream's gradient buffer."""

    @staticmethod
    def forward(ctx, slots: _SlotBuffers, n: int, token: Tensor) -> tuple[Tensor, Tensor]:
        ctx.slots, ctx.n = slots, n
        ctx.set_materialize_grads(False)  # an op that took `grad_buffers` returns no slot gradients
        depth_k = _detached_storage_view(slots.keys)[:, :, :n]
        depth_v = _detached_storage_view(slots.values)[:, :, :n]
        return depth_k, depth_v

    @staticmethod
    def backward(ctx, grad_k: Tensor | None, grad_v: Tensor | None) -> tuple:
        slots: _SlotBuffers = ctx.slots
        if grad_k is not None or grad_v is not None:
            slots.ensure_grad_buffers()
        if grad_k is not None:
            slots.grad_keys[:, :, : ctx.n] += grad_k
        if grad_v is not None:
            slots.grad_values[:, :, : ctx.n] += grad_v
        # A zero (not None) keeps the writers' backward scheduled after this read; one per
        # stream, not a fill kernel per read.
        if slots.zero is None:
            slots.zero = torch.zeros((), device=slots.keys.device)
        return None, None, slots.zero
