"""The training loader's throughput at the 700M shape, against the GPU's training step at that shape.

    PYTHONPATH=kernels:. python benchmarks/loader_speed.py                      # built-in corpus, micro-batches 2 and 4
    PYTHONPATH=kernels:. python benchmarks/loader_speed.py --data.files='corpus/*.jsonl' --batches 5000
    PYTHONPATH=kernels:. python benchmarks/loader_speed.py --config configs/moda_700m.yaml --batch-sizes 4 --steps 20

For each micro-batch size, the data module is built from the config as ``moda fit --config
configs/moda_700m.yaml --data.batch_size=B`` builds it (the same parsed config: seq_len 4096,
num_workers, cache folder, corpus), prepared and set up, and ``--batches`` batches are drawn from
its training DataLoader after one warm-up batch (pinned when CUDA is available, collated by the
DataLoader, epoch after epoch on a small corpus), as Lightning draws them. Tokens/s counts the
``B * seq_len`` tokens a batch trains on.

With CUDA, the same run also times the model's training step at that shape (``benchmarks/_step.py``:
forward, backward, fused AdamW in bf16 autocast, median of ``--steps`` steps by CUDA events) on a
batch from the loader, and prints the loader's time per batch over the step's time: a data pipeline
that keeps up is far below 1. The step's vocabulary is the config's ``data.tokenizer_vocab_size``
(the size a tokenizer trained on a large corpus reaches; a small corpus's tokenizer stops earlier,
which changes the ids, not the loader's work), or the given tokenizer's or token files'.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/moda_700m.yaml", help="the moda fit config (default moda_700m)")
    parser.add_argument(
        "--data.files", dest="files", default=None, help="training files (default: the built-in corpus)"
    )
    parser.add_argument("--data.cache_dir", dest="cache_dir", default=None, help="cache folder (default: the config's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4], help="micro-batch sizes (default 2 4)")
    parser.add_argument("--batches", type=int, default=2000, help="loader batches timed per size (default 2000)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per size, with CUDA (default 10)")
    args = parser.parse_args()
    if min(args.batch_sizes) < 1 or args.batches < 1 or args.steps < 1:
        parser.error("--batch-sizes, --batches and --steps must be 1 or more")
    return args


def fit_config(args: argparse.Namespace, batch_size: int) -> dict:
    """The config ``moda fit`` would run with for this micro-batch size."""
    from moda_lightning.cli import resolved_fit_config

    flags = ["--config", args.config, f"--data.batch_size={batch_size}"]
    flags += [f"--data.files={args.files}"] if args.files else []
    flags += [f"--data.cache_dir={args.cache_dir}"] if args.cache_dir else []
    config = resolved_fit_config(flags)
    if "class_path" in config["data"]:
        raise SystemExit(f"loader_speed: {args.config} names its own data module; this times TextDataModule only")
    return config


def time_loader(loader, batches: int) -> float:
    """Seconds to draw ``batches`` batches after one warm-up batch, starting new epochs as needed."""
    next(iter(loader))  # maps the shards, starts any workers
    done, start = 0, time.perf_counter()
    while done < batches:
        for _ in loader:
            done += 1
            if done == batches:
                break
    return time.perf_counter() - start


def step_ms(config: dict, vocab_size: int, batch, steps: int) -> float:
    """Median ms of the model's training step on ``batch`` (moved to the GPU)."""
    import torch

    from benchmarks._step import median_step_ms, training_step
    from moda_lightning.config import MoDAConfig
    from moda_lightning.model import MoDATransformer

    model = MoDATransformer(MoDAConfig.from_mapping(config["model"], vocab_size=vocab_size)).cuda()
    network = torch.compile(model) if config["model"].get("compile") else model
    step = training_step(network, model, batch.cuda(non_blocking=True))
    try:
        for _ in range(3):  # kernel compilation, autotuning, the allocator
            step()
        torch.cuda.synchronize()
        return median_step_ms(step, steps)
    finally:
        del model, network, step
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()

    import torch

    from moda_lightning.data import TextDataModule
    from moda_lightning.data.token_sources import describe

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "no CUDA device"
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {device}; config {args.config}\n")
    columns = ["micro-batch", "seq len", "workers", "pinned", "batches", "seconds", "batches/s", "tokens/s"]
    columns += ["ms/batch", "step ms", "loader/step"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for batch_size in args.batch_sizes:
        config = fit_config(args, batch_size)
        data = config["data"]
        dm = TextDataModule(**data)
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        seconds = time_loader(loader, args.batches)
        loader_ms = 1000 * seconds / args.batches
        tokens = args.batches * batch_size * dm.seq_len
        row = (
            f"| {batch_size} | {dm.seq_len} | {dm.num_workers} | {loader.pin_memory} | {args.batches} | {seconds:.3f} | "
            f"{args.batches / seconds:,.0f} | {tokens / seconds:,.0f} | {loader_ms:.3f} |"
        )
        if cuda:
            given = data.get("tokenizer") or dm.token_paths is not None
            vocab_size = dm.vocab_size if given else data["tokenizer_vocab_size"]
            ms = step_ms(config, vocab_size, next(iter(loader)), args.steps)
            row += f" {ms:.1f} | {loader_ms / ms:.5f} |"
        else:
            row += " not timed (no CUDA) | |"
        print(row, flush=True)
    windows = f"{len(dm.train_dataset):,} training windows of {dm.seq_len + 1} tokens"
    print(f"\n{describe(dm.corpus, dm.token_paths)}: tokenizer vocabulary {dm.vocab_size:,}; {windows}")


if __name__ == "__main__":
    main()
