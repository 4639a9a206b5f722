"""What one finished study run measured, read back from its TensorBoard event files.

The event files are the record: a run's ``result.json`` is a small summary of them, written when the
run has finished, and the report is built from these summaries.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from moda_lightning.callbacks.gpu_memory import PEAK_MEMORY_TAG

RESULT_FILE = "result.json"


@dataclass
class RunResult:
    """One run's validation curve and its cost.

    ``val_tokens[i]`` training tokens had been seen at validation ``i`` (loss ``val_loss[i]``,
    mean over the data module's fixed validation windows).
    """

    arm: str
    seed: int
    steps: int
    tokens: int
    val_tokens: list[int]
    val_loss: list[float]
    tokens_per_sec: float | None
    params: float
    flops_per_token: float
    # How many runs trained on this run's GPU at once, itself included, for most of its time (None:
    # not recorded). Throughput is only comparable between runs that shared their GPU alike.
    gpu_sharing: int | None = None
    # The GPU model the run trained on (several, comma-separated, if its pieces moved between
    # machines; None: not recorded or a CPU). Throughput is only comparable on the same model.
    device: str | None = None
    # The last depth probe's softmax mass on the depth slots, per layer (None where a layer reads
    # none): "all" slots, and split into the attention and FFN slots; None for a run without depth.
    depth_mass: dict[str, list[float | None]] | None = None
    # The most GPU memory the run's process reserved (GiB; None: a CPU run, or not logged), which
    # says how many such runs fit one GPU together.
    peak_memory_gib: float | None = None

    @property
    def final_loss(self) -> float:
        return self.val_loss[-1]

    def save(self, run_dir: Path) -> None:
        (run_dir / RESULT_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> RunResult:
        return cls(**json.loads((run_dir / RESULT_FILE).read_text()))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run folder as ``tag -> [(step, value), ...]`` in step order.

    All event files of the folder are read, so a resumed run continues its curve; TensorBoard's
    reader drops the events a restart replays (steps logged again after a resume).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def latest_step(run_dir: Path) -> int:
    """The last training step a run has logged (0 before its first log)."""
    scalars = read_scalars(run_dir) if any(run_dir.glob("events.out.tfevents.*")) else {}
    return max((points[-1][0] for points in scalars.values() if points), default=0)


def summarize(
    run_dir: Path,
    arm: str,
    seed: int,
    tokens_per_step: int,
    max_steps: int,
    eval_every_steps: int,
    gpu_sharing: int | None = None,
    device: str | None = None,
) -> RunResult:
    """Summarise a finished run's event files; ``gpu_sharing`` and ``device`` are recorded as given.

    Raises:
        ValueError: If the run logged fewer validations than ``max_steps / eval_every_steps``.
    """
    scalars = read_scalars(run_dir)
    val = [value for _, value in scalars.get("val/loss", [])]
    expected = max_steps // eval_every_steps
    if len(val) < expected:
        raise ValueError(
            f"study: run {run_dir} logged {len(val)} of its {expected} validations; it did not finish. "
            "Run the study again to resume it."
        )
    # Validation i (from 1) runs after i * eval_every_steps optimizer steps; the logger's step for
    # it depends on where in the loop Lightning logs, so count validations instead.
    val_tokens = [(i + 1) * eval_every_steps * tokens_per_step for i in range(len(val))]
    throughput = [value for _, value in scalars.get("train/device/items_per_sec", [])]
    # The first windows include compilation and warm-up; the median of the rest is the run's rate.
    rate = statistics.median(throughput[len(throughput) // 4 :]) if throughput else None
    return RunResult(
        arm=arm,
        seed=seed,
        steps=max_steps,
        tokens=max_steps * tokens_per_step,
        val_tokens=val_tokens,
        val_loss=val,
        tokens_per_sec=rate,
        gpu_sharing=gpu_sharing,
        device=device,
        depth_mass=final_depth_mass(scalars),
        peak_memory_gib=max((value for _, value in scalars.get(PEAK_MEMORY_TAG, [])), default=None),
        **model_cost(run_dir),
    )


DEPTH_MASS_TAGS = {"all": "mass", "attn_slots": "mass_attn_slots", "ffn_slots": "mass_ffn_slots"}


def final_depth_mass(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[float | None]] | None:
    """Per layer, the last logged ``depth_attn/layer_LL/<tag>`` of each kind in `DEPTH_MASS_TAGS`
    (the callback's final probe); None if the run logged no depth mass."""
    layers = sorted({int(tag.split("/")[1].removeprefix("layer_")) for tag in scalars if tag.startswith("depth_attn/layer_")})
    if not any(f"depth_attn/layer_{i:02d}/mass" in scalars for i in layers):
        return None
    out: dict[str, list[float | None]] = {}
    for kind, tag in DEPTH_MASS_TAGS.items():
        points = [scalars.get(f"depth_attn/layer_{i:02d}/{tag}") for i in range(max(layers) + 1)]
        out[kind] = [p[-1][1] if p else None for p in points]
    return out


def model_cost(run_dir: Path) -> dict[str, float]:
    """Parameters and training FLOPs per token of a run's model, counted from its ``hparams.yaml``
    by :mod:`moda_lightning.flops` (the FlopsOverhead callback checks that count at fit start)."""
    import yaml

    from moda_lightning.config import MoDAConfig
    from moda_lightning.flops import parameter_counts, training_flops_per_token

    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    config = MoDAConfig.from_mapping(hparams)
    return {
        "params": float(parameter_counts(config).total),
        "flops_per_token": float(training_flops_per_token(config, int(hparams["seq_len"])).total),
    }
