"""Throughput of the data pipeline on CPU: tokenizing into the sharded cache, and reading windows back.

    PYTHONPATH=kernels:. python benchmarks/tokenize_speed.py
    PYTHONPATH=kernels:. python benchmarks/tokenize_speed.py --mb 256 --procs 1 4 16   # a larger machine

The corpus is the built-in one (Python's help topics, English prose and code) repeated into
JSON-lines files of ``--mb`` MB in all, tokenized with a 4096-token byte-level BPE trained on it.
Rows: ``num_proc=1, one thread`` encodes in this process on one core (``TOKENIZERS_PARALLELISM=false``);
``num_proc=1`` as shipped, where the tokenizer spreads each batch over its own threads;
``num_proc=N`` a pool of N worker processes, one thread each. Each row builds the cache from
scratch and checks that its shards equal the first row's. The loader row times shuffled training
batches of ``--seq-len + 1`` tokens from the memory-mapped shards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=24, help="corpus size in MB of text (default 24)")
    parser.add_argument(
        "--procs",
        type=int,
        nargs="+",
        default=None,
        help="worker counts to time (default 1 and every core)",
    )
    parser.add_argument("--seq-len", type=int, default=1024, help="loader window length (default 1024)")
    parser.add_argument(
        "--batches",
        type=int,
        default=5000,
        help="loader batches to time (default 5000)",
    )
    args = parser.parse_args()

    from moda_lightning.data import (
        Corpus,
        PackedWindows,
        builtin_documents,
        train_bpe_tokenizer,
    )
    from moda_lightning.data import token_cache as tc
    from moda_lightning.data.encode_pool import available_cores
    from moda_lightning.data.sampler import ResumableLoader, ResumableShuffle

    cores = available_cores()
    procs = args.procs or sorted({1, cores})
    work = Path(tempfile.mkdtemp(prefix="tokenize-speed-"))
    try:
        docs = builtin_documents()
        per_copy = sum(len(d.encode()) for d in docs)
        copies = max(1, round(args.mb * 2**20 / per_copy))
        for part in range(4):
            with open(work / f"part{part}.jsonl", "w") as f:
                for copy in range(part, copies, 4):
                    f.writelines(json.dumps({"text": doc, "copy": copy}) + "\n" for doc in docs)
        corpus = Corpus(str(work / "part*.jsonl"))
        text_mb = copies * per_copy / 2**20
        tokenizer = train_bpe_tokenizer(docs, 4096, show_progress=False)
        eot = tokenizer.token_to_id("<|endoftext|>")
        key = tc.CacheKey(corpus.fingerprint(), "benchmark", 4096)
        print(f"{platform.processor() or platform.machine()}, {cores} cores available; corpus {text_mb:.1f} MB of text "
              f"({copies} copies of the built-in corpus, {copies * len(docs):,} documents)\n")  # fmt: skip
        print("| tokenizing | seconds | tokens/s | MB/s of text |\n|---|---|---|---|")
        first = None
        rows = [
            ("num_proc=1, one thread", 1, "false"),
            ("num_proc=1 (in process, tokenizer threads)", 1, None),
        ]
        rows += [(f"num_proc={n} (worker processes)", n, None) for n in procs if n > 1]
        for label, num_proc, parallelism in rows:
            folder = work / f"cache-{len(list(work.glob('cache-*')))}"
            if parallelism is not None:  # the tokenizer reads this on every call
                os.environ["TOKENIZERS_PARALLELISM"] = parallelism
            start = time.perf_counter()
            manifest = tc.build_token_cache(
                corpus,
                tokenizer,
                eot,
                folder,
                key,
                num_proc=num_proc,
                show_progress=False,
            )
            seconds = time.perf_counter() - start
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            first = first or manifest
            assert manifest == first, "shards differ between worker counts"
            print(
                f"| {label} | {seconds:.2f} | {manifest.n_tokens / seconds:,.0f} | {text_mb / seconds:.2f} |",
                flush=True,
            )

        # The loader: shuffled windows of the memory-mapped shards, as the data module serves them,
        # epoch after epoch until --batches batches.
        stream = tc.open_token_cache(work / "cache-0")
        windows = PackedWindows(stream, [(0, len(stream))], args.seq_len)
        loader = ResumableLoader(
            windows,
            batch_size=16,
            sampler=ResumableShuffle(windows, seed=0),
            drop_last=True,
        )
        next(iter(loader))
        done, start = 0, time.perf_counter()
        while done < args.batches:
            for _ in itertools.islice(loader, args.batches - done):
                done += 1
        seconds = time.perf_counter() - start
        print(f"\n| loader (batch 16, seq_len {args.seq_len}) | windows/s | tokens/s |\n|---|---|---|")
        print(
            f"| {done} batches in {seconds:.2f} s | {16 * done / seconds:,.0f} | {16 * done * args.seq_len / seconds:,.0f} |"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
