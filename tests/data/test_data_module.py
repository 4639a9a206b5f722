"""Tests for the data package: built-in corpus, BPE tokenizer, token cache, TextDataModule.

All CPU and fast: the built-in corpus trains a 4096-token BPE in well under a second, user-file
tests use tiny corpora with small vocabularies. Every cache lives under pytest's tmp_path.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from moda_lightning.data import (
    EOT,
    Corpus,
    TextDataModule,
    builtin_documents,
    train_bpe_tokenizer,
)
from moda_lightning.data import token_cache as tc
from moda_lightning.data import tokenizer as tk
from _ready import ready as _ready


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder with the built-in corpus's tokenizer and tokens already built, shared by tests."""
    cache = tmp_path_factory.mktemp("builtin_cache")
    dm = TextDataModule(cache_dir=str(cache), seq_len=64, batch_size=4)
    dm.prepare_data()
    return cache


def _write_docs(folder: Path, docs: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")


def test_builtin_corpus_is_nontrivial_and_ordered() -> None:
    docs = builtin_documents()
    assert len(docs) >= 50
    assert sum(len(d) for d in docs) > 200_000
    assert docs == builtin_documents()
    assert Corpus().fingerprint() == Corpus().fingerprint()


def test_tokenizer_trains_requested_vocab_and_round_trips() -> None:
    tokenizer = train_bpe_tokenizer(builtin_documents(), 4096, show_progress=False)
    assert tk.vocab_size_of(tokenizer) == 4096
    text = "def f(x):\n\treturn x ** 2  # café — 世界 ✓\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    assert tokenizer.encode(EOT).ids == [tk.eot_id(tokenizer)]


def test_second_datamodule_reuses_both_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _ready(cache_dir=str(tmp_path), seq_len=32, batch_size=4)
    files = sorted(tmp_path.rglob("*"))
    # The tokenizer and the token cache folder: one shard, its document ends and its manifest; no temp
    # files left over.
    kinds = [re.sub(r"-[0-9a-f]{16,}", "", f.relative_to(tmp_path).as_posix()) for f in files]
    assert kinds == [
        "tokenizer-v4096.json",
        "tokens.u16",
        "tokens.u16/00000.bin",
        "tokens.u16/document_ends.i64",
        "tokens.u16/document_ends.json",
        "tokens.u16/manifest.json",
    ]
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second run retrained or re-tokenized instead of using the cache")

    monkeypatch.setattr(tk, "train_bpe_tokenizer", fail)
    monkeypatch.setattr(tc, "build_token_cache", fail)
    second = _ready(cache_dir=str(tmp_path), seq_len=32, batch_size=4)

    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(tmp_path.rglob("*"))} == stamps
    assert second.tokenizer_fingerprint == first.tokenizer_fingerprint
    assert torch.equal(second.val_dataset[0], first.val_dataset[0])


def test_batches_have_shape_dtype_and_chain(builtin_cache: Path) -> None:
    seq_len, batch_size = 64, 4
    dm = _ready(cache_dir=str(builtin_cache), seq_len=seq_len, batch_size=batch_size)
    assert dm.vocab_size == 4096 and dm.seq_len == seq_len

    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (batch_size, seq_len + 1) and batch.dtype == torch.int64
    assert 0 <= batch.min() and batch.max() < dm.vocab_size

    # Validation comes in stream order; within a held-out span each window's targets continue
    # into the next window.
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape[1] == seq_len + 1 and len(val) == len(dm.val_dataset)
    first_span_windows = (dm.val_dataset.spans[0][1] - dm.val_dataset.spans[0][0] - 1) // seq_len
    assert first_span_windows >= 2
    assert torch.equal(val[1:first_span_windows, 0], val[: first_span_windows - 1, -1])
    train = dm.train_dataset
    tokens = train.tokens
    start = train.spans[0][0]
    assert torch.equal(
        torch.cat([train[0], train[1][1:]]),
        tokens[start : start + 2 * seq_len + 1].to(torch.int64),
    )


def test_validation_is_held_out_documents_from_the_whole_corpus(
    builtin_cache: Path,
) -> None:
    """The validation split used to be the tail of the token stream: the last documents of the
    corpus only. It is now whole-document chunks drawn at random; no window crosses a split."""
    dm = _ready(cache_dir=str(builtin_cache), seq_len=64, batch_size=4, val_fraction=0.1)
    train, val = dm.train_dataset, dm.val_dataset
    tokens = train.tokens
    n_tokens = len(tokens)
    spans = sorted(train.spans + val.spans)
    assert spans[0][0] == 0 and spans[-1][1] == n_tokens
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), "the spans tile the stream"
    held = sum(stop - start for start, stop in val.spans)
    assert 0.1 <= held / n_tokens < 0.1 + 0.01
    assert val.spans[0][0] < n_tokens // 2, "not just the tail"
    held_mask = torch.zeros(n_tokens, dtype=torch.bool)
    for start, stop in val.spans:
        held_mask[start:stop] = True
    # Every validation window lies inside one held-out span; no training window touches one.
    for i in range(len(val)):
        begin = _start_of(val, i)
        assert held_mask[begin : begin + dm.seq_len + 1].all()
    for i in range(0, len(train), 7):
        begin = _start_of(train, i)
        assert not held_mask[begin : begin + dm.seq_len + 1].any()
    eot = tk.eot_id(dm.tokenizer)
    assert all(start == 0 or int(tokens[start - 1]) == eot for start, _ in val.spans), "spans start at document ends"
    # The choice depends on val_seed only, not on the training seed.
    other = _ready(cache_dir=str(builtin_cache), seq_len=64, batch_size=4, val_fraction=0.1, seed=5)
    assert other.val_dataset.spans == val.spans
    moved = _ready(
        cache_dir=str(builtin_cache),
        seq_len=64,
        batch_size=4,
        val_fraction=0.1,
        val_seed=1,
    )
    assert moved.val_dataset.spans != val.spans


