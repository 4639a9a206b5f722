"""Token ids on disk, memory-mapped: one logical stream over several shard files.

A `TokenStream` is the concatenation of `Shard`s (a run of ids at a byte offset of a file), read
through read-only maps that each process opens on first use, so DataLoader workers and every rank
share the page cache instead of holding copies. The token cache's shards (`token_cache.py`) are
headerless; pre-tokenized inputs are read here too, without numpy:

* nanoGPT / modded-nanogpt ``.bin`` shards: a header of 256 little-endian int32 words (magic
  20240520, version 1, token count), then the tokens as uint16;
* numpy ``.npy`` arrays of uint16, uint32, int32 or int64 ids (any shape, C order, little-endian),
  whose header is parsed here.
"""

from __future__ import annotations

import ast
import bisect
import itertools
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

NANOGPT_MAGIC = 20240520
NANOGPT_VERSION = 1
NANOGPT_HEADER_WORDS = 256

NPY_DTYPES = {
    "<u2": torch.uint16,
    "<u4": torch.uint32,
    "<i4": torch.int32,
    "<i8": torch.int64,
}
"""The ``.npy`` element types read as token ids (``|u1`` etc. are not token arrays)."""

_ITEMSIZE = {torch.uint16: 2, torch.uint32: 4, torch.int32: 4, torch.int64: 8}


@dataclass(frozen=True)
class Shard:
    """``n_tokens`` ids of type ``dtype`` starting ``offset`` bytes into ``path``."""

    path: Path
    n_tokens: int
    dtype: torch.dtype
    offset: int = 0

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]


def _map(shard: Shard) -> torch.Tensor:
    itemsize = shard.itemsize
    assert shard.offset % itemsize == 0, f"{shard.path}: header of {shard.offset} bytes is not a whole number of ids"
    head = shard.offset // itemsize
    # shared=False maps the file copy-on-write, so nothing written to the tensor reaches the file.
    mapped = torch.from_file(str(shard.path), shared=False, size=head + shard.n_tokens, dtype=shard.dtype)
    return mapped[head:]


class TokenStream:
    """The ids of several shards as one stream; slicing ``stream[a:b]`` gives a tensor of their dtype.

    Only the shards a slice touches are mapped, once per process; a pickled stream carries the shard
    list, not the maps.
    """

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)
        self._starts = [0, *itertools.accumulate(s.n_tokens for s in self.shards)]
        self._maps: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, index: int) -> torch.Tensor:
        if index not in self._maps:
            self._maps[index] = _map(self.shards[index])
        return self._maps[index]

    def __getitem__(self, key: int | slice) -> torch.Tensor:
        if isinstance(key, int):
            position = key + len(self) if key < 0 else key
            if not 0 <= position < len(self):
                raise IndexError(f"token {key} is out of range for a stream of {len(self)}")
            return self[position : position + 1][0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream takes a position or a contiguous slice, stream[start:stop]")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return torch.empty(0, dtype=self.shards[0].dtype if self.shards else torch.int64)
        first = bisect.bisect_right(self._starts, start) - 1
        parts = []
        for index in range(first, len(self.shards)):
            begin = self._starts[index]
            if begin >= stop:
                break
            parts.append(self._shard(index)[max(start - begin, 0) : stop - begin])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def chunks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(position, ids)`` pieces of at most `size` ids covering the stream, none across a shard's end."""
        for index, shard in enumerate(self.shards):
            for start in range(0, shard.n_tokens, size):
                yield (
                    self._starts[index] + start,
                    self._shard(index)[start : start + size],
                )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"data: {str(path)!r} {what}")


