"""The layout of a token cache folder and its manifest: folder and shard names, id dtype, and the
manifest's fields, parsed with every type checked.

Shared by the builder (`token_cache.py`), which writes the manifest, and the checks
(`cache_integrity.py`), which read it; neither reads the other's files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"

RECORD_FORMAT = 2
"""Version of the manifest's fields; a manifest of another version is not trusted (the cache is rebuilt).
Format 1 was a single token file with a record beside it."""


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """A signed dtype that holds every `dtype` id: uint16/uint32 tensors lack most reductions in torch."""
    return torch.int32 if dtype == torch.uint16 else torch.int64


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
