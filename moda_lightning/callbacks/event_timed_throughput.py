"""Lightning's ``ThroughputMonitor``, optionally without its GPU synchronization after every batch.

``ThroughputMonitor`` times each batch with the host clock, so on CUDA it synchronizes the GPU at
every batch end: the host cannot run ahead into the next step, and whatever it does between two
steps (the loop's hooks, logging, the next batch) is time the GPU sits idle. With
``sync_every_batch=False`` a training batch's end is instead a CUDA event recorded on the stream;
the events are read when the monitor logs (once per ``log_every_n_steps``), with one
synchronization, and placed on the host clock through an event recorded when training started
(at the host time the monitor's clock starts). The same window arithmetic then gives the same
rates, measured where the GPU finished the work.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

# Batches held before their times are read even if nothing logs (no logger, long logging interval).
MAX_PENDING = 256


class EventTimedThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` whose training batches, with ``sync_every_batch=False`` on CUDA, are timed
    by CUDA events read at logging steps (module docstring). Validation keeps the monitor's own timing.
    """

    def __init__(self, *args: Any, sync_every_batch: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sync_every_batch = sync_every_batch
        # (end-of-batch event, samples, items, FLOPs) of the training batches not yet counted
        self._pending: list[tuple[Any, int, int, float | None]] = []
        self._start_event: Any = None  # recorded when training starts, at host time self._start_host
        self._start_host = 0.0

    def _times_by_events(self, trainer: L.Trainer) -> bool:
        return (
            not self.sync_every_batch
            and trainer.strategy.root_device.type == "cuda"
            and trainer.state.stage == RunningStage.TRAINING
        )

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        if self._times_by_events(trainer):
            self._pending.clear()
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
            self._start_host = self._t0s[RunningStage.TRAINING]

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        if not self._times_by_events(trainer):
            super()._update(trainer, pl_module, batch, iter_num)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        flops = getattr(pl_module, "flops_per_batch", None)
        self._pending.append((end, self.batch_size_fn(batch), self.length_fn(batch) if self.length_fn else 0, flops))
        if len(self._pending) >= MAX_PENDING:
            self._count_pending()

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        if self._pending and trainer._logger_connector.should_update_logs:
            self._count_pending()
        super()._compute(trainer, iter_num)

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        # Validation's end reads the last training time to move the training clock past it.
        if self._pending:
            self._count_pending()
        super().on_validation_start(trainer, *args)

    def _count_pending(self) -> None:
        """Wait for the last pending batch, then add every pending batch to the training window at
        the host time its event marks: the start's host time plus the GPU time since the start."""
        stage = RunningStage.TRAINING
        self._pending[-1][0].synchronize()
        throughput = self._throughputs[stage]
        for end, samples, items, flops in self._pending:
            self._samples[stage] += samples
            self._lengths[stage] += items
            self._batches[stage] += 1
            host_time = self._start_host + self._start_event.elapsed_time(end) / 1000
            throughput.update(
                time=host_time - self._t0s[stage],  # the monitor's clock, moved past validations
                batches=self._batches[stage],
                samples=self._samples[stage],
                lengths=self._lengths[stage] if self.length_fn is not None else None,
                flops=flops,
            )
        self._pending.clear()
