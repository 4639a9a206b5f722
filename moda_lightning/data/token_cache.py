"""Tokenize a corpus once into a flat, memory-mapped file of token ids, with a record that vouches for it.

Token file ``tokens-<key>.u16.bin`` (or ``.u32.bin``): the whole corpus as one stream, each document
followed by the end-of-text token, stored as raw native-endian uint16 (vocabularies up to 65536) or
uint32. Its name is keyed by the corpus and tokenizer fingerprints. Uses only the standard library
and torch (no numpy).

Record ``tokens-<key>.u16.json`` next to it (`TokenCacheRecord`): format version, dtype, vocabulary
size, token and document counts, largest id, both fingerprints, the SHA-256 of all token bytes and
the SHA-256 of a fixed sample of blocks. A raw token file carries no length or checksum of its own,
so without the record a truncated copy, an interrupted ``rsync`` or a file overwritten with garbage
would be trained on as if it were the corpus.

What `cache_problem` checks, every time a process opens the cache:

* Always, from ``stat`` alone: the record exists, parses, has this format, and was made for this
  corpus, tokenizer, vocabulary and dtype; the file holds exactly ``n_tokens * itemsize`` bytes. A
  truncated, one-byte-short, empty or grown file is caught this way at any size.
* The content, files up to `FULL_CHECK_MAX_BYTES` (256 MiB, 134M uint16 tokens): the SHA-256 of
  every byte, streamed through one 8 MiB buffer (never the whole file in memory). A match proves
  the bytes are the ones built, whose largest id the record holds; the ids themselves are only
  scanned to explain a mismatch ("holds token id 65,535, but the vocabulary has 300 ids").
  Measured on a 30M-token uint16 file (60 MB, page cache warm, 2-core x86 VM with SHA
  extensions): SHA-256 0.06 s (0.1 s with the other core busy), BLAKE2b 1.7-2x that, so SHA-256;
  0.3-0.5 s per open at the limit. A sample (below) costs under 0.01 s.
* The content, larger files: the same over `SAMPLE_BLOCKS` blocks of `SAMPLE_BLOCK_BYTES` spread
  evenly over the file (4 MiB read, milliseconds at any size), so a multi-GB cache does not cost
  seconds on every rank of every run. That catches a file overwritten, zeroed or filled with
  0xFF, not a few damaged bytes between samples; ``cache_problem(path, key, full=True)`` checks
  every byte on demand.

`TextDataModule` checks once per process (a node's rank 0 in ``prepare_data``, which its ``setup``
reuses; every other rank in ``setup``). A failed check names what is wrong ("is 1 byte shorter than
its record says"); the data module then rebuilds the cache, says why, and checks the new file.

Publishing, for several processes sharing one cache folder (each node's rank 0 runs
``prepare_data``; nodes may share storage): the token file and the record are written to unique
temp names in the folder and fsynced; the record is renamed into place first and the token file
LAST, both with ``os.replace``. So a token file that exists has had its record published before
it, and a crash between the two renames leaves a record without a token file, which is simply
built again. Tokenization is deterministic and the name is a function of corpus and tokenizer, so
every complete build of one name has the same bytes and the same record: a reader that meets the
record of one build and the token file of another (two nodes building at once) still sees a
matching pair. Any other pairing involves a damaged file, which the check reports.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moda_lightning.data.corpus import Corpus

ENCODE_BATCH_DOCS = 256
"""Documents per `encode_batch` call; ``tokenizers`` spreads a batch over all CPU cores."""

ENCODE_BATCH_CHARS = 8_000_000
"""Also cut a batch once it holds this many characters, to bound memory on large corpora."""

RECORD_FORMAT = 1
"""Version of the record's fields; a record of another version is not trusted (the cache is rebuilt)."""

FULL_CHECK_MAX_BYTES = 256 * 2**20
"""Token files up to this size have every byte checksummed on open; larger ones a sample."""

SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 64 * 2**10
"""The sample checked on open of a file over `FULL_CHECK_MAX_BYTES`: this many blocks of this size,
evenly spread from the first byte to the last."""

