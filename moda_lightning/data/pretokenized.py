"""Pre-tokenized training data: nanoGPT ``.bin`` shards and ``.npy`` arrays, used as they are.

The files become one `TokenStream` (no re-tokenization, no copy). Their headers are checked against
their sizes on every open; their ids are checked once against the vocabulary (a full read, shown
with a progress bar) and the result is remembered in the cache folder, keyed by the files' paths,
sizes and modification times, so later runs and other ranks open them at once. An id outside the
vocabulary would otherwise fail deep inside the embedding, or on a GPU not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moda_lightning.data.token_files import (
    TokenStream,
    file_fingerprint_parts,
    token_file_shard,
)

_SCAN_TOKENS = 1 << 24  # ids compared at a time when checking the range


def open_token_files(paths: Sequence[Path]) -> TokenStream:
    """The files as one stream, in the order given; headers checked (see `token_files`)."""
    shards = [token_file_shard(path) for path in paths]
    dtypes = {shard.dtype for shard in shards}
    if len(dtypes) > 1:
        found = ", ".join(f"{shard.path.name}: {str(shard.dtype).removeprefix('torch.')}" for shard in shards[:4])
        raise ValueError(f"data: the token files mix id types ({found}); convert them to one dtype.")
    return TokenStream(shards)


def _record_path(cache_dir: Path, paths: Sequence[Path], vocab_size: int) -> Path:
    key = hashlib.sha256("\n".join([f"vocab={vocab_size}", *file_fingerprint_parts(paths)]).encode()).hexdigest()
    return cache_dir / f"pretokenized-{key[:20]}.json"


def id_range(stream: TokenStream, show_progress: bool = True) -> tuple[int, int]:
    """The smallest and largest id of the stream, read once through (``(0, -1)`` when empty)."""
    low, high = None, None
    progress = tqdm(total=len(stream), desc="checking token ids", unit=" tokens", unit_scale=True,
                    mininterval=2.0, leave=False, disable=not show_progress)  # fmt: skip
    for _, ids in stream.chunks(_SCAN_TOKENS):
        wide = ids.to(torch.int64)
        low = int(wide.min()) if low is None else min(low, int(wide.min()))
        high = int(wide.max()) if high is None else max(high, int(wide.max()))
        progress.update(len(ids))
    progress.close()
    return (0, -1) if low is None else (low, high)


def check_token_ids(stream: TokenStream, vocab_size: int, eot_id: int, cache_dir: Path) -> None:
    """Check that every id of the stream is in ``[0, vocab_size)``, once per set of files.

    Raises:
        ValueError: If the stream is empty, or holds an id outside the vocabulary.
    """
    paths = [shard.path for shard in stream.shards]
    names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if len(stream) == 0:
        raise ValueError(f"data: the token files hold no tokens ({names}); pass files that do.")
    if not 0 <= eot_id < vocab_size:
        raise ValueError(
            f"data: eot_id={eot_id} is outside the {vocab_size}-token vocabulary; pass the end-of-text id of the tokenizer the files were made with."
        )
    record = _record_path(cache_dir, paths, vocab_size)
    if record.is_file():
        return
    low, high = id_range(stream)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"data: the token files ({names}) hold ids from {low:,} to {high:,}, outside the {vocab_size:,}-token "
            "vocabulary (0 to {:,}); pass the vocabulary size of the tokenizer they were made with "
            "(--data.token_vocab_size, or --data.tokenizer).".format(vocab_size - 1)
        )
    # Remembered only when the folder can be written; a read-only cache just checks again next time.
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(
            json.dumps(
                {
                    "files": [str(p) for p in paths],
                    "min_id": low,
                    "max_id": high,
                    "n_tokens": len(stream),
                }
            )
        )
        os.replace(tmp, record)
    except OSError:
        pass
