"""`moda study` on a CPU: 2 arms x 2 seeds of a tiny model, the report checked against the event files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moda_lightning.study.report import PairedDifference, _throughput, figure, markdown, summarize_arms, t975, write_report
from moda_lightning.study.results import RunResult, final_depth_mass
from moda_lightning.study.spec import load_study

TINY = [
    "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
    "--model.max_seq_len=32", "--model.warmup_steps=2", "--data.tokenizer_vocab_size=300", "--data.seq_len=32",
    "--data.batch_size=4", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
    "--trainer.enable_model_summary=false", "--data.cache_dir=cache",
    # probes at step 4 and at the last step, 6, whose depth mass the report shows
    '--trainer.callbacks=[{"class_path": "moda_lightning.callbacks.DepthAttentionStats", '
    '"init_args": {"every_n_steps": 4, "probe_batch_size": 2}}]',
]  # fmt: skip


def write_study(folder: Path, **overrides) -> Path:
    study = {
        "name": "tiny",
        "args": TINY,
        "arms": {"base": {"args": ["--model.attention=sdpa"]}, "moda": {"args": ["--model.attention=moda_torch"]}},
        "reference": "base",
        "seeds": [0, 1],
        "tokens": 768,  # 6 steps of 4 x 32 tokens
        "eval_every_tokens": 256,  # validation after steps 2, 4 and 6
        "runs_per_gpu": 2,
        **overrides,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def moda_study(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moda_lightning.cli", "study", "--config", "tiny.yaml", *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def val_losses(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars("val/loss")]


@pytest.mark.slow
def test_study_runs_reports_and_skips_finished_runs(tmp_path):
    write_study(tmp_path)
    # `--arms` starts one arm's runs; the next call starts only what is still missing.
    base_only = moda_study(tmp_path, "--arms", "base")
    assert base_only.returncode == 0, base_only.stdout[-2000:] + base_only.stderr[-2000:]
    assert "starting base/seed0" in base_only.stdout and "starting moda" not in base_only.stdout
    first = moda_study(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "starting moda/seed1" in first.stdout and "starting base" not in first.stdout
    out = tmp_path / "runs" / "studies" / "tiny"
    md = (out / "study.md").read_text()
    png = (out / "study.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert (out / "depth.png").read_bytes().startswith(b"\x89PNG") and "| moda | 2 | " in md.split("Depth mass")[1]

    # The table's numbers are the event files' final validation losses, averaged over seeds.
    finals = {(arm, s): val_losses(out / arm / f"seed{s}")[-1] for arm in ("base", "moda") for s in (0, 1)}
    assert all(len(val_losses(out / arm / f"seed{s}")) == 3 for arm, s in finals)
    for arm in ("base", "moda"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm} | 2 |"))
        mean = (finals[arm, 0] + finals[arm, 1]) / 2
        assert f"| {mean:.4f} |" in row and f"| {math.exp(mean):.2f} |" in row
        # Two runs of one arm went at once on the CPU, and both results say so.
        results = [json.loads((out / arm / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
        assert all(r["gpu_sharing"] == 2 for r in results)
        # The last step's depth probe is each MoDA run's depth mass; the baseline has none.
        assert all((r["depth_mass"] is None) == (arm == "base") for r in results)
    diffs = [finals["moda", s] - finals["base", s] for s in (0, 1)]
    paired_section = md[md.index("Paired differences") :]
    pair = next(line for line in paired_section.splitlines() if line.startswith("| moda | 2 | "))
    assert f"{sum(diffs) / 2:+.4f}" in pair and f"0: {diffs[0]:+.4f}" in pair and f"1: {diffs[1]:+.4f}" in pair
    lo, hi = PairedDifference("moda", [0, 1], diffs).ci95
    assert f"[{lo:+.4f}, {hi:+.4f}]" in pair
    assert list((out / "report").glob("events.out.tfevents.*")), "the report is logged to TensorBoard too"

    # A second call starts nothing: every run is finished. Its archive holds no checkpoint, and a
    # study pointed at the archive finds every run done and writes the same table.
    events_before = sorted(p.name for p in out.glob("*/seed*/events.out.tfevents.*"))
    second = moda_study(tmp_path, "--archive", "archive")
    assert second.returncode == 0 and "starting" not in second.stdout and "resuming" not in second.stdout
    assert sorted(p.name for p in out.glob("*/seed*/events.out.tfevents.*")) == events_before
    archive = tmp_path / "archive"
    assert list(out.glob("*/seed*/checkpoints/*.ckpt")) and not list(archive.rglob("*.ckpt"))
    assert all(val_losses(archive / arm / f"seed{s}")[-1] == finals[arm, s] for arm, s in finals)
    from_archive = moda_study(tmp_path, "--out", "archive", "--report-only")
    assert from_archive.returncode == 0, from_archive.stderr[-2000:]
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert [line for line in (archive / "study.md").read_text().splitlines() if line.startswith("| ")] == table

    # A run without its result resumes from its last checkpoint; the dry run says so and starts nothing.
    (out / "moda" / "seed1" / "result.json").unlink()
    dry = moda_study(tmp_path, "--dry-run")
    assert dry.returncode == 0
    assert re.search(r"moda/seed1\s+resume", dry.stdout) and "--ckpt_path=" in dry.stdout
    assert re.search(r"base/seed0\s+done", dry.stdout)
    assert not (out / "moda" / "seed1" / "result.json").exists()


def test_archived_events_keep_every_scalar_and_the_last_figure(tmp_path):
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    from moda_lightning.study.archive import compact_events

    writer = SummaryWriter(str(tmp_path / "run"))
    for step in (10, 20, 30):
        writer.add_scalar("val/loss", 3.0 / step, step)
        writer.add_image("depth/mass", np.full((3, 8, 8), step / 30.0), step)
        writer.add_histogram("depth/hist", np.arange(step, dtype=np.float32), step)
        writer.add_text("notes", f"step {step}", step)
    writer.close()
    (source,) = (tmp_path / "run").glob("events.out.tfevents.*")
    compact_events(source, tmp_path / "small" / source.name)

    def load(folder):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        return acc

    full, small = load(tmp_path / "run"), load(tmp_path / "small")
    assert [(e.step, e.value) for e in small.Scalars("val/loss")] == [(e.step, e.value) for e in full.Scalars("val/loss")]
    assert [e.step for e in small.Images("depth/mass")] == [30]
    assert small.Images("depth/mass")[0].encoded_image_string == full.Images("depth/mass")[-1].encoded_image_string
    assert [e.step for e in small.Histograms("depth/hist")] == [30]
    assert len(small.Tensors("notes/text_summary")) == 3
    assert (tmp_path / "small" / source.name).stat().st_size < source.stat().st_size


def test_dry_run_lists_every_run_with_equal_budgets(tmp_path):
    write_study(tmp_path, seeds=[3, 4, 5])
    dry = moda_study(tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    rows = [line for line in dry.stdout.splitlines() if not line.startswith(" ")]
    # seed-major: the arms of one seed run side by side
    assert [r.split()[0] for r in rows] == [f"{a}/seed{s}" for s in (3, 4, 5) for a in ("base", "moda")]
    assert all("new" in r and "6 steps x 128 tokens" in r for r in rows)
    assert "--seed_everything=4" in dry.stdout and "--trainer.val_check_interval=2" in dry.stdout
    assert not (tmp_path / "runs").exists()


def test_an_unknown_arm_is_one_error_line(tmp_path):
    write_study(tmp_path)
    result = moda_study(tmp_path, "--arms", "base,bsae")
    assert result.returncode == 2 and "--arms names ['bsae']" in result.stderr and "its arms: ['base', 'moda']" in result.stderr


def test_report_only_without_finished_runs_is_one_error_line(tmp_path):
    write_study(tmp_path)
    result = moda_study(tmp_path, "--report-only", "--out", "nowhere")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no finished run" in result.stderr and "--out" in result.stderr


def test_paired_panels_fit_their_range_to_the_later_differences():
    """Early differences (and two-pair bands, t factor 12.7) are many times the late ones: the
    difference panels fit their y-range from a third of training on, zero and the late bands inside."""
    tokens = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    early = [0.8, -0.6, 0.3]  # seed-to-seed swings of the first evaluations
    base = {seed: [3.0 - 0.01 * i for i in range(10)] for seed in (0, 1)}
    arm = {seed: [b + (early[i] * (1 if seed else -1) if i < 3 else 0.01 + 0.002 * seed) for i, b in enumerate(base[seed])]
           for seed in (0, 1)}  # fmt: skip
    results = [RunResult(name, seed, 10, 100, tokens, losses[seed], None, 1.0, 1.0)
               for name, losses in (("base", base), ("moda", arm)) for seed in (0, 1)]  # fmt: skip
    spec = SimpleNamespace(name="t", arms=[SimpleNamespace(name="base"), SimpleNamespace(name="moda")], reference="base",
                           comparisons=())  # fmt: skip
    low, high = figure(spec, results).axes[2].get_ylim()
    late_half_width = t975(1) * 0.002 / math.sqrt(2) / math.sqrt(2)  # sd of (0.010, 0.012) / sqrt(2), times t
    assert low < 0 < 0.011 + late_half_width < high  # zero and the late band are inside
    assert high < 0.2 and low > -0.2  # the early swings (0.3-0.8) run off the panel


def test_bad_study_file_is_one_error_line(tmp_path):
    write_study(tmp_path, reference="baseline", seeds=[1, 1], tokens=0, arms={"a": {"confgs": []}})
    result = moda_study(tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith("moda: error: study: invalid study file")
    for problem in ("reference 'baseline' is not an arm", "repeat a seed", "tokens must be a positive integer", "arm 'a'"):
        assert problem in line
    with pytest.raises(ValueError, match="does not exist"):
        load_study(tmp_path / "missing.yaml")


def test_bad_comparisons_are_named_in_the_one_error_line(tmp_path):
    write_study(tmp_path, comparisons=["moda - bsae", "moda-base", "moda - moda", "moda - base"])
    with pytest.raises(ValueError) as err:
        load_study(tmp_path / "tiny.yaml")
    line = str(err.value)
    assert "\n" not in line
    assert "comparison 'moda - bsae' names ['bsae'], not arms of the study" in line
    assert "comparison 'moda-base' is not 'ARM - OTHER_ARM'" in line
    assert "comparison 'moda - moda' compares an arm with itself" in line
    assert "'moda - base'" not in line
    write_study(tmp_path, comparisons="moda - base")
    with pytest.raises(ValueError, match="comparisons must be a list of 'ARM - OTHER_ARM' strings"):
        load_study(tmp_path / "tiny.yaml")


def test_report_adds_the_comparisons_the_study_file_names(tmp_path):
    arms = {"base_post": {}, "moda_post": {}, "base_pre": {}, "moda_pre": {}}
    write_study(tmp_path, arms=arms, reference="base_post", seeds=[0, 1, 2],
                comparisons=["moda_pre - base_pre", "moda_pre - moda_post"])  # fmt: skip
    spec = load_study(tmp_path / "tiny.yaml")
    assert spec.comparisons == (("moda_pre", "base_pre"), ("moda_pre", "moda_post"))
    loss = {("base_post", 0): 2.00, ("base_post", 1): 2.10, ("base_post", 2): 2.05,
            ("moda_post", 0): 1.97, ("moda_post", 1): 2.08,  # seed 2 not finished
            ("base_pre", 0): 2.20, ("base_pre", 1): 2.25, ("base_pre", 2): 2.30,
            ("moda_pre", 0): 2.18, ("moda_pre", 1): 2.21, ("moda_pre", 2): 2.31}  # fmt: skip
    results = [RunResult(arm, seed, 4, 64, [64], [value], None, 1.0, 1.0) for (arm, seed), value in loss.items()]
    write_report(spec, results, ["moda_post/seed2"], tmp_path)
    named = (tmp_path / "study.md").read_text().split("Paired differences the study file names")[1]
    pre = [loss["moda_pre", s] - loss["base_pre", s] for s in (0, 1, 2)]
    lo, hi = PairedDifference("x", [0, 1, 2], pre).ci95
    # mean -0.0167, sd 0.0252: t_{0.975,11} * sd / sqrt(12) = 0.0160 is the first half-width below 0.0167
    assert (f"| moda_pre - base_pre | 3 | {sum(pre) / 3:+.4f} | [{lo:+.4f}, {hi:+.4f}] | 12 | "
            f"0: {pre[0]:+.4f}, 1: {pre[1]:+.4f}, 2: {pre[2]:+.4f} |") in named  # fmt: skip
    # only the seeds both arms finished are paired
    post = [loss["moda_pre", s] - loss["moda_post", s] for s in (0, 1)]
    row = next(line for line in named.splitlines() if line.startswith("| moda_pre - moda_post |"))
    assert row.startswith(f"| moda_pre - moda_post | 2 | {sum(post) / 2:+.4f} |")
    assert row.endswith(f"| 0: {post[0]:+.4f}, 1: {post[1]:+.4f} |")
    # ... and plots them in a panel of their own, one curve per comparison
    named_panel = figure(spec, results).axes[3]
    assert [line.get_label() for line in named_panel.lines if not line.get_label().startswith("_")] == [
        "moda_pre - base_pre (3 pairs)", "moda_pre - moda_post (2 pairs)",
    ]  # fmt: skip
    last = named_panel.lines[0].get_ydata()[-1]
    assert last == pytest.approx(sum(pre) / 3)


def test_arms_with_different_tokens_per_step_are_refused(tmp_path):
    write_study(tmp_path, arms={"a": {"args": []}, "b": {"args": ["--data.batch_size=8"]}}, reference="a")
    result = moda_study(tmp_path, "--dry-run")
    assert result.returncode == 2 and "different numbers of tokens per step" in result.stderr


def test_throughput_averages_the_least_shared_runs_only():
    def result(seed: int, rate: float, sharing: int | None) -> RunResult:
        return RunResult("a", seed, 1, 1, [1], [1.0], rate, 1.0, 1.0, gpu_sharing=sharing)

    spec = SimpleNamespace(arms=[SimpleNamespace(name="a")])
    (alone,) = summarize_arms(spec, [result(0, 100.0, 2), result(1, 300.0, 1), result(2, 500.0, 1)])
    assert (alone.tokens_per_sec, alone.throughput_sharing, alone.throughput_runs) == (400.0, 1, 2)
    (unknown,) = summarize_arms(spec, [result(0, 100.0, None), result(1, 300.0, None)])
    assert (unknown.tokens_per_sec, unknown.throughput_sharing, unknown.throughput_runs) == (200.0, None, 2)


def test_throughput_averages_one_gpu_model():
    def result(seed: int, rate: float, device: str | None) -> RunResult:
        return RunResult("a", seed, 1, 1, [1], [1.0], rate, 1.0, 1.0, gpu_sharing=1, device=device)

    spec = SimpleNamespace(arms=[SimpleNamespace(name="a")])
    runs = [result(0, 100.0, "NVIDIA H100"), result(1, 300.0, "NVIDIA H200"), result(2, 500.0, "NVIDIA H200")]
    (arm,) = summarize_arms(spec, runs)
    assert (arm.tokens_per_sec, arm.throughput_device, arm.throughput_runs) == (400.0, "NVIDIA H200", 2)
    assert "400 (alone on H200; 2 runs)" in _throughput(arm)


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706) and t975(4) == pytest.approx(2.776) and t975(100) == 1.96


def test_final_depth_mass_takes_each_layers_last_probe():
    scalars = {
        "depth_attn/layer_00/sink": [(10, 0.9)],  # layer 0 reads no depth: no mass
        "depth_attn/layer_01/mass": [(10, 0.1), (20, 0.3)],
        "depth_attn/layer_01/mass_attn_slots": [(10, 0.05), (20, 0.1)],
        "depth_attn/layer_01/mass_ffn_slots": [(10, 0.05), (20, 0.2)],
        "depth_attn/layer_02/mass": [(20, 0.5)],
        "train/loss": [(20, 2.0)],
    }
    assert final_depth_mass(scalars) == {
        "all": [None, 0.3, 0.5],
        "attn_slots": [None, 0.1, None],
        "ffn_slots": [None, 0.2, None],
    }
    assert final_depth_mass({"train/loss": [(1, 2.0)], "depth_attn/layer_00/sink": [(1, 1.0)]}) is None


def test_report_shows_depth_mass_of_the_arms_that_read_depth(tmp_path):
    def result(arm: str, seed: int, mass: list[float | None] | None) -> RunResult:
        depth = None if mass is None else {"all": mass, "attn_slots": mass, "ffn_slots": [None] * len(mass)}
        return RunResult(arm, seed, 4, 64, [64], [2.0 + seed], None, 1.0, 1.0, gpu_sharing=1, depth_mass=depth)

    spec = SimpleNamespace(name="t", path="t.yaml", arms=[SimpleNamespace(name="base"), SimpleNamespace(name="moda")],
                           reference="base", comparisons=(), runs_per_gpu=1, seeds=[0, 1])  # fmt: skip
    results = [result("base", 0, None), result("base", 1, None),
               result("moda", 0, [None, 0.1, 0.4]), result("moda", 1, [None, 0.3, 0.2])]  # fmt: skip
    write_report(spec, results, [], tmp_path)
    md = (tmp_path / "study.md").read_text()
    # per layer means over seeds: 0.2 (layer 1), 0.3 (layer 2); their mean 0.25; the top layer 2
    assert "| moda | 2 | 0.250 | 2 (0.300) |" in md and "| base | 2 |" not in md.split("Depth mass")[1]
    png = (tmp_path / "depth.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_a_run_records_each_gpu_model_it_trained_on_once(tmp_path, monkeypatch):
    import torch

    from moda_lightning.study import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("NVIDIA H200", "NVIDIA H200", "NVIDIA H100 80GB HBM3"):  # a resumed piece moved machines
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index, name=name: name)
        runner._record_device(tmp_path, 0)
    runner._record_device(tmp_path, None)  # a CPU run adds nothing
    assert runner._recorded_device(tmp_path) == "NVIDIA H200, NVIDIA H100 80GB HBM3"
    assert runner._recorded_device(tmp_path / "missing") is None


def test_runs_sharing_a_gpu_without_mps_get_one_line_saying_to_start_it(tmp_path, monkeypatch):
    from moda_lightning.study.runner import mps_daemon_running, sharing_hint

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_daemon_running()
    hint = sharing_hint(["0", "0", "1", "1"], n_runs=3)
    assert hint is not None and "nvidia-cuda-mps-control -d" in hint and "\n" not in hint
    assert sharing_hint(["0", "1"], n_runs=2) is None, "one run per GPU shares nothing"
    assert sharing_hint(["0", "0"], n_runs=1) is None, "a single run shares nothing"
    assert sharing_hint([None, None], n_runs=2) is None, "CPU runs have no GPU to share"
    (tmp_path / "control").write_text("")  # the daemon's control pipe
    assert mps_daemon_running() and sharing_hint(["0", "0"], n_runs=2) is None


def test_runs_go_to_the_gpus_this_process_may_use(monkeypatch):
    """A study started with CUDA_VISIBLE_DEVICES=2,3 hands its runs GPUs 2 and 3, not 0 and 1; asking
    for more GPUs than are visible is one error before any run starts."""
    import torch

    from moda_lightning.study import runner

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert runner.visible_gpus(None) == ["2", "3"]
    assert runner.visible_gpus(1) == ["2"]
    spec = SimpleNamespace(runs_per_gpu=2, gpus=None)
    assert runner._slots(spec) == ["2", "2", "3", "3"]
    with pytest.raises(ValueError, match=r"asks for gpus: 3, but 2 GPU\(s\) are visible here \(CUDA_VISIBLE_DEVICES=2,3\)"):
        runner.visible_gpus(3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert runner.visible_gpus(None) == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert runner._slots(spec) == [None, None], "no GPU: the runs share the CPU"


def test_recorded_sharing_is_what_a_run_trained_under(tmp_path):
    from moda_lightning.study.runner import GPU_SHARING_FILE, _recorded_gpu_sharing

    record = tmp_path / GPU_SHARING_FILE
    assert _recorded_gpu_sharing(tmp_path) is None
    record.write_text("3\n")  # one sample: also how earlier studies recorded the most runs seen
    assert _recorded_gpu_sharing(tmp_path) == 3
    record.write_text("3\n3\n1\n1\n1\n")  # started beside two runs that soon ended
    assert _recorded_gpu_sharing(tmp_path) == 1
    record.write_text("1\n2\n")  # shared half the time: counts as shared
    assert _recorded_gpu_sharing(tmp_path) == 2


def test_a_run_out_of_gpu_memory_beside_others_says_to_run_fewer_at_once(tmp_path, monkeypatch, capsys):
    """Two runs share a device; one dies out of memory at once. Its failure line says to run fewer at
    once, and the survivor, alone for most of its time, records that it trained alone."""
    from moda_lightning.study import runner
    from moda_lightning.study.spec import plan_runs

    spec = load_study(write_study(tmp_path, seeds=[0]))
    runs = plan_runs(spec, tmp_path / "out")
    programs = {
        "base/seed0": "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'); sys.exit(1)",
        "moda/seed0": "import time; time.sleep(3)",
    }
    monkeypatch.setattr(runner, "fit_command", lambda run: [sys.executable, "-c", programs[run.name]])
    monkeypatch.setattr(runner, "_prepare_data", lambda run: None)
    monkeypatch.setattr(runner, "SHARING_SAMPLE_S", 0.25)
    summarized = {}

    def fake_summarize(run_dir, arm, seed, *rest):
        summarized[f"{arm}/seed{seed}"] = rest[-2]  # the recorded sharing
        return SimpleNamespace(save=lambda folder: None)

    monkeypatch.setattr(runner, "summarize", fake_summarize)
    assert runner.execute(spec, runs) == ["base/seed0"]
    out = capsys.readouterr().out
    failure = next(line for line in out.splitlines() if "FAILED base/seed0" in line)
    assert "ran out of GPU memory while 2 runs shared its GPU" in failure and "--runs-per-gpu 1" in failure
    assert summarized == {"moda/seed0": 1}
    samples = (tmp_path / "out" / "moda" / "seed0" / runner.GPU_SHARING_FILE).read_text().split()
    assert samples[0] == "2" and samples[-1] == "1"


def test_runs_per_gpu_can_be_set_for_one_call(tmp_path, monkeypatch):
    from moda_lightning.study import runner

    study = write_study(tmp_path)  # runs_per_gpu: 2
    seen = []
    monkeypatch.setattr(runner, "execute", lambda spec, runs, **kw: seen.append(spec.runs_per_gpu) or [])
    assert runner.main(["--config", str(study), "--out", str(tmp_path / "out"), "--runs-per-gpu", "1"]) == 0
    assert runner.main(["--config", str(study), "--out", str(tmp_path / "out")]) == 0
    assert seen == [1, 2]
    bad = moda_study(tmp_path, "--runs-per-gpu", "0", "--dry-run")
    assert bad.returncode == 2 and "--runs-per-gpu must be at least 1" in bad.stderr


def test_the_archive_keeps_the_log_of_a_failed_run(tmp_path, monkeypatch):
    from moda_lightning.study import runner

    study = write_study(tmp_path, seeds=[0])
    monkeypatch.setattr(runner, "fit_command", lambda run: [sys.executable, "-c", "raise SystemExit('bad luck: ' + 'x' * 3)"])
    monkeypatch.setattr(runner, "_prepare_data", lambda run: None)
    archive = tmp_path / "archive"
    assert runner.main(["--config", str(study), "--out", str(tmp_path / "out"), "--archive", str(archive)]) == 1
    for arm in ("base", "moda"):
        assert "bad luck: xxx" in (archive / arm / "seed0" / "fit.log").read_text()
    assert [p.name for p in (archive / "base" / "seed0").iterdir()] == ["fit.log"]


def test_runs_that_would_not_fit_one_gpu_together_are_refused_before_any_work(tmp_path):
    """The most memory each arm's finished runs reserved, plus a margin each, against the GPU's memory."""
    from moda_lightning.study.runner import MEMORY_MARGIN_GIB, memory_problem
    from moda_lightning.study.spec import plan_runs

    spec = load_study(write_study(tmp_path, seeds=[0, 1], runs_per_gpu=3))
    runs = plan_runs(spec, tmp_path / "out")
    done = {r.name: r for r in runs}
    for name, peak in (("base/seed0", 30.0), ("moda/seed0", 38.0)):
        done[name].dir.mkdir(parents=True)
        RunResult("x", 0, 1, 1, [1], [1.0], None, 1.0, 1.0, peak_memory_gib=peak).save(done[name].dir)
    todo = [done["base/seed1"], done["moda/seed1"]]
    need = 30.0 + 38.0 + 2 * MEMORY_MARGIN_GIB  # 70 GiB
    assert memory_problem(spec, runs, todo, gpu_gib=need) is None
    line = memory_problem(spec, runs, todo, gpu_gib=need - 1)
    assert line is not None and "\n" not in line
    assert "2 runs at once would need about 70 GiB" in line and "--runs-per-gpu 1" in line
    assert "base 30.0 GiB, moda 38.0 GiB" in line
    assert memory_problem(spec, runs, todo[:1], gpu_gib=10.0) is None, "a run alone is never refused"
    spec_one = load_study(write_study(tmp_path, seeds=[0, 1], runs_per_gpu=1))
    assert memory_problem(spec_one, runs, todo, gpu_gib=10.0) is None


def test_peak_gpu_memory_is_logged_on_a_gpu_at_the_logging_steps(monkeypatch):
    import torch

    from moda_lightning.callbacks import PeakGPUMemory
    from moda_lightning.callbacks.gpu_memory import PEAK_MEMORY_TAG

    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(loggers=[logger], global_step=20, log_every_n_steps=10)
    module = SimpleNamespace(device=torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 3 * 2**30)
    PeakGPUMemory().on_train_batch_end(trainer, module, None, None, 0)
    assert logged == [], "a CPU run has no GPU memory to report"
    module.device = torch.device("cuda", 0)
    callback = PeakGPUMemory()
    for step in (20, 20, 21, 30):  # two batches end at step 20 (gradient accumulation): one entry
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert logged == [(20, {PEAK_MEMORY_TAG: 3.0}), (30, {PEAK_MEMORY_TAG: 3.0})]
    trainer.loggers = []
    PeakGPUMemory().on_train_batch_end(trainer, module, None, None, 0)
    assert len(logged) == 2


def test_pairs_to_clear_zero_is_the_first_count_whose_interval_leaves_zero_out():
    # mean 0.02, sd 0.0141: half-widths 0.127 (2 pairs), 0.0351 (3), 0.0225 (4), 0.0176 (5)
    assert PairedDifference("x", [0, 1], [0.01, 0.03]).pairs_to_clear_zero() == 5
    assert PairedDifference("x", [0], [0.01]).pairs_to_clear_zero() is None  # no spread to plan with
    assert PairedDifference("x", [0, 1], [-0.01, 0.01]).pairs_to_clear_zero() is None  # a zero mean never clears
    assert PairedDifference("x", [0, 1], [-0.5, 0.5001]).pairs_to_clear_zero(most=50) == 51  # past the limit


def test_report_says_when_a_difference_is_clear_of_zero_already_or_past_the_planning_limit(tmp_path):
    spec = SimpleNamespace(name="s", path="s.yaml", arms=[SimpleNamespace(name=n) for n in ("ref", "a", "b")],
                           seeds=[0, 1, 2], reference="ref", comparisons=())  # fmt: skip
    loss = {("ref", 0): 2.0, ("ref", 1): 2.1, ("ref", 2): 2.2,
            ("a", 0): 1.9, ("a", 1): 2.0, ("a", 2): 2.11,  # -0.10, -0.10, -0.09: clear of zero
            ("b", 0): 2.5, ("b", 1): 1.6, ("b", 2): 2.2001}  # +0.5, -0.5, +0.0001: a mean of 0.00003
    results = [RunResult(arm, seed, 4, 64, [64], [value], None, 1.0, 1.0) for (arm, seed), value in loss.items()]
    paired = markdown(spec, results, []).split("Paired differences to")[1].splitlines()
    assert next(line for line in paired if line.startswith("| a | 3 |")).split(" | ")[4] == "clear now"
    assert next(line for line in paired if line.startswith("| b | 3 |")).split(" | ")[4] == "more than 10,000"
