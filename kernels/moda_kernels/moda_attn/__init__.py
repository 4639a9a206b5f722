"""MoDA attention: the PyTorch reference (imported eagerly) and the fused Triton op (lazily).

``import moda_kernels.moda_attn`` never imports Triton; ``moda_attn`` does, on first use.
"""

from __future__ import annotations

from typing import Any

from moda_kernels.moda_attn.checks import check_moda_inputs
from moda_kernels.moda_attn.reference import moda_attn_reference

__all__ = ["check_moda_inputs", "moda_attn", "moda_attn_reference"]


def __getattr__(name: str) -> Any:
    if name == "moda_attn":
        from moda_kernels.moda_attn.function import moda_attn

        return moda_attn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
