"""Stored document ends: the held-out split reads them instead of scanning the token stream.

A cache stores them when it is built, pre-tokenized files get them once in the cache folder, a cache
built before they were stored gets them on first use, and a damaged ends file is found again with
one line saying what was wrong. Every case checks that the split is the one a full scan gives.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moda_lightning.data import TextDataModule, splits, stored_ends
from moda_lightning.data import token_cache as tc

VOCAB = 300
SEQ_LEN = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder with the built-in corpus's tokenizer and token cache, built by this version."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB, seq_len=SEQ_LEN).prepare_data()
    return cache


@pytest.fixture
def cache(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    return copy


def ends_files(cache: Path) -> stored_ends.EndsFiles:
    (folder,) = cache.glob("tokens-*.u16")
    return stored_ends.ends_in_cache_folder(folder)


def ready(cache: Path, **kwargs: object) -> TextDataModule:
    dm = TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB, seq_len=SEQ_LEN, **kwargs)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def spans(dm: TextDataModule) -> tuple[list, list]:
    return dm.train_dataset.spans, dm.val_dataset.spans


def scanned_split(dm: TextDataModule) -> tuple[list, list]:
    """The split made from a full scan of the stream, as before the ends were stored."""
    tokens = dm.train_dataset.tokens
    ends = splits.document_ends(tokens, dm.eot)
    return splits.held_out_split(len(tokens), ends, dm.val_fraction, SEQ_LEN + 1, dm.val_seed)


def no_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(splits, "document_ends", lambda *a, **k: pytest.fail("scanned the stream for document ends"))


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "document ends" in r.getMessage()]


def test_the_builder_stores_the_ends_of_a_scan(built: Path) -> None:
    files = ends_files(built)
    stream = tc.open_token_cache(files.data.parent)
    manifest = tc.read_manifest(files.data.parent)
    eot = TextDataModule(cache_dir=str(built), tokenizer_vocab_size=VOCAB).eot
    stored = stored_ends.read_ends(files, stream=manifest.sha256, eot_id=eot, n_tokens=len(stream))
    assert torch.equal(stored, splits.document_ends(stream, eot))
    assert len(stored) == manifest.n_documents > 50


def test_setup_reads_the_stored_ends_and_splits_as_a_scan_does(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    no_scan(monkeypatch)
    with caplog.at_level(logging.INFO):
        dm = ready(cache)
        again = ready(cache, seed=3)
    monkeypatch.undo()
    assert messages(caplog) == []
    assert spans(dm) == spans(again) == scanned_split(dm)


def test_a_cache_built_before_the_ends_were_stored_gets_them_once(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = ends_files(cache)
    good = files.data.read_bytes(), files.record.read_text()
    files.data.unlink()
    files.record.unlink()
    with caplog.at_level(logging.INFO):
        dm = ready(cache)
    assert messages(caplog) == [
        f"TextDataModule: finding the document ends of the token stream once; storing them in {files.data}"
    ]
    assert (files.data.read_bytes(), files.record.read_text()) == good
    assert spans(dm) == scanned_split(dm)
    no_scan(monkeypatch)
    assert spans(ready(cache)) == spans(dm)


def _truncate(files: stored_ends.EndsFiles) -> None:
    os.truncate(files.data, files.data.stat().st_size - 8)


def _one_end_moved(files: stored_ends.EndsFiles) -> None:
    data = bytearray(files.data.read_bytes())
    data[80] ^= 1  # the low byte of the 11th end: off by one token
    files.data.write_bytes(bytes(data))


def _record_field(field: str, value: object) -> Callable[[stored_ends.EndsFiles], None]:
    def change(files: stored_ends.EndsFiles) -> None:
        record = json.loads(files.record.read_text())
        files.record.write_text(json.dumps({**record, field: value}))

    return change


def _data_deleted(files: stored_ends.EndsFiles) -> None:
    files.data.unlink()


def _record_not_json(files: stored_ends.EndsFiles) -> None:
    files.record.write_text("{")


DAMAGES = {
    "truncated": (_truncate, "is 8 bytes shorter than its record says ("),
    "one-end-moved": (_one_end_moved, "has bytes whose SHA-256 differs from the one its record holds"),
    "another-stream": (_record_field("stream", "f" * 64), "was stored for another token stream ("),
    "another-eot": (_record_field("eot_id", 7), "was stored for end-of-text id 7, not "),
    "record-format": (_record_field("format", 9), "has a record of format 9, but this version reads format 1"),
    "record-field": (
        _record_field("n_ends", "12"),
        "has an unreadable record document_ends.json (field 'n_ends' is '12')",
    ),
    "record-not-json": (_record_not_json, "has an unreadable record document_ends.json (Expecting"),
    "data-deleted": (_data_deleted, "is missing (its record document_ends.json is there)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_ends_are_found_again_with_one_line(
    damage: str, cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = ends_files(cache)
    good = files.data.read_bytes(), files.record.read_text()
    make, reason = DAMAGES[damage]
    make(files)
    with caplog.at_level(logging.INFO):
        dm = ready(cache)
    (line,) = messages(caplog)
    assert line.startswith(f"TextDataModule: document ends {files.data} {reason}") and line.endswith(
        "; finding them again"
    ), line
    assert (files.data.read_bytes(), files.record.read_text()) == good, "stored again as built"
    assert spans(dm) == scanned_split(dm)
    no_scan(monkeypatch)
    assert spans(ready(cache)) == spans(dm)


def write_nanogpt(path: Path, ids: list[int]) -> None:
    path.write_bytes(
        struct.pack("<3i", 20240520, 1, len(ids)) + b"\0" * (256 * 4 - 12) + struct.pack(f"<{len(ids)}H", *ids)
    )


def test_token_files_get_their_ends_once_keyed_by_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = []
    for length in torch.randint(20, 120, (300,), generator=generator).tolist():
        ids += torch.randint(0, 99, (length,), generator=generator).tolist() + [99]
    path = tmp_path / "ids.bin"
    write_nanogpt(path, ids)
    args = {"files": str(path), "token_vocab_size": 100, "eot_id": 99, "seq_len": 16}
    first = TextDataModule(cache_dir=str(tmp_path / "cache"), **args)
    first.prepare_data()
    first.setup("fit")
    (stored,) = (tmp_path / "cache").glob("document-ends-*.i64")
    assert torch.equal(
        torch.frombuffer(bytearray(stored.read_bytes()), dtype=torch.int64),
        splits.document_ends(first.train_dataset.tokens, 99),
    )

    no_scan(monkeypatch)
    second = TextDataModule(cache_dir=str(tmp_path / "cache"), **args)
    second.prepare_data()
    second.setup("fit")
    assert spans(second) == spans(first)

    # Another modification time is another set of files: their ends are found again, beside the first ones.
    monkeypatch.undo()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        TextDataModule(cache_dir=str(tmp_path / "cache"), **args).prepare_data()
    assert len(messages(caplog)) == 1 and "finding the document ends of the token stream once" in messages(caplog)[0]
    assert len(list((tmp_path / "cache").glob("document-ends-*.i64"))) == 2