_READ_BYTES = 8 * 2**20  # buffer of the streamed full check


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """What a token file must have been built from to be used: corpus, tokenizer and vocabulary."""

    corpus_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class TokenCacheRecord:
    """The record stored next to a token file (as JSON): what it was built from and what it holds."""

    format: int
    dtype: str
    vocab_size: int
    n_tokens: int
    n_documents: int
    max_id: int
    corpus_fingerprint: str
    tokenizer_fingerprint: str
    sha256: str
    sample_sha256: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TokenCacheRecord:
        """Parse a record; raises ValueError if it is not JSON or lacks a field or has one of the wrong type."""
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object, found {type(fields).__name__}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in fields)
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        record = cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})
        for f in dataclasses.fields(cls):
            wanted = int if f.type in ("int", int) else str
            value = getattr(record, f.name)
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"field {f.name!r} is {value!r}, expected {wanted.__name__}")
        return record


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
    cache_dir: str | os.PathLike[str], corpus_fingerprint: str, tokenizer_fingerprint: str, vocab_size: int
) -> Path:
    """Where the token file of (corpus, tokenizer) lives; the suffix names its dtype."""
    key = hashlib.sha256(f"{corpus_fingerprint}:{tokenizer_fingerprint}".encode()).hexdigest()[:20]
    suffix = "u16" if token_dtype(vocab_size) == torch.uint16 else "u32"
    return Path(cache_dir) / f"tokens-{key}.{suffix}.bin"


def record_path(path: Path) -> Path:
    """The record of token file `path`: ``tokens-<key>.u16.bin`` -> ``tokens-<key>.u16.json``."""
    return path.with_suffix(".json")


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


def _sample_offsets(n_bytes: int, itemsize: int) -> list[int]:
    """Start of each sampled block: the whole file when it is small, else evenly spread blocks."""
    if n_bytes <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        return list(range(0, n_bytes, SAMPLE_BLOCK_BYTES))
    step = (n_bytes - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1) // itemsize * itemsize
    return [i * step for i in range(SAMPLE_BLOCKS)]


def _ranges(n_bytes: int, itemsize: int, sampled: bool) -> list[tuple[int, int]]:
    """``(start, length)`` of the blocks read: the sample, or the whole file in `_READ_BYTES` pieces."""
    if sampled:
        return [(start, min(SAMPLE_BLOCK_BYTES, n_bytes - start)) for start in _sample_offsets(n_bytes, itemsize)]
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


