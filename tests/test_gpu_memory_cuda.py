"""On a GPU: a training run's TensorBoard events hold its peak GPU memory, and a study run's summary reads it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from moda_lightning.callbacks import PeakGPUMemory
from moda_lightning.callbacks.gpu_memory import PEAK_MEMORY_TAG
from moda_lightning.lightning_module import MoDALightningModule
from moda_lightning.study.results import read_scalars

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_a_run_logs_the_most_gpu_memory_it_reserved(tmp_path):
    torch.manual_seed(0)
    module = MoDALightningModule(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                 attention="moda_triton", warmup_steps=1)  # fmt: skip
    data = list(torch.randint(0, 256, (16, 65)))
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, log_every_n_steps=2,
                        logger=TensorBoardLogger(tmp_path, name="", version=""), callbacks=[PeakGPUMemory()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=4))
    logged = read_scalars(tmp_path)[PEAK_MEMORY_TAG]
    assert [step for step, _ in logged] == [2, 4]
    assert 0 < logged[-1][1] <= torch.cuda.max_memory_reserved() / 2**30