def _start_of(windows, index: int) -> int:
    span = max(i for i, offset in enumerate(windows._offsets[:-1]) if offset <= index)
    return windows.spans[span][0] + (index - windows._offsets[span]) * windows.seq_len


def test_training_order_is_seeded_and_reshuffled_each_epoch(
    builtin_cache: Path,
) -> None:
    dm = _ready(cache_dir=str(builtin_cache), seq_len=64, batch_size=4, seed=1)
    loader = dm.train_dataloader()
    epoch1, epoch2 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(epoch1, epoch2)
    again = _ready(cache_dir=str(builtin_cache), seq_len=64, batch_size=4, seed=1)
    assert torch.equal(next(iter(again.train_dataloader())), epoch1)


def test_user_txt_files_and_glob(tmp_path: Path) -> None:
    docs = {
        "a.txt": "The quick brown fox jumps over the lazy dog. " * 20,
        "b.md": "# Title\nSome *markdown* text. " * 20,
    }
    _write_docs(tmp_path / "corpus", docs)
    as_list = _ready(
        files=[str(tmp_path / "corpus" / "a.txt"), str(tmp_path / "corpus" / "b.md")],
        tokenizer_vocab_size=300,
        seq_len=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    as_glob = _ready(
        files=str(tmp_path / "corpus" / "*"),
        tokenizer_vocab_size=300,
        seq_len=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert as_glob.tokenizer_fingerprint == as_list.tokenizer_fingerprint
    assert as_list.vocab_size == 300

    # The packed stream is every document followed by the end-of-text token, in file order.
    tokens = as_list.train_dataset.tokens[:].tolist()
    decoded = as_list.tokenizer.decode(tokens, skip_special_tokens=False)
    assert decoded == docs["a.txt"] + EOT + docs["b.md"] + EOT
    assert next(iter(as_glob.train_dataloader())).shape == (2, 9)


def test_user_jsonl_with_text_field(tmp_path: Path) -> None:
    records = [{"body": f"Record number {i} says hello to the data module.", "id": i} for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    dm = _ready(
        files=str(path),
        text_field="body",
        tokenizer_vocab_size=300,
        seq_len=16,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    tokens = dm.train_dataset.tokens[:].tolist()
    assert dm.tokenizer.decode(tokens, skip_special_tokens=False) == "".join(r["body"] + EOT for r in records)
    assert len(dm.train_dataset) > 0 and len(dm.val_dataset) > 0


def test_worker_processes_give_the_same_batches(builtin_cache: Path) -> None:
    """Workers receive the dataset pickled without its mapped tensor and open the file themselves."""
    in_process = _ready(cache_dir=str(builtin_cache), seq_len=64, batch_size=8)
    with_workers = _ready(cache_dir=str(builtin_cache), seq_len=64, batch_size=8, num_workers=2)
    expected = torch.cat(list(in_process.val_dataloader()))
    assert torch.equal(torch.cat(list(with_workers.val_dataloader())), expected)


def test_state_dict_round_trips_and_a_given_tokenizer_file_matches(builtin_cache: Path, tmp_path: Path) -> None:
    dm = TextDataModule(cache_dir=str(builtin_cache))
    state = dm.state_dict()
    assert state["vocab_size"] == 4096 and len(state["tokenizer_fingerprint"]) == 64
    # Reloading the saved tokenizer.json (as a resumed run passes it) gives the same fingerprint.
    reloaded = TextDataModule(tokenizer=state["tokenizer_path"], cache_dir=str(tmp_path))
    reloaded.load_state_dict(state)
    assert reloaded.state_dict()["tokenizer_fingerprint"] == state["tokenizer_fingerprint"]


def test_mismatched_tokenizer_raises(builtin_cache: Path) -> None:
    state = TextDataModule(cache_dir=str(builtin_cache)).state_dict()
    other = TextDataModule(cache_dir=str(builtin_cache), tokenizer_vocab_size=512)
    with pytest.raises(
        ValueError,
        match=r"different tokenizer.*vocab_size=4096.*vocab_size=512.*--data\.tokenizer",
    ):
        other.load_state_dict(state)


def test_fits_with_a_lightning_trainer(builtin_cache: Path) -> None:
    """Lightning calls prepare_data/setup and iterates both loaders; a bigram model learns from them."""

    class Bigram(L.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, 32)
            self.head = nn.Linear(32, vocab_size)

        def _loss(self, batch: torch.Tensor) -> torch.Tensor:
            logits = self.head(self.embed(batch[:, :-1]))
            return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self._loss(batch)

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.1)

    dm = TextDataModule(cache_dir=str(builtin_cache), seq_len=32, batch_size=4)
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=30,
        limit_val_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    torch.manual_seed(0)
    model = Bigram(dm.vocab_size)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val_loss"]
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["val_loss"] < before - 0.25  # held-out documents: it learned, not memorised


def test_installed_package_sources_are_a_corpus(tmp_path: Path) -> None:
    """`pkg:NAME` reads the .py files of an installed package: here `json` of the standard library."""
    import json as json_package

    corpus = Corpus(["pkg:json"])
    folder = Path(json_package.__file__).parent
    assert corpus.paths == sorted(p.resolve() for p in folder.rglob("*.py"))
    docs = list(corpus.documents())
    assert len(docs) == len(corpus.paths) and any("def dumps(" in d for d in docs)
    with pytest.raises(ValueError, match=r"pkg:no_such_pkg names no installed package"):
        Corpus(["pkg:no_such_pkg"])
