"""A bad ``--ckpt_path`` is refused before training, in one line naming the file and the fix: files
that are not checkpoints, damaged bytes (the checksum written at save), NaN weights, flags the
checkpoint would silently replace, and another tokenizer.

The cases run against ``moda_lightning.checkpoint`` in-process on one real tiny checkpoint; the
last tests run each case once through the ``moda`` command (exit status 2, one line, no run folder).
"""

from __future__ import annotations

import logging
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from moda_lightning.checkpoint import (
    CHECKSUM_KEY,
    add_checksum,
    check_checkpoint_file,
    check_resume,
    checkpoint_checksum,
    explicit_flags_from_argv,
)
from moda_lightning.cli import main
from moda_lightning.data import TextDataModule
from moda_lightning.lightning_module import MoDALightningModule

MODEL = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)
TINY = [
    *(f"--model.{key}={value}" for key, value in MODEL.items()),
    "--data.tokenizer_vocab_size=300", "--data.seq_len=32", "--data.batch_size=4",
    "--trainer.limit_val_batches=2", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The folder of a 2-step run: ``checkpoints/last.ckpt``, another checkpoint beside it, ``cache/``."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        main(["fit", *TINY, f"--data.cache_dir={root / 'cache'}", "--trainer.max_steps=2",
              "--trainer.val_check_interval=1"])  # fmt: skip
    run_dir = next((root / "runs").rglob("checkpoints")).parent
    shutil.move(run_dir / "checkpoints", root / "checkpoints")
    shutil.rmtree(root / "runs")
    return root


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run's checkpoints and cache that a test may damage."""
    shutil.copytree(trained / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "cache").symlink_to(trained / "cache")
    return tmp_path


def _modules(run: Path, vocab: int = 300, **model_args: object) -> tuple[MoDALightningModule, TextDataModule]:
    datamodule = TextDataModule(tokenizer_vocab_size=vocab, seq_len=32, batch_size=4, cache_dir=str(run / "cache"))
    model = MoDALightningModule(vocab_size=datamodule.vocab_size, **{**MODEL, **model_args})
    return model, datamodule


