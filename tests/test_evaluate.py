"""`moda eval`: a trained checkpoint scores text exactly as its model does, and every bad input is
one error before any scoring."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from moda_lightning import evaluate as ev
from moda_lightning.checkpoint import add_checksum
from moda_lightning.cli import main
from moda_lightning.data.tokenizer import EOT
from moda_lightning.lightning_module import MoDALightningModule
from tests.test_cli import TINY, moda_command

TRAINED_SEQ_LEN = 32  # TINY's --data.seq_len, and the model's max_seq_len

# Prose, code and text outside ASCII, so that bytes and characters differ and the BPE splits unevenly.
TEXT = (
    "The while statement is used for repeated execution as long as an expression is true:\n\n"
    "    while x < 10:\n        x += 1\n\n"
    "Naïve café owners in Zürich serve crème brûlée — and 東京 has ramen 🍜.\n"
)
DOCUMENTS = [
    "A try statement specifies exception handlers and/or cleanup code for a group of statements.",
    "Ω ≈ 3.14; the for statement iterates over the elements of a sequence (such as a string, tuple or list).",
    "def f(x):\n    return x * 2  # doubled\n",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny model trained two steps on the built-in corpus: one checkpoint for every test here."""
    root = tmp_path_factory.mktemp("trained")
    main(
        [
            "fit", *TINY,
            f"--data.cache_dir={root / 'cache'}",
            f"--trainer.logger.init_args.save_dir={root / 'runs'}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    return next((root / "runs").rglob("last.ckpt"))


def direct_score(ckpt_path: Path, documents: list[str], seq_len: int) -> tuple[float, int]:
    """Mean NLL and token count from the LightningModule itself, one unpadded window at a time: end-of-text,
    then each document and its end-of-text, cut into windows of seq_len + 1 tokens with stride seq_len."""
    checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    tokenizer = Tokenizer.from_str(checkpoint["TextDataModule"]["tokenizer_json"])
    module = MoDALightningModule.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    eot = tokenizer.token_to_id(EOT)
    stream = [eot]
    for doc in documents:
        stream += tokenizer.encode(doc, add_special_tokens=False).ids + [eot]
    tokens = torch.tensor(stream)
    total, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, seq_len):
            window = tokens[start : start + seq_len + 1]
            logits = module(window[None, :-1])
            total += float(F.cross_entropy(logits[0].float(), window[1:], reduction="sum"))
            predicted += len(window) - 1
    assert predicted == len(tokens) - 1  # every token after the leading end-of-text, once
    return total / predicted, predicted


def test_a_text_file_scores_as_the_model_does_on_the_same_windows(ckpt, tmp_path, capsys):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "scores.json"
    main(["eval", "--ckpt_path", str(ckpt), "--files", str(text_file), "--seq_len", "16", "--batch_size", "3",
          "--device", "cpu", "--json", str(out)])  # fmt: skip
    scores = json.loads(out.read_text())

    loss, tokens = direct_score(ckpt, [TEXT], seq_len=16)
    assert tokens % 16, "the text should end in a partial window, which must be scored too"
    assert scores["tokens"] == tokens and scores["windows"] == math.ceil(tokens / 16)
    assert scores["loss"] == pytest.approx(loss, abs=1e-5)
    assert scores["bytes"] == len(TEXT.encode("utf-8")) > len(TEXT)
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] * tokens / math.log(2) / scores["bytes"], rel=1e-12)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-12)
    assert scores["documents"] == 1 and scores["files"] == [str(text_file.resolve())]
    assert scores["seq_len"] == 16 and scores["attention"] == "moda_torch" and scores["device"] == "cpu"
    printed = capsys.readouterr().out
    assert f"loss              {scores['loss']:.4f} nats/token" in printed
    assert f"bits per byte     {scores['bits_per_byte']:.4f}" in printed
    assert f"{tokens:,} tokens, {scores['bytes']:,} bytes" in printed


def test_jsonl_documents_are_read_from_the_text_field(ckpt, tmp_path):
    lines = [{"body": doc, "id": i} for i, doc in enumerate(DOCUMENTS)] + [{"body": "", "id": 9}]  # empty: skipped
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    result = ev.evaluate(ckpt, [str(tmp_path / "*.jsonl")], text_field="body", device="cpu")

    loss, tokens = direct_score(ckpt, DOCUMENTS, seq_len=TRAINED_SEQ_LEN)
    assert result.seq_len == TRAINED_SEQ_LEN  # the checkpoint's training seq_len by default
    assert result.documents == len(DOCUMENTS) and result.tokens == tokens
    assert result.bytes == sum(len(doc.encode("utf-8")) for doc in DOCUMENTS)
    assert result.loss == pytest.approx(loss, abs=1e-5)


