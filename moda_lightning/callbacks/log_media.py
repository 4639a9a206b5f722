"""Log matplotlib figures, markdown text and histograms through each Lightning logger's own API.

The one place that knows how each logger takes media; the callbacks hand it ``trainer.loggers``.
Scalars are not handled here: they go through ``logger.log_metrics`` on every logger.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

# Lightning's logger classes import wandb and mlflow only when used, so isinstance needs neither installed.
MEDIA_LOGGERS = ("TensorBoardLogger", "CSVLogger", "WandbLogger", "MLFlowLogger")
_warned: set[str] = set()


def media_stem(tag: str, step: int) -> str:
    """File name of a tag's media at a step, without suffix: ``depth_attn-mass_layer_x_head-step000100``."""
    return f"{tag.replace('/', '-')}-step{step:06d}"


def render_rgb(fig: Figure) -> np.ndarray:
    """The figure drawn by the Agg canvas (no pyplot, no window): ``[H, W, 3]`` uint8."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def close_figure(fig: Figure) -> None:
    """Let a logged figure be freed. One built without pyplot (as ours are) is freed with its last
    reference; one made with pyplot stays in pyplot's registry until closed there (and pyplot is
    only imported if someone already did)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)


def _media_path(logger: CSVLogger, tag: str, step: int, suffix: str) -> Path:
    folder = Path(logger.log_dir) / "media"  # beside metrics.csv
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (media_stem(tag, step) + suffix)


def _warn_unsupported(logger: Logger) -> None:
    name = type(logger).__name__
    if name in _warned:
        return
    _warned.add(name)
    rank_zero_warn(
        f"moda_lightning: {name} gets the scalar statistics only; figures and text tables are logged to "
        f"{', '.join(MEDIA_LOGGERS)}. Add one of those loggers to see them, or a branch for {name} in "
        "moda_lightning/callbacks/log_media.py."
    )


@rank_zero_only
def log_figure(loggers: Iterable[Logger], tag: str, fig: Figure, step: int) -> None:
    """Log ``fig`` under ``tag`` at ``step`` to every logger, then close it.

    TensorBoard: an image summary (``add_figure``); CSV: ``log_dir/media/<stem>.png`` beside metrics.csv;
    W&B: ``log_image``; MLflow: the run artifact ``media/<stem>.png``; other loggers: a one-time warning.
    """
    try:
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, step, close=False)
            elif isinstance(logger, CSVLogger):
                fig.savefig(_media_path(logger, tag, step, ".png"), dpi=fig.dpi)
            elif isinstance(logger, WandbLogger):
                # Pixels rather than the figure, so the image does not hang on how wandb converts figures.
                logger.log_image(key=tag, images=[render_rgb(fig)], step=step)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, fig, f"media/{media_stem(tag, step)}.png")
            else:
                _warn_unsupported(logger)
    finally:
        close_figure(fig)


@rank_zero_only
def log_text(loggers: Iterable[Logger], tag: str, markdown: str, step: int) -> None:
    """Log a markdown text (a table) under ``tag`` at ``step`` to every logger.

    TensorBoard: a text summary (``add_text``, rendered as markdown); CSV: ``log_dir/media/<stem>.md``;
    W&B: a one-cell table (``log_text``); MLflow: the run artifact ``media/<stem>.md``; others: a warning.
    """
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(tag, markdown, step)
        elif isinstance(logger, CSVLogger):
            _media_path(logger, tag, step, ".md").write_text(markdown + "\n")
        elif isinstance(logger, WandbLogger):
            logger.log_text(key=tag, columns=["markdown"], data=[[markdown]], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, markdown, f"media/{media_stem(tag, step)}.md")
        else:
            _warn_unsupported(logger)


@rank_zero_only
def log_histogram(loggers: Iterable[Logger], tag: str, values: Tensor, step: int, bins: int = 40) -> None:
    """TensorBoard's native histogram of ``values`` (its histogram and distribution tabs), ``bins`` equal
    buckets over ``[min, max]``. Counted where the values live (the GPU in training), so only ``bins``
    numbers reach the host: ``add_histogram`` would bin every value with numpy, about 0.2 s per probe at
    24 layers x 131k rows. Other loggers have no such summary; they read the histogram figure instead."""
    boards = [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]
    if not boards:
        return
    x = values.detach().float().flatten()
    lo, hi = x.min(), x.max()
    width = (hi - lo).clamp_min(1e-12) / bins
    counts = torch.bincount(((x - lo) / width).long().clamp_(0, bins - 1), minlength=bins)
    moments = torch.stack([lo, hi, x.sum(), x.square().sum()])
    lo, hi, total, squares, *counts = torch.cat([moments.double(), counts.double()]).tolist()  # one copy
    limits = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[1:].tolist()  # each bucket's right edge
    for logger in boards:
        logger.experiment.add_histogram_raw(
            tag, min=lo, max=hi, num=x.numel(), sum=total, sum_squares=squares,
            bucket_limits=limits, bucket_counts=[int(c) for c in counts], global_step=step,
        )  # fmt: skip
