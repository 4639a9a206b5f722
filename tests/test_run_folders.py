"""Run folders: runs started together never share one; a run that fails before training leaves
none behind; every fit ends with a summary of where things are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moda_lightning.cli import main

TINY_FIT = [
    "--model.attention=moda_torch", "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2",
    "--model.n_kv_heads=1", "--model.max_seq_len=32", "--data.tokenizer_vocab_size=300", "--data.seq_len=32",
    "--data.batch_size=4", "--trainer.limit_val_batches=2", "--trainer.enable_model_summary=false",
    "--trainer.enable_progress_bar=false",
]  # fmt: skip


def _fit_command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "moda_lightning.cli", "fit", *TINY_FIT, f"--data.cache_dir={tmp_path / 'cache'}", *args]


@pytest.mark.slow
def test_runs_started_together_get_their_own_folders(tmp_path):
    # The cache is built first, so the two runs race only for the run folder.
    subprocess.run(_fit_command(tmp_path, "--trainer.max_steps=1"), cwd=tmp_path, check=True, capture_output=True)
    widths = (32, 48)
    procs = [
        subprocess.Popen(_fit_command(tmp_path, "--trainer.max_steps=2", f"--model.d_model={w}"), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in widths
    ]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "runs" / "moda" / "moda_torch-pre").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1", "version_2"]
    # Each folder's config.yaml and hparams.yaml describe the same run.
    seen = set()
    for run in runs[1:]:
        config = yaml.safe_load((run / "config.yaml").read_text())
        hparams = yaml.safe_load((run / "hparams.yaml").read_text())
        assert config["model"]["d_model"] == hparams["d_model"]
        seen.add(hparams["d_model"])
    assert seen == set(widths)


@pytest.mark.parametrize(
    "args",
    [["--model.norm=sandwich"], ["--data.seq_len=64", "--model.max_seq_len=32"], ["--ckpt_path=missing.ckpt"]],
    ids=["bad-config", "checked-before-fit", "missing-checkpoint"],
)
def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "moda" / "moda_torch-pre" / "version_0").mkdir(parents=True)  # an earlier run's
    with pytest.raises((ValueError, OSError, FileNotFoundError)):
        main(["fit", *TINY_FIT, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=1", *args])
    assert [p.name for p in (tmp_path / "runs" / "moda" / "moda_torch-pre").iterdir()] == ["version_0"]


def test_fit_ends_with_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY_FIT, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    out = capsys.readouterr().out
    run = Path("runs") / "moda" / "moda_torch-pre" / "version_0"
    assert "moda: trained 2 steps, 256 tokens, in " in out
    assert f"run folder        {run}" in out
    assert "final validation  loss " in out and "perplexity " in out
    assert f"last checkpoint   {run / 'checkpoints' / 'last.ckpt'}" in out
    assert "best checkpoint   " in out and "(val/loss " in out


def test_an_unwritable_run_folder_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "a_file").write_text("")
    cmd = [*_fit_command(tmp_path, f"--trainer.logger.init_args.save_dir={tmp_path / 'a_file' / 'runs'}")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("moda: error: "))
    assert f"cannot create the run folder in {tmp_path / 'a_file' / 'runs'}" in line
    assert "--trainer.logger.init_args.save_dir=DIR" in line


def test_the_run_folder_and_the_checkpoint_carry_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [*TINY_FIT, "--trainer.val_check_interval=2"]
    main(["fit", *common, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=2"])
    run = tmp_path / "runs" / "moda" / "moda_torch-pre" / "version_0"
    (cached,) = (tmp_path / "cache").glob("tokenizer-*.json")
    assert (run / "tokenizer.json").read_text() == cached.read_text()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    from tokenizers import Tokenizer

    from moda_lightning.data import load_tokenizer, tokenizer_fingerprint

    carried = Tokenizer.from_str(checkpoint["TextDataModule"]["tokenizer_json"])
    assert tokenizer_fingerprint(carried) == tokenizer_fingerprint(load_tokenizer(cached))
    # The run folder's copy is enough to resume: a fresh cache folder, no tokenizer training.
    main([
        "fit", *common, f"--data.cache_dir={tmp_path / 'fresh_cache'}", f"--data.tokenizer={run / 'tokenizer.json'}",
        "--trainer.max_steps=4", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    ])  # fmt: skip
    assert not list((tmp_path / "fresh_cache").glob("tokenizer-*.json"))
    resumed = torch.load(tmp_path / "runs" / "moda" / "moda_torch-pre" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
