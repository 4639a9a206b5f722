"""Text corpora for the data module: the built-in corpus and the user's own files.

A `Corpus` yields documents (one string each, or streamed in pieces) in a fixed order and has a
fingerprint that changes when its content does, so the tokenizer and token caches built from it can
be keyed by it. The formats are read by `readers.py` and `hf_datasets.py`. This module knows nothing
of tokenizers or Lightning.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from moda_lightning.data import hf_datasets
from moda_lightning.data.readers import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    Piece,
    ReadMeter,
    read_jsonl,
    read_parquet,
    read_text,
    require_optional,
    suffix_of,
)

BUILTIN_CORPUS = "pydoc_data.topics"
"""Name of the built-in corpus: the help topics of the Python documentation (~79 documents,
~465 KB of English technical prose), shipped in every CPython install, so no download is needed."""

PACKAGE_PREFIX = "pkg:"
"""``--data.files`` entries ``pkg:NAME`` stand for the ``.py`` sources of the installed package
``NAME`` (e.g. ``pkg:torch``): a large corpus of real code that needs no download."""

TOKEN_SUFFIXES = (".bin", ".npy")
"""Pre-tokenized files (`token_files.py`): token ids, not text; they are never a `Corpus`."""


def builtin_documents() -> list[str]:
    """Return the built-in corpus: the Python documentation's help topics, sorted by topic name.

    Returns:
        The topic texts, ordered by topic name so every run sees the same document order.
    """
    # Imported here: it is a ~0.5 MB module that only the built-in corpus needs.
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def resolve_files(files: str | Sequence[str]) -> list[Path]:
    """Expand paths and globs into a list of readable files.

    Args:
        files: A path, a glob (``data/*.txt``, ``data/**/*.jsonl``), or a list of them.

    Returns:
        The matching files in a deterministic order: entries in the order given, the matches of
        each glob sorted; a file named twice is kept once.

    Raises:
        ValueError: If a glob matches nothing, a path does not exist or is a directory, or a file
            cannot be opened for reading.
    """
    entries = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not entries:
        raise ValueError(
            "data: `files` is an empty list; pass a path, a glob, or a list of them "
            "(e.g. --data.files='data/*.txt'), or leave it unset to use the built-in corpus."
        )
    paths: list[Path] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if entry.startswith(PACKAGE_PREFIX):
            paths.extend(package_sources(entry[len(PACKAGE_PREFIX) :]))
        elif glob.has_magic(entry):
            matches = sorted(glob.glob(entry, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise ValueError(
                    f"data: the glob {entry!r} matches no files (searched from {os.getcwd()}); "
                    "check the pattern and the working directory, e.g. --data.files='data/*.txt'."
                )
            paths.extend(Path(m) for m in matches)
        else:
            path = Path(entry)
            if not path.exists():
                raise ValueError(
                    f"data: file {entry!r} does not exist (searched from {os.getcwd()}); "
                    "pass an existing path or a glob in --data.files."
                )
            if path.is_dir():
                raise ValueError(
                    f"data: {entry!r} is a directory, expected a file; pass a glob such as "
                    f"--data.files='{os.path.join(entry, '*.txt')}' to read the files inside it."
                )
            paths.append(path)

    unique: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        try:
            # Open now so a permission problem shows before any tokenizer training starts.
            with open(resolved, "rb"):
                pass
        except OSError as err:
            raise ValueError(
                f"data: cannot read {str(path)!r} ({err.strerror or err}); fix its permissions "
                "or remove it from --data.files."
            ) from err
        unique.append(resolved)
    return unique


def package_sources(name: str) -> list[Path]:
    """The ``.py`` files of installed package ``name``, sorted.

    Raises:
        ValueError: If no such package is installed, or it has no Python sources.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ValueError(
            f"data: {PACKAGE_PREFIX}{name} names no installed package (a folder with __init__.py importable as "
            f"{name!r}); install it or drop it from --data.files."
        )
    files = sorted({p for folder in folders for p in Path(folder).rglob("*.py") if p.is_file()})
    if not files:
        raise ValueError(f"data: package {name!r} ({folders[0]}) has no .py files; drop {PACKAGE_PREFIX}{name}.")
    return files


