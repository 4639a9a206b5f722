"""Lightning callbacks that show what MoDA does: depth-attention statistics and its FLOPs overhead."""

from moda_lightning.callbacks.depth_stats import DepthAttentionStats
from moda_lightning.callbacks.flops_overhead import FlopsOverhead

__all__ = ["DepthAttentionStats", "FlopsOverhead"]
