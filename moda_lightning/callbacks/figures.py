"""Matplotlib figures of the depth statistics: layer x head and layer x slot heatmaps (the paper's
Figure 5, arXiv 2603.15619) and per-layer histograms of depth mass.

Built with the object-oriented ``matplotlib.figure.Figure`` API, never pyplot: no backend to choose,
no window opens, and no global figure registry keeps them alive. ``log_media`` hands them to each logger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from torch import Tensor

# Grey marks the cells nothing was read from (layer 0; slots not yet written), distinct from 0.
CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="0.75")
FONT_PT = 7
DPI = 100


def _cell_inches(n: int, target: float, cap: float) -> float:
    """Side of one cell: ``target / n`` inches, kept in [0.12, 0.35] so small maps stay compact and large
    ones legible, and shrunk below 0.12 only when the matrix would pass ``cap`` inches."""
    return min(min(0.35, max(0.12, target / n)), cap / n)


def _tick_step(n: int, cell_in: float) -> int:
    """Label every k-th cell, k a power of 2 (so slot labels keep to one kind of sublayer), such that at most
    32 labels are drawn (each tick label costs render time) and labels one line tall do not overlap."""
    line_in = 1.2 * FONT_PT / 72
    k = 1
    while math.ceil(n / k) > 32 or k * cell_in < line_in:
        k *= 2
    return k


def _set_ticks(
    ax: Axes, axis: str, labels: Sequence[str], cell_in: float, positions: Sequence[float] | None = None
) -> None:
    step = _tick_step(len(labels), cell_in)
    chosen = list(range(0, len(labels), step))
    at = [positions[i] for i in chosen] if positions is not None else chosen
    rotate = axis == "x" and max(len(s) for s in labels) > 3  # slot names are read sideways
    getattr(ax, f"set_{axis}ticks")(at, [labels[i] for i in chosen], fontsize=FONT_PT, rotation=90 if rotate else 0)


def _framed_axes(
    width: float, height: float, *, left: float, right: float, top: float, bottom: float
) -> tuple[Figure, Axes]:
    """A figure holding one axes of ``width x height`` inches (grown to at least 4 x 2.8 in for the title and
    labels) with the given margins in inches. Fixed margins rather than constrained layout, which measures
    every tick label and doubles the drawing time."""
    fig_w, fig_h = max(4.0, width + left + right), max(2.8, height + top + bottom)
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, 1 - (left + right) / fig_w, 1 - (top + bottom) / fig_h))
    return fig, ax


def heatmap_figure(
    values: Tensor | np.ndarray,
    *,
    step: int,
    title: str,
    xlabel: str,
    xticklabels: Sequence[str] | None = None,
    ylabel: str = "layer",
    colorbar_label: str = "mean depth mass",
) -> Figure:
    """A ``[rows, cols]`` matrix as a heatmap with labelled axes and a colour bar.

    Rows are numbered from 0 (layers), columns by ``xticklabels`` (default: numbered from 0). Colours run
    from 0 to the matrix's largest finite value; NaN cells are masked and drawn grey. Cells are 0.12-0.35 in
    a side, so a 2-layer map is 4 x 2.8 in and a 64 layer x 126 slot map about 17 x 9 in (at 100 dpi);
    beyond 32 rows or columns every 2nd, 4th, ... one is labelled (each tick label costs drawing time).

    Args:
        values: ``[rows, cols]``; NaN where nothing was read.
        step: training step, shown in the title.
        title: what the matrix holds; ``", step N"`` is appended.
        xlabel: what the columns are.
        xticklabels: ``cols`` column names; default ``"0" .. "cols-1"``.
        ylabel: what the rows are, default ``"layer"``.
        colorbar_label: what the colours stand for.
    """
    data = np.ma.masked_invalid(torch.as_tensor(values).detach().float().cpu().numpy())
    if data.ndim != 2 or 0 in data.shape:
        raise ValueError(
            f"heatmap_figure: expected a [rows, cols] matrix, rows, cols >= 1; got shape {list(data.shape)}. "
            "Pass one row per layer and one column per head or slot."
        )
    rows, cols = data.shape
    xticklabels = [str(c) for c in range(cols)] if xticklabels is None else list(xticklabels)
    if len(xticklabels) != cols:
        raise ValueError(
            f"heatmap_figure: {len(xticklabels)} xticklabels for a matrix of {cols} columns; pass one label per column."
        )
    cell_w, cell_h = _cell_inches(cols, 8.0, 16.0), _cell_inches(rows, 5.0, 10.0)
    rotated = max(map(len, xticklabels)) > 3
    tick_in = max(map(len, xticklabels)) * 0.6 * FONT_PT / 72 if rotated else 0.15
    fig, ax = _framed_axes(cols * cell_w, rows * cell_h, left=0.6, right=1.0, top=0.35, bottom=0.35 + tick_in)
    vmax = float(data.max()) if data.count() and data.max() > 0 else 1.0
    image = ax.imshow(data, cmap=CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    _set_ticks(ax, "x", xticklabels, cell_w)
    _set_ticks(ax, "y", [str(r) for r in range(rows)], cell_h)
    ax.set_xlabel(xlabel, fontsize=FONT_PT + 1)
    ax.set_ylabel(ylabel, fontsize=FONT_PT + 1)
    ax.set_title(f"{title}, step {step}", fontsize=FONT_PT + 2)
    # The colour bar in its own axes 0.1 in right of the map, as tall as the map.
    box = ax.get_position()
    width, _ = fig.get_size_inches()
    bar = fig.colorbar(image, cax=fig.add_axes((box.x1 + 0.1 / width, box.y0, 0.15 / width, box.height)))
    bar.set_label(f"{colorbar_label} (grey: not read)", fontsize=FONT_PT + 1)
    bar.ax.tick_params(labelsize=FONT_PT)
    return fig


def histogram_figure(masses: Sequence[tuple[int, Tensor]], *, step: int, bins: int = 40) -> Figure:
    """One histogram of depth mass over the attention rows per reading layer, stacked as a ridgeline.

    Each layer gets a band, top to bottom in layer order as in the heatmaps, holding the histogram of
    its rows' depth mass scaled to the band's height (so shapes compare; every layer has the same number
    of rows) and an orange mark at its mean. One axes rather than one panel per layer: it reads the same
    from 2 to 64 layers and draws in a fraction of the time. All bands share the x range
    ``[0, largest mass seen]``, so mass that stays near 0 is not squeezed into one bin of [0, 1].

    Args:
        masses: ``(layer index, per-row depth mass [...])`` for each layer that reads depth.
        step: training step, shown in the title.
        bins: histogram bins per layer.
    """
    if not masses:
        raise ValueError("histogram_figure: no layer reads depth, so there is no depth mass to draw; pass >= 1 layer.")
    layers = [layer for layer, _ in masses]
    flat = [m.detach().float().flatten() for _, m in masses]
    # Counted where the masses live (the GPU in training): only [layers, bins] numbers come to the host.
    hi = min(1.0, max(1e-3, torch.stack([m.max() for m in flat]).max().item()))
    counts = torch.stack([torch.bincount((m * (bins / hi)).long().clamp_(0, bins - 1), minlength=bins) for m in flat])
    counts, means = counts.float().cpu().numpy(), torch.stack([m.mean() for m in flat]).cpu().numpy()
    n = len(layers)
    base = n - 1 - np.arange(n, dtype=np.float64)  # first layer on top, as in the heatmaps
    heights = 0.9 * counts / np.maximum(counts.max(axis=1, keepdims=True), 1.0)
    # Each band's step outline as one polygon, all in one collection: per-artist cost dominates at 64 layers.
    edges = np.linspace(0.0, hi, bins + 1)
    xs = np.concatenate([[0.0], np.repeat(edges, 2)[1:-1], [hi]])
    polygons = [np.column_stack([xs, np.concatenate([[b], b + np.repeat(h, 2), [b]])]) for b, h in zip(base, heights)]
    band_in = _cell_inches(n, 5.0, 10.0)
    fig, ax = _framed_axes(5.0, n * band_in, left=0.6, right=0.3, top=0.35, bottom=0.5)
    ax.add_collection(PolyCollection(polygons, facecolors="C0", edgecolors="C0", linewidths=0.5), autolim=False)
    ax.vlines(means, base, base + 0.9, colors="C1", linewidth=1.5)
    _set_ticks(ax, "y", [str(layer) for layer in layers], band_in, positions=list(base + 0.45))
    ax.set_xlim(0.0, hi)
    ax.set_ylim(-0.1, n)
    ax.tick_params(axis="x", labelsize=FONT_PT)
    ax.set_xlabel("depth mass of an attention row (one token, one head)", fontsize=FONT_PT + 1)
    ax.set_ylabel("layer", fontsize=FONT_PT + 1)
    ax.set_title(f"Depth mass histogram per layer (orange: mean), step {step}", fontsize=FONT_PT + 2)
    return fig
