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
    """Logs :data:`PEAK_MEMORY_TAG` at the trainer's logging steps (``log_every_n_steps``); nothing on
    a CPU or without a logger. Each process reads its own GPU and the loggers write rank 0's."""

    def __init__(self) -> None:
        self._logged_step = -1  # with gradient accumulation, several batches end at one step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if pl_module.device.type != "cuda" or not trainer.loggers or step % trainer.log_every_n_steps or step == self._logged_step:
            return
        self._logged_step = step
        # The allocator's counters are host-side bookkeeping, and the loggers take a float: nothing
        # here touches the GPU or waits for it (``self.log`` would copy the value to the device).
        peak = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        for logger in trainer.loggers:
            logger.log_metrics({PEAK_MEMORY_TAG: peak}, step=step)
