"""RMSNorm and the norm-placement registry: where a sublayer's norm sits on the residual.

A placement wraps one sublayer ``f`` (attention or FFN). Whatever ``f`` receives is also
what feeds the depth keys/values that ``f`` writes (the FFN KV projection reads the FFN's
input), so the placement decides which hidden state enters the depth stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's rms_norm: one fused kernel on CUDA where the hand-written formula launches six
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class NormPlacement(nn.Module):
    """A sublayer ``f`` and its norm on the residual stream; subclasses say where the norm sits."""

    def __init__(self, dim: int, sublayer: nn.Module, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.sublayer = sublayer


class PreNorm(NormPlacement):
    """``x + f(norm(x))``: the sublayer (and its depth K/V) sees the normalised stream.

    ::

        x ──┬──────────────── + ──▶
            └─ norm ─▶ f ─────┘        f's input = norm(x) feeds the depth K/V
    """

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return x + self.sublayer(self.norm(x), **kwargs)


class PostNorm(NormPlacement):
    """``norm(x + f(x))``: the sublayer sees the raw stream; the sum is normalised.

    ::

        x ──┬──────── + ─▶ norm ─▶
            └─ f ─────┘                f's input = x (already normalised by the
                                       previous sublayer's norm) feeds the depth K/V

    The paper finds MoDA with post-norm best (MODA_SPEC.md, Table 6).
    """

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.norm(x + self.sublayer(x, **kwargs))


class Olmo2Norm(NormPlacement):
    """``x + norm(f(x))``: OLMo2's reordered placement; the sublayer's output is normalised.

    ::

        x ──┬──────────────── + ──▶
            └─ f ─▶ norm ─────┘        f's input = x (the raw residual) feeds the depth K/V
    """

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return x + self.norm(self.sublayer(x, **kwargs))


NORM_PLACEMENTS: dict[str, type[NormPlacement]] = {"pre": PreNorm, "post": PostNorm, "olmo2": Olmo2Norm}
"""Registry of norm placements by config key; add an entry to make a new one selectable."""
