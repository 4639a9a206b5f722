"""The document formats of --data.files: every format gives the same documents, text files in pieces
give the ids of the whole, and memory stays bounded whatever the size of a file.

The optional formats (zstandard, parquet) are skipped where their package is not installed; their
one-line "install the data extra" error is checked with the package hidden.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moda_lightning.data import (
    Corpus,
    TextDataModule,
    builtin_documents,
    readers,
    train_bpe_tokenizer,
)
from moda_lightning.data.encode_pool import TextBatch, encode_in_order
from moda_lightning.data.readers import Piece

DOCS = ["First document.\nIt has two lines.", "Second: café — 世界 ✓", "third " * 50]


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    lines = "".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(docs))
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode()))
    elif path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines, encoding="utf-8")


def _write_parquet(path: Path, docs: list[str], rows_per_group: int = 2) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": docs, "id": list(range(len(docs)))}),
        path,
        row_group_size=rows_per_group,
    )


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet"])
def test_each_format_gives_the_documents(tmp_path: Path, name: str) -> None:
    if name.endswith(".zst"):
        pytest.importorskip("zstandard")
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
        _write_parquet(tmp_path / name, [*DOCS[:2], None, "", DOCS[2]])  # type: ignore[list-item]
    else:
        _write_jsonl(tmp_path / name, DOCS)
    assert list(Corpus(str(tmp_path / name)).documents()) == DOCS


def test_a_long_text_file_comes_in_pieces_with_the_ids_of_the_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .txt file is one document, read a few KB at a time here; the pieces end before a space or
    after a line break, where the byte-level BPE ends a pre-token anyway, so their ids are the
    document's."""
    monkeypatch.setattr(readers, "TEXT_PIECE_BYTES", 4096)
    text = "\n\n".join(builtin_documents()[:12])
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    pieces = list(Corpus(str(tmp_path / "book.txt")).pieces())
    assert (
        len(pieces) >= len(text.encode()) // 4096 - 1
        and [p.ends_document for p in pieces].count(True) == 1
        and pieces[-1].ends_document
    )
    assert "".join(p.text for p in pieces) == text
    tokenizer = train_bpe_tokenizer(builtin_documents(), 1024, show_progress=False)
    eot = tokenizer.token_to_id("<|endoftext|>")
    whole = next(encode_in_order([TextBatch([text], [True])], tokenizer, eot, "H", 1))
    batch = TextBatch([p.text for p in pieces], [p.ends_document for p in pieces])
    assert next(encode_in_order([batch], tokenizer, eot, "H", 1)) == whole


def test_safe_cut_points() -> None:
    assert readers.safe_cut("one two") == 3
    assert readers.safe_cut("line\nnext") == 5
    assert readers.safe_cut("end  of") == 0, "two spaces: the GPT-2 pre-tokenizer splits them differently"
    assert readers.safe_cut("no_cut_point_at_all") == 0


def test_a_file_without_cut_points_is_still_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "TEXT_PIECE_BYTES", 1000)
    monkeypatch.setattr(readers, "MAX_PIECE_CHARS", 3000)
    (tmp_path / "one_word.txt").write_text("x" * 10_000)
    pieces = list(readers.read_text(tmp_path / "one_word.txt"))
    assert max(len(p.text) for p in pieces) <= 3000 and "".join(p.text for p in pieces) == "x" * 10_000


def test_not_utf8_inside_a_compressed_file_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(
        ValueError,
        match=r"cannot read '.*docs\.jsonl\.gz': it is not UTF-8 text \(invalid continuation byte at byte 30\)",
    ):
        list(Corpus(str(path)).documents())


def test_a_truncated_gzip_file_fails_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    _write_jsonl(path, DOCS * 50)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(
        ValueError,
        match=r"^data: cannot read '.*docs\.jsonl\.gz' \(.*\); fix or replace the file",
    ):
        list(Corpus(str(path)).documents())


