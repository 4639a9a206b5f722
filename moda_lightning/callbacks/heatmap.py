"""Heatmap images for TensorBoard, drawn with torch alone (matplotlib is not a dependency).

``heatmap_image`` colours a matrix; ``labeled_heatmap`` adds row and column indices and a colour
bar with its scale, so a layer x head or layer x slot image can be read without the code.
"""

from __future__ import annotations

import torch
from torch import Tensor

_VIRIDIS = torch.tensor(
    [[0.267, 0.005, 0.329], [0.231, 0.322, 0.546], [0.128, 0.567, 0.551], [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]]
)

# 3x5 pixel glyphs, one string of 15 bits per character, row by row.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010",
}  # fmt: skip
_SCALE = 2  # glyph pixels are drawn 2x2: 6x10 px characters, 8 px apart
_CHAR_W, _CHAR_H = 4 * _SCALE, 5 * _SCALE


def _colours(x: Tensor) -> Tensor:
    """Values in [0, 1] ``[...]`` to viridis RGB ``[..., 3]``."""
    pos = x.clamp(0, 1) * (len(_VIRIDIS) - 1)
    lo = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (pos - lo).unsqueeze(-1)
    return _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac


def heatmap_image(values: Tensor, cell: int | None = None) -> Tensor:
    """A ``[rows, cols]`` matrix as a ``[3, rows*cell, cols*cell]`` float image in [0, 1].

    Colors run from dark purple (0) to yellow (the matrix's maximum) along a 5-stop viridis;
    NaN cells (no such slot) are gray. ``cell`` defaults to a size that makes the image ~256 px.
    """
    values = values.detach().float().cpu()
    missing = torch.isnan(values)
    vmax = values[~missing].max().item() if (~missing).any() else 0.0
    x = values.nan_to_num(0.0) / vmax if vmax > 0 else torch.zeros_like(values)
    rgb = _colours(x)  # [rows, cols, 3]
    rgb[missing] = 0.5
    cell = cell or max(4, min(32, 256 // max(values.shape)))
    rgb = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return rgb.permute(2, 0, 1).contiguous()


def _draw_text(img: Tensor, text: str, x: int, y: int) -> None:
    """Black text into ``img [3, H, W]`` with its top-left corner at pixel ``(x, y)``."""
    for i, char in enumerate(text):
        bits = torch.tensor([int(b) for b in _GLYPHS[char]], dtype=torch.bool).view(5, 3)
        mask = bits.repeat_interleave(_SCALE, 0).repeat_interleave(_SCALE, 1)
        x0 = x + i * _CHAR_W
        region = img[:, y : y + mask.shape[0], x0 : x0 + mask.shape[1]]
        region[:, mask[: region.shape[1], : region.shape[2]]] = 0.0


def _label_step(cell: int, width_px: int) -> int:
    """Label every k-th index (k in 1, 2, 5, 10, ...) so labels ``width_px`` wide do not overlap."""
    for step in (1, 2, 5, 10, 20, 50, 100):
        if step * cell >= width_px:
            return step
    return 200


def labeled_heatmap(values: Tensor) -> Tensor:
    """``heatmap_image`` framed by row indices (left), column indices (top) and a colour bar
    (right) marked with 0 and the maximum it stands for. ``[3, H, W]`` in [0, 1], white frame."""
    rows, cols = values.shape
    cell = max(4, min(32, 512 // max(rows, cols)))
    core = heatmap_image(values, cell)
    finite = values[~torch.isnan(values)]
    vmax = finite.max().item() if finite.numel() else 0.0
    top_text = f"{vmax:.2f}"

    row_digits, col_digits = len(str(rows - 1)), len(str(cols - 1))
    left = row_digits * _CHAR_W + 4
    top = _CHAR_H + 6
    bar_x = left + cols * cell + 8
    right = 8 + 10 + 4 + len(top_text) * _CHAR_W
    height = top + rows * cell + _CHAR_H + 6
    img = torch.ones(3, height, left + cols * cell + right)
    img[:, top : top + rows * cell, left : left + cols * cell] = core

    for r in range(0, rows, _label_step(cell, _CHAR_H + 2)):
        label = str(r)
        _draw_text(img, label, left - 2 - len(label) * _CHAR_W, top + r * cell + max(0, (cell - _CHAR_H) // 2))
    for c in range(0, cols, _label_step(cell, col_digits * _CHAR_W + 2)):
        _draw_text(img, str(c), left + c * cell, 2)

    # Colour bar: the maximum at the top, 0 at the bottom, with both written beside it.
    ramp = torch.linspace(1, 0, rows * cell)
    img[:, top : top + rows * cell, bar_x : bar_x + 10] = _colours(ramp).T.unsqueeze(-1)
    _draw_text(img, top_text, bar_x + 14, top)
    _draw_text(img, "0", bar_x + 14, top + rows * cell - _CHAR_H)
    return img
