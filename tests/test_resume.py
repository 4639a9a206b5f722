"""Resume is exact: a run continued from any checkpoint, or stopped by SIGTERM / Ctrl-C and resumed
with the command it prints, trains on the batches, and reaches the losses, of the uninterrupted
run; the training order is the one runs had before it was resumable."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from moda_lightning.cli import main
from moda_lightning.data.sampler import ResumableLoader, ResumableShuffle

TINY = [
    "--model.attention=moda_torch", "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2",
    "--model.n_kv_heads=1", "--model.max_seq_len=32", "--model.warmup_steps=4", "--data.tokenizer_vocab_size=300",
    "--data.seq_len=32", "--data.batch_size=4", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
    "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false", "--trainer.max_steps=40",
    "--trainer.val_check_interval=10", "--trainer.check_val_every_n_epoch=null",
    "--trainer.accelerator=cpu",  # bit-equal losses need deterministic kernels; CUDA's embedding backward is not
]  # fmt: skip


@pytest.mark.parametrize("n,batch_size", [(23, 4), (24, 4), (7, 3), (50, 1)])
def test_training_order_is_the_shuffled_dataloaders(n, batch_size):
    """Epoch by epoch, the same batches as ``DataLoader(shuffle=True, generator=seeded)``."""
    data = TensorDataset(torch.arange(n))
    reference = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(5), drop_last=True)
    expected = [[batch[0].tolist() for batch in reference] for _ in range(4)]
    sampler = ResumableShuffle(data, seed=5)
    loader = ResumableLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)
    got = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        got.append([batch[0].tolist() for batch in loader])
    assert got == expected


def test_resumed_sampler_skips_what_was_done_and_ranks_split_an_epoch():
    data = TensorDataset(torch.arange(30))
    whole = ResumableShuffle(data, seed=1)
    whole.set_epoch(2)
    order = list(whole)
    resumed = ResumableShuffle(data, seed=1)
    resumed.resume(epoch=2, done=11)
    resumed.set_epoch(2)
    assert list(resumed) == order[11:]
    resumed.set_epoch(2)
    assert list(resumed) == order, "the skip applies to the resumed pass only"
    assert list(resumed) != order, "a pass without set_epoch is the next epoch"
    # A position at the end of an epoch resumes at the start of the next one.
    resumed.resume(epoch=2, done=30)
    resumed.set_epoch(3)
    whole.set_epoch(3)
    assert list(resumed) == list(whole)
    # Ranks deal the epoch's permutation: disjoint, equal in size, the whole epoch between them.
    ranks = [ResumableShuffle(data, seed=1, num_replicas=4, rank=r) for r in range(4)]
    for r in ranks:
        r.set_epoch(2)
    shards = [list(r) for r in ranks]
    assert all(len(s) == 7 for s in shards) and len(set().union(*shards)) == 28
    assert set().union(*shards) == set(order[:28])


def _write_corpus(folder: Path) -> Path:
    """About 20 training batches per epoch, so 40 steps cross an epoch boundary."""
    folder.mkdir()
    words = "depth stream keys values layer token softmax attention residual norm gradient".split()
    for i in range(4):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] + str(j % 13) for j in range(170))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    return folder


def train_losses(run_dir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _command(tmp_path: Path, version: str) -> list[str]:
    return [
        "fit", *TINY, f"--data.files={tmp_path / 'corpus'}/*.txt", f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.name=",
        f"--trainer.logger.init_args.version={version}",
    ]  # fmt: skip


def fit(tmp_path: Path, version: str, *args: str) -> Path:
    main([*_command(tmp_path, version), *args])
    return tmp_path / "runs" / version


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted 40-step run, with a checkpoint every 7 steps; shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("resume")
    _write_corpus(tmp_path / "corpus")
    every_7 = ["--checkpoint.every_n_train_steps=7", "--checkpoint.save_top_k=-1", "--checkpoint.monitor=null",
               "--checkpoint.filename=step{step:02d}"]  # fmt: skip
    return fit(tmp_path, "straight", *every_7)


@pytest.mark.slow
def test_resume_from_any_checkpoint_repeats_the_uninterrupted_run(straight, monkeypatch):
    tmp_path = straight.parent.parent
    monkeypatch.chdir(tmp_path)
    expected = train_losses(straight)
    assert sorted(expected) == list(range(40))
    assert torch.load(straight / "checkpoints" / "step28.ckpt", weights_only=False)["epoch"] >= 1, "no epoch boundary"
    checkpoints = {p.name: p for p in (straight / "checkpoints").glob("step*.ckpt")}
    # Step 14 is in the first epoch, 28 in the second; 20 is a validation (and last.ckpt) boundary.
    for name in ("step14.ckpt", "step28.ckpt"):
        resumed = fit(tmp_path, f"from_{name[:-5]}", f"--ckpt_path={checkpoints[name]}")
        step = int(name[4:6])
        got = train_losses(resumed)
        assert sorted(got) == list(range(step, 40)), f"resumed from {name}: logged steps {sorted(got)}"
        assert [got[s] for s in got] == [expected[s] for s in got], f"resumed from {name}: losses differ"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_saves_a_checkpoint_and_the_resume_is_exact(straight, monkeypatch, signum):
    tmp_path = straight.parent.parent
    monkeypatch.chdir(tmp_path)
    expected = train_losses(straight)
    version = f"stopped_{signal.Signals(signum).name}"
    run_dir = tmp_path / "runs" / version
    moda = [sys.executable, "-m", "moda_lightning.cli"]
    proc = subprocess.Popen([*moda, *_command(tmp_path, version)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The step-10 checkpoint (first validation) shows training is under way; then the signal.
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"moda: {signal.Signals(signum).name} received" in err and "Traceback" not in err
    stopped_at = max(train_losses(run_dir))
    assert 10 <= stopped_at < 39, "the run stopped at a step before its end"

    # The printed command resumes it; together the two parts logged every step once, and the
    # losses are the uninterrupted run's.
    match = re.search(r"resume with:\n\s+(.+)", err)
    assert match, err[-2000:]
    resume = shlex.split(match.group(1))
    assert resume[:2] == ["moda", "fit"] and resume[-1] == f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    done = subprocess.run(
        [*moda, *resume[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert train_losses(run_dir) == expected
