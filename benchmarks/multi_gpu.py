"""One GPU against two (DDP and FSDP) at the same global batch: the loss curves must agree within noise.

    PYTHONPATH=kernels:. python benchmarks/multi_gpu.py --steps 300

Runs ``moda fit`` three times on the built-in corpus with the fused MoDA backend, reads
``train/loss`` and ``val/loss`` back from each run's TensorBoard events and prints them side
by side.

All three runs see the same global batches: the one-device run also uses the ``ddp`` strategy,
so Lightning gives it the DistributedSampler the two-device runs shard (one replica takes
``perm[16i:16i+16]`` at step i, two replicas take its even and odd entries). With plain
one-device sampling the data order differs, and on this small corpus, which the model
memorizes, a different order alone moves the curves apart by more than their noise.
``train/loss`` is rank zero's own half of the batch on two devices, so the curves agree within
noise, not bit for bit. (That the gradients of one global batch agree is tested exactly:
``tests/test_distributed.py``.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

MODEL = [
    "--model.d_model=384",
    "--model.n_layers=8",
    "--model.n_heads=6",
    "--model.n_kv_heads=2",
    "--model.max_seq_len=512",
    "--model.warmup_steps=30",
    "--data.tokenizer_vocab_size=4096",
    "--data.seq_len=512",
]


def run(name: str, args: argparse.Namespace, devices: int, strategy: str) -> tuple[dict, float]:
    workdir, steps = args.workdir, args.steps
    cmd = [
        sys.executable, "-m", "moda_lightning.cli", "fit", *MODEL, f"--model.attention={args.attention}",
        f"--data.batch_size={args.global_batch // devices}", f"--data.cache_dir={workdir / 'cache'}",
        f"--trainer.accelerator={args.accelerator}", f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps // 3}", "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=8",
        "--trainer.log_every_n_steps=10", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", f"--trainer.logger.init_args.name={name}",
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-5000:])
        raise SystemExit(f"{name} failed")
    newest = max((workdir / "runs" / name).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    events = EventAccumulator(str(newest.parent))
    events.Reload()
    curves = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("train/loss", "val/loss")}
    return curves, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moda_multi_gpu"))
    parser.add_argument("--attention", default="moda_triton")
    parser.add_argument("--accelerator", default="gpu", help="cpu runs a smoke test (gloo DDP; Lightning's FSDP needs GPUs)")
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], help="two-device strategies to compare")
    args = parser.parse_args()
    # the one-device run uses the ddp strategy too, for the same sampler and so the same batches
    runs = {"1 device": run("1dev", args, 1, "ddp")}
    for strategy in args.strategies:
        runs[f"2 devices, {strategy}"] = run(f"2dev-{strategy}", args, 2, strategy)
    names = list(runs)
    print(f"\nwall time (start-up included): " + ", ".join(f"{n} {wall:.0f} s" for n, (_, wall) in runs.items()))
    for tag in ("train/loss", "val/loss"):
        steps = sorted(set.intersection(*(set(curves[tag]) for curves, _ in runs.values())))
        if tag == "train/loss":
            steps = sorted(set(steps[:: max(1, len(steps) // 10)] + steps[-1:]))
        print(f"\n{tag}\n| step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for step in steps:
            print(f"| {step} | " + " | ".join(f"{runs[n][0][tag][step]:.3f}" for n in names) + " |")
    print_agreement(runs)


def print_agreement(runs: dict) -> None:
    """How far each run's curve is from one device's, next to one device's own step-to-step noise."""
    one = runs["1 device"][0]["train/loss"]
    late = sorted(one)[len(one) // 2 :]  # second half of training: past the fast initial drop
    diffs = [one[b] - one[a] for a, b in zip(late, late[1:])]
    noise = (sum(d * d for d in diffs) / max(1, len(diffs)) / 2) ** 0.5
    print(f"\n1 device, second half: train/loss noise between logged steps {noise:.3f}")
    for name, (curves, _) in runs.items():
        if name == "1 device":
            continue
        common = [s for s in late if s in curves["train/loss"]]
        mean_diff = sum(curves["train/loss"][s] - one[s] for s in common) / max(1, len(common))
        last_val = max(curves["val/loss"])
        val_diff = curves["val/loss"][last_val] - runs["1 device"][0]["val/loss"].get(last_val, float("nan"))
        print(f"{name}: mean train/loss difference over the second half {mean_diff:+.3f}, final val/loss difference {val_diff:+.3f}")


if __name__ == "__main__":
    main()
