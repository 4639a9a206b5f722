"""Whether a token cache folder holds what its manifest says: `cache_problem`, run by every process
that opens a cache, and `sample_sha256`, the sampled checksum the builder stores for it.

A raw shard carries no length or checksum of its own, so without these checks a truncated copy, an
interrupted ``rsync`` or a shard overwritten with garbage would be trained on as if it were the corpus.
What `cache_problem` checks, every time:

* Always, from ``stat`` alone: the manifest exists, parses, has this format, and was made for this
  corpus, tokenizer, vocabulary and dtype; every shard exists and holds exactly ``n_tokens *
  itemsize`` bytes. A truncated, one-byte-short, empty or grown shard is caught this way at any size.
* The content, caches up to `FULL_CHECK_MAX_BYTES` (256 MiB, 134M uint16 tokens): the SHA-256 of
  every byte of every shard, streamed through one 8 MiB buffer (never a whole shard in memory). A
  match proves the bytes are the ones built, whose largest id the manifest holds; the ids themselves
  are only scanned to explain a mismatch ("holds token id 65,535, but the vocabulary has 300 ids").
  Measured on a 30M-token uint16 file (60 MB, page cache warm, 2-core x86 VM with SHA
  extensions): SHA-256 0.06 s (0.1 s with the other core busy), BLAKE2b 1.7-2x that, so SHA-256;
  0.3-0.5 s per open at the limit. A sample (below) costs under 0.01 s.
* The content, larger caches: the same over a sample of each shard, `SAMPLE_BLOCKS` blocks of
  `SAMPLE_BLOCK_BYTES` in all (at least one per shard) spread evenly over it, so a multi-GB cache
  does not cost seconds on every rank of every run. That catches a shard overwritten, zeroed or
  filled with 0xFF, not a few damaged bytes between samples; ``cache_problem(path, key, full=True)``
  checks every byte on demand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from moda_lightning.data.cache_manifest import (
    MANIFEST,
    RECORD_FORMAT,
    CacheKey,
    ShardRecord,
    dtype_name,
    itemsize_of,
    read_manifest,
    token_dtype,
    wide_dtype,
)

FULL_CHECK_MAX_BYTES = 256 * 2**20
"""Caches up to this size have every byte checksummed on open; larger ones a sample."""

SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 64 * 2**10
"""The sample checked on open of a cache over `FULL_CHECK_MAX_BYTES`: this many blocks of this size in
all (at least one per shard), each shard's evenly spread from its first byte to its last."""

_READ_BYTES = 8 * 2**20  # buffer of the streamed full check


