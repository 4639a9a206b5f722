"""Document-end offsets stored beside a token stream, so the held-out split reads them instead of
scanning every token of the stream on every rank.

The ends are `splits.document_ends` of the stream: the position one past each end-of-text id, as
raw native-endian int64 in ascending order. A token cache gets them when it is built
(``document_ends.i64`` in its folder, found while its shards are written); a cache built before
they were stored, or a set of pre-tokenized files, gets them the first time they are needed, one
scan then stored (pre-tokenized files: ``document-ends-<key>.i64`` in the cache folder, keyed by the
files' paths, sizes and modification times and the end-of-text id, like their id-range check).

Each ends file has a JSON record beside it (``.json``): the stream it was found in (a cache's
SHA-256 of all ids, or the token files' key), the end-of-text id, the stream's length, the count
and the SHA-256 of the file. A file that does not match its record (truncated, overwritten, stored
for another stream) is found again and stored again, with one line saying what was wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moda_lightning.data import splits
from moda_lightning.data.token_files import TokenStream, file_fingerprint_parts

FORMAT = 1
"""Version of the record's fields; a record of another version is not trusted (the ends are found again)."""

_INT64_BYTES = 8


@dataclasses.dataclass(frozen=True)
class EndsFiles:
    """Where one stream's document ends are stored: the int64 offsets and their JSON record."""

    data: Path
    record: Path


def ends_in_cache_folder(folder: Path) -> EndsFiles:
    """The ends stored inside the token cache folder `folder`."""
    return EndsFiles(folder / "document_ends.i64", folder / "document_ends.json")


def token_files_key(paths: Sequence[Path], eot_id: int) -> str:
    """What the ends of pre-tokenized files are keyed by: the files' identity and the end-of-text id."""
    return hashlib.sha256("\n".join([f"eot={eot_id}", *file_fingerprint_parts(paths)]).encode()).hexdigest()


def ends_of_token_files(cache_dir: Path, key: str) -> EndsFiles:
    """The ends of the pre-tokenized files of `key` (`token_files_key`), stored in the cache folder."""
    stem = f"document-ends-{key[:20]}"
    return EndsFiles(cache_dir / f"{stem}.i64", cache_dir / f"{stem}.json")


def _replace(path: Path, data: bytes | bytearray) -> None:
    """Write `data` to `path` in one step: a reader finds the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_ends(files: EndsFiles, ends: torch.Tensor, *, stream: str, eot_id: int, n_tokens: int) -> None:
    """Store `ends` ([n_docs] int64) and their record; the record last, so it never vouches for a missing file.

    Raises:
        OSError: If the folder cannot be written.
    """
    data = bytearray(len(ends) * _INT64_BYTES)
    if len(ends):  # through a view of the bytes: numpy is not needed
        torch.frombuffer(data, dtype=torch.int64).copy_(ends)
    record = {
        "format": FORMAT,
        "stream": stream,
        "eot_id": eot_id,
        "n_tokens": n_tokens,
        "n_ends": len(ends),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    _replace(files.data, data)
    _replace(files.record, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _read_record(files: EndsFiles) -> dict:
    try:
        record = json.loads(files.record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"has an unreadable record {files.record.name} ({err})") from err
    expected = {"format": int, "stream": str, "eot_id": int, "n_tokens": int, "n_ends": int, "sha256": str}
    if not isinstance(record, dict):
        raise ValueError(f"has an unreadable record {files.record.name} (not a JSON object)")  # noqa: TRY004
    for field, kind in expected.items():
        if not isinstance(record.get(field), kind) or isinstance(record.get(field), bool):
            raise ValueError(  # noqa: TRY004 (a damaged file read from disk, reported as such)
                f"has an unreadable record {files.record.name} (field {field!r} is {record.get(field)!r})"
            )
    return record


def read_ends(files: EndsFiles, *, stream: str, eot_id: int, n_tokens: int) -> torch.Tensor:
    """The stored ends of `stream`, checked against their record: ``[n_docs]`` int64.

    Raises:
        FileNotFoundError: If no record is stored (the stream's ends were never stored).
        ValueError: If what is stored does not match; the message is a phrase that follows the
            file's name ("is 8 bytes shorter than its record says ...").
    """
    record = _read_record(files)
    if record["format"] != FORMAT:
        raise ValueError(f"has a record of format {record['format']}, but this version reads format {FORMAT}")
    if record["stream"] != stream or record["n_tokens"] != n_tokens:
        raise ValueError(
            f"was stored for another token stream ({record['n_tokens']:,} tokens, {record['stream'][:12]}...; "
            f"expected {n_tokens:,} tokens, {stream[:12]}...)"
        )
    if record["eot_id"] != eot_id:
        raise ValueError(f"was stored for end-of-text id {record['eot_id']}, not {eot_id}")
    try:
        data = files.data.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"is missing (its record {files.record.name} is there)") from None
    expected = record["n_ends"] * _INT64_BYTES
    if len(data) != expected:
        shorter = "shorter" if len(data) < expected else "longer"
        raise ValueError(
            f"is {abs(expected - len(data)):,} bytes {shorter} than its record says ({len(data):,} bytes, "
            f"expected {record['n_ends']:,} ends, {expected:,} bytes)"
        )
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError("has bytes whose SHA-256 differs from the one its record holds")
    return torch.frombuffer(bytearray(data), dtype=torch.int64) if data else torch.zeros(0, dtype=torch.int64)


def stored_document_ends(
    tokens: TokenStream, eot_id: int, files: EndsFiles, stream: str, info: Callable[[str], object]
) -> torch.Tensor:
    """The document ends of `tokens`: read from `files` when they hold them, else found (one scan of
    the stream) and stored there for the next run, with one line saying which and why.

    Args:
        tokens: The stream.
        eot_id: The end-of-text id that ends each document.
        files: Where the ends are stored.
        stream: The stream's identity, as the record must hold it.
        info: Where the line goes.

    Returns:
        ``[n_docs]`` int64 positions one past each end-of-text id, ascending.
    """
    try:
        return read_ends(files, stream=stream, eot_id=eot_id, n_tokens=len(tokens))
    except FileNotFoundError:
        info(f"TextDataModule: finding the document ends of the token stream once; storing them in {files.data}")
    except (OSError, ValueError) as err:
        info(f"TextDataModule: document ends {files.data} {err}; finding them again")
    ends = splits.document_ends(tokens, eot_id)
    try:
        write_ends(files, ends, stream=stream, eot_id=eot_id, n_tokens=len(tokens))
    except OSError as err:
        info(
            f"TextDataModule: cannot store document ends in {files.data} ({err.strerror or err}); every run finds them"
        )
    return ends
