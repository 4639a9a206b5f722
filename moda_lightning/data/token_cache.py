"""Tokenize a corpus once into a folder of memory-mapped token shards, with a manifest that vouches for them.

Cache folder ``tokens-<key>.u16/`` (or ``.u32/``), named by the corpus and tokenizer fingerprints:
shards ``00000.bin``, ``00001.bin``, ... holding the corpus as one stream, each document followed by
the end-of-text token, as raw native-endian uint16 (vocabularies up to 65536) or uint32;
`SHARD_TOKENS` ids per shard, the last one shorter. A shard ends wherever its count is reached,
inside a document if need be, so the shards are the same bytes whatever the number of processes
that tokenized them. Built once (on shared storage if several nodes train), every rank of every node
maps the shards read-only (`token_files.TokenStream`). Beside them, ``document_ends.i64`` and its
record hold where each document ends, found while the shards are written (`stored_ends.py`), so
the held-out split never scans the stream.

Manifest ``manifest.json`` in the folder (`cache_manifest.TokenCacheManifest`): format version,
dtype, vocabulary size, token and document counts, largest id, both fingerprints, the SHA-256 of all
token bytes, and per shard its token count, SHA-256 and the SHA-256 of a fixed sample of its blocks.
`cache_integrity.cache_problem` checks a cache against it every time a process opens one (what it
checks, and what that costs, is listed there). `TextDataModule` checks once per process (a node's
rank 0 in ``prepare_data``, which its ``setup`` reuses; every other rank in ``setup``). A failed check
names what is wrong ("shard 00000.bin is 1 byte shorter than the manifest says"); the data module
then rebuilds the cache, says why, and checks the new one.

Publishing, for several processes sharing one cache folder (each node's rank 0 runs
``prepare_data``; nodes may share storage): shards, manifest and document ends are written into a temp folder
beside the cache, fsynced, and the folder is renamed into place in one step, so a cache folder that
exists is complete. If another process published first, its folder is kept when it passes the check
(tokenization is deterministic, so it holds the same bytes) and ours is dropped; a damaged one is
moved aside, then deleted, and ours takes its place.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moda_lightning.data import cache_integrity, splits, stored_ends
from moda_lightning.data.cache_integrity import cache_problem
from moda_lightning.data.cache_manifest import (
    MANIFEST,
    RECORD_FORMAT,
    CacheKey,
    ShardRecord,
    TokenCacheManifest,
    dtype_name,
    itemsize_of,
    manifest_path,
    read_manifest,
    shard_name,
    token_cache_path,
    token_dtype,
    wide_dtype,
)
from moda_lightning.data.corpus import Corpus
from moda_lightning.data.encode_pool import TextBatch, encode_in_order
from moda_lightning.data.readers import Piece, ReadMeter
from moda_lightning.data.token_files import Shard, TokenStream

__all__ = [  # the token cache's interface in one place; the format and the checks live in their own modules
    "MANIFEST",
    "RECORD_FORMAT",
    "SHARD_TOKENS",
    "CacheKey",
    "ShardRecord",
    "TokenCacheManifest",
    "build_token_cache",
    "cache_problem",
    "cache_write_error",
    "document_batches",
    "manifest_path",
    "open_token_cache",
    "read_manifest",
    "require_writable_cache_dir",
    "shard_name",
    "text_batches",
    "token_cache_path",
    "token_dtype",
]

ENCODE_BATCH_DOCS = 256
"""Documents per `encode_batch` call when encoding in this process; ``tokenizers`` spreads a batch over all CPU cores."""

ENCODE_BATCH_CHARS = 8_000_000
"""Also cut a batch once it holds this many characters, to bound memory on large corpora."""

POOL_BATCH_DOCS = 4096
POOL_BATCH_CHARS = 1_000_000
"""Batches sent to worker processes: smaller, so ``2 * num_proc`` of them in flight stay a few MB each."""

SHARD_TOKENS = 2**27
"""Token ids per shard (256 MiB of uint16): large enough that even a trillion-token cache is a few
thousand files, small enough to copy, check or rebuild one at a time."""


def _array_typecode(dtype: torch.dtype) -> str:
    # array's 'I' is 4 bytes on every mainstream platform, 'L' is the fallback where it is not.
    if dtype == torch.uint16:
        return "H"
    return "I" if array.array("I").itemsize == 4 else "L"


def cache_write_error(cache_dir: str | os.PathLike[str], err: OSError) -> OSError:
    """The error for a cache folder that cannot be written, naming the folder and the flag that moves it."""
    folder = Path(os.path.abspath(cache_dir))
    if folder.exists() and not folder.is_dir():
        reason = "it is a file, not a folder"
    elif isinstance(err, NotADirectoryError):
        reason = "a part of that path is a file, not a folder"
    else:
        reason = err.strerror or str(err)
    return OSError(
        f"data: cannot write to the cache folder {folder} ({reason}); make it writable or move the "
        "cache with --data.cache_dir=<a writable folder>"
    )


def require_writable_cache_dir(cache_dir: str | os.PathLike[str]) -> None:
    """Create the cache folder if needed and prove a file can be written in it.

    Called before work whose result must be saved there (training a tokenizer takes minutes), so a
    read-only folder fails first, not after.

    Raises:
        OSError: From `cache_write_error`.
    """
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise cache_write_error(cache_dir, err) from err


def text_batches(pieces: Iterator[Piece], max_docs: int, max_chars: int) -> Iterator[TextBatch]:
    """Pieces of text in batches of at most `max_docs` texts or about `max_chars` characters."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for piece in pieces:
        texts.append(piece.text)
        ends.append(piece.ends_document)
        chars += len(piece.text)
        if len(texts) >= max_docs or chars >= max_chars:
            yield TextBatch(texts, ends)
            texts, ends, chars = [], [], 0
    if texts:
        yield TextBatch(texts, ends)


