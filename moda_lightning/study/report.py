"""The study's results page: ``study.md`` (per-arm table, paired differences) and ``study.png`` (curves).

Arms are compared on the final validation loss. Because every arm runs the same seeds, and a seed
fixes both the shared initial weights and the data order, the honest comparison is *paired*: the
per-seed difference to the reference arm (and between the pairs of arms the study file names
under ``comparisons``), with a t confidence interval over seeds.
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from moda_lightning.study.depth_figure import depth_arms, depth_figure
from moda_lightning.study.results import RunResult
from moda_lightning.study.spec import StudySpec

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; beyond that the normal's 1.96
# is within 2%. A table keeps scipy out of the dependencies.
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


PLANNING_LIMIT = 10_000  # pairs; a sign that needs more is reported as "more than" this


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass
class ArmSummary:
    name: str
    seeds: list[int]
    final_loss: list[float]
    tokens_per_sec: float | None
    throughput_sharing: int | None  # runs at once on the GPU of the runs tokens/s averages
    throughput_runs: int  # how many runs tokens/s averages
    throughput_device: str | None  # the GPU model those runs trained on
    params: float | None
    flops_per_token: float | None
    tokens: int
    peak_memory_gib: float | None = None  # the most any of its runs reserved on its GPU

    @property
    def mean(self) -> float:
        return statistics.fmean(self.final_loss)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.final_loss) if len(self.final_loss) > 1 else None


@dataclass
class PairedDifference:
    """Final loss of an arm minus another's (the reference's unless named), seed by seed (negative: the
    arm is better)."""

    arm: str
    seeds: list[int]
    diffs: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def ci95(self) -> tuple[float, float] | None:
        if len(self.diffs) < 2:
            return None
        half = t975(len(self.diffs) - 1) * statistics.stdev(self.diffs) / math.sqrt(len(self.diffs))
        return self.mean - half, self.mean + half

    def pairs_to_clear_zero(self, most: int = PLANNING_LIMIT) -> int | None:
        """The fewest pairs whose 95% interval would leave out zero if the mean and sd of these pairs
        held: a planning guess for how many seeds would settle the sign. ``None`` with one pair or a
        zero mean; ``most + 1`` where even ``most`` pairs would not do."""
        if len(self.diffs) < 2 or self.mean == 0:
            return None
        sd = statistics.stdev(self.diffs)
        for n in range(2, most + 1):
            if t975(n - 1) * sd / math.sqrt(n) < abs(self.mean):
                return n
        return most + 1


def summarize_arms(spec: StudySpec, results: list[RunResult]) -> list[ArmSummary]:
    out = []
    for arm in spec.arms:
        runs = sorted((r for r in results if r.arm == arm.name), key=lambda r: r.seed)
        if not runs:
            continue
        timed = [r for r in runs if r.tokens_per_sec is not None]
        # A run that shared its GPU ran slower for it, so the rate averages the arm's least-shared runs
        # only, and of those the ones on the GPU model most of them used (an H100 is not an H200).
        sharing = min((r.gpu_sharing for r in timed if r.gpu_sharing is not None), default=None)
        least_shared = [r for r in timed if r.gpu_sharing == sharing]
        devices = collections.Counter(r.device for r in least_shared)
        device = max(devices, key=lambda d: (devices[d], d is not None, d or "")) if devices else None
        rates = [r.tokens_per_sec for r in least_shared if r.device == device]
        out.append(
            ArmSummary(
                name=arm.name,
                seeds=[r.seed for r in runs],
                final_loss=[r.final_loss for r in runs],
                tokens_per_sec=statistics.fmean(rates) if rates else None,
                throughput_sharing=sharing,
                throughput_runs=len(rates),
                throughput_device=device,
                params=runs[0].params,
                flops_per_token=runs[0].flops_per_token,
                tokens=runs[0].tokens,
                peak_memory_gib=max((r.peak_memory_gib for r in runs if r.peak_memory_gib is not None), default=None),
            )
        )
    return out


def _seed_pairs(first: list[RunResult], second: list[RunResult]) -> list[tuple[RunResult, RunResult]]:
    """``(run of first, run of second)`` at every seed both have, by seed."""
    theirs = {r.seed: r for r in second}
    return sorted(((r, theirs[r.seed]) for r in first if r.seed in theirs), key=lambda pair: pair[0].seed)


def paired_difference(
    results: list[RunResult], arm: str, other: str, label: str | None = None
) -> PairedDifference | None:
    """``arm`` minus ``other`` at every seed both finished; ``None`` where they share none."""
    pairs = _seed_pairs([r for r in results if r.arm == arm], [r for r in results if r.arm == other])
    if not pairs:
        return None
    return PairedDifference(label or arm, [a.seed for a, _ in pairs], [a.final_loss - b.final_loss for a, b in pairs])


def paired_differences(spec: StudySpec, results: list[RunResult]) -> list[PairedDifference]:
    """Every arm against the reference."""
    diffs = (paired_difference(results, arm.name, spec.reference) for arm in spec.arms if arm.name != spec.reference)
    return [d for d in diffs if d is not None]


def named_comparisons(spec: StudySpec, results: list[RunResult]) -> list[PairedDifference]:
    """The study file's ``comparisons``, labelled ``arm - other``."""
    diffs = (paired_difference(results, a, b, f"{a} - {b}") for a, b in spec.comparisons)
    return [d for d in diffs if d is not None]