def nanogpt_shard(path: Path) -> Shard:
    """The tokens of a nanoGPT ``.bin`` shard, its header checked against the file size.

    Raises:
        ValueError: If the header's magic, version or token count do not fit the file.
    """
    with open(path, "rb") as f:
        header = f.read(NANOGPT_HEADER_WORDS * 4)
    if len(header) < NANOGPT_HEADER_WORDS * 4:
        raise _bad(
            path,
            f"is {len(header)} bytes, shorter than the {NANOGPT_HEADER_WORDS * 4}-byte header of a nanoGPT .bin shard",
        )
    magic, version, n_tokens = struct.unpack("<3i", header[:12])
    if magic != NANOGPT_MAGIC or version != NANOGPT_VERSION:
        raise _bad(
            path,
            f"is not a nanoGPT token shard (header starts {magic}, {version}; expected magic {NANOGPT_MAGIC}, "
            f"version {NANOGPT_VERSION}); pass .bin files written by nanoGPT's data scripts, or text files.",
        )
    expected = NANOGPT_HEADER_WORDS * 4 + 2 * n_tokens
    actual = path.stat().st_size
    if actual != expected:
        raise _bad(
            path,
            f"is {actual:,} bytes, but its header says {n_tokens:,} uint16 tokens ({expected:,} bytes with the header); "
            "the file is truncated or damaged: copy or build it again.",
        )
    return Shard(path, n_tokens, torch.uint16, offset=NANOGPT_HEADER_WORDS * 4)


def npy_shard(path: Path) -> Shard:
    """The ids of a ``.npy`` array, read from its header (format 1.0 to 3.0), flattened in C order.

    Raises:
        ValueError: If it is not an ``.npy`` file, is Fortran-ordered, big-endian, or not of a token dtype.
    """
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic[:6] != b"\x93NUMPY":
            raise _bad(
                path,
                "is not a numpy .npy file (no \\x93NUMPY magic); pass .npy arrays saved by numpy.save.",
            )
        major = magic[6]
        length_bytes = 2 if major == 1 else 4
        (header_len,) = struct.unpack("<H" if major == 1 else "<I", f.read(length_bytes))
        header_text = f.read(header_len).decode("latin1")
    try:
        header = ast.literal_eval(header_text)
        descr, fortran, shape = (
            header["descr"],
            header["fortran_order"],
            tuple(header["shape"]),
        )
    except (ValueError, SyntaxError, KeyError, TypeError) as err:
        raise _bad(path, f"has an unreadable .npy header ({header_text.strip()!r})") from err
    if descr not in NPY_DTYPES:
        raise _bad(
            path,
            f"holds {descr!r} values; token arrays must be one of {sorted(NPY_DTYPES)} (little-endian unsigned 16/32-bit "
            "or signed 32/64-bit integers): convert with array.astype('uint32').",
        )
    if fortran and len(shape) > 1:
        raise _bad(
            path,
            "is a Fortran-ordered array; save it in C order (numpy.ascontiguousarray) to read its ids in order.",
        )
    dtype = NPY_DTYPES[descr]
    n_tokens = 1
    for dim in shape:
        n_tokens *= int(dim)
    offset = 8 + length_bytes + header_len
    expected, actual = offset + n_tokens * _ITEMSIZE[dtype], path.stat().st_size
    if actual != expected:
        raise _bad(
            path,
            f"is {actual:,} bytes, but its header says {n_tokens:,} {descr} ids ({expected:,} bytes); copy or save it again.",
        )
    if offset % _ITEMSIZE[dtype]:
        raise _bad(
            path,
            f"has a {offset}-byte header, not a multiple of its {_ITEMSIZE[dtype]}-byte ids; save it again with numpy.save.",
        )
    return Shard(path, n_tokens, dtype, offset=offset)


def token_file_shard(path: Path) -> Shard:
    """A pre-tokenized file as a shard, by its suffix: ``.bin`` (nanoGPT) or ``.npy``."""
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return nanogpt_shard(path)
    if suffix == ".npy":
        return npy_shard(path)
    raise _bad(
        path,
        "is not a pre-tokenized file; expected .bin (nanoGPT) or .npy token arrays.",
    )


def file_fingerprint_parts(paths: Sequence[Path]) -> Iterator[str]:
    """Path, size and modification time of each file: what cached facts about them are keyed by."""
    for path in paths:
        stat = os.stat(path)
        yield f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
