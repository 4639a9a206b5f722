"""The shape contract every attention backend of the model follows."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class AttentionBackend(ABC):
    """One way of computing a layer's attention, selected by a registry key.

    ``__call__(q, k, v, depth_k, depth_v, *, num_depth, scale, q_depth)`` takes ``q [B, T, Hq, d]``,
    ``k, v [B, T, Hk, d]`` and the depth stream ``depth_k, depth_v [B, T, S, Hk, d]`` of which
    the first ``num_depth`` slots are valid, and returns ``o [B, T, Hq, d]``. Attention is
    causal. ``q_depth`` (shaped like ``q``, default ``None`` = ``q``) is the query of the depth
    logits only: the model passes ``q`` times the reader's key-norm gain when slots are stored
    without it (``depth_keys="reader"``). Backends that read depth must use it for the depth
    logits and ``q`` for the sequence logits. Backends that cannot read depth
    (``reads_depth = False``) get ``None`` for ``depth_k``, ``depth_v`` and ``q_depth``.
    """

    reads_depth: bool = True
    """Whether the backend attends to the depth stream (False: plain causal attention)."""

    reads_slot_lists: bool = False
    """Whether ``__call__`` also accepts ``depth_k, depth_v`` as lists of ``num_depth`` slots
    ``[B, T, Hk, d]`` (``moda_attention`` does). The model then keeps its depth stream as such a
    list (``moda_lightning/depth_slots.py``), which ``torch.compile`` traces as one graph; other
    backends get the ``[B, T, S, Hk, d]`` buffer, whose writes and reads run eagerly under compile."""

    decodes: bool = False
    """Whether ``__call__`` takes ``k, v [B, Tk, Hk, d]`` with ``Tk >= T`` (the queries are the last
    ``T`` positions: decoding with a KV cache) and ``key_mask [B, Tk]`` (False: padding no query may
    attend), as ``moda_attention`` does. ``MoDATransformer.generate`` needs it."""

    takes_depth_grad_into: bool = False
    """Whether ``__call__`` accepts ``depth_grad_into=(keys, values)``: tensors into which the
    backward adds the depth gradients (see ``moda_attention``). The depth stream then passes
    its gradient buffer; otherwise it sums the returned gradients itself. With
    ``reads_slot_lists`` too, a slot-list stream passes a ``SlotGradSums`` (one sum per slot)."""

    def check_available(self) -> None:
        """Raise ``RuntimeError`` saying why this backend cannot run here and what to use instead."""

    def check_device(self, device_type: str) -> None:
        """Raise ``RuntimeError`` if the backend cannot run on tensors of this device type."""

    @abstractmethod
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        depth_k: Tensor | None = None,
        depth_v: Tensor | None = None,
        *,
        num_depth: int = 0,
        scale: float | None = None,
        q_depth: Tensor | None = None,
    ) -> Tensor:
        """Attention output ``[B, T, Hq, d]``."""
