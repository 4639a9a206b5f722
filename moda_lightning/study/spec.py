"""A study file: arms x seeds of ``moda fit`` runs at one token budget, and the runs it implies.

A study file is YAML (see ``studies/``)::

    name: table6_24l                      # output folder runs/studies/<name> unless --out is given
    configs: [configs/table6_24l.yaml]    # config files of every run
    args: [--data.files=corpus/*.jsonl]   # flags of every run
    arms:                                 # name -> extra config files and flags
      baseline_post: {configs: [configs/variants/baseline.yaml, configs/variants/post_norm.yaml]}
      moda_post: {configs: [configs/variants/post_norm.yaml], args: [--model.ffn_kv=false]}
    reference: baseline_post              # paired differences are taken against this arm
    comparisons: [moda_pre - baseline_pre]  # more paired differences, first arm minus second (optional)
    seeds: [0, 1, 2]
    tokens: 100_000_000                   # training tokens per run
    eval_every_tokens: 10_000_000         # validation at the same token counts in every run
    runs_per_gpu: 3                       # runs sharing one GPU (several small models fit on one)

Config paths are relative to the working directory, as for ``moda fit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moda_lightning.cli import resolved_fit_config

_KEYS = {
    "name", "configs", "args", "arms", "reference", "comparisons", "seeds", "tokens", "eval_every_tokens",
    "runs_per_gpu", "gpus",
}  # fmt: skip
_ARM_KEYS = {"configs", "args"}


@dataclass(frozen=True)
class Arm:
    """One variant of the study: config files and flags added to the study's own."""

    name: str
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudySpec:
    """A parsed, checked study file."""

    name: str
    arms: tuple[Arm, ...]
    reference: str
    seeds: tuple[int, ...]
    tokens: int
    eval_every_tokens: int
    configs: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    runs_per_gpu: int = 1
    gpus: int | None = None
    """GPUs to spread runs over (one run on one GPU at a time per slot); default: all visible."""
    path: str = ""
    comparisons: tuple[tuple[str, str], ...] = ()
    """Paired differences the report adds to those against ``reference``: (arm, minus this arm)."""

    def fit_args(self, arm: Arm) -> list[str]:
        """The ``moda fit`` arguments shared by every seed of ``arm`` (config files first)."""
        configs = [*self.configs, *arm.configs]
        return [a for c in configs for a in ("--config", c)] + [*self.args, *arm.args]


@dataclass(frozen=True)
class Run:
    """One ``moda fit`` run of the study: an arm at a seed, with its folder and full arguments."""

    arm: str
    seed: int
    dir: Path
    args: tuple[str, ...]
    max_steps: int
    eval_every_steps: int
    tokens_per_step: int

    @property
    def name(self) -> str:
        return f"{self.arm}/seed{self.seed}"


@dataclass
class _Problems:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)


