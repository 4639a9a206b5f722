"""The depth stream: the keys/values that earlier sublayers wrote for each token.

Sublayers ``append`` their slot as the forward pass goes down the stack and a layer asks
``read`` for what it may attend to. Nothing else in the model knows how slots are stored,
so the storage can change (one preallocated buffer read in place) without touching it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DepthStream:
    """Depth slots of one forward pass, ``[B, T, S, Hk, d]`` as the op expects.

    Args:
        max_slots: how many slots the whole stack writes (``L * slots_per_layer``); a write
            past it is a bug in the model, not a user error.
    """

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []

    def __len__(self) -> int:
        """Number of slots written so far."""
        return len(self._keys)

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write one slot: ``k, v [B, T, Hk, d]`` for every token (keys already rotated at their token)."""
        assert len(self._keys) < self.max_slots, f"depth stream holds {self.max_slots} slots; one more was written"
        self._keys.append(k)
        self._values.append(v)

    def read(self) -> tuple[Tensor | None, Tensor | None, int]:
        """Every slot written so far: ``(depth_k, depth_v, num_depth)``, ``[B, T, S, Hk, d]`` each.

        Returns ``(None, None, 0)`` before the first write (layer 0 reads no depth).
        """
        if not self._keys:
            return None, None, 0
        # Stacking copies all earlier slots for every layer (O(L^2) memory over the stack);
        # correct and simple, to be replaced by an in-place buffer when memory matters.
        return torch.stack(self._keys, dim=2), torch.stack(self._values, dim=2), len(self._keys)
