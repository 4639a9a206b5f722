"""The token cache's manifest: a damaged or mismatched cache is rebuilt with one line saying why, and
what cannot be fixed by a rebuild (an unwritable folder, a corpus too small) fails before training.

First through the real `moda fit` (one subprocess per case), then the manifest functions in process,
on one shard and on several. All cases start from one cache of the built-in corpus with a 300-token
vocabulary, built once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moda_lightning.data import TextDataModule
from moda_lightning.data import cache_integrity as ci
from moda_lightning.data import token_cache as tc
from moda_lightning.data import tokenizer as tk
from tests.test_cli import TINY, moda_command

VOCAB = 300


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the tokenizer and the token cache (one shard and its manifest), as `moda fit` builds them."""
    cache = tmp_path_factory.mktemp("good") / "cache"
    TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB, seq_len=32).prepare_data()
    return cache


def token_folder(cache: Path) -> Path:
    (path,) = cache.glob("tokens-*.u16")
    return path


def token_file(cache: Path) -> Path:
    """The cache's only shard (the built-in corpus is far below `SHARD_TOKENS`)."""
    return token_folder(cache) / "00000.bin"


def manifest_of(shard: Path) -> Path:
    return tc.manifest_path(shard.parent)


@pytest.fixture
def cache(good_cache: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good cache, for a test to damage."""
    copy = tmp_path / "cache"
    shutil.copytree(good_cache, copy)
    return copy


def _truncate_half(path: Path) -> None:
    size = path.stat().st_size
    os.truncate(path, size // 2 // 2 * 2)


def _one_byte_short(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def _all_ff(path: Path) -> None:
    path.write_bytes(b"\xff" * path.stat().st_size)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete_manifest(path: Path) -> None:
    manifest_of(path).unlink()


def _wrong_corpus_fingerprint(path: Path) -> None:
    manifest = json.loads(manifest_of(path).read_text())
    manifest["corpus_fingerprint"] = "0" * 64
    manifest_of(path).write_text(json.dumps(manifest))


def _reason(damage: str, size: int) -> str:
    """The exact phrase the rebuild line gives for each damage, for a good file of `size` bytes."""
    half = size // 2 // 2 * 2
    return {
        "truncated": f"shard 00000.bin is {size - half:,} bytes shorter than the manifest says ({half:,} bytes, expected {size:,})",
        "one-byte-short": f"shard 00000.bin is 1 byte shorter than the manifest says ({size - 1:,} bytes, expected {size:,})",
        "all-0xff": f"shard 00000.bin holds token id 65,535, but the vocabulary has {VOCAB} ids (0 to {VOCAB - 1})",
        "empty": f"shard 00000.bin is empty, but the manifest says {size // 2:,} tokens ({size:,} bytes)",
        "manifest-deleted": "has no manifest manifest.json in it (deleted, or written by a version that kept none)",
        "wrong-fingerprint": "has a manifest made for another corpus (fingerprint 000000000000..., expected",
    }[damage]


DAMAGES: dict[str, Callable[[Path], None]] = {
    "truncated": _truncate_half,
    "one-byte-short": _one_byte_short,
    "all-0xff": _all_ff,
    "empty": _empty,
    "manifest-deleted": _delete_manifest,
    "wrong-fingerprint": _wrong_corpus_fingerprint,
}


def moda_fit(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*moda_command(), "fit", *TINY, f"--data.cache_dir={cache}", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)


# --- through the CLI ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_cli_rebuilds_a_bad_cache_and_trains(damage: str, good_cache: Path, cache: Path, tmp_path: Path) -> None:
    path = token_file(cache)
    good_bytes, good_manifest = path.read_bytes(), manifest_of(path).read_text()
    DAMAGES[damage](path)

    result = moda_fit(tmp_path, cache, "--trainer.max_steps=1", "--trainer.val_check_interval=1")

    assert result.returncode == 0, result.stderr[-3000:]
    reason = _reason(damage, len(good_bytes))
    rebuild_lines = [line for line in result.stderr.splitlines() if "; rebuilding" in line]
    assert len(rebuild_lines) == 1 and f"token cache {path.parent} {reason}" in rebuild_lines[0], result.stderr[-3000:]
    assert list(tmp_path.glob("runs/**/last.ckpt")), "training did not get to a checkpoint"
    # The rebuilt cache is the fresh one: same bytes, same manifest, no temp or set-aside folders left.
    assert path.read_bytes() == good_bytes
    assert manifest_of(path).read_text() == good_manifest
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == sorted(
        p.relative_to(good_cache) for p in good_cache.rglob("*")
    )


def test_cli_cache_folder_under_a_file_fails_in_one_line(tmp_path: Path) -> None:
    """Works as root too: no permission bits are involved, the path cannot be a folder at all."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder's parent should be")
    result = moda_fit(tmp_path, blocker / "sub", "--trainer.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"moda: error: data: cannot write to the cache folder {blocker / 'sub'} (a part of that path is a file, "
        "not a folder); make it writable or move the cache with --data.cache_dir=<a writable folder>"
    ) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root writes into read-only folders; see the not-a-folder test",
)
def test_cli_read_only_cache_folder_fails_in_one_line(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        result = moda_fit(tmp_path, cache, "--trainer.max_steps=1")
    finally:
        cache.chmod(0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"moda: error: data: cannot write to the cache folder {cache} (Permission denied); " in result.stderr
    assert "move the cache with --data.cache_dir=<a writable folder>" in result.stderr


def test_cli_corpus_too_small_fails_in_one_line(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just a few words of text here.")
    result = moda_fit(tmp_path, tmp_path / "cache", f"--data.files={tiny}", "--trainer.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("moda: error:")]
    assert line.startswith(f"moda: error: data: the corpus is too small: 1 file(s): {tiny} has ")
    assert line.endswith(
        "; lower --data.seq_len (at most 1 here), raise --data.val_fraction, or pass more text in --data.files"
    )
    assert "Traceback" not in result.stderr


# --- the manifest, in process -------------------------------------------------------------------


def _key(cache: Path) -> tc.CacheKey:
    dm = TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB)
    return tc.CacheKey(dm.corpus.fingerprint(), dm.tokenizer_fingerprint, dm.vocab_size)


def _eot(dm: TextDataModule) -> int:
    return dm.tokenizer.token_to_id("<|endoftext|>")


def test_manifest_describes_the_shards(good_cache: Path) -> None:
    path = token_file(good_cache)
    manifest = tc.read_manifest(path.parent)
    data = path.read_bytes()
    tokens = tc.open_token_cache(path.parent)[:]
    dm = TextDataModule(cache_dir=str(good_cache), tokenizer_vocab_size=VOCAB)
    (shard,) = manifest.shards
    assert manifest == tc.TokenCacheManifest(
        format=tc.RECORD_FORMAT,
        dtype="uint16",
        vocab_size=VOCAB,
        n_tokens=len(data) // 2,
        n_documents=int((tokens.to(torch.int32) == _eot(dm)).sum()),
        max_id=int(tokens.to(torch.int32).max()),
        corpus_fingerprint=dm.corpus.fingerprint(),
        tokenizer_fingerprint=dm.tokenizer_fingerprint,
        sha256=hashlib.sha256(data).hexdigest(),
        shards=[
            tc.ShardRecord(
                "00000.bin",
                len(data) // 2,
                hashlib.sha256(data).hexdigest(),
                shard.sample_sha256,
            )
        ],
    )
    assert manifest.n_documents == sum(1 for _ in dm.corpus.documents())
    assert tc.cache_problem(path.parent, _key(good_cache)) is None
    assert tc.cache_problem(path.parent, _key(good_cache), full=False) is None


@pytest.mark.parametrize(
    "damage,reason",
    [
        (
            "grown",
            "shard 00000.bin is 2 bytes longer than the manifest says ({grown:,} bytes, expected {size:,})",
        ),
        (
            "one-valid-id-changed",
            "shard 00000.bin has bytes whose SHA-256 differs from the one the manifest holds",
        ),
        ("shard-deleted", "is missing shard 00000.bin of its 1"),
        (
            "manifest-not-json",
            "has an unreadable manifest manifest.json (Expecting value: line 1 column 1 (char 0))",
        ),
        (
            "manifest-field-missing",
            "has an unreadable manifest manifest.json (missing field(s) sha256)",
        ),
        (
            "manifest-shard-field",
            "has an unreadable manifest manifest.json (a shard entry: field 'n_tokens' is '12', expected int)",
        ),
        (
            "manifest-format",
            f"has a manifest of format 99, but this version reads format {tc.RECORD_FORMAT}",
        ),
        (
            "manifest-vocab",
            f"has a manifest for uint16 ids of a 512-token vocabulary, expected uint16 ids of {VOCAB}",
        ),
        (
            "manifest-tokenizer",
            "has a manifest made for another tokenizer (fingerprint ffffffffffff..., expected",
        ),
        (
            "manifest-count",
            "has a manifest whose 1 shard hold {tokens:,} tokens, not its {more:,}",
        ),
    ],
)
def test_each_problem_is_named(cache: Path, damage: str, reason: str) -> None:
    path, manifest = token_file(cache), manifest_of(token_file(cache))
    size = path.stat().st_size
    fields = json.loads(manifest.read_text())
    if damage == "grown":
        path.write_bytes(path.read_bytes() + b"\0\0")
    elif damage == "one-valid-id-changed":
        data = bytearray(path.read_bytes())
        data[size // 4 * 2] ^= 1  # the low byte of a token: n <-> n ^ 1, still below 300
        path.write_bytes(bytes(data))
    elif damage == "shard-deleted":
        path.unlink()
    elif damage == "manifest-not-json":
        manifest.write_text("")
    elif damage == "manifest-field-missing":
        del fields["sha256"]
        manifest.write_text(json.dumps(fields))
    elif damage == "manifest-shard-field":
        fields["shards"][0]["n_tokens"] = "12"
        manifest.write_text(json.dumps(fields))
    else:
        field, value = {
            "manifest-format": ("format", 99),
            "manifest-vocab": ("vocab_size", 512),
            "manifest-tokenizer": ("tokenizer_fingerprint", "f" * 64),
            "manifest-count": ("n_tokens", size // 2 + 1),
        }[damage]
        manifest.write_text(json.dumps({**fields, field: value}))
    problem = tc.cache_problem(path.parent, _key(cache))
    assert problem is not None and problem.startswith(
        reason.format(size=size, grown=size + 2, tokens=size // 2, more=size // 2 + 1)
    )


def _rebuild(cache: Path, monkeypatch: pytest.MonkeyPatch, shard_tokens: int) -> tuple[Path, tc.CacheKey]:
    """Build the cache again in place with `shard_tokens` ids per shard."""
    monkeypatch.setattr(tc, "SHARD_TOKENS", shard_tokens)
    folder, key = token_folder(cache), _key(cache)
    shutil.rmtree(folder)
    dm = TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB)
    tc.build_token_cache(dm.corpus, dm.tokenizer, _eot(dm), folder, key)
    return folder, key


def test_several_shards_hold_the_one_stream(good_cache: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards end at their token count, inside a document if need be; read back, they are the stream
    the one-shard cache holds, and a damaged middle shard is named."""
    whole = token_file(good_cache).read_bytes()
    shard_tokens = len(whole) // 2 // 3 - 5  # 4 shards, the last one short
    folder, key = _rebuild(cache, monkeypatch, shard_tokens)
    manifest = tc.read_manifest(folder)
    assert [s.name for s in manifest.shards] == [
        "00000.bin",
        "00001.bin",
        "00002.bin",
        "00003.bin",
    ]
    assert [s.n_tokens for s in manifest.shards[:3]] == [shard_tokens] * 3
    assert b"".join((folder / s.name).read_bytes() for s in manifest.shards) == whole
    assert manifest.sha256 == hashlib.sha256(whole).hexdigest()
    stream = tc.open_token_cache(folder)
    assert torch.equal(
        stream[shard_tokens - 3 : shard_tokens + 4],
        torch.frombuffer(bytearray(whole), dtype=torch.uint16)[shard_tokens - 3 : shard_tokens + 4],
    )
    assert tc.cache_problem(folder, key) is None

    _one_byte_short(folder / "00001.bin")
    assert tc.cache_problem(folder, key).startswith("shard 00001.bin is 1 byte shorter than the manifest says")
    (folder / "00001.bin").write_bytes(
        whole[4 * shard_tokens : 6 * shard_tokens]
    )  # the next shard: right size, wrong ids
    assert (
        tc.cache_problem(folder, key)
        == "shard 00001.bin has bytes whose SHA-256 differs from the one the manifest holds"
    )


def test_large_caches_check_a_sample(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the size limit only the sample is hashed: a shard overwritten is caught, one id changed
    between samples is not (unless asked to check every byte)."""
    monkeypatch.setattr(ci, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(ci, "SAMPLE_BLOCK_BYTES", 64)
    size = token_file(cache).stat().st_size
    folder, key = _rebuild(cache, monkeypatch, size)  # one shard
    path = folder / "00000.bin"
    monkeypatch.setattr(ci, "FULL_CHECK_MAX_BYTES", size - 1)
    offsets = ci._sample_offsets(size, 2, ci.sample_blocks_per_shard(1))
    assert len(offsets) == 4 and offsets[-1] + 64 > size - 4 and offsets[0] == 0
    assert tc.cache_problem(folder, key) is None

    data = bytearray(path.read_bytes())
    between = offsets[1] // 2
    assert not any(start <= between < start + 64 for start in offsets)
    data[between] ^= 1
    path.write_bytes(bytes(data))
    assert tc.cache_problem(folder, key) is None
    assert (
        tc.cache_problem(folder, key, full=True)
        == "shard 00000.bin has bytes whose SHA-256 differs from the one the manifest holds"
    )

    _all_ff(path)
    assert tc.cache_problem(folder, key) == _reason("all-0xff", size)
    path.write_bytes(b"\0" * size)
    assert (
        tc.cache_problem(folder, key)
        == "shard 00000.bin has 4 sampled blocks whose SHA-256 differs from the one the manifest holds"
    )


def test_the_sample_is_shared_among_shards(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many shards do not multiply the bytes read on open: `SAMPLE_BLOCKS` in all, one per shard at least."""
    monkeypatch.setattr(ci, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(ci, "SAMPLE_BLOCK_BYTES", 64)
    monkeypatch.setattr(ci, "FULL_CHECK_MAX_BYTES", 0)
    size = token_file(cache).stat().st_size
    folder, key = _rebuild(cache, monkeypatch, size // 2 // 8 + 1)  # 8 shards
    assert len(tc.read_manifest(folder).shards) == 8 and ci.sample_blocks_per_shard(8) == 1
    assert tc.cache_problem(folder, key) is None
    _all_ff(folder / "00005.bin")
    assert tc.cache_problem(folder, key).startswith("shard 00005.bin holds token id 65,535")


def test_full_check_streams_through_a_small_buffer(good_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ci, "_READ_BYTES", 1000)
    path = token_file(good_cache)
    ranges = ci._ranges(path.stat().st_size, 2, sampled=False)
    assert max(length for _, length in ranges) == 1000 and sum(length for _, length in ranges) == path.stat().st_size
    with open(path, "rb") as f:
        assert ci._sha256(f, ranges) == hashlib.sha256(path.read_bytes()).hexdigest()
        assert ci._max_id(f, ranges, torch.uint16) == tc.read_manifest(path.parent).max_id


def test_the_cache_folder_appears_complete(tmp_path: Path, good_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers on other ranks or nodes never find a cache folder whose manifest or shards are not all
    there: it is built under a temp name beside its place and renamed into place in one step."""
    published: list[tuple[str, list[str]]] = []
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        assert Path(src).parent == Path(dst).parent, "temp folders live next to their destination"
        published.append((Path(dst).name, sorted(p.name for p in Path(src).iterdir())))
        real_rename(src, dst)

    monkeypatch.setattr(tc.os, "rename", rename)
    dm = TextDataModule(cache_dir=str(good_cache), tokenizer_vocab_size=VOCAB)
    path = tmp_path / token_folder(good_cache).name
    tc.build_token_cache(dm.corpus, dm.tokenizer, _eot(dm), path, _key(good_cache))
    assert published == [(path.name, ["00000.bin", "document_ends.i64", "document_ends.json", "manifest.json"])]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert (path / "00000.bin").read_bytes() == token_file(good_cache).read_bytes()


def test_a_good_cache_published_first_is_kept(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builders of one cache (two nodes on shared storage): the second keeps the first's folder,
    whose shards may be mapped already, instead of replacing it."""
    folder, key = token_folder(cache), _key(cache)
    inode = (folder / "00000.bin").stat().st_ino
    dm = TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB)
    tc.build_token_cache(dm.corpus, dm.tokenizer, _eot(dm), folder, key)
    assert (folder / "00000.bin").stat().st_ino == inode
    assert [p.name for p in cache.iterdir() if p.name.startswith("tokens-")] == [folder.name], "no temp folder left"


def test_data_module_rebuilds_once_and_says_why(
    cache: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = token_file(cache)
    good = path.read_bytes()
    _one_byte_short(path)
    checks: list[Path] = []
    real_check = ci.cache_problem
    monkeypatch.setattr(
        ci,
        "cache_problem",
        lambda p, key, full=None: checks.append(p) or real_check(p, key, full),
    )

    dm = TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB, seq_len=32)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup("fit")
    rebuilds = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert rebuilds == [
        (
            f"TextDataModule: token cache {path.parent} shard 00000.bin is 1 byte shorter than the manifest says "
            f"({len(good) - 1:,} bytes, expected {len(good):,}); rebuilding"
        )
    ]
    assert path.read_bytes() == good
    assert checks == [path.parent] * 3, (
        "checked before the rebuild, on publishing over the bad one, and after; not in setup"
    )

    # A second process finds the rebuilt cache good and uses it as is.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB, seq_len=32).prepare_data()
    assert [r.getMessage() for r in caplog.records][-1] == f"TextDataModule: using cached tokens {path.parent}"


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncated", "damaged ("),
        ("without-eot", "has no '<|endoftext|>' token"),
    ],
)
def test_a_damaged_cached_tokenizer_is_trained_again(
    cache: Path, damage: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    (path,) = cache.glob("tokenizer-*.json")
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.write_text(good.decode().replace("<|endoftext|>", "<|end|>"))

    dm = TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB, seq_len=32)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    messages = [r.getMessage() for r in caplog.records]
    retrained = [m for m in messages if "training it again" in m]
    assert len(retrained) == 1 and retrained[0].startswith(f"TextDataModule: cached tokenizer {path} is damaged")
    assert reason in retrained[0]
    # Training is deterministic: the same file comes back, so the token cache made with it stays good.
    assert path.read_bytes() == good
    assert f"TextDataModule: using cached tokens {token_folder(cache)}" in messages
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_a_rebuild_that_does_not_stick_is_an_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = token_file(cache)
    _empty(path)
    real_build = tc.build_token_cache

    def build_then_lose_a_byte(*args: object, **kwargs: object) -> tc.TokenCacheManifest:
        record = real_build(*args, **kwargs)  # type: ignore[arg-type]
        _one_byte_short(path)
        return record

    monkeypatch.setattr(tc, "build_token_cache", build_then_lose_a_byte)
    with pytest.raises(
        RuntimeError,
        match=(
            rf"^data: token cache {re.escape(str(path.parent))} shard 00000\.bin is 1 byte shorter than the manifest says .* right "
            r"after it was written, so its "
            r"folder does not keep what is written there .*; move the cache with --data\.cache_dir=<another folder>$"
        ),
    ):
        TextDataModule(cache_dir=str(cache), tokenizer_vocab_size=VOCAB).prepare_data()


def test_unwritable_cache_folder_when_only_the_tokens_are_missing(good_cache: Path, tmp_path: Path) -> None:
    """With a given tokenizer nothing is trained; building the token cache meets the folder first."""
    (tokenizer,) = good_cache.glob("tokenizer-*.json")
    blocker = tmp_path / "file"
    blocker.write_text("")
    dm = TextDataModule(cache_dir=str(blocker / "sub"), tokenizer=str(tokenizer))
    with pytest.raises(
        OSError,
        match=rf"^data: cannot write to the cache folder {re.escape(str(blocker / 'sub'))} \(a part of that "
        r"path is a file, not a folder\); .* --data\.cache_dir=<a writable folder>$",
    ):
        dm.prepare_data()
    with pytest.raises(
        OSError,
        match=rf"cache folder {re.escape(str(blocker))} \(it is a file, not a folder\)",
    ):
        TextDataModule(cache_dir=str(blocker), tokenizer=str(tokenizer)).prepare_data()


def test_empty_corpus_lists_the_files_it_read(tmp_path: Path) -> None:
    names = [f"part{i}.txt" for i in range(5)]
    for name in names:
        (tmp_path / name).write_text("")
    listed = re.escape(", ".join(str(tmp_path / name) for name in names))
    dm = TextDataModule(
        files=str(tmp_path / "*.txt"),
        cache_dir=str(tmp_path / "cache"),
        tokenizer_vocab_size=VOCAB,
    )
    with pytest.raises(ValueError, match=rf"the corpus is empty: 5 file\(s\): {listed} gave no text"):
        dm.prepare_data()


def test_permission_denied_names_the_folder_and_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-only folder case in process, where root cannot make one: the write probe is refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tc.tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(
        tk,
        "train_bpe_tokenizer",
        lambda *a, **k: pytest.fail("trained before the folder was probed"),
    )
    dm = TextDataModule(cache_dir=str(tmp_path / "cache"), tokenizer_vocab_size=VOCAB)
    with pytest.raises(
        OSError,
        match=rf"^data: cannot write to the cache folder {re.escape(str(tmp_path / 'cache'))} "
        r"\(Permission denied\); make it writable or move the cache with "
        r"--data\.cache_dir=<a writable folder>$",
    ):
        _ = dm.vocab_size  # trains the tokenizer, whose file is the first thing the cache folder gets
