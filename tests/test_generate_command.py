"""`moda generate`: a checkpoint from `moda fit` continues prompts with its own tokenizer, anywhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from moda_lightning.cli import main
from moda_lightning.data.tokenizer import eot_id
from moda_lightning.trained import load_trained
from tests.test_cli import TINY, moda_command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for 3 steps; its cache folder is removed so only the checkpoint remains."""
    import shutil

    folder = tmp_path_factory.mktemp("generate")
    cache = folder / "cache"
    main(["fit", *TINY, f"--data.cache_dir={cache}", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
          f"--trainer.default_root_dir={folder}", "--trainer.logger.init_args.save_dir=" + str(folder / "runs")])  # fmt: skip
    found = sorted((folder / "runs").rglob("last.ckpt"))
    assert found, "moda fit wrote no last.ckpt"
    shutil.rmtree(cache)
    return found[0]


def test_greedy_generation_prints_the_prompt_and_the_models_continuation(checkpoint, capsys):
    main(["generate", f"--ckpt_path={checkpoint}", "--prompt", "def main(", "--max_new_tokens=8", "--temperature=0",
          "--device=cpu"])  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model, read = load_trained(checkpoint, "cpu")
    ids = read.tokenizer.encode("def main(").ids
    expected = model.generate([ids], 8, temperature=0, eos_id=eot_id(read.tokenizer))[0]
    assert printed == "def main(" + read.tokenizer.decode(expected)


def test_several_prompts_are_one_batch_and_a_seed_repeats_a_sample(checkpoint, capsys):
    args = ["generate", f"--ckpt_path={checkpoint}", "--prompt", "import", "--prompt", "class Foo:", "--max_new_tokens=6",
            "--top_k=20", "--seed=5"]  # fmt: skip
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first and "--- prompt 2" in first


def test_a_gpu_checkpoint_runs_its_portable_twin_on_the_cpu(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=False)
    saved["hyper_parameters"]["attention"] = "moda_triton"
    gpu_trained = tmp_path / "gpu.ckpt"
    torch.save(saved, gpu_trained)
    model, read = load_trained(gpu_trained, "cpu")
    assert model.config.attention == "moda_torch" and "running moda_torch" in read.notes[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ckpt_path=missing.ckpt", "--prompt=x"], "--ckpt_path missing.ckpt does not exist"),
        (["--ckpt_path={ckpt}", "--prompt=x", "--temperature=-1"], "temperature=-1.0"),
        (["--ckpt_path={ckpt}", "--prompt=x", "--max_new_tokens=40"], "longer than the model's max_seq_len=32"),
        (["--ckpt_path={ckpt}", "--prompt=x", "--device=tpu"], "--device 'tpu' is not one of"),
    ],
    ids=["missing", "temperature", "too-long", "device"],
)
def test_bad_requests_are_one_line(checkpoint, tmp_path, args, message):
    args = [a.format(ckpt=checkpoint) for a in args]
    result = subprocess.run([*moda_command(), "generate", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[0].startswith("moda: error:") and message in lines[0], result.stderr
