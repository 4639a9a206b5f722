"""Each user-facing error of the data package, checked once: it fails before training and says
what was wrong and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from moda_lightning.data import TextDataModule


def _prepare(tmp_path: Path, **kwargs: object) -> TextDataModule:
    dm = TextDataModule(cache_dir=str(tmp_path / "cache"), tokenizer_vocab_size=300, **kwargs)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"glob '.*/nothing/\*\.txt' matches no files"):
        TextDataModule(files=str(tmp_path / "nothing" / "*.txt"))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"file '.*missing\.txt' does not exist"):
        TextDataModule(files=[str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match=r"is a directory, expected a file; pass a glob"):
        TextDataModule(files=str(tmp_path))


def test_unreadable_file(tmp_path: Path) -> None:
    """A binary file passed by mistake (not UTF-8) is reported by name, before training."""
    path = tmp_path / "image.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"cannot read '.*image\.txt': it is not UTF-8 text"):
        _prepare(tmp_path, files=str(path))


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match=r"the corpus is empty: 2 file\(s\).*gave no text"):
        _prepare(tmp_path, files=str(tmp_path / "*"))


def test_empty_corpus_with_a_given_tokenizer(tmp_path: Path) -> None:
    """With --data.tokenizer no training happens; tokenization must still catch the empty corpus."""
    dm = _prepare(tmp_path / "first")
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match=r"the corpus is empty"):
        _prepare(tmp_path, files=str(tmp_path / "a.txt"), tokenizer=str(dm.tokenizer_path))


def test_jsonl_line_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"'.*bad\.jsonl' line 2 is not valid JSON"):
        _prepare(tmp_path, files=str(path))


def test_jsonl_line_without_the_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n{"content": "wrong field"}\n')
    with pytest.raises(
        ValueError,
        match=r"'.*docs\.jsonl' line 3 has no 'text' field \(found: \['content'\]\); "
        r"set --data\.text_field",
    ):
        _prepare(tmp_path, files=str(path))


def test_corpus_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("Just a few words of text here.")
    with pytest.raises(
        ValueError,
        match=r"too small: .* has \d+ tokens, but one training and one validation "
        r"sequence of seq_len\+1=257 tokens.*; lower --data\.seq_len \(at most 1 here\)",
    ):
        _prepare(tmp_path, files=str(path), seq_len=256)


def test_invalid_arguments() -> None:
    with pytest.raises(
        ValueError,
        match=r"seq_len=0, expected >= 1; val_fraction=1\.5, expected a fraction in \(0, 1\)",
    ):
        TextDataModule(val_fraction=1.5, seq_len=0)
    with pytest.raises(ValueError, match=r"tokenizer_vocab_size=100, expected 257"):
        TextDataModule(tokenizer_vocab_size=100)
    with pytest.raises(
        ValueError,
        match=r"num_proc=0, expected >= 1 \(or leave it unset: this process, every core\)",
    ):
        TextDataModule(num_proc=0)


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer file '.*nope\.json' does not exist"):
        TextDataModule(tokenizer=str(tmp_path / "nope.json"))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match=r"is not a valid tokenizer\.json"):
        _ = TextDataModule(tokenizer=str(garbage)).vocab_size
    no_eot = tmp_path / "no_eot.json"
    Tokenizer(models.BPE()).save(str(no_eot))
    with pytest.raises(ValueError, match=r"has no '<\|endoftext\|>' token"):
        _ = TextDataModule(tokenizer=str(no_eot)).vocab_size


def test_interrupted_tokenization_leaves_no_cache_file(tmp_path: Path) -> None:
    """The token file is written to a temp name and renamed when complete: an error after the
    first batch was written must leave neither a token file nor a temp file behind."""
    trained = _prepare(tmp_path / "first")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(300)) + "oops\n")
    with pytest.raises(ValueError, match=r"line 301 is not valid JSON"):
        _prepare(tmp_path, files=str(path), tokenizer=str(trained.tokenizer_path))
    assert list((tmp_path / "cache").iterdir()) == []
