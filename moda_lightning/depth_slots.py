"""The depth stream as a list of slots: the functional form that ``torch.compile`` traces whole.

Same methods as :class:`moda_lightning.depth_stream.DepthStream`; the slots are kept as the
tensors their sublayers produced (made contiguous) and a read hands the op the list of slots
written so far. Nothing is written in place, so the compiler sees plain tensors flowing from
writer to readers, and memory stays linear in depth: backward keeps a reference to each slot,
never a stacked copy per reading layer (the op reads the list in place: the reference slot by
slot, the fused kernel through a table of slot addresses).

Each slot's gradient is the sum over its readers. Autograd forms it itself for the reference
op. For the fused kernel (``sum_gradients=True``) every slot also gets a zero-filled gradient
sum, written in place by each reader's backward kernel, and the slot's first reader hands the
finished sum to the writer (``SlotGradSums``): left to autograd, the compiled backward keeps
every reader's slot gradients until the slot's writer needs them, memory that grows with depth
squared (docs/model.md). The buffer stream does the same with one gradient buffer, so eager
training on the fused kernel keeps that one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moda_kernels.moda_attn.grad_into import SlotGradSums


class DepthSlots:
    """Depth slots of one forward pass as lists of ``[B, T, Hk, d]`` keys and values.

    Args:
        max_slots: how many slots the whole stack writes (``(L - 1) * slots_per_layer``);
            a write past it is a bug in the model, not a user error.
    """

    def __init__(self, max_slots: int, sum_gradients: bool = False) -> None:
        self.max_slots = max_slots
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.sum_gradients = sum_gradients and torch.is_grad_enabled()
        self.key_grads: list[Tensor] = []  # with sum_gradients: each slot's gradient sum, zero until backward
        self.value_grads: list[Tensor] = []
        self._first_unread = 0  # slots from here on have not been read yet

    def __len__(self) -> int:
        """Number of slots written so far."""
        return len(self.keys)

    def seek(self, slot: int) -> None:
        """Drop the slots from ``slot`` on; activation checkpointing replays a layer's writes
        from its first slot (it rewrites the same values)."""
        assert 0 <= slot <= len(self.keys), f"cannot seek to slot {slot}; {len(self.keys)} are written"
        del self.keys[slot:], self.values[slot:], self.key_grads[slot:], self.value_grads[slot:]
        self._first_unread = min(self._first_unread, slot)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one slot: ``k, v [B, T, Hk, d]`` for every token (keys already rotated at their token).

        Contiguous, so every slot has the same strides and the fused kernel can address each one by
        its base pointer alone; a view of a fused projection is copied once here, as the buffer
        stream copies every slot into its buffer.
        """
        assert len(self.keys) < self.max_slots, f"depth stream holds {self.max_slots} slots; one more was written"
        self.keys.append(k.contiguous())
        self.values.append(v.contiguous())
        if self.sum_gradients:
            self.key_grads.append(torch.zeros_like(self.keys[-1]))
            self.value_grads.append(torch.zeros_like(self.values[-1]))

    def grad_buffers(self, n: int) -> SlotGradSums | None:
        """The gradient sums of the first ``n`` slots for a read of them, which hands the slots it is
        the first to read their finished sums; ``None`` without ``sum_gradients`` (autograd sums)."""
        if not self.sum_gradients:
            return None
        sums = SlotGradSums(self.key_grads[:n], self.value_grads[:n], self._first_unread)
        self._first_unread = n
        return sums

    def read(self) -> tuple[list[Tensor] | None, list[Tensor] | None, int]:
        """Every slot written so far: ``(keys, values, num_depth)`` as new lists of the slot tensors;
        ``(None, None, 0)`` before the first write (layer 0 reads no depth)."""
        n = len(self.keys)
        if n == 0:
            return None, None, 0
        return list(self.keys), list(self.values), n


def trace_checkpointed_writes() -> None:
    """Let ``torch.compile`` trace activation-checkpointed layers, stream writes and all, into the one graph.

    A checkpointed layer appends its slots to the stream's lists, a Python side effect. Eagerly,
    the recomputation in backward replays it (``seek``, then the same writes). Traced, the compiler
    recomputes the layer's tensors inside the graph and no Python runs again, so the replay is not
    needed; dynamo's default refuses such a side effect inside a checkpoint and falls back to eager
    for the model's whole forward, compiling each layer apart, and that fallback stays with the
    forward's code for the rest of the process: a later model without checkpointing then compiles
    in pieces, whose per-slot gradient sums cross from one graph to another, and its backward
    fails (a sum that one graph saved is changed in place by another's backward). The switch is
    dynamo's, process-wide, and changes only checkpointed code with side effects.
    """
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