def _paired_rows(diffs: list[PairedDifference]) -> list[str]:
    rows = []
    for d in diffs:
        ci = d.ci95
        ci_text = "— (one pair)" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
        per_seed = ", ".join(f"{s}: {x:+.4f}" for s, x in zip(d.seeds, d.diffs))
        rows.append(f"| {d.arm} | {len(d.diffs)} | {d.mean:+.4f} | {ci_text} | {_to_clear_zero(d, ci)} | {per_seed} |")
    return rows


def _to_clear_zero(d: PairedDifference, ci: tuple[float, float] | None) -> str:
    """The planning column's text for ``d``, whose 95% interval ``ci`` the row already holds."""
    if ci is not None and (ci[0] > 0 or ci[1] < 0):
        return "clear now"
    needed = d.pairs_to_clear_zero()
    if needed is None:
        return "—"
    return f"more than {PLANNING_LIMIT:,}" if needed > PLANNING_LIMIT else f"{needed:,}"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _throughput(arm: ArmSummary) -> str:
    if arm.tokens_per_sec is None:
        return "—"
    if arm.throughput_sharing is None:
        shared = "sharing not recorded"
    else:
        shared = "alone" if arm.throughput_sharing == 1 else f"{arm.throughput_sharing} at once"
    if arm.throughput_device:
        shared += f" on {arm.throughput_device.removeprefix('NVIDIA ')}"
    return f"{arm.tokens_per_sec:,.0f} ({shared}; {arm.throughput_runs} run{'s' if arm.throughput_runs > 1 else ''})"


PAIRS_TO_CLEAR_ZERO = (
    "\"Pairs to clear 0\": how many pairs would put the interval clear of zero if the mean and sd of "
    "the pairs so far held (a planning guess from few pairs: both will move as seeds are added; "
    "\"clear now\": the interval already leaves zero out)."
)


