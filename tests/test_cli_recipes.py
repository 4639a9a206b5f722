"""The recipes in cli/ make the `moda fit` calls they describe, and each call parses.

Each script runs for real with ``MODA`` pointing at a recorder and ``--print_config`` as its
extra argument; every recorded call must end with that argument (the script passes ``"$@"``
through) and is then parsed by the real CLI, which prints the config instead of training.
Parsing instantiates nothing, so GPU trainer settings parse on a CPU machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moda_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "cli"
RECIPES = ["cpu_quickstart.sh", "table6_study_1gpu.sh", "fsdp_700m_8gpu.sh", "multinode_slurm.sbatch", "multinode_env.sh"]
# Variables the recipes read; cleared so the caller's environment cannot leak into a test.
RECIPE_VARIABLES = [
    "MODA", "SRUN", "CORPUS", "DATA", "CACHE_DIR", "RUNS", "SEEDS", "ARMS", "MASTER_ADDR", "MASTER_PORT",
    "NODE_RANK", "NNODES", "GPUS_PER_NODE",
]  # fmt: skip
RECORDED_ENV = ["MASTER_ADDR", "MASTER_PORT", "NODE_RANK"]


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """A stand-in for `moda` that appends its arguments (and the cluster variables it sees) to calls.jsonl."""
    fake = tmp_path / "fake_moda"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as log:\n"
        f"    env = {{k: os.environ.get(k) for k in {RECORDED_ENV!r}}}\n"
        "    log.write(json.dumps({'argv': sys.argv[1:], 'env': env}) + '\\n')\n"
    )
    fake.chmod(0o755)
    return fake


def run_recipe(
    script: str, recorder: Path, env: dict[str, str], *args: str, cwd: Path = ROOT, check: bool = True
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``bash cli/<script> *args`` with MODA set to the recorder; return the result and the calls made."""
    log = recorder.parent / "calls.jsonl"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in RECIPE_VARIABLES and not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(CLI / script), *args], cwd=cwd, env={**base, "MODA": str(recorder), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def parsed(argv: list[str]) -> dict:
    """The config the real `moda fit` builds from one recorded call (which ends in --print_config)."""
    assert argv[0] == "fit" and argv[-1] == "--print_config", f"extra arguments were not passed through last: {argv}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None), f"`moda {' '.join(argv)}` did not parse (exit {exit_.value.code})"
    return yaml.safe_load(printed.getvalue())


def test_cpu_quickstart_trains_the_default_config_from_any_folder(recorder, tmp_path):
    _, calls = run_recipe("cpu_quickstart.sh", recorder, {}, "--model.norm=post", "--print_config", cwd=tmp_path)
    assert len(calls) == 1
    assert calls[0]["argv"][:3] == ["fit", "--config", str(ROOT / "configs" / "default.yaml")]
    config = parsed(calls[0]["argv"])
    assert (config["model"]["attention"], config["model"]["d_model"], config["model"]["norm"]) == ("moda_torch", 192, "post")
    assert config["trainer"]["max_steps"] == 300 and config["data"]["files"] is None  # the built-in corpus


def test_table6_study_recipe_runs_the_committed_study_file(recorder, tmp_path):
    _, calls = run_recipe("table6_study_1gpu.sh", recorder, {}, "--dry-run", cwd=tmp_path)
    assert len(calls) == 1
    argv = calls[0]["argv"]
    assert argv[:2] == ["study", "--config"] and argv[-1] == "--dry-run"
    assert Path(argv[2]) == ROOT / "studies" / "table6_24l.yaml"


@pytest.mark.slow
def test_table6_study_file_plans_every_arm_and_seed():
    """The committed study file parses and plans 6 arms x 3 seeds of the Table 6 shape (no training)."""
    from moda_lightning.study import load_study, plan_runs

    spec = load_study(ROOT / "studies" / "table6_24l.yaml")
    runs = plan_runs(spec, Path("runs/studies/table6_24l"))
    assert len(runs) == 6 * 3 and {r.seed for r in runs} == {0, 1, 2}
    assert all(r.tokens_per_step * r.max_steps >= 100_000_000 for r in runs)
    by_arm = {r.arm: parsed(["fit", *r.args, "--print_config"]) for r in runs if r.seed == 0}
    expected = {  # (attention, norm, ffn_kv, depth_keys)
        "baseline_post": ("sdpa", "post", False, "reader"),
        "moda_depth_post": ("moda_triton", "post", False, "reader"),
        "moda_ffn_post": ("moda_triton", "post", True, "reader"),
        "baseline_pre": ("sdpa", "pre", False, "reader"),
        "moda_ffn_pre": ("moda_triton", "pre", True, "reader"),
        "moda_ffn_post_writer": ("moda_triton", "post", True, "writer"),
    }
    for arm, config in by_arm.items():
        model = config["model"]
        ffn_kv = model["attention"] != "sdpa" if model["ffn_kv"] is None else model["ffn_kv"]  # None: the backend's default
        assert (model["attention"], model["norm"], ffn_kv, model["depth_keys"]) == expected[arm], arm
        assert (model["n_layers"], model["d_model"], model["n_heads"], model["n_kv_heads"]) == (24, 384, 6, 2)
        assert config["data"]["files"][0] == "pkg:torch"


def test_fsdp_recipe_trains_the_700m_config_on_8_gpus(recorder):
    env = {"DATA": "corpus/*.jsonl", "CACHE_DIR": "/scratch/cache"}
    _, calls = run_recipe("fsdp_700m_8gpu.sh", recorder, env, "--print_config")
    config = parsed(calls[0]["argv"])
    trainer, data, model = config["trainer"], config["data"], config["model"]
    # devices stays the string "8" (Trainer takes int | str | list); Lightning reads it as 8 devices
    assert (trainer["strategy"], str(trainer["devices"]), trainer["num_nodes"], trainer["precision"]) == ("fsdp", "8", 1, "bf16-mixed")
    assert (data["files"], data["cache_dir"], data["seq_len"]) == ("corpus/*.jsonl", "/scratch/cache", 4096)
    assert (model["d_model"], model["n_layers"], model["attention"]) == (1024, 36, "moda_triton")


def sbatch_options(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), flags=re.M))


