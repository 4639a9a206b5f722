"""Portable MoDA backend: ``moda_torch`` runs ``moda_attn_reference``, vectorized PyTorch, on CPU and GPU."""

from __future__ import annotations

from torch import Tensor

from moda_lightning.attention import register_backend
from moda_lightning.attention.base import AttentionBackend
from moda_lightning.ops import moda_attention


@register_backend("moda_torch")
class MoDATorchBackend(AttentionBackend):
    """MoDA through ``moda_attention(..., backend="moda_torch")``: dense, any device and dtype."""

    reads_slot_lists = True
    decodes = True

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
        key_mask: Tensor | None = None,
    ) -> Tensor:
        return moda_attention(
            q, k, v, depth_k, depth_v,
            num_depth=num_depth, scale=scale, backend="moda_torch", q_depth=q_depth, key_mask=key_mask,
        )  # fmt: skip
