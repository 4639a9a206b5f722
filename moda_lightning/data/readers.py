"""Streamed readers of document files: plain text, JSON lines (plain, gzip, zstandard) and parquet.

Each reader yields the text of a file as `Piece`s, never holding more than one line, one parquet
row batch or `TEXT_PIECE_BYTES` of a text file in memory, whatever the file's size. A `.txt` file
is one document; when it is large it comes in pieces cut where a byte-level BPE pre-tokenizer
splits anyway (see `safe_cut`), so tokenizing the pieces gives the ids of the whole. ``zstandard``
and ``pyarrow`` are optional (the ``data`` extra) and imported only when such a file is read.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

TEXT_PIECE_BYTES = 2**20
"""A text file is read this many bytes at a time; a piece is cut at the last safe point of a read.
The tokenizer's working set is some 20x a text's size, so a piece of 1 MiB costs about 20 MB."""

MAX_PIECE_CHARS = 64 * 2**20
"""Text with no safe cut point for this many characters (no space or line break) is cut anyway,
which may change the ids of the few tokens at that point."""

INSTALL_DATA_EXTRA = "pip install 'moda-lightning[data]'"

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)

# Before a single space, or after a line break, with no whitespace on either side: the GPT-2
# pre-tokenizer (letters, digits, punctuation runs, whitespace runs) ends a pre-token there, and
# what follows is matched the same whether or not the text before it is present.
_SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)")
_SAFE_CUT_WINDOW = 65536  # characters searched back from the end of a read for a cut point


@dataclass(frozen=True)
class Piece:
    """Text read from a file: a whole document, or a part of one (`ends_document` False until its last)."""

    text: str
    ends_document: bool = True


class ReadMeter:
    """Bytes read from the source files so far (compressed bytes for compressed files), for progress bars."""

    def __init__(self) -> None:
        self.bytes = 0


class _CountingReader(io.RawIOBase):
    """A binary file that adds every byte read from it to a `ReadMeter`."""

    def __init__(self, raw: BinaryIO, meter: ReadMeter | None) -> None:
        self._raw, self._meter = raw, meter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if self._meter is not None and n:
            self._meter.bytes += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def suffix_of(path: Path) -> str:
    """The format suffix of a file name: ``.jsonl.gz`` for ``a.jsonl.gz``, else the last suffix, lowercased."""
    name = path.name.lower()
    for double in (".jsonl.gz", ".jsonl.zst"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def require_optional(path: Path) -> None:
    """Fail now, in one line, if reading `path` needs an optional package that is not installed."""
    suffix = suffix_of(path)
    module, what = {
        ".jsonl.zst": ("zstandard", "zstandard"),
        ".parquet": ("pyarrow", "pyarrow"),
    }.get(suffix, (None, ""))
    if module is None:
        return
    try:
        __import__(module)
    except ImportError as err:
        raise ValueError(
            f"data: reading {str(path)!r} needs the {what} package, which is not installed; install the data "
            f"extra ({INSTALL_DATA_EXTRA}) or convert the file to .jsonl."
        ) from err


def open_binary(path: Path, meter: ReadMeter | None = None) -> BinaryIO:
    """`path` opened for reading its bytes, decompressed for ``.gz`` and ``.zst`` files."""
    raw = io.BufferedReader(_CountingReader(open(path, "rb"), meter), buffer_size=2**20)  # noqa: SIM115 (the caller closes it)
    suffix = suffix_of(path)
    if suffix.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if suffix.endswith(".zst"):
        import zstandard

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, closefd=True),
            buffer_size=2**20,
        )  # type: ignore[arg-type, return-value]
    return raw  # type: ignore[return-value]


def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int) -> ValueError:
    return ValueError(
        f"data: cannot read {str(path)!r}: it is not UTF-8 text ({err.reason} at byte {offset + err.start:,}); "
        "convert it to UTF-8 or remove it from --data.files."
    )


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while it is read: OS errors, a truncated gzip stream, zstandard's own error."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _unreadable(path: Path, err: BaseException) -> ValueError:
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return ValueError(
        f"data: cannot read {str(path)!r} ({reason}); fix or replace the file, or remove it from --data.files."
    )


def safe_cut(text: str) -> int:
    """Where to end a piece of `text`: after the last safe cut point (0 if there is none near the end)."""
    start = max(0, len(text) - _SAFE_CUT_WINDOW)
    last = 0
    for match in _SAFE_CUT.finditer(text, start):
        last = match.start()
    return last


def read_text(path: Path, meter: ReadMeter | None = None, lenient: bool = False) -> Iterator[Piece]:
    """A text file as one document, in pieces of about `TEXT_PIECE_BYTES`.

    Args:
        path: The file; its bytes must be UTF-8.
        meter: Counts the bytes read.
        lenient: Replace bytes that are not UTF-8 with U+FFFD instead of failing (for the sources
            of installed packages, which the user cannot fix).
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if lenient else "strict")
    pending, offset = "", 0
    try:
        with open_binary(path, meter) as f:
            while True:
                chunk = f.read(TEXT_PIECE_BYTES)
                try:
                    pending += decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, err, offset) from err
                offset += len(chunk)
                if not chunk:
                    break
                cut = safe_cut(pending) if len(pending) < MAX_PIECE_CHARS else len(pending)
                if cut:
                    yield Piece(pending[:cut], ends_document=False)
                    pending = pending[cut:]
    except _read_errors() as err:
        raise _unreadable(path, err) from err
    yield Piece(pending)


def _record_text(path: Path, where: str, record: object, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"data: {str(path)!r} {where} has no {text_field!r} field (found: {keys}); "
            "set --data.text_field to the field that holds the text."
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise TypeError(
            f"data: {str(path)!r} {where}: field {text_field!r} is a {type(text).__name__}, expected a string of text."
        )
    return text


def read_jsonl(path: Path, text_field: str, meter: ReadMeter | None = None) -> Iterator[Piece]:
    """One document per line of a JSON-lines file (plain, ``.gz`` or ``.zst``): the `text_field` of each object."""
    offset = 0
    try:
        with open_binary(path, meter) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, err, offset) from err
                offset += len(raw)
                if not line.strip():
                    continue  # blank lines (often a trailing newline) carry no document
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"data: {str(path)!r} line {lineno} is not valid JSON ({err.msg}); each line of a "
                        '.jsonl file must be one JSON object such as {"' + text_field + '": "..."}.'
                    ) from err
                yield Piece(_record_text(path, f"line {lineno}", record, text_field))
    except _read_errors() as err:
        raise _unreadable(path, err) from err


def read_parquet(path: Path, text_field: str, meter: ReadMeter | None = None) -> Iterator[Piece]:
    """One document per row of a parquet file: its `text_field` column, read a row batch at a time.

    Null values are skipped, as empty texts are.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"data: {str(path)!r} is not a readable parquet file ({err}); fix or remove it.") from err
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(
            f"data: {str(path)!r} has no {text_field!r} column (found: {names}); set --data.text_field to the "
            "column that holds the text."
        )
    column_type = parquet.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise ValueError(
            f"data: {str(path)!r} column {text_field!r} holds {column_type}, expected strings of text; "
            "set --data.text_field to the column that holds the text."
        )
    size, groups = path.stat().st_size, max(parquet.num_row_groups, 1)
    for group in range(parquet.num_row_groups):
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield Piece(text)
        if meter is not None:  # the file's bytes, shared evenly among its row groups
            meter.bytes += size // groups
