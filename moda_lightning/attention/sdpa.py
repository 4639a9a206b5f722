"""Baseline backend: causal GQA attention through torch's scaled_dot_product_attention, no depth."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from moda_lightning.attention import register_backend
from moda_lightning.attention.base import AttentionBackend


@register_backend("sdpa")
class SDPABackend(AttentionBackend):
    """The OLMo2-style baseline: sequence attention only (Table 3, row 1)."""

    reads_depth = False

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
        # No depth logits here, so q_depth (their query) has nothing to act on: ignoring it is exact.
        # SDPA wants heads before tokens: [B, T, H, d] -> [B, H, T, d] views, no copies.
        o_BHTd = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
        )
        return o_BHTd.transpose(1, 2)
