"""Per-head RMSNorm followed by rotary embedding, fused (the q/k path of every attention layer), and
the same norm without gain or rotation (a depth slot's key under ``depth_keys="reader"``).

``import moda_kernels.norm_rope`` never imports Triton; ``norm_rope`` and ``unit_rms`` do, on first use.
"""

from __future__ import annotations

from typing import Any

from moda_kernels.norm_rope.reference import norm_rope_reference, unit_rms_reference

__all__ = ["norm_rope", "norm_rope_reference", "unit_rms", "unit_rms_reference"]


def __getattr__(name: str) -> Any:
    if name in ("norm_rope", "unit_rms"):
        from moda_kernels.norm_rope import function

        return getattr(function, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
