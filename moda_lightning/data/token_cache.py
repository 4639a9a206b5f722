"""Tokenize a corpus once into a flat, memory-mapped file of token ids.

The file holds the whole corpus as one stream, each document followed by the end-of-text token,
stored as raw native-endian uint16 (vocabularies up to 65536) or uint32. Its name is keyed by the
corpus and tokenizer fingerprints, and it is published atomically (temp file + ``os.replace``),
so a file that exists is complete. Uses only the standard library and torch (no numpy).
"""

from __future__ import annotations

import array
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moda_lightning.data.corpus import Corpus

ENCODE_BATCH_DOCS = 256
"""Documents per `encode_batch` call; ``tokenizers`` spreads a batch over all CPU cores."""

ENCODE_BATCH_CHARS = 8_000_000
"""Also cut a batch once it holds this many characters, to bound memory on large corpora."""


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return torch.uint16 if vocab_size <= 2**16 else torch.uint32


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


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
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


def build_token_cache(corpus: Corpus, tokenizer: Tokenizer, eot_id: int, vocab_size: int, path: Path) -> int:
    """Tokenize `corpus` and write the token file at `path` atomically.

    Args:
        corpus: The documents to tokenize, in order.
        tokenizer: The tokenizer; its ids must be below `vocab_size`.
        eot_id: Id appended after every document.
        vocab_size: Decides the stored dtype (uint16 or uint32).
        path: Destination; written through a temp file in the same folder, then ``os.replace``.

    Returns:
        The number of tokens written.

    Raises:
        ValueError: If the corpus gives no text.
    """
    typecode = _array_typecode(token_dtype(vocab_size))
    # encode_batch_fast skips character offsets we do not use (tokenizers >= 0.20.2).
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    n_docs = n_tokens = 0
    # A large corpus takes minutes: show documents done and tokens written as it goes.
    progress = tqdm(desc="tokenizing", unit=" docs", mininterval=2.0, leave=False)
    try:
        with open(tmp, "wb") as f:
            for batch in _batches(corpus.documents()):
                ids = array.array(typecode)
                for encoding in encode(batch, add_special_tokens=False):
                    ids.extend(encoding.ids)
                    ids.append(eot_id)
                f.write(ids.tobytes())
                n_docs += len(batch)
                n_tokens += len(ids)
                progress.update(len(batch))
                progress.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
            f.flush()
            os.fsync(f.fileno())
        if n_docs == 0:
            raise corpus.empty_error()
        os.replace(tmp, path)
    finally:
        progress.close()
        tmp.unlink(missing_ok=True)
    return n_tokens


def open_token_cache(path: Path, vocab_size: int) -> torch.Tensor:
    """Memory-map a token file read-only.

    Returns:
        The token stream, [N] of uint16 or uint32; pages are read from disk on first access.
    """
    dtype = token_dtype(vocab_size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_tokens = path.stat().st_size // itemsize
    # shared=False maps the file copy-on-write, so nothing written to the tensor reaches the file.
    return torch.from_file(str(path), shared=False, size=n_tokens, dtype=dtype)
