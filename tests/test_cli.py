"""`moda fit` end to end: the installed console script trains, writes one run folder, resumes;
bad configurations fail before training with advice."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moda_lightning.cli import main

TINY = [
    "--model.d_model=32",
    "--model.n_layers=2",
    "--model.n_heads=2",
    "--model.n_kv_heads=1",
    "--model.max_seq_len=32",
    "--data.tokenizer_vocab_size=300",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_model_summary=false",
]


def moda_command() -> list[str]:
    """The installed `moda` console script; from a checkout on PYTHONPATH (no install), the module it runs."""
    script = Path(sys.executable).with_name("moda")
    found = str(script) if script.exists() else shutil.which("moda")
    return [found] if found else [sys.executable, "-m", "moda_lightning.cli"]


def run_moda(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*moda_command(), "fit", *TINY, f"--data.cache_dir={tmp_path / 'cache'}", *args]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"moda fit failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_console_script_trains_then_resumes(tmp_path):
    first_run = run_moda(tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=2")
    # Nothing the user cannot act on: no product tip, no deprecation inside Lightning, no MFU note on a CPU.
    printed = first_run.stdout + first_run.stderr
    for unactionable in ("💡 Tip", "LeafSpec", "no known dense peak"):
        assert unactionable not in printed
    run_dir = tmp_path / "runs" / "moda" / "moda_torch-pre" / "version_0"
    assert (run_dir / "config.yaml").exists() and list(run_dir.glob("events.out.tfevents.*"))
    last = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=False)
    assert first["global_step"] == 4 and first["tokens_seen"] == 4 * 4 * 32

    run_moda(tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=2", f"--ckpt_path={last}")
    resumed_dir = tmp_path / "runs" / "moda" / "moda_torch-pre" / "version_1"
    resumed = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    # The resumed run continues the step count, the LR schedule and the token count.
    assert resumed["global_step"] == 6 and resumed["tokens_seen"] == 6 * 4 * 32
    assert resumed["lr_schedulers"][0]["last_epoch"] == 6


@pytest.mark.parametrize(
    "args,error,match",
    [
        (["--model.attention=moda_triton"], RuntimeError, r"needs a CUDA GPU.*--model.attention=moda_torch"),
        (["--model.attention=flash"], ValueError, r"unknown attention backend 'flash'; registered: \["),
        (["--model.norm=sandwich"], ValueError, r"unknown norm placement 'sandwich'"),
        (["--model.n_heads=3", "--model.n_kv_heads=2"], ValueError, r"n_heads=3 is not a multiple of n_kv_heads=2"),
        (["--model.attention=sdpa", "--model.ffn_kv=true"], ValueError, r"'sdpa' reads no depth stream"),
        (["--data.seq_len=64", "--model.max_seq_len=32"], ValueError, r"--data.seq_len=64 is longer than the model's max_seq_len=32"),
        (["--data.files=/nonexistent/*.txt"], ValueError, r"/nonexistent/\*\.txt"),
        (["--model.lr=0"], ValueError, r"lr=0\.0: the peak learning rate must be > 0"),
        (["--model.warmup_steps=-5"], ValueError, r"warmup_steps=-5: give a step count >= 0"),
    ],
    ids=["triton-on-cpu", "unknown-backend", "unknown-norm", "heads", "depth-with-sdpa", "seq-too-long", "no-files",
         "zero-lr", "negative-warmup"],
)
def test_bad_config_fails_before_training(tmp_path, monkeypatch, args, error, match):
    monkeypatch.chdir(tmp_path)
    if "--model.attention=moda_triton" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    base = [a for a in TINY if not any(a.startswith(o.split("=")[0] + "=") for o in args)]
    with pytest.raises(error, match=match):
        main(["fit", *base, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=1", *args])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
    # A setting the config alone shows wrong stops before the data module trains a tokenizer.
    assert not (tmp_path / "cache").exists() or "--data.files" in args[0]


def test_resuming_with_another_tokenizer_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = [*TINY, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.max_steps=1", "--trainer.val_check_interval=1"]
    main(["fit", *common])
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    other_vocab = [a for a in common if not a.startswith("--data.tokenizer_vocab_size")] + ["--data.tokenizer_vocab_size=320"]
    with pytest.raises(ValueError, match=r"was trained with another tokenizer .* --data.tokenizer="):
        main(["fit", *other_vocab, "--trainer.max_steps=2", f"--ckpt_path={last}"])


def test_console_script_reports_a_bad_config_in_one_line(tmp_path):
    """From the shell a configuration problem is one `moda: error:` line and exit status 2, not a traceback."""
    cmd = [*moda_command(), "fit", *TINY, "--model.norm=sandwich", f"--data.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "moda: error: invalid MoDA model configuration" in result.stderr
    assert "unknown norm placement 'sandwich'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flag,hint",
    [("--model.d_modle=3", "did you mean --model.d_model?"), ("--trainer.max_step=3", "did you mean --trainer.max_steps")],
)
def test_a_typo_is_one_line_with_the_closest_flags(tmp_path, flag, hint):
    result = subprocess.run([*moda_command(), "fit", flag], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moda: error: unrecognized arguments: ") and hint in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_abbreviated_options_are_refused(tmp_path, capsys):
    """A unique prefix must not stand for a whole option: `--model.attn` is not `--model.attn_kv_proj`."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.attn=true", "--print_config"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --model.attn=true" in capsys.readouterr().err