def sample_blocks_per_shard(n_shards: int) -> int:
    """Blocks sampled in each shard: `SAMPLE_BLOCKS` shared among the shards, at least one each."""
    return max(1, SAMPLE_BLOCKS // max(n_shards, 1))


def _sample_offsets(n_bytes: int, itemsize: int, blocks: int) -> list[int]:
    """Start of each sampled block: the whole shard when it is small, else `blocks` evenly spread blocks."""
    if n_bytes <= blocks * SAMPLE_BLOCK_BYTES:
        return list(range(0, n_bytes, SAMPLE_BLOCK_BYTES))
    if blocks == 1:
        return [0]
    step = (n_bytes - SAMPLE_BLOCK_BYTES) // (blocks - 1) // itemsize * itemsize
    return [i * step for i in range(blocks)]


def _ranges(n_bytes: int, itemsize: int, sampled: bool, blocks: int = 1) -> list[tuple[int, int]]:
    """``(start, length)`` of the blocks read: the sample of `blocks` blocks, or the whole shard in
    `_READ_BYTES` pieces."""
    if sampled:
        return [
            (start, min(SAMPLE_BLOCK_BYTES, n_bytes - start)) for start in _sample_offsets(n_bytes, itemsize, blocks)
        ]
    return [(start, min(_READ_BYTES, n_bytes - start)) for start in range(0, n_bytes, _READ_BYTES)]


def _blocks(f: BinaryIO, ranges: list[tuple[int, int]]) -> Iterator[memoryview]:
    """The bytes of each range in turn, read into one reused buffer (valid until the next block)."""
    buffer = memoryview(bytearray(max((length for _, length in ranges), default=0)))
    for start, length in ranges:
        f.seek(start)
        got = 0
        while got < length:
            n = f.readinto(buffer[got:length])
            if not n:
                raise OSError(f"the file ended at byte {start + got:,}, before its size")
            got += n
        yield buffer[:length]


def _sha256(f: BinaryIO, ranges: list[tuple[int, int]]) -> str:
    digest = hashlib.sha256()
    for block in _blocks(f, ranges):
        digest.update(block)
    return digest.hexdigest()


def _max_id(f: BinaryIO, ranges: list[tuple[int, int]], dtype: torch.dtype) -> int:
    """The largest token id in the ranges, -1 if they hold none."""
    size, max_id = itemsize_of(dtype), -1
    widened = torch.empty(max((n for _, n in ranges), default=0) // size, dtype=wide_dtype(dtype))
    for block in _blocks(f, ranges):
        count = len(block) // size
        if count:
            # Copied into one reused tensor: a fresh one per block costs more in page faults than the max.
            widened[:count].copy_(torch.frombuffer(block, dtype=dtype, count=count))
            max_id = max(max_id, int(widened[:count].max()))
    return max_id


def sample_sha256(path: Path, n_tokens: int, dtype: torch.dtype, n_shards: int) -> str:
    """The SHA-256 of the sample `cache_problem` checks in shard `path` of a cache of `n_shards` shards."""
    size = itemsize_of(dtype)
    with open(path, "rb") as f:
        return _sha256(f, _ranges(n_tokens * size, size, sampled=True, blocks=sample_blocks_per_shard(n_shards)))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _size_problem(shard: ShardRecord, actual: int, itemsize: int) -> str | None:
    expected = shard.n_tokens * itemsize
    if actual == expected:
        return None
    if actual == 0:
        return f"shard {shard.name} is empty, but the manifest says {shard.n_tokens:,} tokens ({expected:,} bytes)"
    shorter = "shorter" if actual < expected else "longer"
    return (
        f"shard {shard.name} is {_plural(abs(expected - actual), 'byte')} {shorter} than the manifest says "
        f"({actual:,} bytes, expected {expected:,})"
    )


def cache_problem(path: Path, key: CacheKey, full: bool | None = None) -> str | None:
    """What is wrong with the existing cache folder `path` for `key`, or None if it can be used.

    Args:
        path: An existing cache folder.
        key: What it must have been built from.
        full: Checksum every byte (True) or a sample (False); None decides by size (see the module
            docstring).

    Returns:
        None, or the problem as a phrase that follows the folder's name ("shard 00000.bin is
        empty, but the manifest says ...").
    """
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return f"has no manifest {MANIFEST} in it (deleted, or written by a version that kept none)"
    except (OSError, ValueError) as err:
        return f"has an unreadable manifest {MANIFEST} ({err})"
    if manifest.format != RECORD_FORMAT:
        return f"has a manifest of format {manifest.format}, but this version reads format {RECORD_FORMAT}"
    dtype = token_dtype(key.vocab_size)
    for field, wanted, what in (
        ("corpus_fingerprint", key.corpus_fingerprint, "corpus"),
        ("tokenizer_fingerprint", key.tokenizer_fingerprint, "tokenizer"),
    ):
        found = getattr(manifest, field)
        if found != wanted:
            return f"has a manifest made for another {what} (fingerprint {found[:12]}..., expected {wanted[:12]}...)"
    if manifest.vocab_size != key.vocab_size or manifest.dtype != dtype_name(dtype):
        return (
            f"has a manifest for {manifest.dtype} ids of a {manifest.vocab_size}-token vocabulary, expected "
            f"{dtype_name(dtype)} ids of {key.vocab_size}"
        )
    listed = sum(shard.n_tokens for shard in manifest.shards)
    if listed != manifest.n_tokens or not manifest.shards:
        return f"has a manifest whose {_plural(len(manifest.shards), 'shard')} hold {listed:,} tokens, not its {manifest.n_tokens:,}"
    if not -1 <= manifest.max_id < key.vocab_size:
        return (
            f"has a manifest that says it holds id {manifest.max_id:,}, outside the {key.vocab_size:,}-token vocabulary"
        )

    size = itemsize_of(dtype)
    for shard in manifest.shards:
        try:
            actual = (path / shard.name).stat().st_size
        except FileNotFoundError:
            return f"is missing shard {shard.name} of its {len(manifest.shards)}"
        if (problem := _size_problem(shard, actual, size)) is not None:
            return problem

    # A matching checksum proves the bytes are the ones built, whose ids the manifest bounds; the
    # ids are only scanned to say what is wrong with bytes that do not match.
    sampled = not full if full is not None else manifest.n_tokens * size > FULL_CHECK_MAX_BYTES
    blocks = sample_blocks_per_shard(len(manifest.shards))
    for shard in manifest.shards:
        ranges = _ranges(shard.n_tokens * size, size, sampled, blocks)
        try:
            with open(path / shard.name, "rb") as f:
                if _sha256(f, ranges) == (shard.sample_sha256 if sampled else shard.sha256):
                    continue
                max_id = _max_id(f, ranges, dtype)
        except OSError as err:
            return f"shard {shard.name} cannot be read ({err.strerror or err})"
        if max_id >= key.vocab_size:
            return (
                f"shard {shard.name} holds token id {max_id:,}, but the vocabulary has {key.vocab_size:,} ids "
                f"(0 to {key.vocab_size - 1:,})"
            )
        which = _plural(len(ranges), "sampled block") if sampled else "bytes"
        return f"shard {shard.name} has {which} whose SHA-256 differs from the one the manifest holds"
    return None