def build_token_cache(corpus: Corpus, tokenizer: Tokenizer, eot_id: int, path: Path, key: CacheKey) -> TokenCacheRecord:
    """Tokenize `corpus` and publish the token file at `path` and its record (see the module docstring).

    Args:
        corpus: The documents to tokenize, in order.
        tokenizer: The tokenizer; its ids must be below ``key.vocab_size``.
        eot_id: Id appended after every document.
        path: Destination, as given by `token_cache_path`; written through temp files in its folder.
        key: What the file is built from; stored in the record. ``vocab_size`` decides the dtype.

    Returns:
        The record written next to the file.

    Raises:
        ValueError: If the corpus gives no text (the message lists the files read).
        OSError: If the cache folder cannot be written (`cache_write_error`).
    """
    dtype = token_dtype(key.vocab_size)
    typecode = _array_typecode(dtype)
    wide = _wide(dtype)
    # encode_batch_fast skips character offsets we do not use (tokenizers >= 0.20.2).
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    stem = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, record_tmp = path.with_name(path.name + stem), path.with_name(record_path(path).name + stem)
    n_docs = n_tokens = 0
    max_id = -1
    digest = hashlib.sha256()  # hashed as written: the full checksum costs no second read
    # A large corpus takes minutes: show documents done and tokens written as it goes.
    progress = tqdm(desc="tokenizing", unit=" docs", mininterval=2.0, leave=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w+b") as f:
            for batch in document_batches(corpus.documents()):
                ids = array.array(typecode)
                for encoding in encode(batch, add_special_tokens=False):
                    ids.extend(encoding.ids)
                    ids.append(eot_id)
                data = ids.tobytes()
                f.write(data)
                digest.update(data)
                if ids:
                    max_id = max(max_id, int(torch.frombuffer(ids, dtype=dtype).to(wide).max()))
                n_docs += len(batch)
                n_tokens += len(ids)
                progress.update(len(batch))
                progress.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
            if n_docs == 0:
                raise corpus.empty_error()
            f.flush()
            os.fsync(f.fileno())
            sample_sha256 = _sha256(f, _ranges(n_tokens * _itemsize(dtype), _itemsize(dtype), sampled=True))
        record = TokenCacheRecord(
            format=RECORD_FORMAT,
            dtype=_dtype_name(dtype),
            vocab_size=key.vocab_size,
            n_tokens=n_tokens,
            n_documents=n_docs,
            max_id=max_id,
            corpus_fingerprint=key.corpus_fingerprint,
            tokenizer_fingerprint=key.tokenizer_fingerprint,
            sha256=digest.hexdigest(),
            sample_sha256=sample_sha256,
        )
        with open(record_tmp, "w", encoding="utf-8") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(record_tmp, record_path(path))
        os.replace(tmp, path)  # last: a token file never appears before its record
    except OSError as err:
        raise cache_write_error(path.parent, err) from err
    finally:
        progress.close()
        for leftover in (tmp, record_tmp):
            with contextlib.suppress(OSError):  # in a folder we could not write, there is none to remove
                leftover.unlink(missing_ok=True)
    return record


def read_record(path: Path) -> TokenCacheRecord:
    """The record of token file `path`.

    Raises:
        FileNotFoundError: If there is none.
        ValueError: If it is not a valid record.
    """
    try:
        text = record_path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text ({err.reason})") from err
    try:
        return TokenCacheRecord.from_json(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(str(err)) from err


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def cache_problem(path: Path, key: CacheKey, full: bool | None = None) -> str | None:
    """What is wrong with the existing token file `path` for `key`, or None if it can be used.

    Args:
        path: An existing token file.
        key: What it must have been built from.
        full: Checksum every byte (True) or a sample (False); None decides by size (see the module
            docstring).

    Returns:
        None, or the problem as a phrase that follows the file's name ("is empty, but its record says
        ...").
    """
    record_name = record_path(path).name
    try:
        record = read_record(path)
    except FileNotFoundError:
        return f"has no record {record_name} next to it (deleted, or written by a version that kept none)"
    except (OSError, ValueError) as err:
        return f"has an unreadable record {record_name} ({err})"
    if record.format != RECORD_FORMAT:
        return f"has a record of format {record.format}, but this version reads format {RECORD_FORMAT}"
    dtype = token_dtype(key.vocab_size)
    for field, wanted, what in (
        ("corpus_fingerprint", key.corpus_fingerprint, "corpus"),
        ("tokenizer_fingerprint", key.tokenizer_fingerprint, "tokenizer"),
    ):
        found = getattr(record, field)
        if found != wanted:
            return f"has a record made for another {what} (fingerprint {found[:12]}..., expected {wanted[:12]}...)"
    if record.vocab_size != key.vocab_size or record.dtype != _dtype_name(dtype):
        return (
            f"has a record for {record.dtype} ids of a {record.vocab_size}-token vocabulary, expected "
            f"{_dtype_name(dtype)} ids of {key.vocab_size}"
        )

    itemsize = _itemsize(dtype)
    expected, actual = record.n_tokens * itemsize, path.stat().st_size
    if actual != expected:
        if actual == 0:
            return f"is empty, but its record says {record.n_tokens:,} tokens ({expected:,} bytes)"
        shorter = "shorter" if actual < expected else "longer"
        return (
            f"is {_plural(abs(expected - actual), 'byte')} {shorter} than its record says "
            f"({actual:,} bytes, expected {expected:,})"
        )

    if not -1 <= record.max_id < key.vocab_size:
        return f"has a record that says it holds id {record.max_id:,}, outside the {key.vocab_size:,}-token vocabulary"

    # A matching checksum proves the bytes are the ones built, whose ids the record bounds; the ids
    # are only scanned to say what is wrong with bytes that do not match.
    sampled = not full if full is not None else actual > FULL_CHECK_MAX_BYTES
    ranges = _ranges(actual, itemsize, sampled)
    try:
        with open(path, "rb") as f:
            if _sha256(f, ranges) == (record.sample_sha256 if sampled else record.sha256):
                return None
            max_id = _max_id(f, ranges, dtype)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if max_id >= key.vocab_size:
        return f"holds token id {max_id:,}, but the vocabulary has {key.vocab_size:,} ids (0 to {key.vocab_size - 1:,})"
    which = f"{len(ranges)} sampled blocks" if sampled else "bytes"
    return f"has {which} whose SHA-256 differs from the one its record holds"


def open_token_cache(path: Path, vocab_size: int) -> torch.Tensor:
    """Memory-map a token file read-only; checks nothing (`cache_problem` does, once per process).

    Returns:
        The token stream, [N] of uint16 or uint32; pages are read from disk on first access.
    """
    dtype = token_dtype(vocab_size)
    n_tokens = path.stat().st_size // _itemsize(dtype)
    # shared=False maps the file copy-on-write, so nothing written to the tensor reaches the file.
    return torch.from_file(str(path), shared=False, size=n_tokens, dtype=dtype)
