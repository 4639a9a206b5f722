"""Per-head RMSNorm followed by rotary embedding, fused (the q/k path of every attention layer).

``import moda_kernels.norm_rope`` never imports Triton; ``norm_rope`` does, on first use.
"""

from __future__ import annotations

from typing import Any

from moda_kernels.norm_rope.reference import norm_rope_reference

__all__ = ["norm_rope", "norm_rope_reference"]


def __getattr__(name: str) -> Any:
    if name == "norm_rope":
        from moda_kernels.norm_rope.function import norm_rope

        return norm_rope
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
