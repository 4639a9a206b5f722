"""A short CPU `moda fit` with both callbacks writes the expected TensorBoard tags, or CSV-side files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moda_lightning.cli import main

CALLBACKS = [
    {"class_path": "moda_lightning.callbacks.DepthAttentionStats",
     "init_args": {"every_n_steps": 2, "probe_batch_size": 2, "figures_every_n_steps": 2}},
    {"class_path": "moda_lightning.callbacks.FlopsOverhead", "init_args": {"window_size": 2}},
]


def run_fit(tmp_path: Path, *args: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} follows word{(i * 7) % 89}." for i in range(4000)))
    main([
        "fit",
        f"--data.files={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.tokenizer_vocab_size=300",
        "--data.seq_len=16",
        "--data.batch_size=4",
        "--model.d_model=32",
        "--model.n_layers=3",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.max_seq_len=16",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.callbacks={json.dumps(CALLBACKS)}",
        *args,
    ])


def fit(tmp_path: Path, *args: str) -> tuple[EventAccumulator, dict[str, list[str]]]:
    run_fit(tmp_path, *args)
    (events,) = tmp_path.glob("runs/**/events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc, acc.Tags()


@pytest.mark.slow
def test_moda_fit_writes_depth_and_flops_tags(tmp_path):
    acc, tags = fit(tmp_path)
    scalars = set(tags["scalars"])
    for layer in ("01", "02"):
        assert {f"depth_attn/layer_{layer}/{s}" for s in ("mass", "mass_std", "mass_attn_slots", "mass_ffn_slots", "sink", "entropy")} <= scalars
    assert {"depth_attn/layer_00/sink", "depth_attn/mean_mass", "depth_attn/probe_seconds"} <= scalars
    assert "depth_attn/layer_00/mass" not in scalars  # layer 0 reads no depth
    assert [e.step for e in acc.Scalars("depth_attn/layer_02/mass")] == [2, 4]
    figures = {"depth_attn/mass_layer_x_head", "depth_attn/mass_layer_x_slot", "depth_attn/mass_hist"}
    assert set(tags["images"]) == figures
    for tag in figures:  # matplotlib figures at each probe, a few hundred pixels a side
        assert [im.step for im in acc.Images(tag)] == [2, 4]
        assert all(im.width >= 300 and im.height >= 250 for im in acc.Images(tag))
    assert set(tags["histograms"]) == {"depth_attn/layer_01/mass_hist", "depth_attn/layer_02/mass_hist"}
    assert {"flops/table/text_summary", "depth_attn/slot_legend/text_summary"} <= set(tags["tensors"])
    (table,) = acc.Tensors("flops/table/text_summary")
    assert "training FLOPs / token" in table.tensor_proto.string_val[0].decode()
    flops = {"train_per_token", "train_per_token_baseline", "overhead_ratio", "depth_overhead_ratio", "proj_overhead_ratio",
             "params", "params_baseline", "param_overhead_ratio", "measured_per_token", "executed_per_token", "measured_over_executed"}
    assert {f"flops/{name}" for name in flops} <= scalars
    assert acc.Scalars("flops/measured_over_executed")[0].value == pytest.approx(1.0, abs=0.05)
    assert {"train/device/items_per_sec", "train/device/flops_per_sec"} <= scalars
    assert "train/device/mfu" not in scalars  # CPU: no known peak


@pytest.mark.slow
def test_sdpa_baseline_logs_the_sink_only(tmp_path):
    _, tags = fit(tmp_path, "--model.attention=sdpa")
    scalars = set(tags["scalars"])
    assert {"depth_attn/layer_00/sink", "depth_attn/layer_02/entropy", "flops/overhead_ratio"} <= scalars
    assert not any(tag.startswith("depth_attn/") and "mass" in tag for tag in scalars)
    assert not tags["images"]


@pytest.mark.slow
def test_csv_logger_gets_the_figures_and_the_flops_table_as_files(tmp_path):
    run_fit(tmp_path, "--trainer.logger=lightning.pytorch.loggers.CSVLogger")
    (metrics,) = tmp_path.glob("runs/**/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"depth_attn/layer_02/mass", "flops/overhead_ratio"} <= set(header)
    media = metrics.parent / "media"
    for name in ("mass_layer_x_head", "mass_layer_x_slot", "mass_hist"):
        for step in (2, 4):
            png = media / f"depth_attn-{name}-step{step:06d}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            width, height = Image.open(png).size
            assert 300 <= width <= 2000 and 250 <= height <= 1500
    assert "training FLOPs / token" in (media / "flops-table-step000000.md").read_text()
    assert "L01.ffn" in (media / "depth_attn-slot_legend-step000002.md").read_text()


@pytest.mark.slow
def test_figures_are_drawn_every_figures_every_n_steps_and_at_the_end(tmp_path):
    """Scalars at every probe (steps 1..5); figures at step 4 and, the run ending between, at 5."""
    sparse = [{"class_path": "moda_lightning.callbacks.DepthAttentionStats",
               "init_args": {"every_n_steps": 1, "probe_batch_size": 2, "figures_every_n_steps": 4}}]  # fmt: skip
    run_fit(tmp_path, "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.max_steps=5",
            f"--trainer.callbacks={json.dumps(sparse)}")  # fmt: skip
    (metrics,) = tmp_path.glob("runs/**/metrics.csv")
    drawn = sorted(int(p.stem[-6:]) for p in (metrics.parent / "media").glob("depth_attn-mass_layer_x_head-step*.png"))
    assert drawn == [4, 5]
    rows = metrics.read_text().splitlines()
    column = rows[0].split(",").index("depth_attn/layer_02/mass")
    assert sum(1 for row in rows[1:] if row.split(",")[column]) == 5


@pytest.mark.slow
def test_the_last_step_is_probed_whatever_every_n_steps_is(tmp_path):
    """every_n_steps=3 in a 4-step run: probes at step 3 and at the last step, 4, with its figures."""
    sparse = [{"class_path": "moda_lightning.callbacks.DepthAttentionStats",
               "init_args": {"every_n_steps": 3, "probe_batch_size": 2, "figures_every_n_steps": 30}}]  # fmt: skip
    run_fit(tmp_path, "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.callbacks={json.dumps(sparse)}")
    (metrics,) = tmp_path.glob("runs/**/metrics.csv")
    rows = [row.split(",") for row in metrics.read_text().splitlines()]
    mass, step = rows[0].index("depth_attn/layer_02/mass"), rows[0].index("step")
    assert sorted({int(row[step]) for row in rows[1:] if row[mass]}) == [3, 4]
    drawn = sorted(int(p.stem[-6:]) for p in (metrics.parent / "media").glob("depth_attn-mass_layer_x_head-step*.png"))
    assert drawn == [4]
