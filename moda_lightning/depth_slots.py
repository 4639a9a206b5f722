"""The depth stream as a list of slots: the functional form that ``torch.compile`` traces whole.

Same methods as :class:`moda_lightning.depth_stream.DepthStream`; the slots are kept as the
tensors their sublayers produced (made contiguous) and a read hands the op the list of slots
written so far. Nothing is written in place, so the compiler sees plain tensors flowing from
writer to readers, and memory stays linear in depth: backward keeps a reference to each slot,
never a stacked copy per reading layer (the op reads the list in place: the reference slot by
slot, the fused kernel through a table of slot addresses).

Each slot's gradient is the sum over its readers, which autograd forms itself; the buffer
stream instead lets the fused kernel add into one gradient buffer (one read-modify-write per
read rather than a write and an add), so eager training on the fused kernel keeps that one.
"""

from __future__ import annotations

from torch import Tensor


class DepthSlots:
    """Depth slots of one forward pass as lists of ``[B, T, Hk, d]`` keys and values.

    Args:
        max_slots: how many slots the whole stack writes (``(L - 1) * slots_per_layer``);
            a write past it is a bug in the model, not a user error.
    """

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def __len__(self) -> int:
        """Number of slots written so far."""
        return len(self.keys)

    def seek(self, slot: int) -> None:
        """Drop the slots from ``slot`` on; activation checkpointing replays a layer's writes
        from its first slot (it rewrites the same values)."""
        assert 0 <= slot <= len(self.keys), f"cannot seek to slot {slot}; {len(self.keys)} are written"
        del self.keys[slot:], self.values[slot:]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one slot: ``k, v [B, T, Hk, d]`` for every token (keys already rotated at their token).

        Contiguous, so every slot has the same strides and the fused kernel can address each one by
        its base pointer alone; a view of a fused projection is copied once here, as the buffer
        stream copies every slot into its buffer.
        """
        assert len(self.keys) < self.max_slots, f"depth stream holds {self.max_slots} slots; one more was written"
        self.keys.append(k.contiguous())
        self.values.append(v.contiguous())

    def grad_buffers(self, n: int) -> None:
        """No gradient buffer: autograd sums each slot's gradients over its readers."""
        return None

    def read(self) -> tuple[list[Tensor] | None, list[Tensor] | None, int]:
        """Every slot written so far: ``(keys, values, num_depth)`` as new lists of the slot tensors;
        ``(None, None, 0)`` before the first write (layer 0 reads no depth)."""
        n = len(self.keys)
        if n == 0:
            return None, None, 0
        return list(self.keys), list(self.values), n
