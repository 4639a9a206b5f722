"""Tokenize a corpus once into a folder of memory-mapped token shards, with a manifest that vouches for them.

Cache folder ``tokens-<key>.u16/`` (or ``.u32/``), named by the corpus and tokenizer fingerprints:
shards ``00000.bin``, ``00001.bin``, ... holding the corpus as one stream, each document followed by
the end-of-text token, as raw native-endian uint16 (vocabularies up to 65536) or uint32;
`SHARD_TOKENS` ids per shard, the last one shorter. A shard ends wherever its count is reached,
inside a document if need be, so the shards are the same bytes whatever the number of processes
that tokenized them. Built once (on shared storage if several nodes train), every rank of every node
maps the shards read-only (`token_files.TokenStream`).

Manifest ``manifest.json`` in the folder (`TokenCacheManifest`): format version, dtype, vocabulary
size, token and document counts, largest id, both fingerprints, the SHA-256 of all token bytes, and
per shard its token count, SHA-256 and the SHA-256 of a fixed sample of its blocks. A raw shard
carries no length or checksum of its own, so without the manifest a truncated copy, an interrupted
``rsync`` or a shard overwritten with garbage would be trained on as if it were the corpus.

What `cache_problem` checks, every time a process opens the cache:

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

`TextDataModule` checks once per process (a node's rank 0 in ``prepare_data``, which its ``setup``
reuses; every other rank in ``setup``). A failed check names what is wrong ("shard 00000.bin is 1
byte shorter than the manifest says"); the data module then rebuilds the cache, says why, and checks
the new one.

Publishing, for several processes sharing one cache folder (each node's rank 0 runs
``prepare_data``; nodes may share storage): shards and manifest are written into a temp folder
beside the cache, fsynced, and the folder is renamed into place in one step, so a cache folder that
exists is complete. If another process published first, its folder is kept when it passes the check
(tokenization is deterministic, so it holds the same bytes) and ours is dropped; a damaged one is
moved aside, then deleted, and ours takes its place.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moda_lightning.data.corpus import Corpus
from moda_lightning.data.encode_pool import TextBatch, encode_in_order
from moda_lightning.data.readers import Piece, ReadMeter
from moda_lightning.data.token_files import Shard, TokenStream

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

MANIFEST = "manifest.json"

RECORD_FORMAT = 2
"""Version of the manifest's fields; a manifest of another version is not trusted (the cache is rebuilt).
Format 1 was a single token file with a record beside it."""

FULL_CHECK_MAX_BYTES = 256 * 2**20
"""Caches up to this size have every byte checksummed on open; larger ones a sample."""

SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 64 * 2**10
"""The sample checked on open of a cache over `FULL_CHECK_MAX_BYTES`: this many blocks of this size in
all (at least one per shard), each shard's evenly spread from its first byte to its last."""

_READ_BYTES = 8 * 2**20  # buffer of the streamed full check


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """What a token cache must have been built from to be used: corpus, tokenizer and vocabulary."""

    corpus_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """One shard as the manifest lists it."""

    name: str
    n_tokens: int
    sha256: str
    sample_sha256: str


def _typed(cls: type, fields: Any) -> dict[str, Any]:
    """The fields of dataclass `cls` from a parsed JSON object, each checked to be an int or a str."""
    if not isinstance(fields, dict):  # a damaged manifest: a bad value read from disk, reported as such
        raise ValueError(f"expected a JSON object, found {type(fields).__name__}")  # noqa: TRY004
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in fields)
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    values = {}
    for f in dataclasses.fields(cls):
        value = fields[f.name]
        wanted = {"int": int, "str": str}.get(str(f.type))
        if wanted is not None and (not isinstance(value, wanted) or isinstance(value, bool)):
            raise ValueError(f"field {f.name!r} is {value!r}, expected {wanted.__name__}")
        values[f.name] = value
    return values


@dataclasses.dataclass(frozen=True)
class TokenCacheManifest:
    """The manifest stored in a cache folder (as JSON): what it was built from and what its shards hold."""

    format: int
    dtype: str
    vocab_size: int
    n_tokens: int
    n_documents: int
    max_id: int
    corpus_fingerprint: str
    tokenizer_fingerprint: str
    sha256: str
    shards: list[ShardRecord]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TokenCacheManifest:
        """Parse a manifest; raises ValueError if it is not JSON or lacks a field or has one of the wrong type."""
        values = _typed(cls, json.loads(text))
        if not isinstance(values["shards"], list):
            raise ValueError(f"field 'shards' is {values['shards']!r}, expected a list")  # noqa: TRY004
        try:
            values["shards"] = [ShardRecord(**_typed(ShardRecord, shard)) for shard in values["shards"]]
        except ValueError as err:
            raise ValueError(f"a shard entry: {err}") from err
        return cls(**values)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return torch.uint16 if vocab_size <= 2**16 else torch.uint32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _wide(dtype: torch.dtype) -> torch.dtype:
    # uint16/uint32 tensors lack most reductions in torch; max() runs on a signed copy.
    return torch.int32 if dtype == torch.uint16 else torch.int64