def markdown(spec: StudySpec, results: list[RunResult], missing: list[str]) -> str:
    """The text of ``study.md``."""
    arms = summarize_arms(spec, results)
    lines = [
        f"# Study `{spec.name}`",
        "",
        f"Study file `{spec.path}`; {len(results)} finished run(s) of {len(spec.arms) * len(spec.seeds)}; "
        f"{arms[0].tokens:,} training tokens per run." if arms else f"Study file `{spec.path}`; no finished runs.",
        "",
        "Final validation loss (nats/token, mean over the fixed validation windows) and perplexity, mean and "
        "sample sd over seeds. tokens/s is the median training throughput of a run, averaged over the arm's "
        "runs that shared their GPU least, on the GPU model most of those used (in brackets: how many runs "
        "trained on that GPU at once, the GPU, and how many runs the average takes); compare it only between "
        "arms with the same sharing and GPU. GPU memory is the most any of the arm's runs reserved (— where "
        "its runs did not record it).",
        "",
        "| arm | seeds | val loss | sd | val ppl | tokens/s | params | train FLOPs/token | GPU memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        lines.append(
            f"| {a.name} | {len(a.seeds)} | {a.mean:.4f} | {_num(a.sd, '.4f')} | {math.exp(a.mean):.2f} | "
            f"{_throughput(a)} | {_num(None if a.params is None else a.params / 1e6, '.2f')}M | "
            f"{_num(None if a.flops_per_token is None else a.flops_per_token / 1e9, '.4g')} G | "
            f"{'—' if a.peak_memory_gib is None else f'{a.peak_memory_gib:.1f} GiB'} |"
        )
    diffs = paired_differences(spec, results)
    if diffs:
        lines += [
            "",
            f"Paired differences to `{spec.reference}` (arm minus reference, same seed: same shared initial "
            "weights and data order; negative = lower loss than the reference), with a 95% t interval over seeds. "
            + PAIRS_TO_CLEAR_ZERO,
            "",
            "| arm | pairs | mean difference | 95% CI | pairs to clear 0 | per seed |",
            "|---|---|---|---|---|---|",
            *_paired_rows(diffs),
        ]
    named = named_comparisons(spec, results)
    if named:
        lines += [
            "",
            "Paired differences the study file names (first arm minus second, same seed; negative = the first "
            "has the lower loss), with a 95% t interval over seeds:",
            "",
            "| comparison | pairs | mean difference | 95% CI | pairs to clear 0 | per seed |",
            "|---|---|---|---|---|---|",
            *_paired_rows(named),
        ]
    if missing:
        lines += ["", "Not finished yet: " + ", ".join(missing) + "."]
    lines += ["", "![validation loss](study.png)", ""]
    depth = depth_arms(spec, results)
    if depth:
        lines += [
            "Depth mass at the end of training: the softmax mass a row puts on its depth slots, from each "
            "run's last depth probe, mean over the layers that read depth and over seeds:",
            "",
            "| arm | seeds | mean depth mass | layer with the most (its mass) |",
            "|---|---|---|---|",
        ]
        for name, runs in depth:
            per_layer = {
                layer: statistics.fmean(values)
                for layer, values in enumerate(zip(*(r.depth_mass["all"] for r in runs)))
                if all(v is not None for v in values)
            }
            top = max(per_layer, key=per_layer.__getitem__)
            lines.append(f"| {name} | {len(runs)} | {statistics.fmean(per_layer.values()):.3f} | {top} ({per_layer[top]:.3f}) |")
        lines += ["", "![depth mass per layer](depth.png)", ""]
    return "\n".join(lines)


def _curves(runs: list[RunResult]) -> tuple[list[int], list[list[float]]]:
    """Tokens and, per validation point, the losses of ``runs`` there (cut to the shortest run)."""
    n = min(len(r.val_loss) for r in runs)
    return runs[0].val_tokens[:n], [list(p) for p in zip(*(r.val_loss[:n] for r in runs))]


def _plot_paired(ax, first: list[RunResult], second: list[RunResult], colour: str, label: str) -> list[tuple[int, float, float]]:
    """The curve of ``first`` minus ``second`` at the seeds both have, mean over those seeds, with a
    95% t band where there are two or more. Returns ``(tokens, low, high)`` per point: the band, or
    the mean where there is none."""
    pairs = _seed_pairs(first, second)
    if not pairs:
        return []
    n = min(min(len(a.val_loss), len(b.val_loss)) for a, b in pairs)
    tokens = pairs[0][0].val_tokens[:n]
    diffs = [[a.val_loss[j] - b.val_loss[j] for a, b in pairs] for j in range(n)]
    d_mean = [statistics.fmean(d) for d in diffs]
    ax.plot(tokens, d_mean, color=colour, label=f"{label} ({len(pairs)} pair{'s' if len(pairs) > 1 else ''})")
    half = [0.0] * n
    if len(pairs) > 1:
        half = [t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) for d in diffs]
        ax.fill_between(tokens, [m - h for m, h in zip(d_mean, half)], [m + h for m, h in zip(d_mean, half)],
                        color=colour, alpha=0.2, linewidth=0)  # fmt: skip
    return [(t, m - h, m + h) for t, m, h in zip(tokens, d_mean, half)]