def test_resuming_names_the_config_values_the_checkpoint_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = [*TINY, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.val_check_interval=1"]
    main(["fit", *common, "--trainer.max_steps=1"])
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    (tmp_path / "wider.yaml").write_text("model:\n  d_model: 48\n")
    capsys.readouterr()
    no_width_flag = [a for a in common if not a.startswith("--model.d_model")]
    main(["fit", "--config", "wider.yaml", *no_width_flag, "--trainer.max_steps=2", f"--ckpt_path={last}"])
    err = capsys.readouterr().err
    assert "moda: from the checkpoint, replacing the config files' values: model.d_model=32 (config: 48)" in err


def test_a_written_one_is_one_batch_not_all_of_them(tmp_path, monkeypatch):
    """Trainer types these `float | int`, so the parser reads `1` as 1.0, which Lightning takes as 100%."""
    from moda_lightning.cli import MoDACLI
    from moda_lightning.data import TextDataModule
    from moda_lightning.lightning_module import MoDALightningModule

    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.yaml").write_text("trainer:\n  limit_train_batches: 1\n")
    args = ["--config", "one.yaml", *TINY, "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1.0",
            f"--data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    cli = MoDACLI(MoDALightningModule, TextDataModule, run=False, args=args)
    assert cli.trainer.limit_train_batches == 1 and isinstance(cli.trainer.limit_train_batches, int)
    assert cli.trainer.limit_val_batches == 1 and isinstance(cli.trainer.limit_val_batches, int)
    assert cli.trainer.limit_test_batches == 1.0 and isinstance(cli.trainer.limit_test_batches, float)


def test_training_without_a_logger_runs(tmp_path, monkeypatch):
    """`--trainer.logger=false` trains and checkpoints; the learning-rate monitor, with nowhere to log,
    stands aside instead of stopping the run."""
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.logger=false", "--trainer.max_steps=2",
          "--trainer.val_check_interval=2"])  # fmt: skip
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "runs").exists()


def test_training_without_checkpoints_runs_and_writes_none(tmp_path, monkeypatch, capsys):
    """`--trainer.enable_checkpointing=false` trains and validates without the CLI's checkpoint
    callback (Lightning refuses the flag beside one), and the summary names no checkpoint."""
    monkeypatch.chdir(tmp_path)
    main(["fit", *TINY, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.enable_checkpointing=false",
          "--trainer.max_steps=2", "--trainer.val_check_interval=2"])  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt"))
    out = capsys.readouterr().out
    assert "final validation" in out and "checkpoint" not in out


def test_training_without_validation_keeps_the_last_checkpoint_without_warnings(tmp_path, monkeypatch, capsys):
    """`--trainer.limit_val_batches=0` turns validation off: the checkpoint callback, which ranks by the
    validation loss, keeps `last.ckpt` alone instead of warning that the loss is missing."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", *TINY, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.limit_val_batches=0",
              "--trainer.max_steps=2"])  # fmt: skip
    assert not [w for w in caught if "monitored key" in str(w.message)]
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["last.ckpt"]
    assert "last checkpoint" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_config_on_a_cpu_is_refused_before_the_data_is_built(tmp_path, monkeypatch):
    """One line naming the flags that run it here, and no tokenizer trained or corpus tokenized first."""
    monkeypatch.chdir(tmp_path)
    gpu_config = str(Path(__file__).parents[1] / "configs" / "table6_24l.yaml")
    cache = f"--data.cache_dir={tmp_path / 'cache'}"
    with pytest.raises(RuntimeError, match=r"no CUDA GPU is visible here; to train on this machine's CPU add "
                                           r"--trainer.accelerator=cpu --model.attention=moda_torch --model.compile=false$"):  # fmt: skip
        main(["fit", "--config", gpu_config, cache])
    with pytest.raises(RuntimeError, match=r"'moda_triton' needs a CUDA GPU.*--model.attention=moda_torch"):
        main(["fit", "--config", gpu_config, cache, "--trainer.accelerator=cpu"])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_cuda_graphs_with_several_processes_are_refused_before_the_data_is_built(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"compile_mode='reduce-overhead' replays CUDA graphs, tested on one GPU only; "
                                         r"for 4 processes pass --model.compile=false"):  # fmt: skip
        main(["fit", *TINY, f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.accelerator=cpu", "--trainer.devices=2",
              "--trainer.num_nodes=2", "--trainer.strategy=ddp", "--model.compile=true",
              "--model.compile_mode=reduce-overhead"])  # fmt: skip
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_planned_processes_reads_devices_and_nodes_as_lightning_does():
    from jsonargparse import Namespace

    from moda_lightning.cli import planned_processes

    assert planned_processes(Namespace(accelerator="cpu", devices=3, num_nodes=2)) == 6
    assert planned_processes(Namespace(accelerator="cpu", devices="auto", num_nodes=1)) == 1
    assert planned_processes(Namespace(accelerator="cpu", devices="1", num_nodes=None)) == 1


def test_planned_processes_counts_the_gpus_lightning_would_use(monkeypatch):
    """On a (pretended) machine of 4 GPUs: `auto` and -1 are all four, a count or a list is itself."""
    import lightning.fabric.accelerators.cuda as cuda
    import lightning.pytorch.accelerators.cuda as pl_cuda
    from jsonargparse import Namespace

    from moda_lightning.cli import planned_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "_get_all_visible_cuda_devices", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(pl_cuda, "num_cuda_devices", lambda: 4)
    for devices, expected in (("auto", 4), (-1, 4), (2, 2), ([1, 3], 2), ("0,1,2", 3)):
        assert planned_processes(Namespace(accelerator="gpu", devices=devices, num_nodes=2)) == 2 * expected, devices