def test_slurm_recipe_launches_one_task_per_gpu_through_srun(recorder, tmp_path):
    options = sbatch_options(CLI / "multinode_slurm.sbatch")
    # Lightning's SLURMEnvironment: --ntasks-per-node must equal the devices per node; --ntasks is refused.
    assert options["ntasks-per-node"] == options["gpus-per-node"] and "ntasks" not in options
    srun = tmp_path / "fake_srun"
    srun.write_text(f'#!/bin/sh\ntouch {tmp_path / "srun_called"}\nexec "$@"\n')
    srun.chmod(0o755)
    env = {
        "SRUN": str(srun), "DATA": "corpus/*.jsonl", "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": options["ntasks-per-node"],
    }  # fmt: skip
    _, calls = run_recipe("multinode_slurm.sbatch", recorder, env, "--print_config", cwd=tmp_path)
    assert (tmp_path / "srun_called").exists() and len(calls) == 1
    trainer = parsed(calls[0]["argv"])["trainer"]
    assert (trainer["strategy"], trainer["num_nodes"], str(trainer["devices"])) == ("fsdp", 3, options["ntasks-per-node"])


def test_env_recipe_passes_the_node_count_and_exports_the_rendezvous(recorder):
    env = {"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1", "NNODES": "2", "DATA": "corpus/*.jsonl"}
    _, calls = run_recipe("multinode_env.sh", recorder, env, "--print_config")
    assert calls[0]["env"] == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "NODE_RANK": "1"}
    trainer = parsed(calls[0]["argv"])["trainer"]
    assert (trainer["strategy"], trainer["num_nodes"], str(trainer["devices"])) == ("fsdp", 2, "8")
    result, calls = run_recipe("multinode_env.sh", recorder, {**env, "NODE_RANK": ""}, check=False)
    assert result.returncode != 0 and "set NODE_RANK" in result.stderr and not calls


def test_readme_lists_every_recipe():
    listed = set(re.findall(r"^\| `([\w.]+)` \|", (CLI / "README.md").read_text(), flags=re.M))
    on_disk = {path.name for path in CLI.iterdir() if path.name != "README.md"}
    assert listed == on_disk == set(RECIPES)
