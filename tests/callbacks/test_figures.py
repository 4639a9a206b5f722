"""The matplotlib figures of the depth statistics: cells, tick labels, grey NaN cells, sizes, histograms."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from moda_lightning.callbacks.depth_stats import slot_labels
from moda_lightning.callbacks.figures import CMAP, heatmap_figure, histogram_figure
from moda_lightning.callbacks.log_media import render_rgb
from moda_lightning.config import MoDAConfig

nan = float("nan")


def pixel(fig, rgb: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The rendered colour at data point ``(x, y)`` of ``ax`` (display y counts from the bottom)."""
    px, py = ax.transData.transform((x, y))
    return rgb[rgb.shape[0] - 1 - int(py), int(px)].astype(int)


def test_heatmap_has_a_cell_per_entry_labelled_axes_a_colour_bar_and_grey_nan_cells():
    values = torch.tensor([[nan, nan, nan, nan], [0.1, 0.2, 0.3, 0.4], [0.5, nan, 0.0, 0.2]])
    fig = heatmap_figure(values, step=7, title="Depth mass per layer and query head", xlabel="query head")
    rgb = render_rgb(fig)
    ax, bar = fig.axes  # the map and its colour bar
    cells = ax.images[0].get_array()
    assert cells.shape == (3, 4)
    assert cells.mask.tolist() == torch.isnan(values).tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("query head", "layer")
    assert ax.get_title() == "Depth mass per layer and query head, step 7"
    assert "mean depth mass" in bar.get_ylabel()
    assert ax.images[0].norm.vmin == 0.0 and ax.images[0].norm.vmax == pytest.approx(0.5)
    # Drawn colours: NaN is grey, 0 is the colour map's bottom, the maximum its top.
    grey = np.array(matplotlib.colors.to_rgb(CMAP.get_bad())) * 255
    assert np.abs(pixel(fig, rgb, ax, 0, 0) - grey).max() <= 2
    assert np.abs(pixel(fig, rgb, ax, 1, 2) - grey).max() <= 2
    assert np.abs(pixel(fig, rgb, ax, 2, 2) - np.array(CMAP(0.0)[:3]) * 255).max() <= 2
    assert np.abs(pixel(fig, rgb, ax, 0, 2) - np.array(CMAP(1.0)[:3]) * 255).max() <= 2


def test_slot_map_is_labelled_by_the_sublayer_that_wrote_each_slot():
    cfg = MoDAConfig(vocab_size=16, d_model=16, n_layers=3, n_heads=2, n_kv_heads=2)
    per_slot = torch.tensor([[nan] * 4, [0.2, 0.1, nan, nan], [0.1, 0.1, 0.3, 0.2]])
    fig = heatmap_figure(per_slot, step=0, title="t", xlabel="depth slot", xticklabels=slot_labels(cfg))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["L00.attn", "L00.ffn", "L01.attn", "L01.ffn"]
    assert ax.get_xticklabels()[0].get_rotation() == 90
    with pytest.raises(ValueError, match="3 xticklabels for a matrix of 4 columns"):
        heatmap_figure(per_slot, step=0, title="t", xlabel="x", xticklabels=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"expected a \[rows, cols\] matrix, rows, cols >= 1; got shape \[4\]"):
        heatmap_figure(torch.ones(4), step=0, title="t", xlabel="x")


def test_figure_size_grows_with_the_layers_and_labels_thin_out_past_32():
    small = heatmap_figure(torch.rand(2, 4), step=0, title="t", xlabel="x")
    mid = heatmap_figure(torch.rand(24, 16), step=0, title="t", xlabel="x")
    slots = [f"L{i // 2:02d}.{'attn' if i % 2 == 0 else 'ffn'}" for i in range(126)]
    large = heatmap_figure(torch.rand(64, 126), step=0, title="t", xlabel="x", xticklabels=slots)
    (w0, h0), (w1, h1), (w2, h2) = (f.get_size_inches() for f in (small, mid, large))
    assert (w0, h0) == (4.0, 2.8)  # the floor that holds title, labels and colour bar
    assert h0 < h1 < h2 <= 12 and w0 < w1 < w2 <= 20
    ax = large.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(r) for r in range(0, 64, 2)]
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["L00.attn", "L02.attn", "L04.attn"]
    assert len(mid.axes[0].get_yticklabels()) == 24  # up to 32 rows, every one is labelled


def test_histogram_has_one_band_per_reading_layer_peaking_at_its_mass():
    masses = [(1, torch.full((2, 9, 4), 0.1)), (2, torch.cat([torch.full((36,), 0.2), torch.full((36,), 0.4)]))]
    fig = histogram_figure(masses, step=5, bins=40)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
    assert "step 5" in ax.get_title() and ax.get_xlim() == pytest.approx((0.0, 0.4))
    bands, means = ax.collections  # the histogram polygons, the mean marks
    (top, bottom) = bands.get_paths()
    # Layer 1 (top band, base 1) is one bar of full height at 0.1; layer 2 two equal bars at 0.2 and 0.4.
    peak = top.vertices[np.argmax(top.vertices[:, 1])]
    assert peak[1] == pytest.approx(1.9) and 0.09 <= peak[0] <= 0.11
    tall = bottom.vertices[np.isclose(bottom.vertices[:, 1], 0.9)][:, 0]
    assert tall.min() == pytest.approx(0.2, abs=0.011) and tall.max() == pytest.approx(0.4)
    assert [seg[0, 0] for seg in means.get_segments()] == pytest.approx([0.1, 0.3])
    with pytest.raises(ValueError, match="no layer reads depth"):
        histogram_figure([], step=0)
