"""RMSNorm and the norm-placement registry: where a sublayer's norm sits on the residual.

A placement wraps one sublayer ``f`` (attention or FFN). Whatever ``f`` receives is also
what feeds the depth keys/values that ``f`` writes (the FFN KV projection reads the FFN's
input), so the placement decides which hidden state enters the depth stream. Another project
adds a placement with ``@register_norm("name")`` on a :class:`NormPlacement` subclass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moda_lightning.registry import Registry


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's rms_norm: one fused kernel on CUDA where the hand-written formula launches six
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class QKNorm(RMSNorm):
    """RMSNorm of per-head queries or keys ``[B, T, H, d]``: over each head's ``d`` channels with one
    shared ``[d]`` gain (``scope="head"``), or over all ``H*d`` channels with a gain per channel
    (``scope="full"``, OLMo2's form)."""

    def __init__(self, n_heads: int, head_dim: int, scope: str = "head", eps: float = 1e-6) -> None:
        self.spans_heads = scope == "full"
        super().__init__(n_heads * head_dim if self.spans_heads else head_dim, eps)
        self.n_heads, self.head_dim = n_heads, head_dim

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(-2)).view_as(x) if self.spans_heads else super().forward(x)

    def unit(self, x: Tensor) -> Tensor:
        """``x`` divided by its RMS over the norm's span, without the gain: ``forward(x) = unit(x) * gain``."""
        return unit_rms(x, self.spans_heads, self.eps)

    def gain_per_head(self, n_heads: int) -> Tensor:
        """The gain as ``[n_heads, d]`` for ``n_heads`` query heads reading these ``self.n_heads`` KV heads
        (query head ``h`` reads KV head ``h // G``)."""
        if not self.spans_heads:
            return self.weight.expand(n_heads, self.head_dim)
        return self.weight.view(self.n_heads, self.head_dim).repeat_interleave(n_heads // self.n_heads, dim=0)


def unit_rms(x: Tensor, spans_heads: bool, eps: float) -> Tensor:
    """``[B, T, H, d]`` divided by its root mean square over each head (or over all heads), in float32."""
    flat = x.flatten(-2) if spans_heads else x
    return F.rms_norm(flat.float(), flat.shape[-1:], None, eps).to(x.dtype).view_as(x)


class NormPlacement(nn.Module):
    """A sublayer ``f`` and its norm on the residual stream; subclasses say where the norm sits."""

    def __init__(self, dim: int, sublayer: nn.Module, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.sublayer = sublayer


_NORMS: Registry[type[NormPlacement]] = Registry(
    "norm placement", "Pick one with --model.norm=NAME.", base=NormPlacement
)


def register_norm(key: str) -> Callable[[type[NormPlacement]], type[NormPlacement]]:
    """Class decorator that makes a :class:`NormPlacement` selectable as ``--model.norm=key``."""
    return _NORMS.register(key)


def registered_norms() -> list[str]:
    """Sorted keys of every registered norm placement."""
    return _NORMS.keys()


def norm_class(key: str) -> type[NormPlacement]:
    """The placement class registered under ``key``; an unknown key raises ``ValueError`` naming the registered keys."""
    return _NORMS.get(key)


@register_norm("pre")
class PreNorm(NormPlacement):
    """``x + f(norm(x))``: the sublayer (and its depth K/V) sees the normalised stream.

    ::

        x ──┬──────────────── + ──▶
            └─ norm ─▶ f ─────┘        f's input = norm(x) feeds the depth K/V
    """

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return x + self.sublayer(self.norm(x), **kwargs)


@register_norm("post")
class PostNorm(NormPlacement):
    """``norm(x + f(x))``: the sublayer sees the raw stream; the sum is normalised.

    ::

        x ──┬──────── + ─▶ norm ─▶
            └─ f ─────┘                f's input = x (already normalised by the
                                       previous sublayer's norm) feeds the depth K/V

    The paper finds MoDA with post-norm best (arXiv 2603.15619, Table 6).
    """

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return self.norm(x + self.sublayer(x, **kwargs))


@register_norm("olmo2")
class Olmo2Norm(NormPlacement):
    """``x + norm(f(x))``: OLMo2's reordered placement; the sublayer's output is normalised.

    ::

        x ──┬──────────────── + ──▶
            └─ f ─▶ norm ─────┘        f's input = x (the raw residual) feeds the depth K/V
    """

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        return x + self.norm(self.sublayer(x, **kwargs))