def document_batches(documents: Iterator[str]) -> Iterator[list[str]]:
    """Documents in batches for ``encode_batch``: at most ``ENCODE_BATCH_DOCS`` documents or about
    ``ENCODE_BATCH_CHARS`` characters each, so a few long files stay a few MB of text."""
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Writes a stream of ids into consecutive shards of `SHARD_TOKENS` ids, hashing as it writes and
    noting where documents end (`splits.document_ends` of the ids, found as they pass)."""

    def __init__(self, folder: Path, dtype: torch.dtype, eot_id: int) -> None:
        self.folder, self.dtype, self.itemsize, self.eot_id = folder, dtype, itemsize_of(dtype), eot_id
        self.shards: list[tuple[str, int, str]] = []  # (name, n_tokens, sha256) of each closed shard
        self.total = hashlib.sha256()  # the whole stream's hash, as written: no second read
        self.n_tokens, self.max_id = 0, -1
        self.ends: list[torch.Tensor] = []  # document ends of each write, as stream positions
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._count = 0

    def write(self, ids: array.array) -> None:
        if not ids:
            return
        written = torch.frombuffer(ids, dtype=self.dtype)
        self.max_id = max(self.max_id, int(written.to(wide_dtype(self.dtype)).max()))
        self.ends.append(splits.document_ends(written, self.eot_id) + self.n_tokens)
        data = memoryview(ids.tobytes())
        while data:
            if self._file is None:
                self._file = open(self.folder / shard_name(len(self.shards)), "wb")  # noqa: SIM115 (open across writes)
            room = (SHARD_TOKENS - self._count) * self.itemsize
            part, data = data[:room], data[room:]
            self._file.write(part)
            self._digest.update(part)
            self.total.update(part)
            self._count += len(part) // self.itemsize
            self.n_tokens += len(part) // self.itemsize
            if self._count == SHARD_TOKENS:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards.append((shard_name(len(self.shards)), self._count, self._digest.hexdigest()))
        self._file, self._digest, self._count = None, hashlib.sha256(), 0

    def finish(self) -> list[ShardRecord]:
        """Close the last shard and return every shard's record, with its sample hash."""
        if self._file is not None:
            self._close_shard()
        n_shards = len(self.shards)
        return [
            ShardRecord(name, n, sha256, cache_integrity.sample_sha256(self.folder / name, n, self.dtype, n_shards))
            for name, n, sha256 in self.shards
        ]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem can open a folder for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, path: Path, key: CacheKey) -> None:
    """Rename the complete folder `tmp` to `path`, unless a good cache got there first (see the module docstring)."""
    try:
        os.rename(tmp, path)
        return
    except OSError:
        if not path.is_dir():
            raise
    if cache_integrity.cache_problem(path, key) is None:
        return  # another process published the same cache; `tmp` is removed by the caller
    aside = path.with_name(f"{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise  # a publisher in between is fine; anything else is a real failure
    finally:
        shutil.rmtree(aside, ignore_errors=True)  # open maps of its shards stay valid until closed


def build_token_cache(
    corpus: Corpus,
    tokenizer: Tokenizer,
    eot_id: int,
    path: Path,
    key: CacheKey,
    *,
    num_proc: int = 1,
    show_progress: bool = True,
) -> TokenCacheManifest:
    """Tokenize `corpus` into the cache folder `path` (see the module docstring) and publish it.

    Args:
        corpus: The documents to tokenize, in order.
        tokenizer: The tokenizer; its ids must be below ``key.vocab_size``.
        eot_id: Id appended after every document.
        path: Destination folder, as given by `token_cache_path`; built in a temp folder beside it.
        key: What the cache is built from; stored in the manifest. ``vocab_size`` decides the dtype.
        num_proc: Worker processes that encode (`encode_pool.encode_in_order`); 1 encodes in this
            process. The shards are the same bytes for every value.
        show_progress: Show a progress bar (source bytes read, tokens written and tokens/s, ETA).

    Returns:
        The manifest written into the folder.

    Raises:
        ValueError: If the corpus gives no text (the message lists the files read).
        OSError: If the cache folder cannot be written (`cache_write_error`).
    """
    dtype = token_dtype(key.vocab_size)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    meter = ReadMeter()
    n_docs = 0

    def counted(pieces: Iterator[Piece]) -> Iterator[Piece]:
        nonlocal n_docs
        for piece in pieces:
            n_docs += piece.ends_document
            yield piece

    if num_proc > 1:
        batches = text_batches(counted(corpus.pieces(meter)), POOL_BATCH_DOCS, POOL_BATCH_CHARS)
    else:
        batches = text_batches(counted(corpus.pieces(meter)), ENCODE_BATCH_DOCS, ENCODE_BATCH_CHARS)
    progress = tqdm(
        desc="tokenizing", total=corpus.source_bytes(), unit="B", unit_scale=True, mininterval=2.0,
        leave=False, disable=not show_progress,
    )  # fmt: skip
    started = time.perf_counter()
    writer: _ShardWriter | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        writer = _ShardWriter(tmp, dtype, eot_id)
        for ids in encode_in_order(batches, tokenizer, eot_id, _array_typecode(dtype), num_proc):
            writer.write(ids)
            progress.update(meter.bytes - progress.n)
            rate = writer.n_tokens / max(time.perf_counter() - started, 1e-9)
            progress.set_postfix_str(f"{writer.n_tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        if n_docs == 0:
            raise corpus.empty_error()
        shards = writer.finish()
        manifest = TokenCacheManifest(
            format=RECORD_FORMAT,
            dtype=dtype_name(dtype),
            vocab_size=key.vocab_size,
            n_tokens=writer.n_tokens,
            n_documents=n_docs,
            max_id=writer.max_id,
            corpus_fingerprint=key.corpus_fingerprint,
            tokenizer_fingerprint=key.tokenizer_fingerprint,
            sha256=writer.total.hexdigest(),
            shards=shards,
        )
        with open(manifest_path(tmp), "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        stored_ends.write_ends(
            stored_ends.ends_in_cache_folder(tmp),
            torch.cat(writer.ends),
            stream=manifest.sha256,
            eot_id=eot_id,
            n_tokens=manifest.n_tokens,
        )
        _fsync_folder(tmp)
        _publish(tmp, path, key)
    except OSError as err:
        raise cache_write_error(path.parent, err) from err
    finally:
        progress.close()
        if writer is not None:
            writer.close()
        with contextlib.suppress(OSError):  # in a folder we could not write, there is none to remove
            shutil.rmtree(tmp)
    return manifest


def open_token_cache(path: Path) -> TokenStream:
    """The cache folder's shards as one memory-mapped stream; checks nothing
    (`cache_integrity.cache_problem` does, once per process).

    Returns:
        The token stream of uint16 or uint32 ids; pages are read from disk on first access.
    """
    manifest = read_manifest(path)
    dtype = getattr(torch, manifest.dtype)
    return TokenStream([Shard(path / shard.name, shard.n_tokens, dtype) for shard in manifest.shards])
