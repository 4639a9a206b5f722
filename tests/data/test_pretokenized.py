"""Pre-tokenized inputs (nanoGPT .bin shards, .npy arrays) used as they are, and --data.val_files.

The files are written here by hand (header bytes and all), so numpy is not needed; where numpy is
installed, an array saved by numpy.save is read too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from moda_lightning.data import TextDataModule, pretokenized
from moda_lightning.data import tokenizer as tk
from moda_lightning.data.token_files import TokenStream, nanogpt_shard, npy_shard
from _ready import ready as _ready

EOT = 99
VOCAB = 100


def documents(n: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 120, (n,), generator=generator).tolist()
    return [torch.randint(0, EOT, (length,), generator=generator).tolist() + [EOT] for length in lengths]


def write_nanogpt(path: Path, ids: list[int]) -> Path:
    header = struct.pack("<3i", 20240520, 1, len(ids)) + b"\0" * (256 * 4 - 12)
    path.write_bytes(header + struct.pack(f"<{len(ids)}H", *ids))
    return path


def write_npy(path: Path, ids: list[int], descr: str = "<u4") -> Path:
    """A version 1.0 .npy file, its header padded to 64 bytes as numpy writes it."""
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({len(ids)},), }}"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    code = {"<u2": "H", "<u4": "I", "<i4": "i", "<i8": "q", ">u4": "I"}[descr]
    order = ">" if descr.startswith(">") else "<"
    path.write_bytes(
        b"\x93NUMPY\x01\x00"
        + struct.pack("<H", len(header))
        + header.encode()
        + struct.pack(f"{order}{len(ids)}{code}", *ids)
    )
    return path


def test_nanogpt_shards_are_one_stream_of_their_ids(tmp_path: Path) -> None:
    docs = documents(300)
    flat = [i for doc in docs for i in doc]
    half = len(flat) // 2 + 7  # the shards split a document: windows run across them
    write_nanogpt(tmp_path / "train_000.bin", flat[:half])
    write_nanogpt(tmp_path / "train_001.bin", flat[half:])
    dm = _ready(files=str(tmp_path / "train_*.bin"), token_vocab_size=VOCAB, eot_id=EOT, seq_len=16, batch_size=4,
                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.vocab_size == VOCAB and dm.eot == EOT and not dm.has_tokenizer
    assert dm.train_dataset.tokens[:].tolist() == flat
    assert list(tmp_path.glob("cache/tokens-*")) == [], "nothing re-tokenized or copied"
    # Every window is a slice of the stream, a window across the two files included.
    stream = torch.tensor(flat)
    crossing = [
        i for i in range(len(dm.train_dataset)) if _begin(dm.train_dataset, i) < half < _begin(dm.train_dataset, i) + 17
    ]
    assert crossing, "no window runs across the two files"
    for i in [0, len(dm.train_dataset) - 1, *crossing]:
        begin = _begin(dm.train_dataset, i)
        assert torch.equal(dm.train_dataset[i], stream[begin : begin + 17])
    # The validation split is held-out documents, as for text.
    assert all(start == 0 or flat[start - 1] == EOT for start, _ in dm.val_dataset.spans)
    assert next(iter(dm.train_dataloader())).shape == (4, 17)
    assert len(dm.state_dict()["tokenizer_fingerprint"]) == 64 and dm.state_dict()["tokenizer_json"] is None


def _begin(windows, index: int) -> int:
    span = max(i for i, offset in enumerate(windows._offsets[:-1]) if offset <= index)
    return windows.spans[span][0] + (index - windows._offsets[span]) * windows.seq_len


@pytest.mark.parametrize("descr", ["<u2", "<u4", "<i4", "<i8"])
def test_npy_token_arrays(tmp_path: Path, descr: str) -> None:
    flat = [i for doc in documents(100) for i in doc]
    shard = npy_shard(write_npy(tmp_path / "tokens.npy", flat, descr))
    assert TokenStream([shard])[:].tolist() == flat


def test_an_array_saved_by_numpy(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    flat = [i for doc in documents(100) for i in doc]
    flat = flat[: len(flat) // 4 * 4]
    np.save(tmp_path / "tokens.npy", np.array(flat, dtype=np.uint32).reshape(4, -1))  # read in C order
    assert TokenStream([npy_shard(tmp_path / "tokens.npy")])[:].tolist() == flat


def test_the_vocabulary_and_end_of_text_can_come_from_a_tokenizer(
    tmp_path: Path,
) -> None:
    trained = _ready(cache_dir=str(tmp_path / "cache"), tokenizer_vocab_size=300, seq_len=16)
    ids = trained.train_dataset.tokens[:].tolist()
    write_nanogpt(tmp_path / "ids.bin", ids)
    dm = _ready(
        files=str(tmp_path / "ids.bin"),
        tokenizer=str(trained.tokenizer_path),
        seq_len=16,
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.vocab_size == 300 and dm.eot == tk.eot_id(trained.tokenizer)
    assert dm.tokenizer_fingerprint == trained.tokenizer_fingerprint, (
        "a checkpoint of either run resumes with the other"
    )


def test_separate_validation_files(tmp_path: Path) -> None:
    train = [i for doc in documents(200) for i in doc]
    val = [i for doc in documents(40, seed=1) for i in doc]
    write_nanogpt(tmp_path / "train.bin", train)
    write_npy(tmp_path / "val.npy", val, "<u2")
    dm = _ready(files=str(tmp_path / "train.bin"), val_files=str(tmp_path / "val.npy"), token_vocab_size=VOCAB,
                eot_id=EOT, seq_len=16, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.train_dataset.spans == [(0, len(train))] and dm.val_dataset.spans == [(0, len(val))]
    assert dm.val_dataset.tokens[:].tolist() == val


def test_separate_validation_text(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("Training text about the quick brown fox. " * 60)
    (tmp_path / "val.jsonl").write_text(
        "".join(json.dumps({"text": f"Held out line {i} on a lazy dog."}) + "\n" for i in range(30))
    )
    dm = _ready(files=str(tmp_path / "train.txt"), val_files=str(tmp_path / "val.jsonl"), tokenizer_vocab_size=300,
                seq_len=8, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    decoded = dm.tokenizer.decode(dm.val_dataset.tokens[:].tolist(), skip_special_tokens=True)
    assert decoded == "".join(f"Held out line {i} on a lazy dog." for i in range(30))
    assert dm.train_dataset.spans == [(0, len(dm.train_dataset.tokens))]
    assert len(list(tmp_path.glob("cache/tokens-*"))) == 2, "each its own cache, with the one tokenizer"


def test_ids_outside_the_vocabulary_fail_before_training(tmp_path: Path) -> None:
    write_nanogpt(tmp_path / "ids.bin", [1, 2, 3, 150, EOT] * 50)
    with pytest.raises(
        ValueError,
        match=r"hold ids from 1 to 150, outside the 100-token vocabulary \(0 to 99\); pass the "
        r"vocabulary size .* \(--data\.token_vocab_size, or --data\.tokenizer\)",
    ):
        _ready(
            files=str(tmp_path / "ids.bin"),
            token_vocab_size=VOCAB,
            eot_id=EOT,
            cache_dir=str(tmp_path / "cache"),
        )


def test_the_id_check_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_nanogpt(tmp_path / "ids.bin", [i for doc in documents(100) for i in doc])
    args = {"files": str(tmp_path / "ids.bin"), "token_vocab_size": VOCAB, "eot_id": EOT, "seq_len": 16,
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    _ready(**args)
    monkeypatch.setattr(pretokenized, "id_range", lambda *a, **k: pytest.fail("scanned the ids again"))
    _ready(**args)


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda p: p.write_bytes(b"\0" * 2000),
            r"is not a nanoGPT token shard \(header starts 0, 0; expected magic 20240520",
        ),
        (
            lambda p: p.write_bytes(write_nanogpt(p, [1, 2, 3]).read_bytes()[:-1]),
            r"is 1,029 bytes, but its header says 3 uint16 tokens \(1,030 bytes",
        ),
        (
            lambda p: p.write_bytes(b"short"),
            r"is 5 bytes, shorter than the 1024-byte header",
        ),
    ],
    ids=["bad-magic", "truncated", "no-header"],
)
def test_damaged_nanogpt_shards(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "ids.bin")
    with pytest.raises(ValueError, match=message):
        nanogpt_shard(tmp_path / "ids.bin")


def test_npy_files_that_are_not_token_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"holds '>u4' values; token arrays must be one of"):
        npy_shard(write_npy(tmp_path / "big_endian.npy", [1, 2, 3], ">u4"))
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ValueError, match=r"is not a numpy \.npy file"):
        npy_shard(tmp_path / "text.npy")


def test_flag_errors(tmp_path: Path) -> None:
    write_nanogpt(tmp_path / "ids.bin", [1, 2, EOT])
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(
        ValueError,
        match=r"need their vocabulary size and end-of-text id: pass --data\.tokenizer=.* or both "
        r"--data\.token_vocab_size and --data\.eot_id",
    ):
        TextDataModule(files=str(tmp_path / "ids.bin"), token_vocab_size=VOCAB)
    with pytest.raises(
        ValueError,
        match=r"--data\.eot_id=100 is outside the vocabulary of --data\.token_vocab_size=100",
    ):
        TextDataModule(files=str(tmp_path / "ids.bin"), token_vocab_size=VOCAB, eot_id=100)
    with pytest.raises(ValueError, match=r"--data\.files mixes pre-tokenized files .* with text files"):
        TextDataModule(
            files=[str(tmp_path / "ids.bin"), str(tmp_path / "a.txt")],
            token_vocab_size=VOCAB,
            eot_id=EOT,
        )
    with pytest.raises(
        ValueError,
        match=r"describe pre-tokenized \.bin / \.npy files, but --data\.files is text",
    ):
        TextDataModule(files=str(tmp_path / "a.txt"), token_vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"--data\.val_files must be of the kind --data\.files is"):
        TextDataModule(
            files=str(tmp_path / "ids.bin"),
            val_files=str(tmp_path / "a.txt"),
            token_vocab_size=VOCAB,
            eot_id=EOT,
        )
    with pytest.raises(ValueError, match=r"the pre-tokenized files came without a tokenizer"):
        _ = TextDataModule(files=str(tmp_path / "ids.bin"), token_vocab_size=VOCAB, eot_id=EOT).tokenizer
