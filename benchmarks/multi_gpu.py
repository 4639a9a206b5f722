"""One GPU against two (DDP and FSDP) at the same global batch: the loss curves must agree within noise.

    PYTHONPATH=. python benchmarks/multi_gpu.py --steps 300

Runs ``moda fit`` three times on the built-in corpus with the fused MoDA backend, reads
``train/loss`` and ``val/loss`` back from each run's TensorBoard events and prints them side
by side. Data order differs between one and two processes (Lightning's DistributedSampler
shards the shuffled windows), so the curves agree within noise, not bit for bit.
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
    "--model.attention=moda_triton",
    "--model.d_model=384",
    "--model.n_layers=8",
    "--model.n_heads=6",
    "--model.n_kv_heads=2",
    "--model.max_seq_len=512",
    "--model.warmup_steps=30",
    "--data.tokenizer_vocab_size=4096",
    "--data.seq_len=512",
]


def run(name: str, workdir: Path, devices: int, strategy: str, per_device_batch: int, steps: int) -> tuple[dict, float]:
    cmd = [
        sys.executable, "-m", "moda_lightning.cli", "fit", *MODEL,
        f"--data.batch_size={per_device_batch}", f"--data.cache_dir={workdir / 'cache'}",
        "--trainer.accelerator=gpu", f"--trainer.devices={devices}", f"--trainer.strategy={strategy}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps // 3}", "--trainer.limit_val_batches=8",
        "--trainer.log_every_n_steps=10", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", f"--trainer.logger.init_args.name={name}",
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-5000:])
        raise SystemExit(f"{name} failed")
    events = EventAccumulator(str(next((workdir / "runs" / name).rglob("events.out.tfevents.*")).parent))
    events.Reload()
    curves = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("train/loss", "val/loss")}
    return curves, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moda_multi_gpu"))
    args = parser.parse_args()
    runs = {
        "1gpu": run("1gpu", args.workdir, 1, "auto", args.global_batch, args.steps),
        "2gpu-ddp": run("2gpu-ddp", args.workdir, 2, "ddp", args.global_batch // 2, args.steps),
        "2gpu-fsdp": run("2gpu-fsdp", args.workdir, 2, "fsdp", args.global_batch // 2, args.steps),
    }
    names = list(runs)
    print(f"\nwall time: " + ", ".join(f"{n} {wall:.0f} s" for n, (_, wall) in runs.items()))
    for tag in ("train/loss", "val/loss"):
        steps = sorted(set.intersection(*(set(curves[tag]) for curves, _ in runs.values())))
        if tag == "train/loss":
            steps = steps[:: max(1, len(steps) // 10)] + steps[-1:]
        print(f"\n{tag}\n| step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for step in steps:
            print(f"| {step} | " + " | ".join(f"{runs[n][0][tag][step]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
