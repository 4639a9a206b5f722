"""Hugging Face sources, offline: a dataset folder read through `datasets` (skipped where it is not
installed), and a tokenizer named as in the Hugging Face cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moda_lightning.data import (
    Corpus,
    TextDataModule,
    builtin_documents,
    train_bpe_tokenizer,
)
from moda_lightning.data import tokenizer as tk

DOCS = [f"Document {i}: " + "words of text " * (i % 7 + 1) for i in range(60)]


def test_a_dataset_saved_with_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": DOCS, "n": list(range(60))}).save_to_disk(str(tmp_path / "saved"))
    assert list(Corpus(dataset=str(tmp_path / "saved"), text_field="body").documents()) == DOCS
    dm = TextDataModule(dataset=str(tmp_path / "saved"), text_field="body", tokenizer_vocab_size=300, seq_len=8,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer.decode(dm.train_dataset.tokens[:].tolist(), skip_special_tokens=True) == "".join(DOCS)


def test_a_saved_dataset_dict_gives_its_train_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    splits = {
        "train": datasets.Dataset.from_dict({"text": DOCS[:40]}),
        "test": datasets.Dataset.from_dict({"text": DOCS[40:]}),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert list(Corpus(dataset=str(tmp_path / "saved")).documents()) == DOCS[:40]


def test_a_folder_of_data_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS))
    assert list(Corpus(dataset=str(folder)).documents()) == DOCS


def test_dataset_errors(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(
        ValueError,
        match=r"has no 'text' column \(found: \['body'\]\); set --data\.text_field",
    ):
        Corpus(dataset=str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"--data\.dataset='.*nowhere' is not a folder"):
        Corpus(dataset=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"both --data\.files and --data\.dataset are set"):
        Corpus(files=str(tmp_path / "saved" / "*.json"), dataset=str(tmp_path / "saved"))


def test_without_the_datasets_package_one_line_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        ValueError,
        match=r"^data: --data\.dataset needs the `datasets` package, which is not installed; install "
        r"the data extra \(pip install 'moda-lightning\[data\]'\)",
    ):
        TextDataModule(dataset=str(tmp_path / "saved"))


# --- named tokenizers -----------------------------------------------------------------------------


def _fake_hub_cache(root: Path, name: str) -> Path:
    """The layout huggingface_hub downloads into: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    repo = root / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    train_bpe_tokenizer(builtin_documents()[:20], 300, show_progress=False).save(str(snapshot / "tokenizer.json"))
    return snapshot / "tokenizer.json"


def test_a_tokenizer_named_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    saved = _fake_hub_cache(tmp_path / "hub", "acme/tiny-bpe")
    assert tk.resolve_tokenizer("acme/tiny-bpe") == saved
    dm = TextDataModule(tokenizer="acme/tiny-bpe", cache_dir=str(tmp_path / "cache"))
    assert dm.vocab_size == 300 and dm.tokenizer_fingerprint == tk.tokenizer_fingerprint(tk.load_tokenizer(saved))
    # A model folder holding a tokenizer.json works too.
    assert tk.resolve_tokenizer(saved.parent) == saved


def test_a_name_not_in_the_local_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(
        ValueError,
        match=rf"^data: --data\.tokenizer='acme/absent' is neither a file nor a tokenizer in the local "
        rf"Hugging Face cache \({tmp_path}/empty\), and nothing is downloaded; fetch it once",
    ):
        TextDataModule(tokenizer="acme/absent")
