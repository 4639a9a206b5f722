"""Each data source as a token stream ready to read, checked once per process.

A text corpus is read through its token cache: used when `cache_integrity.cache_problem` finds it
good, built when missing, rebuilt (with one line saying why) when damaged or made for something
else, and checked again after building. Pre-tokenized files are opened as they are, their ids
checked against the vocabulary (`pretokenized.check_token_ids`, remembered in the cache folder).
Either way the stream's document ends, which the held-out split needs, are read from where they
are stored (`stored_ends.py`), and found and stored only when they are not there yet.
Kept apart from `TextDataModule` so that tools can get the same streams without Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moda_lightning.data import cache_integrity, pretokenized, stored_ends
from moda_lightning.data import token_cache as tc
from moda_lightning.data.corpus import Corpus
from moda_lightning.data.token_files import TokenStream

POOL_MIN_BYTES = 16 * 2**20
"""Corpora smaller than this are tokenized in this process: starting workers would cost more than they save."""


@dataclasses.dataclass(frozen=True)
class SourceStream:
    """A source's token stream, and where its document ends are stored for which stream."""

    tokens: TokenStream
    ends: stored_ends.EndsFiles
    identity: str
    """The stream the stored ends must have been found in: a cache's SHA-256 of all ids, or the token files' key."""


def describe(corpus: Corpus | None, token_paths: list[Path] | None) -> str:
    """The source as the messages name it: the corpus's files, or the first few token files."""
    if corpus is not None:
        return corpus.describe()
    assert token_paths is not None
    shown = ", ".join(str(p) for p in token_paths[:3])
    return f"{len(token_paths)} token file(s): {shown}" + (
        f" and {len(token_paths) - 3} more" if len(token_paths) > 3 else ""
    )


class TokenSources:
    """The token streams of one process's sources, each checked (and, if need be, built) once.

    Args:
        cache_dir: The folder of token caches and of what is remembered about token files.
        num_proc: Processes that tokenize a corpus of `POOL_MIN_BYTES` or more.
        info: Where the one-line progress and rebuild messages go (rank zero's log in training).
    """

    def __init__(self, cache_dir: Path, num_proc: int, info: Callable[[str], object]) -> None:
        self.cache_dir, self.num_proc, self.info = cache_dir, num_proc, info
        self._cache_paths: dict[str, Path] = {}  # corpus fingerprint -> its cache folder, checked
        self._ids_checked: set[tuple[Path, ...]] = set()

    def cache_folder(self, corpus: Corpus, tokenizer: Tokenizer, eot_id: int, key: tc.CacheKey) -> Path:
        """The token cache of `corpus` for `key`, checked against its manifest once per process.

        Built (atomically, with its manifest) if missing; rebuilt, with one info line saying why, if
        the check finds it damaged or not matching (see `cache_integrity` for what is checked and
        when every byte is). A rebuilt cache is checked again, so a folder that cannot keep it fails here.

        Args:
            corpus: The text.
            tokenizer: The tokenizer, used if the cache must be built.
            eot_id: The end-of-text id written after each document.
            key: What the cache must be built from (``key.corpus_fingerprint`` is the corpus's).

        Raises:
            ValueError: If the corpus gives no text.
            OSError: If the cache folder cannot be written.
            RuntimeError: If the cache is still bad right after it was rebuilt.
        """
        known = self._cache_paths.get(key.corpus_fingerprint)
        if known is not None and known.is_dir():
            return known
        path = tc.token_cache_path(self.cache_dir, key.corpus_fingerprint, key.tokenizer_fingerprint, key.vocab_size)
        if not path.is_dir():
            self.info(f"TextDataModule: tokenizing {corpus.describe()} into {path}")
        elif (problem := cache_integrity.cache_problem(path, key)) is None:
            self.info(f"TextDataModule: using cached tokens {path}")
            self._cache_paths[key.corpus_fingerprint] = path
            return path
        else:
            self.info(f"TextDataModule: token cache {path} {problem}; rebuilding")
        # Starting workers costs more than a small corpus takes to tokenize in this process.
        num_proc = self.num_proc if corpus.source_bytes() >= POOL_MIN_BYTES else 1
        manifest = tc.build_token_cache(corpus, tokenizer, eot_id, path, key, num_proc=num_proc)
        shards = f"{len(manifest.shards)} shard" + ("s" if len(manifest.shards) > 1 else "")
        self.info(f"TextDataModule: wrote {manifest.n_tokens:,} tokens ({shards}) to {path}")
        if (problem := cache_integrity.cache_problem(path, key)) is not None:
            raise RuntimeError(
                f"data: token cache {path} {problem} right after it was written, so its folder does not keep "
                "what is written there (a full or failing disk, or another program changing it); move the "
                "cache with --data.cache_dir=<another folder>"
            )
        self._cache_paths[key.corpus_fingerprint] = path
        return path

    def corpus_stream(self, corpus: Corpus, tokenizer: Tokenizer, eot_id: int, key: tc.CacheKey) -> SourceStream:
        """The corpus's tokens, from its checked cache (`cache_folder`)."""
        folder = self.cache_folder(corpus, tokenizer, eot_id, key)
        tokens = tc.open_token_cache(folder)
        return SourceStream(tokens, stored_ends.ends_in_cache_folder(folder), tc.read_manifest(folder).sha256)

    def file_stream(self, token_paths: list[Path], vocab_size: int, eot_id: int) -> SourceStream:
        """Pre-tokenized files as one stream, their ids checked once."""
        tokens = pretokenized.open_token_files(token_paths)
        if tuple(token_paths) not in self._ids_checked:
            pretokenized.check_token_ids(tokens, vocab_size, eot_id, self.cache_dir)
            self._ids_checked.add(tuple(token_paths))
        key = stored_ends.token_files_key(token_paths, eot_id)
        return SourceStream(tokens, stored_ends.ends_of_token_files(self.cache_dir, key), key)

    def document_ends(self, source: SourceStream, eot_id: int) -> torch.Tensor:
        """Where the source's documents end, ``[n_docs]`` int64: stored, or found once and stored."""
        return stored_ends.stored_document_ends(source.tokens, eot_id, source.ends, source.identity, self.info)