def _array_typecode(dtype: torch.dtype) -> str:
    # array's 'I' is 4 bytes on every mainstream platform, 'L' is the fallback where it is not.
    if dtype == torch.uint16:
        return "H"
    return "I" if array.array("I").itemsize == 4 else "L"


def token_cache_path(
    cache_dir: str | os.PathLike[str],
    corpus_fingerprint: str,
    tokenizer_fingerprint: str,
    vocab_size: int,
) -> Path:
    """The cache folder of (corpus, tokenizer); the suffix names its dtype."""
    key = hashlib.sha256(f"{corpus_fingerprint}:{tokenizer_fingerprint}".encode()).hexdigest()[:20]
    suffix = "u16" if token_dtype(vocab_size) == torch.uint16 else "u32"
    return Path(cache_dir) / f"tokens-{key}.{suffix}"


def manifest_path(path: Path) -> Path:
    """The manifest of the cache folder `path`."""
    return path / MANIFEST


def shard_name(index: int) -> str:
    return f"{index:05d}.bin"


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
    itemsize, max_id = _itemsize(dtype), -1
    widened = torch.empty(max((n for _, n in ranges), default=0) // itemsize, dtype=_wide(dtype))
    for block in _blocks(f, ranges):
        count = len(block) // itemsize
        if count:
            # Copied into one reused tensor: a fresh one per block costs more in page faults than the max.
            widened[:count].copy_(torch.frombuffer(block, dtype=dtype, count=count))
            max_id = max(max_id, int(widened[:count].max()))
    return max_id


class _ShardWriter:
    """Writes a stream of ids into consecutive shards of `SHARD_TOKENS` ids, hashing as it writes."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.folder, self.dtype, self.itemsize = folder, dtype, _itemsize(dtype)
        self.shards: list[tuple[str, int, str]] = []  # (name, n_tokens, sha256) of each closed shard
        self.total = hashlib.sha256()  # the whole stream's hash, as written: no second read
        self.n_tokens, self.max_id = 0, -1
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()
        self._count = 0

    def write(self, ids: array.array) -> None:
        if not ids:
            return
        self.max_id = max(
            self.max_id,
            int(torch.frombuffer(ids, dtype=self.dtype).to(_wide(self.dtype)).max()),
        )
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
        blocks = sample_blocks_per_shard(len(self.shards))
        records = []
        for name, n_tokens, sha256 in self.shards:
            with open(self.folder / name, "rb") as f:
                sample = _sha256(
                    f,
                    _ranges(
                        n_tokens * self.itemsize,
                        self.itemsize,
                        sampled=True,
                        blocks=blocks,
                    ),
                )
            records.append(ShardRecord(name, n_tokens, sha256, sample))
        return records

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
    if cache_problem(path, key) is None:
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
        writer = _ShardWriter(tmp, dtype)
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
            dtype=_dtype_name(dtype),
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


def read_manifest(path: Path) -> TokenCacheManifest:
    """The manifest of the cache folder `path`.

    Raises:
        FileNotFoundError: If there is none.
        ValueError: If it is not a valid manifest.
    """
    try:
        text = manifest_path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason})") from err
    try:
        return TokenCacheManifest.from_json(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(str(err)) from err


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
    if manifest.vocab_size != key.vocab_size or manifest.dtype != _dtype_name(dtype):
        return (
            f"has a manifest for {manifest.dtype} ids of a {manifest.vocab_size}-token vocabulary, expected "
            f"{_dtype_name(dtype)} ids of {key.vocab_size}"
        )
    listed = sum(shard.n_tokens for shard in manifest.shards)
    if listed != manifest.n_tokens or not manifest.shards:
        return f"has a manifest whose {_plural(len(manifest.shards), 'shard')} hold {listed:,} tokens, not its {manifest.n_tokens:,}"
    if not -1 <= manifest.max_id < key.vocab_size:
        return (
            f"has a manifest that says it holds id {manifest.max_id:,}, outside the {key.vocab_size:,}-token vocabulary"
        )

    itemsize = _itemsize(dtype)
    for shard in manifest.shards:
        try:
            actual = (path / shard.name).stat().st_size
        except FileNotFoundError:
            return f"is missing shard {shard.name} of its {len(manifest.shards)}"
        if (problem := _size_problem(shard, actual, itemsize)) is not None:
            return problem

    # A matching checksum proves the bytes are the ones built, whose ids the manifest bounds; the
    # ids are only scanned to say what is wrong with bytes that do not match.
    sampled = not full if full is not None else manifest.n_tokens * itemsize > FULL_CHECK_MAX_BYTES
    blocks = sample_blocks_per_shard(len(manifest.shards))
    for shard in manifest.shards:
        ranges = _ranges(shard.n_tokens * itemsize, itemsize, sampled, blocks)
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


def open_token_cache(path: Path) -> TokenStream:
    """The cache folder's shards as one memory-mapped stream; checks nothing (`cache_problem` does,
    once per process).

    Returns:
        The token stream of uint16 or uint32 ids; pages are read from disk on first access.
    """
    manifest = read_manifest(path)
    dtype = getattr(torch, manifest.dtype)
    return TokenStream([Shard(path / shard.name, shard.n_tokens, dtype) for shard in manifest.shards])
