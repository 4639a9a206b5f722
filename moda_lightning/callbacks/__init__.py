"""Lightning callbacks: what MoDA does (depth-attention statistics, its FLOPs overhead), the GPU memory
training holds, and stopping on a signal with a resumable checkpoint."""

from moda_lightning.callbacks.depth_stats import DepthAttentionStats
from moda_lightning.callbacks.flops_overhead import FlopsOverhead
from moda_lightning.callbacks.gpu_memory import PeakGPUMemory
from moda_lightning.callbacks.save_on_interrupt import SaveOnInterrupt

__all__ = ["DepthAttentionStats", "FlopsOverhead", "PeakGPUMemory", "SaveOnInterrupt"]
