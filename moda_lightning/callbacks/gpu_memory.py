"""PeakGPUMemory: the most GPU memory training has held so far, as one TensorBoard scalar.

Lightning's ``DeviceStatsMonitor`` logs the whole of ``torch.cuda.memory_stats()`` (about eighty
tags at every log step); this logs the one figure that says whether runs fit a GPU together:
``train/device/peak_memory_gib``, the caching allocator's peak reservation on this process's GPU.
The CUDA context and library workspaces live outside the allocator and are not in it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

PEAK_MEMORY_TAG = "train/device/peak_memory_gib"


class PeakGPUMemory(L.Callback):
    """Logs :data:`PEAK_MEMORY_TAG` with the training metrics (every ``log_every_n_steps``); nothing on a
    CPU. Under several processes each logs its own GPU's figure and rank 0's is written, with no
    collective per step."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type != "cuda":
            return
        # Reading the allocator's counters is host-side bookkeeping: no synchronisation with the GPU.
        peak = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        pl_module.log(PEAK_MEMORY_TAG, peak, on_step=True, on_epoch=False)