def _rewritten(ckpt: Path, target: Path, change) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True, map_location="cpu")
    change(checkpoint)
    torch.save(checkpoint, target)
    return target


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the fused backend runs as trained")
def test_a_moda_triton_checkpoint_is_scored_on_cpu_with_moda_torch(ckpt, tmp_path):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    faked = _rewritten(ckpt, tmp_path / "triton.ckpt", lambda c: c["hyper_parameters"].update(attention="moda_triton"))
    notes: list[str] = []
    switched = ev.evaluate(faked, str(text_file), device="cpu", say=notes.append)
    as_trained = ev.evaluate(ckpt, str(text_file), device="cpu", say=notes.append)

    assert len(notes) == 1 and "attention=moda_triton" in notes[0] and "moda_torch" in notes[0]
    assert "\n" not in notes[0]
    assert switched.attention == "moda_torch" and switched.loss == as_trained.loss


def test_a_compiled_runs_checkpoint_loads_without_its_wrapper_prefix(ckpt, tmp_path):
    def as_compiled(checkpoint):
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key.replace("model.", "model._orig_mod.", 1): value for key, value in state.items()}
        add_checksum(checkpoint)  # the checksum covers key names: a compiled run writes its own

    text_file = tmp_path / "held_out.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    compiled = _rewritten(ckpt, tmp_path / "compiled.ckpt", as_compiled)
    assert ev.evaluate(compiled, str(text_file), device="cpu").loss == ev.evaluate(ckpt, str(text_file), device="cpu").loss


def _truncated(ckpt: Path, tmp_path: Path) -> Path:
    target = tmp_path / "truncated.ckpt"
    target.write_bytes(ckpt.read_bytes()[:4096])
    return target


def _corrupted(ckpt: Path, tmp_path: Path) -> Path:
    def flip(checkpoint):
        checkpoint["state_dict"]["model.embed.weight"][0, 0] += 1.0  # saved without a new checksum

    return _rewritten(ckpt, tmp_path / "corrupted.ckpt", flip)


BAD_INPUTS = {
    # name: (arguments after the checkpoint's, a checkpoint of one's own or None, the message)
    "missing-checkpoint": ([], lambda c, t: t / "missing.ckpt", r"--ckpt_path \S+missing\.ckpt does not exist"),
    "truncated-checkpoint": ([], _truncated, r"is truncated .* use an earlier checkpoint"),
    "corrupted-checkpoint": ([], _corrupted, r"is corrupted: its weights .* no longer match the checksum"),
    "no-file-matches": (["--files", "{tmp}/*.nothing"], None, r"the glob '\S+\*\.nothing' matches no files"),
    "empty-text": (["--files", "{tmp}/empty.txt"], None, r"the corpus is empty: .*empty\.txt.* in --files"),
    "seq-len-too-long": (["--seq_len", "33"], None, r"--seq_len 33 is longer than the model's max_seq_len=32"),
    "unknown-text-field": (["--files", "{tmp}/docs.jsonl", "--text_field", "body"], None, r"no 'body' field .*--text_field"),
    "cuda-absent": (["--device", "cuda"], None, r"--device cuda was asked for, but torch sees no CUDA GPU"),
    "zero-batch-size": (["--batch_size", "0"], None, r"--batch_size 0 is not a positive number"),
    "json-folder-missing": (["--json", "{tmp}/no/such/folder/out.json"], None, r"--json .* does not exist"),
    "misspelt-flag": (["--seqlen", "8"], None, r"unrecognized arguments: --seqlen 8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_is_one_error_before_any_scoring(ckpt, tmp_path, monkeypatch, case):
    if case == "cuda-absent" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra, own_ckpt, message = BAD_INPUTS[case]
    (tmp_path / "held_out.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT}) + "\n", encoding="utf-8")

    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring started before the input was checked")

    monkeypatch.setattr(ev, "score_stream", no_scoring)
    ckpt_path = own_ckpt(ckpt, tmp_path) if own_ckpt else ckpt
    args = ["--ckpt_path", str(ckpt_path), "--files", str(tmp_path / "held_out.txt")]
    args += [arg.format(tmp=tmp_path) for arg in extra]  # a later --files replaces the first
    with pytest.raises(ValueError, match=message) as raised:
        main(["eval", *args])
    assert "\n" not in str(raised.value)


def test_from_the_shell_a_bad_input_is_one_line_and_status_2(tmp_path):
    (tmp_path / "held_out.txt").write_text(TEXT, encoding="utf-8")
    cmd = [*moda_command(), "eval", "--ckpt_path", "missing.ckpt", "--files", "held_out.txt"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("moda: error: --ckpt_path missing.ckpt does not exist"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