class Corpus:
    """An ordered collection of text documents: the built-in corpus, the user's files, or a dataset folder.

    Args:
        files: A path, a glob, ``pkg:NAME`` (the ``.py`` sources of an installed package), or a list
            of them; ``None`` selects the built-in corpus (`BUILTIN_CORPUS`) unless `dataset` is
            given. Globs are expanded and checked here, so a bad path fails at once. ``.jsonl``,
            ``.jsonl.gz`` and ``.jsonl.zst`` files give one document per line, ``.parquet`` files
            one per row, any other file is one UTF-8 document.
        text_field: The field (or column) holding the text in JSON lines, parquet files and datasets.
        dataset: A folder read through the ``datasets`` package (`hf_datasets.py`), instead of `files`.
    """

    def __init__(
        self,
        files: str | Sequence[str] | None = None,
        text_field: str = "text",
        dataset: str | None = None,
    ) -> None:
        if files is not None and dataset is not None:
            raise ValueError(
                "data: both --data.files and --data.dataset are set; pass one of them (a dataset folder, or the "
                "files themselves)."
            )
        self.paths: list[Path] | None = None if files is None else resolve_files(files)
        self.text_field = text_field
        self.dataset = dataset
        entries = [] if files is None else [files] if isinstance(files, (str, os.PathLike)) else list(files)
        packages = [str(e)[len(PACKAGE_PREFIX) :] for e in entries if str(e).startswith(PACKAGE_PREFIX)]
        self._package_files = {p.resolve() for name in packages for p in package_sources(name)}
        tokens = [p for p in self.paths or [] if suffix_of(p) in TOKEN_SUFFIXES]
        if tokens:
            raise ValueError(
                f"data: {str(tokens[0])!r} holds token ids, not text, and --data.files mixes it with text files; "
                "pass either text files or pre-tokenized files (.bin, .npy), not both."
            )
        for path in self.paths or []:
            require_optional(path)
        if dataset is not None:
            hf_datasets.open_dataset(dataset, text_field)  # a wrong folder or column fails now

    @property
    def is_builtin(self) -> bool:
        return self.paths is None and self.dataset is None

    def describe(self, max_files: int = 3) -> str:
        """A short human-readable name for messages: the built-in corpus, the dataset or the file list
        (its first `max_files` files and how many more)."""
        if self.dataset is not None:
            return f"the dataset {self.dataset}"
        if self.paths is None:
            return f"the built-in corpus ({BUILTIN_CORPUS})"
        shown = ", ".join(str(p) for p in self.paths[:max_files])
        more = f" and {len(self.paths) - max_files} more" if len(self.paths) > max_files else ""
        return f"{len(self.paths)} file(s): {shown}{more}"

    def source_bytes(self) -> int:
        """The size on disk of what `pieces` reads (compressed sizes for compressed files), for an ETA."""
        if self.dataset is not None:
            return sum(p.stat().st_size for p in hf_datasets.dataset_files(self.dataset))
        if self.paths is None:
            return sum(len(doc.encode("utf-8")) for doc in builtin_documents())
        return sum(p.stat().st_size for p in self.paths)

    def pieces(self, meter: ReadMeter | None = None) -> Iterator[Piece]:
        """The text in a fixed order, streamed: each document whole, or a long text file in pieces
        cut where the tokenizer would split anyway (`readers.safe_cut`). Empty documents are skipped.

        Args:
            meter: Counts the source bytes read, for progress bars.

        Raises:
            ValueError: If a file is not UTF-8 text or cannot be read, or a line or row is not JSON
                or lacks `text_field` (the message names the file and the line).
            TypeError: If the `text_field` of a line or row is not a string.
        """
        if self.dataset is not None:
            yield from (p for p in hf_datasets.read_dataset(self.dataset, self.text_field, meter) if p.text)
            return
        if self.paths is None:
            for doc in builtin_documents():
                if meter is not None:
                    meter.bytes += len(doc.encode("utf-8"))
                if doc:
                    yield Piece(doc)
            return
        for path in self.paths:
            suffix = suffix_of(path)
            if suffix in JSONL_SUFFIXES:
                yield from (p for p in read_jsonl(path, self.text_field, meter) if p.text)
            elif suffix in PARQUET_SUFFIXES:
                yield from (p for p in read_parquet(path, self.text_field, meter) if p.text)
            else:
                # A file is one document: empty pieces are dropped, but its end is kept if it had text.
                started = False
                for piece in read_text(path, meter, lenient=path in self._package_files):
                    if piece.text or (piece.ends_document and started):
                        started = not piece.ends_document
                        yield piece

    def documents(self) -> Iterator[str]:
        """Yield the documents in a fixed order, each whole (a long text file is joined from its
        pieces); empty documents are skipped. Raises as `pieces` does."""
        parts: list[str] = []
        for piece in self.pieces():
            parts.append(piece.text)
            if piece.ends_document:
                yield "".join(parts)
                parts = []

    def fingerprint(self) -> str:
        """A hex digest that changes when the corpus does.

        The built-in corpus hashes its content (it differs between Python versions). User files
        (and the files of a dataset folder) hash their paths, sizes and modification times, which
        is cheap for large corpora; the `text_field` is included because it changes what a
        ``.jsonl`` file yields.
        """
        h = hashlib.sha256()
        if self.dataset is not None:
            h.update(f"dataset;text_field={self.text_field}".encode())
            for path in hf_datasets.dataset_files(self.dataset):
                stat = path.stat()
                h.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        elif self.paths is None:
            h.update(BUILTIN_CORPUS.encode())
            for doc in builtin_documents():
                h.update(doc.encode("utf-8"))
                h.update(b"\0")
        else:
            h.update(f"files;text_field={self.text_field}".encode())
            for path in self.paths:
                stat = path.stat()
                h.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return h.hexdigest()

    def empty_error(self) -> ValueError:
        """The error to raise when reading the corpus gave no text at all."""
        return ValueError(
            f"data: the corpus is empty: {self.describe(max_files=10)} gave no text after reading "
            "(empty files, or lines or rows whose "
            f"{self.text_field!r} field is empty); pass files that contain text in --data.files."
        )
