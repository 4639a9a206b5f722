"""moda-lightning: train and study language models with Mixture-of-Depths Attention (MoDA).

The op, the layers and the model import without Lightning; the LightningModule, the data
module and the CLI are loaded on first use. Triton is never imported here.
"""

from __future__ import annotations

from typing import Any

from moda_lightning.attention import AttentionBackend, build_backend, register_backend, registered_backends
from moda_lightning.config import MoDAConfig
from moda_lightning.depth_slots import DepthSlots
from moda_lightning.depth_stream import DepthStream
from moda_lightning.model import MoDAAttention, MoDABlock, MoDATransformer, RotaryEmbedding
from moda_lightning.norms import NormPlacement, register_norm, registered_norms
from moda_lightning.ops import moda_attention

_LAZY = {
    "MoDALightningModule": "moda_lightning.lightning_module",
    "TextDataModule": "moda_lightning.data",
    "MoDACLI": "moda_lightning.cli",
}

__all__ = [
    "AttentionBackend",
    "DepthSlots",
    "DepthStream",
    "MoDAAttention",
    "MoDABlock",
    "MoDACLI",
    "MoDAConfig",
    "MoDALightningModule",
    "MoDATransformer",
    "NormPlacement",
    "RotaryEmbedding",
    "TextDataModule",
    "build_backend",
    "moda_attention",
    "register_backend",
    "register_norm",
    "registered_backends",
    "registered_norms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
