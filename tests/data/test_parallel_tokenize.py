"""Tokenizing on several processes: the same shards, byte for byte, whatever the number of workers;
input read a bounded number of batches ahead; a progress bar with tokens/s and an ETA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moda_lightning.data import (
    Corpus,
    TextDataModule,
    builtin_documents,
    encode_pool,
    token_sources,
    train_bpe_tokenizer,
)
from moda_lightning.data import token_cache as tc
from moda_lightning.data.encode_pool import TextBatch, encode_in_order


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(builtin_documents(), 512, show_progress=False)


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus as JSON lines in three files, plus one long text file."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = builtin_documents()
    for part in range(3):
        with open(folder / f"part{part}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs[part::3])
    (folder / "zbook.txt").write_text("\n".join(docs[:10]))
    return folder


def _build(corpus: Corpus, tokenizer, folder: Path, num_proc: int) -> tc.TokenCacheManifest:
    key = tc.CacheKey(corpus.fingerprint(), "tokenizer", 512)
    return tc.build_token_cache(
        corpus,
        tokenizer,
        tokenizer.token_to_id("<|endoftext|>"),
        folder,
        key,
        num_proc=num_proc,
    )


def test_shards_are_the_same_for_any_number_of_processes(
    tokenizer, corpus_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small batches (many tasks, finished out of order by the workers) and small shards (cut inside
    documents): 1, 2 and 3 processes write the same files and the same manifest."""
    monkeypatch.setattr(tc, "POOL_BATCH_DOCS", 3)
    monkeypatch.setattr(tc, "SHARD_TOKENS", 20_000)
    corpus = Corpus(str(corpus_files / "*"))
    built = {n: _build(corpus, tokenizer, tmp_path / f"procs{n}", n) for n in (1, 2, 3)}
    assert len(built[1].shards) >= 5
    assert built[1] == built[2] == built[3]
    for shard in built[1].shards:
        assert (tmp_path / "procs1" / shard.name).read_bytes() == (tmp_path / "procs3" / shard.name).read_bytes()
    # And the ids are those of encoding each document alone.
    eot = tokenizer.token_to_id("<|endoftext|>")
    expected = [i for doc in corpus.documents() for i in [*tokenizer.encode(doc, add_special_tokens=False).ids, eot]]
    assert tc.open_token_cache(tmp_path / "procs2")[:].tolist() == expected


def test_the_reader_stays_a_few_batches_ahead(tokenizer) -> None:
    """With a pool, at most 2 batches per worker are queued: a long corpus is not read into memory."""
    read = 0

    def batches():
        nonlocal read
        for i in range(40):
            read += 1
            yield TextBatch([f"document number {i}"], [True])

    ahead = []
    for out in encode_in_order(batches(), tokenizer, 0, "H", num_proc=2):
        ahead.append(read - len(ahead) - 1)
    assert len(ahead) == 40 and max(ahead) <= encode_pool.IN_FLIGHT_PER_PROCESS * 2


def record_num_proc(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``num_proc`` of every token-cache build from now on, in order."""
    used: list[int] = []
    real = tc.build_token_cache
    monkeypatch.setattr(tc, "build_token_cache", lambda *a, **k: used.append(k["num_proc"]) or real(*a, **k))
    return used


def test_the_data_module_tokenizes_on_every_core_with_the_same_batches(
    corpus_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(token_sources, "POOL_MIN_BYTES", 0)
    used = record_num_proc(monkeypatch)
    common = {
        "files": str(corpus_files / "*.jsonl"),
        "tokenizer_vocab_size": 300,
        "seq_len": 32,
        "batch_size": 4,
    }
    one = TextDataModule(cache_dir=str(tmp_path / "one"), num_proc=1, **common)
    two = TextDataModule(cache_dir=str(tmp_path / "two"), num_proc=2, **common)
    for dm in (one, two):
        dm.prepare_data()
        dm.setup("fit")
    assert used == [1, 2]
    assert torch.equal(next(iter(one.train_dataloader())), next(iter(two.train_dataloader())))
    assert one.val_dataset.spans == two.val_dataset.spans
    # Unset: this process, whose tokenizer threads use every core (faster than workers where measured).
    assert TextDataModule(cache_dir=str(tmp_path / "x"), **common).num_proc == 1


def test_a_small_corpus_is_tokenized_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default run's built-in corpus must not pay for starting workers."""
    used = record_num_proc(monkeypatch)
    TextDataModule(cache_dir=str(tmp_path), tokenizer_vocab_size=300, num_proc=8).prepare_data()
    assert used == [1]


def test_progress_shows_tokens_per_second_and_an_eta(
    tokenizer, corpus_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars = []

    class Recorder:
        def __init__(self, **kwargs):
            self.kwargs, self.n, self.postfix = kwargs, 0, ""
            bars.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def close(self):
            pass

    monkeypatch.setattr(tc, "tqdm", Recorder)
    corpus = Corpus(str(corpus_files / "*"))
    manifest = _build(corpus, tokenizer, tmp_path / "cache", 1)
    (bar,) = bars
    # The total is the bytes to read, so tqdm can give an ETA; the postfix counts tokens and their rate.
    assert bar.kwargs["total"] == sum(p.stat().st_size for p in corpus.paths) == bar.n
    assert bar.postfix.startswith(f"{manifest.n_tokens:,} tokens, ") and bar.postfix.endswith(" tokens/s")
