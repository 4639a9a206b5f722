"""A plugin as another project would write one: an attention backend and a norm placement that
register themselves, under keys of their own, when this module is imported.

    moda fit --model.plugins='[tests.plugins.toy_backend]' --model.attention=toy --model.norm=toy_sandwich

The module path resolves from the repository root, so that folder must be on ``sys.path``
(``PYTHONPATH=.`` for the ``moda`` script; ``python -m`` adds the working directory).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moda_lightning.attention import AttentionBackend, register_backend
from moda_lightning.norms import NormPlacement, RMSNorm, register_norm


@register_backend("toy")
class ToyCausalBackend(AttentionBackend):
    """Causal GQA attention through SDPA, no depth stream; counts its calls so tests can see it ran."""

    reads_depth = False
    calls = 0

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
    ) -> Tensor:
        ToyCausalBackend.calls += 1
        # SDPA wants heads before tokens: [B, T, H, d] -> [B, H, T, d] views.
        o_BHTd = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
        )
        return o_BHTd.transpose(1, 2)


@register_norm("toy_sandwich")
class SandwichNorm(NormPlacement):
    """``x + norm_out(f(norm(x)))``: a norm on both sides of the sublayer.

    ::

        x ──┬───────────────────────────── + ──▶
            └─ norm ─▶ f ─▶ norm_out ──────┘      f's input = norm(x) feeds the depth K/V
    """

    def __init__(self, dim: int, sublayer: nn.Module, eps: float = 1e-6) -> None:
        super().__init__(dim, sublayer, eps)
        self.norm_out = RMSNorm(dim, eps)

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return x + self.norm_out(self.sublayer(self.norm(x), **kwargs))
