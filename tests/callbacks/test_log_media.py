"""Figures and text reach each logger through its own API: TensorBoard summaries, CSV-side files, W&B, MLflow."""

from __future__ import annotations

import gc
import warnings
import weakref
from pathlib import Path
from unittest.mock import MagicMock, create_autospec

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moda_lightning.callbacks import DepthAttentionStats, log_media
from moda_lightning.callbacks.log_media import log_figure, log_histogram, log_text
from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_figure() -> Figure:
    fig = Figure(figsize=(4, 3), dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


class PlainLogger(Logger):
    """A logger with no media API: it should get scalars and one warning."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "plain"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_csv_logger_gets_png_and_markdown_files_beside_metrics_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    fig = small_figure()
    log_figure([logger], "depth_attn/mass_layer_x_head", fig, 100)
    log_text([logger], "flops/table", "    a  b\n    1  2", 0)
    media = Path(logger.log_dir) / "media"
    png = media / "depth_attn-mass_layer_x_head-step000100.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert Image.open(png).size == (200, 150)  # 4 x 3 in at 50 dpi
    assert (media / "flops-table-step000000.md").read_text() == "    a  b\n    1  2\n"


def test_logged_figures_are_not_kept_alive(tmp_path):
    """Nothing (ours, TensorBoard's writer, pyplot's registry) may hold a figure after it is logged."""
    loggers = [CSVLogger(tmp_path, name="run"), TensorBoardLogger(tmp_path, name="tb")]
    fig = small_figure()
    ref = weakref.ref(fig)
    log_figure(loggers, "a/b", fig, 0)
    del fig
    gc.collect()
    assert ref() is None
    import matplotlib.pyplot as plt  # only here: our own figures never go through pyplot

    plt.switch_backend("agg")
    made_with_pyplot = plt.figure()
    log_figure(loggers, "a/c", made_with_pyplot, 0)
    assert not plt.fignum_exists(made_with_pyplot.number)


def test_tensorboard_logger_gets_image_text_and_histogram_summaries(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    log_figure([logger], "depth_attn/mass_hist", small_figure(), 3)
    log_text([logger], "depth_attn/slot_legend", "slot | written by", 3)
    log_histogram([logger], "depth_attn/layer_01/mass_hist", torch.rand(2, 5, 4), 3)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    (image,) = acc.Images("depth_attn/mass_hist")
    assert (image.step, image.width, image.height) == (3, 200, 150)
    assert image.encoded_image_string[:8] == PNG_SIGNATURE
    assert "depth_attn/slot_legend/text_summary" in acc.Tags()["tensors"]
    (hist,) = acc.Histograms("depth_attn/layer_01/mass_hist")
    assert hist.histogram_value.num == 40 and sum(hist.histogram_value.bucket) == 40
    values = torch.tensor([0.0, 0.1, 0.1, 0.4])
    log_histogram([logger], "h", values, 4, bins=4)
    logger.experiment.flush()
    acc.Reload()
    (hist,) = acc.Histograms("h")
    assert list(hist.histogram_value.bucket) == [1, 2, 0, 1]
    assert list(hist.histogram_value.bucket_limit) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert (hist.histogram_value.min, hist.histogram_value.max) == pytest.approx((0.0, 0.4))
    assert hist.histogram_value.sum_squares == pytest.approx(0.18)


def test_wandb_and_mlflow_get_the_figure_through_their_own_calls():
    wandb = create_autospec(WandbLogger, instance=True)
    mlflow = create_autospec(MLFlowLogger, instance=True)
    mlflow.experiment, mlflow.run_id = MagicMock(), "run-1"
    fig = small_figure()
    log_figure([wandb, mlflow], "depth_attn/mass_layer_x_slot", fig, 7)
    kwargs = wandb.log_image.call_args.kwargs
    assert (kwargs["key"], kwargs["step"]) == ("depth_attn/mass_layer_x_slot", 7)
    (pixels,) = kwargs["images"]
    assert pixels.shape == (150, 200, 3) and pixels.dtype == np.uint8
    artifact = "media/depth_attn-mass_layer_x_slot-step000007.png"
    mlflow.experiment.log_figure.assert_called_once_with("run-1", fig, artifact)
    log_text([wandb, mlflow], "flops/table", "| a |", 0)
    wandb.log_text.assert_called_once_with(key="flops/table", columns=["markdown"], data=[["| a |"]], step=0)
    mlflow.experiment.log_text.assert_called_once_with("run-1", "| a |", "media/flops-table-step000000.md")


def test_other_loggers_are_warned_once_naming_the_supported_ones(monkeypatch):
    monkeypatch.setattr(log_media, "_warned", set())
    logger = PlainLogger()
    with pytest.warns(UserWarning) as caught:
        log_figure([logger], "a/b", small_figure(), 0)
        log_figure([logger], "a/b", small_figure(), 1)
        log_text([logger], "a/c", "text", 1)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "PlainLogger gets the scalar statistics only" in message
    assert all(name in message for name in ("TensorBoardLogger", "CSVLogger", "WandbLogger", "MLFlowLogger"))


def test_only_rank_zero_writes_media(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = CSVLogger(tmp_path, name="run")
    log_figure([logger], "a/b", small_figure(), 0)
    log_text([logger], "a/c", "text", 0)
    assert not (Path(logger.log_dir) / "media").exists()


def test_depth_stats_logs_scalars_figures_and_legend_to_a_csv_logger_and_a_plain_one(tmp_path, monkeypatch):
    monkeypatch.setattr(log_media, "_warned", set())
    cfg = MoDAConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    callback, csv, plain = DepthAttentionStats(), CSVLogger(tmp_path, name="run"), PlainLogger()
    stats = callback.collect(MoDATransformer(cfg), cfg, torch.randint(50, (2, 16)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scalars = callback.log_stats([csv, plain], stats, cfg, step=4)
        callback.log_stats([csv, plain], stats, cfg, step=8)
    assert sum("PlainLogger" in str(w.message) for w in caught) == 1
    assert plain.metrics[0] == scalars and "depth_attn/layer_02/mass" in scalars
    csv.save()
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "depth_attn/layer_02/mass", "depth_attn/mean_entropy"} <= set(header)
    media = Path(csv.log_dir) / "media"
    figures = ["depth_attn-mass_hist", "depth_attn-mass_layer_x_head", "depth_attn-mass_layer_x_slot"]
    legend = "depth_attn-slot_legend-step000004.md"  # written once
    assert sorted(p.name for p in media.iterdir()) == sorted([f"{f}-step{s:06d}.png" for f in figures for s in (4, 8)] + [legend])
    assert "0 | L00.attn" in (media / legend).read_text()
