"""Baseline backend: causal GQA attention through torch's scaled_dot_product_attention, no depth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moda_lightning.attention import register_backend
from moda_lightning.attention.base import AttentionBackend


@register_backend("sdpa")
class SDPABackend(AttentionBackend):
    """The OLMo2-style baseline: sequence attention only (Table 3, row 1)."""

    reads_depth = False
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
        # No depth logits here, so q_depth (their query) has nothing to act on: ignoring it is exact.
        # SDPA wants heads before tokens: [B, T, H, d] -> [B, H, T, d] views, no copies.
        T, Tk = q.shape[1], k.shape[1]
        mask = None
        if T != Tk or key_mask is not None:
            # SDPA's is_causal aligns the mask top-left; decoding queries are the last T positions.
            positions = torch.arange(Tk, device=q.device)
            query_positions = positions[Tk - T :, None]
            mask = positions[None, :] <= query_positions  # [T, Tk]
            if key_mask is not None:  # padding hidden, except a query's own key (no empty row)
                mask = mask & (key_mask[:, None, None, :] | (positions[None, :] == query_positions))
        o_BHTd = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )  # fmt: skip
        return o_BHTd.transpose(1, 2)
