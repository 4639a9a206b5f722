"""``depth.png``: how much attention each layer of each depth-reading arm puts on the depth stream.

The paper's Figure 5 statistic, at the end of training: per layer, the softmax mass a row puts on
its depth slots (mean over the probe's tokens and heads), averaged over seeds with a band from the
lowest to the highest seed; beside it the same mass split into the slots the attention sublayers
wrote and the slots the FFN sublayers wrote.
"""

from __future__ import annotations

import statistics

from moda_lightning.study.results import RunResult
from moda_lightning.study.spec import StudySpec


def _per_layer(runs: list[RunResult], kind: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Layers every run logged ``kind`` for, and the mean, min and max over the runs there."""
    n_layers = min(len(r.depth_mass[kind]) for r in runs)
    layers = [i for i in range(n_layers) if all(r.depth_mass[kind][i] is not None for r in runs)]
    values = [[r.depth_mass[kind][i] for r in runs] for i in layers]
    return layers, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def depth_arms(spec: StudySpec, results: list[RunResult]) -> list[tuple[str, list[RunResult]]]:
    """The arms, in the study's order, whose finished runs all logged depth mass."""
    out = []
    for arm in spec.arms:
        runs = sorted((r for r in results if r.arm == arm.name), key=lambda r: r.seed)
        if runs and all(r.depth_mass is not None for r in runs):
            out.append((arm.name, runs))
    return out


def depth_figure(spec: StudySpec, results: list[RunResult]):
    """The figure, or None when no finished run reads depth."""
    arms = depth_arms(spec, results)
    if not arms:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5), layout="constrained")
    total, split = fig.subplots(1, 2, sharey=True)
    colours = {arm.name: f"C{i % 10}" for i, arm in enumerate(spec.arms)}  # the colours of study.png
    for name, runs in arms:
        label = f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        layers, mean, lo, hi = _per_layer(runs, "all")
        total.plot(layers, mean, color=colours[name], marker=".", label=label)
        if len(runs) > 1:
            total.fill_between(layers, lo, hi, color=colours[name], alpha=0.2, linewidth=0)
        for kind, style in (("attn_slots", "-"), ("ffn_slots", "--")):
            layers, mean, _, _ = _per_layer(runs, kind)
            if layers:
                split.plot(layers, mean, color=colours[name], linestyle=style, marker=".",
                           label=f"{name}: {kind.replace('_', ' ')}")  # fmt: skip
    total.set_title(f"{spec.name}: depth mass per layer, end of training (band: min to max over seeds)", fontsize="medium")
    split.set_title("split by the sublayer that wrote the slot (mean over seeds)", fontsize="medium")
    for ax in (total, split):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    total.set_ylabel("softmax mass on depth slots")
    return fig
