"""Training throughput timed by CUDA events read at logging steps gives the times ThroughputMonitor
takes with a synchronization at every batch (here on CPU, with events that read the host clock)."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

import moda_lightning.callbacks.event_timed_throughput as event_timed
from moda_lightning.callbacks.event_timed_throughput import EventTimedThroughput


class HostClockEvent:
    """A CUDA event's interface on the host clock: complete as soon as it is recorded."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at: float | None = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostClockEvent) -> float:
        return (end.at - self.at) * 1000


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)
        self.flops_per_batch = 100

    def training_step(self, batch, batch_idx):
        time.sleep(0.002)  # batches of a known minimum length
        return self.layer(batch.float()).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch.float()).square().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class HostTimes(EventTimedThroughput):
    """Records, at every training batch end, the elapsed time ThroughputMonitor's own timing takes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(batch_size_fn=lambda batch: batch.shape[0], length_fn=lambda batch: batch.numel(), **kwargs)
        self.host_elapsed: list[float] = []

    def _update(self, trainer, pl_module, batch, iter_num):
        if trainer.state.stage == RunningStage.TRAINING:
            self.host_elapsed.append(time.perf_counter() - self._t0s[RunningStage.TRAINING])
        super()._update(trainer, pl_module, batch, iter_num)


def fit(monitor: HostTimes, tmp_path, batches: int = 10, accelerator: str = "cpu", **trainer_kwargs) -> None:
    data = [torch.ones(8) for _ in range(4 * batches)]
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=batches, log_every_n_steps=3, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[monitor],
                        default_root_dir=tmp_path, **trainer_kwargs)  # fmt: skip
    trainer.fit(Tiny(), DataLoader(data, batch_size=4), DataLoader(data[:8], batch_size=4))


@pytest.fixture
def events_on_cpu(monkeypatch):
    """The event-timed path on CPU: host-clock events, and every training batch timed by events."""
    monkeypatch.setattr(torch.cuda, "Event", HostClockEvent)
    monkeypatch.setattr(
        EventTimedThroughput, "_times_by_events",
        lambda self, trainer: not self.sync_every_batch and trainer.state.stage == RunningStage.TRAINING,
    )  # fmt: skip


def test_event_times_are_the_per_batch_host_times(events_on_cpu, tmp_path):
    monitor = HostTimes(sync_every_batch=False, window_size=4)
    fit(monitor, tmp_path, val_check_interval=5)  # a validation in the middle moves the training clock
    throughput = monitor._throughputs[RunningStage.TRAINING]
    counted = monitor._batches[RunningStage.TRAINING]
    assert counted == 10, "batches are counted at logging steps (3, 6, 9) and before each validation (5, 10)"
    # the window holds the last 4 counted batches' times; each is its host time, less the validation
    # time that the monitor moves the training clock by (the same for the event-timed path)
    expected = monitor.host_elapsed[counted - len(throughput._time) : counted]
    assert len(throughput._time) == 4
    for got, host in zip(throughput._time, expected):
        assert abs(got - host) < 2e-3, (list(throughput._time), expected)
    assert throughput._samples[-1] == 4 * counted and throughput._lengths[-1] == 32 * counted
    assert throughput.compute()["device/items_per_sec"] > 0


def test_pending_batches_are_counted_even_when_nothing_logs(events_on_cpu, tmp_path, monkeypatch):
    monkeypatch.setattr(event_timed, "MAX_PENDING", 4)
    monitor = HostTimes(sync_every_batch=False)
    fit(monitor, tmp_path, logger=False, limit_val_batches=0)
    assert len(monitor._pending) < 4 and monitor._batches[RunningStage.TRAINING] + len(monitor._pending) == 10


def test_by_default_the_monitor_times_as_lightning_does(events_on_cpu, tmp_path):
    monitor = HostTimes(window_size=4)
    fit(monitor, tmp_path, limit_val_batches=0)
    assert monitor._pending == [] and monitor._batches[RunningStage.TRAINING] == 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_event_times_match_synchronized_ones(tmp_path):
    """Real CUDA events: the same batches counted, and each batch's time within a few ms of the
    synchronized host time (the GPU finishes a tiny batch as the host records its end)."""
    synced, timed = HostTimes(window_size=4), HostTimes(sync_every_batch=False, window_size=4)
    for monitor in (synced, timed):
        fit(monitor, tmp_path, accelerator="gpu")
    for monitor in (synced, timed):
        assert monitor._batches[RunningStage.TRAINING] == 10
    for got, host in zip(timed._throughputs[RunningStage.TRAINING]._time, timed.host_elapsed[-4:]):
        assert abs(got - host) < 5e-3