@pytest.mark.parametrize("name,package", [("docs.jsonl.zst", "zstandard"), ("docs.parquet", "pyarrow")])
def test_a_missing_optional_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, package: str
) -> None:
    (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if it were not installed
    with pytest.raises(
        ValueError,
        match=rf"^data: reading '.*{name}' needs the {package} package, which is not installed; "
        r"install the data extra \(pip install 'moda-lightning\[data\]'\)",
    ):
        TextDataModule(files=str(tmp_path / name))


def test_parquet_without_the_column(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    _write_parquet(tmp_path / "docs.parquet", DOCS)
    with pytest.raises(
        ValueError,
        match=r"has no 'body' column \(found: \['text', 'id'\]\); set --data\.text_field",
    ):
        list(Corpus(str(tmp_path / "docs.parquet"), text_field="body").documents())


def test_pieces_of_empty_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("text")
    assert list(Corpus(str(tmp_path / "*.txt")).pieces()) == [Piece("text")]


# --- memory -------------------------------------------------------------------------------------

CAP_MB = 24
"""Growth of peak memory allowed while a file of 4x this size is tokenized."""

_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from moda_lightning.data import readers, token_cache as tc
    from moda_lightning.data.corpus import Corpus

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def restart_peak():
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current size
        return status("VmRSS")

    path, out = Path(sys.argv[1]), Path(sys.argv[2])
    # A word-level tokenizer: fast, so the test is about the pipeline's memory, not BPE speed.
    tokenizer = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = Corpus(str(path))
    # Small batches and pieces: the tokenizer's working set is some 20x a text's size, and that, not
    # the file's size, is what the cap has room for.
    tc.ENCODE_BATCH_CHARS, readers.TEXT_PIECE_BYTES = 250_000, 250_000
    # The tokenizer's first batches set up its threads and their allocator arenas (~50-70 MB, once,
    # whatever the input's size): paid before the measurement.
    warm = " ".join(["abcdefghijklmnopqrstuvwxyz0123456789" * 3] * 2_500)
    for _ in range(3):
        tokenizer.encode_batch_fast([warm, warm], add_special_tokens=False)

    before = restart_peak()
    key = tc.CacheKey(corpus.fingerprint(), "word-level", 2)
    n_tokens = tc.build_token_cache(corpus, tokenizer, 0, out, key, show_progress=False).n_tokens
    streamed = status("VmHWM") - before
    before = restart_peak()
    whole = len(path.read_bytes())  # the control: what reading the file at once costs
    control = status("VmHWM") - before
    print(json.dumps({"streamed": streamed, "control": control, "n_tokens": n_tokens, "bytes": whole}))
    """
)


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux /proc to measure peak memory",
)
@pytest.mark.parametrize("name", ["big.txt", "big.jsonl.gz"])
def test_a_file_four_times_the_cap_is_tokenized_within_it(tmp_path: Path, name: str) -> None:
    """Peak memory (VmHWM, in a child process) grows by less than the cap while a file of 4x the cap
    is tokenized; reading the same file whole, the control, grows by more, so the meter can fail."""
    word = "abcdefghijklmnopqrstuvwxyz0123456789" * 3
    line = " ".join([word] * 100)  # ~11 KB, 100 tokens
    lines = 4 * CAP_MB * 2**20 // (len(line) + 1) + 1
    path = tmp_path / name
    if name.endswith(".gz"):
        record = json.dumps({"text": line}) + "\n"
        with gzip.open(path, "wt", compresslevel=1) as f:
            f.writelines(record for _ in range(lines))
        size = lines * len(record)
        expected_tokens = lines * 101  # each line's words and its end-of-text
    else:
        with open(path, "w") as f:
            f.writelines(line + "\n" for _ in range(lines))
        size = path.stat().st_size
        expected_tokens = lines * 100 + 1
    assert size > 4 * CAP_MB * 2**20
    command = [sys.executable, "-c", _CHILD, str(path), str(tmp_path / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["n_tokens"] == expected_tokens
    assert measured["streamed"] < CAP_MB * 2**20, f"peak memory grew by {measured['streamed'] / 2**20:.1f} MB"
    if name.endswith(".txt"):  # a compressed file is smaller on disk than the cap
        assert measured["control"] > CAP_MB * 2**20, "the meter did not see a whole file read"