def load_study(path: str | Path) -> StudySpec:
    """Read and check a study file; every problem is reported in one ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study: file {str(path)!r} does not exist; pass a study file such as studies/table6_24l.yaml.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"study: {str(path)!r} is not valid YAML ({err}).") from err
    if not isinstance(raw, dict):
        raise ValueError(f"study: {str(path)!r} must hold a mapping with keys {sorted(_KEYS)}.")
    p = _Problems()
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        p.add(f"unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    arms = _arms(raw.get("arms"), p)
    names = [str(n) for n in raw["arms"]] if isinstance(raw.get("arms"), dict) else []
    reference = raw.get("reference", names[0] if names else "")
    if names and reference not in names:
        p.add(f"reference {reference!r} is not an arm; arms: {names}")
    comparisons = _comparisons(raw.get("comparisons", []), names, p)
    seeds = raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        p.add(f"seeds must be a non-empty list of integers, got {seeds!r}")
        seeds = [0]
    elif len(set(seeds)) != len(seeds):
        p.add(f"seeds {seeds} repeat a seed")
    tokens = _positive_int(raw, "tokens", None, p)
    eval_every = _positive_int(raw, "eval_every_tokens", tokens // 10 if tokens else None, p)
    runs_per_gpu = _positive_int(raw, "runs_per_gpu", 1, p)
    gpus = raw.get("gpus")
    if gpus is not None and not (isinstance(gpus, int) and gpus >= 1):
        p.add(f"gpus must be a positive integer (or left out for all visible GPUs), got {gpus!r}")
    configs = _strings(raw, "configs", p)
    args = _strings(raw, "args", p)
    for config in [*configs, *(c for arm in arms for c in arm.configs)]:
        if not Path(config).is_file():
            p.add(f"config file {config!r} does not exist (paths are relative to {str(Path.cwd())!r})")
    if p.items:
        raise ValueError(f"study: invalid study file {str(path)!r}: " + "; ".join(p.items) + ".")
    return StudySpec(
        name=str(raw.get("name") or path.stem),
        arms=tuple(arms),
        reference=reference,
        seeds=tuple(seeds),
        tokens=tokens,
        eval_every_tokens=eval_every,
        configs=tuple(configs),
        args=tuple(args),
        runs_per_gpu=runs_per_gpu,
        gpus=gpus,
        path=str(path),
        comparisons=comparisons,
    )


def _arms(raw: Any, p: _Problems) -> list[Arm]:
    if not isinstance(raw, dict) or not raw:
        p.add("arms must map arm names to {configs: [...], args: [...]} (at least one arm)")
        return []
    arms = []
    for name, body in raw.items():
        body = body or {}
        if not isinstance(body, dict) or set(body) - _ARM_KEYS:
            p.add(f"arm {name!r} must be a mapping with keys {sorted(_ARM_KEYS)}, got {body!r}")
            continue
        arms.append(Arm(str(name), tuple(_strings(body, "configs", p, f"arm {name!r}")), tuple(_strings(body, "args", p, f"arm {name!r}"))))
    return arms


def _comparisons(raw: Any, names: list[str], p: _Problems) -> tuple[tuple[str, str], ...]:
    """``["arm_a - arm_b", ...]`` as pairs of arm names."""
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        p.add(f"comparisons must be a list of 'ARM - OTHER_ARM' strings, got {raw!r}")
        return ()
    pairs = []
    for text in raw:
        sides = [side.strip() for side in text.split(" - ")]
        if len(sides) != 2 or not all(sides):
            p.add(f"comparison {text!r} is not 'ARM - OTHER_ARM' (two arm names with ' - ' between)")
        elif names and not set(sides) <= set(names):
            p.add(f"comparison {text!r} names {sorted(set(sides) - set(names))}, not arms of the study; arms: {names}")
        elif sides[0] == sides[1]:
            p.add(f"comparison {text!r} compares an arm with itself")
        else:
            pairs.append((sides[0], sides[1]))
    return tuple(pairs)


def _strings(raw: dict, key: str, p: _Problems, where: str = "") -> list[str]:
    value = raw.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        p.add(f"{where + ' ' if where else ''}{key} must be a list of strings, got {value!r}")
        return []
    return value


def _positive_int(raw: dict, key: str, default: int | None, p: _Problems) -> int:
    value = raw.get(key, default)
    if value is None:
        p.add(f"{key} is required (a positive integer)")
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        p.add(f"{key} must be a positive integer, got {value!r}")
        return 1
    return value


def plan_runs(spec: StudySpec, out_dir: Path) -> list[Run]:
    """Every run of the study, seed by seed, arm by arm, with the flags that make them comparable.

    Each run trains ``spec.tokens`` tokens (rounded up to whole evaluation intervals) and validates
    every ``eval_every_tokens`` on the data module's fixed validation windows, so all runs are
    evaluated on the same text at the same token counts. Arms must agree on tokens per step.
    """
    runs, tokens_per_step = [], {}
    for arm in spec.arms:
        shared = spec.fit_args(arm)
        config = resolved_fit_config(shared)
        trainer, data = config["trainer"], config["data"]
        devices = trainer.get("devices")
        world = (devices if isinstance(devices, int) else 1) * int(trainer.get("num_nodes") or 1)
        per_step = int(data["batch_size"]) * int(data["seq_len"]) * int(trainer.get("accumulate_grad_batches") or 1) * world
        tokens_per_step[arm.name] = per_step
        # n evaluations evenly spaced, the last at the end; the budget is rounded up by less than n steps
        n_evals = max(1, round(spec.tokens / spec.eval_every_tokens))
        eval_steps = max(1, math.ceil(math.ceil(spec.tokens / per_step) / n_evals))
        max_steps = eval_steps * n_evals
        for seed in spec.seeds:
            run_dir = out_dir / arm.name / f"seed{seed}"
            args = [
                *shared,
                f"--seed_everything={seed}",  # the model's initialisation
                f"--data.seed={seed}",  # and the order of the training windows
                f"--trainer.max_steps={max_steps}",
                f"--trainer.val_check_interval={eval_steps}",
                "--trainer.check_val_every_n_epoch=null",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
                f"--trainer.logger.init_args.save_dir={out_dir / arm.name}",
                "--trainer.logger.init_args.name=",  # the run folder is save_dir/version
                f"--trainer.logger.init_args.version=seed{seed}",
            ]
            runs.append(Run(arm.name, seed, run_dir, tuple(args), max_steps, eval_steps, per_step))
    # Seed-major: the arms of one seed run side by side, so a partly finished study holds whole pairs.
    order = {arm.name: i for i, arm in enumerate(spec.arms)}
    runs.sort(key=lambda run: (spec.seeds.index(run.seed), order[run.arm]))
    if len(set(tokens_per_step.values())) > 1:
        raise ValueError(
            f"study: the arms train different numbers of tokens per step ({tokens_per_step}); a comparison at equal "
            "token counts needs the same batch_size, seq_len, accumulate_grad_batches and devices in every arm."
        )
    return runs