def _focus_after_first_third(ax, points: list[tuple[int, float, float]]) -> None:
    """Fit the y-range to the curves and bands from a third of training on, zero included: early in
    training the differences and their bands are many times wider (two seeds give a t factor of 12.7)
    and would squash the part a reader compares; the early points run off the panel, which says so."""
    if not points:
        return
    first, last = min(t for t, _, _ in points), max(t for t, _, _ in points)
    late = [(lo, hi) for t, lo, hi in points if t >= first + (last - first) / 3]
    lo, hi = min(0.0, *(lo for lo, _ in late)), max(0.0, *(hi for _, hi in late))
    if all(lo <= p_lo and p_hi <= hi for _, p_lo, p_hi in points) or hi <= lo:
        return
    pad = 0.08 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.text(0.99, 0.02, "y-range fitted from a third of training on;\nearlier points run off the panel",
            transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small", color="dimgray")


def figure(spec: StudySpec, results: list[RunResult]):
    """Panels against training tokens: validation loss per arm (mean over seeds, band from min to
    max), the same zoomed on the last third, each arm's paired difference to the reference with its
    95% interval over seeds (below zero: lower loss than the reference), and, when the study file
    names ``comparisons``, those paired differences; the difference panels' y-range is fitted from a
    third of training on (:func:`_focus_after_first_third`)."""
    from matplotlib.figure import Figure

    by_arm = {arm.name: sorted((r for r in results if r.arm == arm.name), key=lambda r: r.seed) for arm in spec.arms}
    named = [(a, b) for a, b in spec.comparisons if by_arm[a] and by_arm[b]]
    fig = Figure(figsize=(21 if named else 16, 4.5), layout="constrained")
    full, zoom, paired, *rest = fig.subplots(1, 4 if named else 3)
    zoom_lo, zoom_hi, zoom_start = math.inf, -math.inf, None
    paired_points: list[tuple[int, float, float]] = []
    for i, arm in enumerate(spec.arms):
        colour = f"C{i % 10}"
        runs = by_arm[arm.name]
        if not runs:
            continue
        tokens, points = _curves(runs)
        mean = [statistics.fmean(p) for p in points]
        lo, hi = [min(p) for p in points], [max(p) for p in points]
        label = f"{arm.name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        for ax in (full, zoom):
            ax.plot(tokens, mean, color=colour, label=label, marker="." if len(tokens) < 30 else None)
            if len(runs) > 1:
                ax.fill_between(tokens, lo, hi, color=colour, alpha=0.2, linewidth=0)
        zoom_start = tokens[0] + 2 * (tokens[-1] - tokens[0]) / 3
        tail = [j for j, t in enumerate(tokens) if t >= zoom_start]
        zoom_lo, zoom_hi = min(zoom_lo, min(lo[j] for j in tail)), max(zoom_hi, max(hi[j] for j in tail))
        if arm.name != spec.reference:
            paired_points += _plot_paired(paired, runs, by_arm[spec.reference], colour, arm.name)
    if zoom_start is not None:
        zoom.set_xlim(zoom_start, max(r.val_tokens[-1] for r in results) * 1.01)
    if zoom_lo < zoom_hi:
        pad = 0.05 * (zoom_hi - zoom_lo)
        zoom.set_ylim(zoom_lo - pad, zoom_hi + pad)
    full.set_title(f"{spec.name}: validation loss (mean over seeds, band: min to max)", fontsize="medium")
    zoom.set_title("last third of training", fontsize="medium")
    paired.set_title(f"paired difference to {spec.reference} (band: 95% CI)", fontsize="medium")
    named_points = [p for j, (a, b) in enumerate(named) for p in _plot_paired(rest[0], by_arm[a], by_arm[b], f"C{j % 10}", f"{a} - {b}")]
    _focus_after_first_third(paired, paired_points)
    if rest:
        rest[0].set_title("named comparisons: first minus second (band: 95% CI)", fontsize="medium")
        _focus_after_first_third(rest[0], named_points)
    for ax in (full, zoom, paired, *rest):
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    for ax in (paired, *rest):
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel("loss difference (nats/token)")
        if ax.lines[1:]:
            ax.legend(fontsize="small")
    full.set_ylabel("validation loss (nats/token)")
    full.legend(fontsize="small")
    return fig


def write_report(spec: StudySpec, results: list[RunResult], missing: list[str], out_dir: Path) -> tuple[Path, Path]:
    """Write ``study.md``, ``study.png`` and (when an arm reads depth) ``depth.png`` into ``out_dir``,
    and log them to TensorBoard there."""
    text = markdown(spec, results, missing)
    md_path, png_path = out_dir / "study.md", out_dir / "study.png"
    md_path.write_text(text)
    fig = figure(spec, results)
    fig.savefig(png_path, dpi=120)
    depth = depth_figure(spec, results)
    if depth is not None:
        depth.savefig(out_dir / "depth.png", dpi=120)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out_dir / "report")) as writer:
        step = len(results)  # one report per number of finished runs
        writer.add_text("study/table", text, step)
        writer.add_figure("study/validation_loss", fig, step)
        if depth is not None:
            writer.add_figure("study/depth_mass", depth, step)
    return md_path, png_path
