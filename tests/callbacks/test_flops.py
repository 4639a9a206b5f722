"""Analytic FLOP and parameter counts: a hand count, the real module, FlopCounterMode, and the docs table."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

import moda_lightning.callbacks.flops_overhead as flops_overhead
from moda_lightning.callbacks import FlopsOverhead
from moda_lightning.callbacks.flops_overhead import executed_convention, measure_training_step
from moda_lightning.config import MoDAConfig
from moda_lightning.flops import (
    executed_training_flops_per_token,
    flops_per_token,
    parameter_counts,
    training_flops_per_token,
)
from moda_lightning.model import MoDATransformer

from benchmarks.flops_table import PAPER_SHAPES, docs_shapes, docs_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "flops.md"


def tiny(**kw) -> MoDAConfig:
    return MoDAConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=8, **kw)


def test_forward_flops_equal_a_hand_count():
    """D=16, L=2, Hq=2, Hk=1, d=8, F=64, V=32, T=4; depth K/V and FFN K/V on (2 slots per layer)."""
    f = flops_per_token(tiny(), seq_len=4)
    # per layer: q, o 2*16*16 each, k, v 2*16*8 each = 1536; SwiGLU 3 * 2*16*64 = 6144
    assert f.dense == 2 * (1536 + 6144)
    assert f.lm_head == 2 * 16 * 32
    # causal: 1+2+3+4 = 10 pairs over 4 tokens, 4*Hq*d = 64 FLOPs per pair, 2 layers
    assert f.seq_attn == 2 * 64 * 10 // 4
    # layer 0 reads 0 slots, layer 1 reads 2
    assert f.depth_attn == 64 * 2
    # one FFN K/V projection (layer 0; the last layer writes none): 2*16*(2*8)
    assert f.depth_proj == 512
    assert (f.total, f.baseline) == (17344, 16704)
    assert f.overhead == pytest.approx(640 / 16704)
    assert flops_per_token(tiny(), 4, pairs="full").seq_attn == 2 * 64 * 4
    assert training_flops_per_token(tiny(), 4).total == 3 * 17344


@pytest.mark.parametrize(
    "kw",
    [{}, {"attention": "sdpa"}, {"ffn_kv": False}, {"depth_kv": False}, {"attn_kv_proj": True}, {"tie_embeddings": True, "qk_norm": False}],
    ids=["moda", "sdpa", "no-ffn-kv", "ffn-kv-only", "attn-kv-proj", "tied-no-qknorm"],
)
def test_parameter_count_matches_the_module(kw):
    cfg = tiny(**kw)
    assert parameter_counts(cfg).total == MoDATransformer(cfg).num_parameters()


def test_parameter_overhead_is_the_specs_ffn_kv_projection():
    """Table 3: rows 4 - 1 differ by 36.7M at the 700M shape, i.e. 2 * (L-1) * D * Hk * d (plus key norms)."""
    cfg = MoDAConfig(vocab_size=50304, d_model=1024, n_layers=36, n_heads=16, n_kv_heads=8)
    assert parameter_counts(cfg).depth_proj == 2 * 35 * 1024 * 8 * 64 + 35 * 64
    assert round(parameter_counts(cfg).depth_proj / 1e6, 1) == 36.7


@pytest.mark.parametrize(
    "kw",
    [{}, {"attention": "sdpa"}, {"attn_kv_proj": True}, {"activation_checkpointing": True}, {"activation_checkpointing": True, "norm": "post"}],
    ids=["moda_torch", "sdpa", "attn-kv-proj", "checkpointing-pre", "checkpointing-post"],
)
def test_flop_counter_agrees_with_the_analytic_count_as_executed(kw):
    cfg = MoDAConfig(vocab_size=64, d_model=24, n_layers=3, n_heads=6, n_kv_heads=2, max_seq_len=16, **kw)
    measured, by_op = measure_training_step(MoDATransformer(cfg), torch.randint(64, (2, 17)))
    pairs, attn_backward, depth, _ = executed_convention(cfg, list(by_op))
    expected = executed_training_flops_per_token(
        cfg, 16, pairs=pairs, attn_backward=attn_backward, depth=depth, recompute=cfg.activation_checkpointing
    )
    assert measured == 2 * 16 * expected


def fake_trainer(pl_module, seq_len: int):
    return SimpleNamespace(
        datamodule=SimpleNamespace(seq_len=seq_len), precision_plugin=Precision(), loggers=[], is_global_zero=True, global_step=0
    )


def test_callback_reports_the_model_count_and_warns_when_the_count_disagrees(monkeypatch):
    cfg = MoDAConfig(vocab_size=64, d_model=24, n_layers=3, n_heads=6, n_kv_heads=2, max_seq_len=16)
    pl_module = SimpleNamespace(config=cfg, model=MoDATransformer(cfg), device=torch.device("cpu"))
    callback = FlopsOverhead()
    callback.on_fit_start(fake_trainer(pl_module, 16), pl_module)
    report = callback.report
    assert report["flops/train_per_token"] == training_flops_per_token(cfg, 16).total
    assert report["flops/overhead_ratio"] == pytest.approx(training_flops_per_token(cfg, 16).overhead)
    assert report["flops/measured_over_executed"] == pytest.approx(1.0)
    monkeypatch.setattr(flops_overhead, "executed_training_flops_per_token", lambda *a, **k: 1)
    with pytest.warns(UserWarning, match="FlopCounterMode counted"):
        FlopsOverhead().on_fit_start(fake_trainer(pl_module, 16), pl_module)


def test_the_paper_like_1_5b_shape_costs_about_3_7_percent():
    kw, T = PAPER_SHAPES["1.5B-like (assumed)"]
    cfg = MoDAConfig(**kw)
    assert 1.4e9 < parameter_counts(cfg).baseline < 1.6e9
    assert training_flops_per_token(cfg, T).overhead == pytest.approx(0.037, abs=0.003)


def test_docs_table_is_the_generated_one():
    """docs/flops.md must hold what `benchmarks/flops_table.py` prints for the shipped configs."""
    assert docs_table() in DOCS.read_text(), (
        "docs/flops.md is stale: regenerate its table with `PYTHONPATH=kernels:. python benchmarks/flops_table.py`"
    )


def test_table_reads_configs_through_the_cli_with_includes_and_overlays():
    """A hand YAML reader saw only the first file: the baseline overlay must turn MoDA off, and the
    row must keep the shape config's model and data values (its `trainer:` include parsed too)."""
    row = [ROOT / "configs" / "moda_700m.yaml", ROOT / "configs" / "variants" / "baseline.yaml"]
    (name, (cfg, seq_len)), *_ = docs_shapes([row]).items()
    assert name == "configs/moda_700m.yaml + configs/variants/baseline.yaml"
    assert (cfg.attention, cfg.depth_kv, cfg.ffn_kv) == ("sdpa", False, False)
    assert (cfg.d_model, cfg.n_layers, cfg.n_kv_heads, cfg.vocab_size, seq_len) == (1024, 36, 8, 100278, 4096)
    assert training_flops_per_token(cfg, seq_len).overhead == 0.0


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("NVIDIA H200", "bf16-mixed", 989.4e12),  # Lightning's table does not match this name
        ("NVIDIA H200", "32-true", 494.7e12),  # TF32 matmuls under the default "high" precision
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", None),  # Lightning's own figure stands
    ],
)
def test_the_h200_gets_the_h100_sxm_dense_peak(monkeypatch, name, precision, expected):
    from lightning.pytorch.plugins.precision import MixedPrecision

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    plugin = MixedPrecision("bf16-mixed", "cuda") if precision == "bf16-mixed" else Precision()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "get_float32_matmul_precision", lambda: "high")
        peak = flops_overhead.dense_peak_flops(torch.device("cuda", 0), plugin)
    assert peak == (None if expected is None else int(expected))
    assert flops_overhead.dense_peak_flops(torch.device("cpu"), plugin) is None