def _flip_bytes(path: Path, n: int = 4096) -> None:
    """Invert ``n`` bytes in the middle of the largest tensor's data in the checkpoint's zip archive."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])
    middle = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2 - n // 2
    raw[middle : middle + n] = bytes(b ^ 0xFF for b in raw[middle : middle + n])
    path.write_bytes(bytes(raw))


def _resave(path: Path, edit, checksum: bool) -> None:
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    checkpoint.pop(CHECKSUM_KEY)
    edit(checkpoint)
    if checksum:
        add_checksum(checkpoint)
    torch.save(checkpoint, path)


def _set_nan(checkpoint: dict) -> None:
    checkpoint["state_dict"]["model.layers.1.attn.sublayer.o_proj.weight"][3, 5] = float("nan")


# --- in-process: the checks themselves ----------------------------------------------------------------


def test_a_good_checkpoint_passes_and_carries_its_checksum(run, caplog):
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True, map_location="cpu", mmap=True)
    assert checkpoint[CHECKSUM_KEY]["algorithm"] == "sha256"
    assert checkpoint[CHECKSUM_KEY]["digest"] == checkpoint_checksum(checkpoint)
    # Flags that agree (a YAML string like 3e-3 included) and data flags, which take effect, pass.
    agreeing = {"model.d_model": 32, "model.lr": "3e-3", "model.betas": [0.9, 0.95], "data.seq_len": 16}
    with caplog.at_level(logging.INFO):
        check_resume(last, *_modules(run), agreeing)
    assert "checksum" not in caplog.text


def test_flipped_bytes_are_refused_by_the_checksum(run):
    last = run / "checkpoints" / "last.ckpt"
    _flip_bytes(last)
    torch.load(last, weights_only=True, map_location="cpu")  # still loads: only the checksum finds it
    with pytest.raises(ValueError) as refused:
        check_resume(last, *_modules(run), {})
    assert str(refused.value).startswith(f"--ckpt_path {last} is corrupted: its weights or optimizer state")
    others = [p.name for p in (run / "checkpoints").glob("step*.ckpt")]
    assert f"re-run from an earlier checkpoint in {run / 'checkpoints'} ({others[0]})" in str(refused.value)


@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "without-checksum"])
def test_nan_weights_are_refused(run, caplog, checksum):
    last = run / "checkpoints" / "last.ckpt"
    _resave(last, _set_nan, checksum=checksum)
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as refused:
        check_resume(last, *_modules(run), {})
    assert str(refused.value).startswith(
        f"--ckpt_path {last} holds NaN or inf values (weight model.layers.1.attn.sublayer.o_proj.weight): "
        f"training had diverged before it was saved; re-run from an earlier checkpoint in {run / 'checkpoints'}"
    )
    assert ("has no checksum" in caplog.text) is not checksum


def test_inf_in_the_optimizer_state_is_refused(run):
    last = run / "checkpoints" / "last.ckpt"
    def set_inf(checkpoint: dict) -> None:
        checkpoint["optimizer_states"][0]["state"][2]["exp_avg_sq"].view(-1)[0] = float("inf")

    _resave(last, set_inf, checksum=True)
    with pytest.raises(ValueError, match=r"holds NaN or inf values \(optimizer_states\[0\]\.state\.2\.exp_avg_sq\)"):
        check_resume(last, *_modules(run), {})


def test_a_checkpoint_without_checksum_is_checked_for_finite_weights_and_says_so(run, caplog):
    last = run / "checkpoints" / "last.ckpt"
    _resave(last, lambda ckpt: None, checksum=False)
    with caplog.at_level(logging.INFO):
        check_resume(last, *_modules(run), {})
    assert f"checkpoint: {last} has no checksum" in caplog.text and "checked only for finite weights" in caplog.text


def _make_bad_file(run: Path, kind: str) -> Path:
    last = run / "checkpoints" / "last.ckpt"
    path = run / "checkpoints" / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif kind == "text":
        path.write_text("step 100: loss 3.2\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "python-object":
        torch.save({"state_dict": {}, "sampler": logging.Formatter()}, path)
    elif kind == "empty":
        path.touch()
    elif kind == "weights-only":  # as ModelCheckpoint(save_weights_only=True) writes it, checksum included
        shutil.copy(last, path)
        _resave(path, lambda ckpt: [ckpt.pop(k) for k in ("optimizer_states", "lr_schedulers")], checksum=True)
    elif kind == "directory":
        path = run / "checkpoints"
    elif kind == "missing":
        path = run / "checkpoints" / "nope.ckpt"
    return path


TRAIN_AFRESH = r"re-run from an earlier checkpoint in {folder} \(.*\), or leave out --ckpt_path to start a new run\.$"
BAD_FILES = {
    "missing": r"^--ckpt_path {path} does not exist; pass the path of a \.ckpt file, e\.g\. "
               r"runs/<config>/<attention>-<norm>/version_N/checkpoints/last\.ckpt, or leave out --ckpt_path",
    "directory": r"^--ckpt_path {path} is a directory \(it holds 2: last\.ckpt, step.*\.ckpt\); "
                 r"pass one checkpoint file, e\.g\. --ckpt_path={path}/last\.ckpt\.$",
    "truncated": r"^--ckpt_path {path} is truncated \([\d,]+ bytes, its zip directory is missing\): "
                 r"the save or a copy of it was interrupted; " + TRAIN_AFRESH,
    "text": r"^--ckpt_path {path} is not a PyTorch checkpoint \(it starts with b'step', not a torch\.save "
            r"archive\); pass a \.ckpt file written by moda fit\.$",
    "tensor": r"^--ckpt_path {path} holds a Tensor, not a training checkpoint .*; pass a \.ckpt file written by "
              r"moda fit\.$",
    "python-object": r"^--ckpt_path {path} holds a Python object of type logging\.Formatter, .* and is not loaded, "
                     r"since loading it would run code from the file; pass a \.ckpt file written by moda fit\.$",
    "empty": r"^--ckpt_path {path} is empty \(0 bytes\): the save or a copy of it was interrupted; " + TRAIN_AFRESH,
    "weights-only": r"^--ckpt_path {path} holds weights only \(no optimizer_states, lr_schedulers: saved with "
                    r"save_weights_only=True\), which cannot resume training; resume from a full checkpoint "
                    r"such as {folder}/last\.ckpt, or leave out --ckpt_path to start a new run\.$",
}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_file_that_is_not_a_usable_checkpoint_is_refused(run, kind):
    path = _make_bad_file(run, kind)
    pattern = BAD_FILES[kind].format(path=re.escape(str(path)), folder=re.escape(str(run / "checkpoints")))
    with pytest.raises(ValueError, match=pattern) as refused:
        check_checkpoint_file(path)  # reads only the file: runs before LightningCLI loads it
    assert "weights_only=False" not in str(refused.value)  # never advise loading a file unrestricted
    with pytest.raises(ValueError, match=pattern):
        check_resume(path, *_modules(run), {})


def test_a_weights_only_checkpoint_passes_when_training_state_is_not_needed(run):
    """``require_training_state=False`` (to evaluate, as `moda validate` would) accepts it."""
    path = _make_bad_file(run, "weights-only")
    check_resume(path, *_modules(run), {}, require_training_state=False)


@pytest.mark.parametrize(
    "value,match",
    [("last", r"^--ckpt_path=last names no file: moda fit writes every run to a new version folder, where "
              r"Lightning's 'last' finds no checkpoint and would start from scratch; pass the file, e\.g\. "),
     ("s3://bucket/run/last.ckpt", r"is a URL; moda checks a checkpoint before training and reads local files "
                                   r"only: copy it to a local disk and pass that path\.$")],
    ids=["keyword", "url"],
)  # fmt: skip
def test_lightning_keywords_and_urls_are_refused(run, monkeypatch, value, match):
    monkeypatch.chdir(run)
    with pytest.raises(ValueError, match=match):
        check_checkpoint_file(value)


def test_flags_the_checkpoint_would_replace_are_listed(run):
    last = run / "checkpoints" / "last.ckpt"
    flags = {"model.d_model": 96, "model.n_layers": 2, "model.lr": "1e-3", "model.betas": [0.9, 0.99], "model.nope": 1,
             "data.seq_len": 16, "trainer.max_steps": 9}  # fmt: skip
    with pytest.raises(ValueError) as refused:
        check_resume(last, *_modules(run), flags)
    assert str(refused.value) == (
        f"--ckpt_path {last} was trained with model.d_model=32, model.lr=0.003, model.betas=[0.9, 0.95] but the "
        "command line asks for --model.d_model=96 --model.lr=1e-3 --model.betas=[0.9, 0.99]; drop these flags to "
        "resume that run, or leave out --ckpt_path to start a new one."
    )


def test_another_tokenizer_is_refused_before_training(run):
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True, map_location="cpu")["TextDataModule"]["tokenizer_path"]
    model, datamodule = _modules(run, vocab=320)
    with pytest.raises(ValueError) as refused:
        check_resume(last, model, datamodule, {})
    message = str(refused.value)
    assert message.startswith(f"--ckpt_path {last} was trained with another tokenizer (300 tokens, fingerprint ")
    assert f"than this run's (320 tokens, fingerprint {datamodule.tokenizer_fingerprint[:12]}, " in message
    assert message.endswith(f"pass the tokenizer it was trained with, --data.tokenizer={saved}, or leave out "
                            "--ckpt_path to start a new run.")  # fmt: skip


def test_another_tokenizer_whose_file_is_gone_is_refused_with_how_to_train_it_again(run):
    last = run / "checkpoints" / "last.ckpt"
    _resave(last, lambda ckpt: ckpt["TextDataModule"].update(tokenizer_path="/gone/tokenizer.json"), checksum=True)
    with pytest.raises(ValueError) as refused:
        check_resume(last, *_modules(run, vocab=320), {})
    assert str(refused.value).endswith(
        "pass the tokenizer.json it was trained with (/gone/tokenizer.json no longer exists) via "
        "--data.tokenizer=<path>, or train it again with --data.tokenizer_vocab_size=300, or leave out "
        "--ckpt_path to start a new run."
    )


def test_weights_that_do_not_fit_the_model_are_refused(run):
    expected = r"does not fit the model built for it \(model\.embed\.weight is \[300, 32\] in the file but \[300, 48\] "
    with pytest.raises(ValueError, match=expected):
        check_resume(run / "checkpoints" / "last.ckpt", *_modules(run, d_model=48), {})


def test_explicit_flags_from_argv():
    argv = ["moda", "fit", "--config", "configs/default.yaml", "--model.d_model=96", "--model.n_layers", "6",
            "--model.lr=3e-4", "--model.betas=[0.9, 0.99]", "--model.head_dim=null", "--trainer.max_steps=5",
            "--data.files", "data/*.txt", "--print_config", "--model.d_model=128",
            "--model={qk_norm: false}"]  # fmt: skip
    assert explicit_flags_from_argv(argv) == {
        "model.d_model": 128,  # the later flag wins, as in the parser
        "model.n_layers": 6,
        "model.lr": "3e-4",
        "model.betas": [0.9, 0.99],
        "model.head_dim": None,
        "data.files": "data/*.txt",
        "model.qk_norm": False,
    }
    assert explicit_flags_from_argv(argv, sections=("trainer",)) == {"trainer.max_steps": 5}


# --- through the `moda` command: one line, exit status 2, no run folder left -----------------------


def _moda_fit_fails(run: Path, *args: str) -> str:
    cwd = run / "elsewhere"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "moda_lightning.cli", "fit", *TINY, f"--data.cache_dir={run / 'cache'}",
           "--trainer.max_steps=3", *args]  # fmt: skip
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, f"expected exit status 2:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr
    assert not (cwd / "runs").exists() or not any((cwd / "runs").rglob("version_*"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("moda: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("kind", ["missing", "directory", "truncated", "text", "tensor"])
def test_cli_refuses_a_file_that_is_not_a_checkpoint(run, kind):
    path = _make_bad_file(run, kind)
    line = _moda_fit_fails(run, f"--ckpt_path={path}")
    expected = {"missing": "does not exist", "directory": "is a directory", "truncated": "is truncated",
                "text": "is not a PyTorch checkpoint",
                "tensor": "holds a Tensor, not a training checkpoint"}  # fmt: skip
    assert line.startswith(f"moda: error: --ckpt_path {path} {expected[kind]}")


def test_cli_refuses_flipped_bytes(run):
    last = run / "checkpoints" / "last.ckpt"
    _flip_bytes(last)
    line = _moda_fit_fails(run, f"--ckpt_path={last}")
    assert line.startswith(f"moda: error: --ckpt_path {last} is corrupted")
    assert f"re-run from an earlier checkpoint in {run / 'checkpoints'}" in line


def test_cli_refuses_nan_weights(run):
    last = run / "checkpoints" / "last.ckpt"
    _resave(last, _set_nan, checksum=True)
    line = _moda_fit_fails(run, f"--ckpt_path={last}")
    assert line.startswith(f"moda: error: --ckpt_path {last} holds NaN or inf values")


def test_cli_refuses_flags_the_checkpoint_would_replace(run):
    last = run / "checkpoints" / "last.ckpt"
    line = _moda_fit_fails(run, "--model.d_model=48", "--model.n_layers", "3", f"--ckpt_path={last}")
    assert line == (
        f"moda: error: --ckpt_path {last} was trained with model.d_model=32, model.n_layers=2 but the command line "
        "asks for --model.d_model=48 --model.n_layers=3; drop these flags to resume that run, or leave out "
        "--ckpt_path to start a new one."
    )


def test_cli_refuses_another_tokenizer(run):
    last = run / "checkpoints" / "last.ckpt"
    line = _moda_fit_fails(run, "--data.tokenizer_vocab_size=320", f"--ckpt_path={last}")
    assert line.startswith(f"moda: error: --ckpt_path {last} was trained with another tokenizer (300 tokens")
    assert "--data.tokenizer=" in line
