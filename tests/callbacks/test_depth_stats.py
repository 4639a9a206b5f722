"""DepthAttentionStats on constructed attention inputs whose answer is known, and on the real model."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moda_lightning.attention import build_backend
from moda_lightning.callbacks import DepthAttentionStats
from moda_lightning.callbacks.depth_stats import _ProbeBackend, attention_row_stats, slot_labels
from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDAAttention, MoDATransformer
from moda_lightning.ops import moda_attention

B, T, H, d = 2, 9, 2, 8  # Hq = Hk = 2, so each query head has its own KV head


class TwoLayerProbe(nn.Module):
    """Two attention layers fed constructed tensors: layer 0 reads no depth, layer 1 reads ``num_depth`` slots."""

    def __init__(self, cfg: MoDAConfig, q, k, v, depth_k, depth_v, num_depth: int, q_depth=None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MoDAAttention(cfg, build_backend("moda_torch"), writes_depth=True, has_depth_proj=False) for _ in range(2)
        )
        self.inputs = (q, k, v, depth_k, depth_v, num_depth)
        self.extra = {} if q_depth is None else {"q_depth": q_depth}  # as the model passes it

    def forward(self, idx):
        q, k, v, depth_k, depth_v, num_depth = self.inputs
        self.layers[0].backend(q, k, v)
        return self.layers[1].backend(q, k, v, depth_k, depth_v, num_depth=num_depth, **self.extra)


def config(**kw) -> MoDAConfig:
    return MoDAConfig(vocab_size=16, d_model=H * d, n_layers=2, n_heads=H, n_kv_heads=H, **kw)


def logged(cfg: MoDAConfig, *tensors, num_depth: int, q_depth=None) -> dict[str, float]:
    callback = DepthAttentionStats()
    model = TwoLayerProbe(cfg, *tensors, num_depth, q_depth=q_depth)
    stats = callback.collect(model, cfg, torch.zeros(1, T, dtype=torch.long))
    return callback.scalars(stats, cfg)


def unit_queries() -> torch.Tensor:
    q = torch.randn(B, T, H, d)
    return q / q.norm(dim=-1, keepdim=True)


def test_depth_keys_aligned_with_the_query_take_all_the_mass():
    torch.manual_seed(0)
    q, k, v = unit_queries(), torch.randn(B, T, H, d), torch.randn(B, T, H, d)
    depth_k = (40.0 * q).unsqueeze(2).repeat(1, 1, 2, 1, 1)  # logit 40 / sqrt(8) ~ 14 per depth slot
    scalars = logged(config(), q, k, v, depth_k, torch.randn_like(depth_k), num_depth=2)
    assert scalars["depth_attn/layer_01/mass"] > 0.999
    assert scalars["depth_attn/mean_mass"] > 0.999
    # Two equal slots share the mass equally: half on layer 0's attention slot, half on its FFN slot.
    assert scalars["depth_attn/layer_01/mass_attn_slots"] == pytest.approx(0.5, abs=1e-3)
    assert scalars["depth_attn/layer_01/mass_ffn_slots"] == pytest.approx(0.5, abs=1e-3)
    assert scalars["depth_attn/layer_01/sink"] < 1e-3
    assert "depth_attn/layer_00/mass" not in scalars  # layer 0 reads no depth


def test_depth_keys_opposite_to_the_query_get_no_mass():
    torch.manual_seed(1)
    q, k, v = unit_queries(), torch.randn(B, T, H, d), torch.randn(B, T, H, d)
    depth_k = (-40.0 * q).unsqueeze(2).repeat(1, 1, 2, 1, 1)
    scalars = logged(config(), q, k, v, depth_k, torch.randn_like(depth_k), num_depth=2)
    assert scalars["depth_attn/layer_01/mass"] < 1e-4
    assert scalars["depth_attn/layer_01/mass_std"] < 1e-4


def test_a_single_valid_slot_gets_all_the_per_slot_mass():
    """The stream holds 3 slots but only the first is valid (num_depth=1): the others must stay unread."""
    torch.manual_seed(2)
    cfg = config(ffn_kv=False)  # one slot per layer: layer 1 reads layer 0's attention K/V only
    q, k, v = unit_queries(), torch.randn(B, T, H, d), torch.randn(B, T, H, d)
    depth_k = torch.stack([10.0 * q, 40.0 * q, 40.0 * q], dim=2)  # slots 1, 2 would dominate if read
    callback = DepthAttentionStats()
    stats = callback.collect(TwoLayerProbe(cfg, q, k, v, depth_k, torch.randn_like(depth_k), 1), cfg, torch.zeros(1, T))
    assert stats[1].num_depth == 1
    assert stats[1].slot_mass.item() == pytest.approx(stats[1].mass.mean().item(), rel=1e-5)
    per_head, per_slot = callback.heatmaps(stats, cfg)
    assert per_slot.shape == (2, 1) and torch.isnan(per_slot[0, 0])
    assert per_slot[1, 0].item() == pytest.approx(stats[1].mass.mean().item(), rel=1e-5)
    scalars = callback.scalars(stats, cfg)
    assert scalars["depth_attn/layer_01/mass"] == pytest.approx(per_slot[1, 0].item(), rel=1e-5)
    assert "depth_attn/layer_01/mass_attn_slots" not in scalars  # only one kind of slot
    assert slot_labels(cfg) == ["L00.attn"]


def test_statistics_match_a_dense_softmax_computed_by_hand():
    """Sink, entropy, depth and slot mass against the explicit [sequence | depth] softmax, with chunking forced."""
    torch.manual_seed(3)
    Hq, Hk, S = 4, 2, 3
    q, k = torch.randn(B, T, Hq, d), torch.randn(B, T, Hk, d)
    depth_k = torch.randn(B, T, S + 2, Hk, d)  # two more slots than are valid
    st = attention_row_stats(q, k, depth_k, num_depth=S, max_chunk_elems=B * Hq * (T + S) * 2)

    kv_head = torch.arange(Hq) // (Hq // Hk)
    seq = torch.einsum("bthd,bjhd->bthj", q, k[:, :, kv_head]) * d**-0.5
    seq = seq.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[None, :, None, :], float("-inf"))
    dep = torch.einsum("bthd,btshd->bths", q, depth_k[:, :, :S][:, :, :, kv_head]) * d**-0.5
    p = torch.cat([seq, dep], dim=-1).softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(st.mass, p[..., T:].sum(-1))
    torch.testing.assert_close(st.slot_mass, p[..., T:].mean(dim=(0, 1, 2)))
    torch.testing.assert_close(st.sink, p[..., 0])
    torch.testing.assert_close(st.entropy, entropy, atol=1e-4, rtol=1e-4)
    # The op's own by-product gives the same depth mass.
    v = torch.randn(B, T, Hk, d)
    _, lse, lse_depth = moda_attention(q, k, v, depth_k, torch.randn_like(depth_k), num_depth=S, return_lse=True)
    torch.testing.assert_close(st.mass, torch.exp(lse_depth - lse))


def test_depth_logits_use_the_depth_query_when_the_model_passes_one():
    """With ``q_depth`` (the reader's key gain on the query of the depth logits) the statistics describe
    the softmax the model computes: slots opposite to ``q`` but aligned with ``q_depth`` take the mass."""
    torch.manual_seed(5)
    q, k, v = unit_queries(), torch.randn(B, T, H, d), torch.randn(B, T, H, d)
    q_depth = -q
    depth_k = (40.0 * q_depth).unsqueeze(2).repeat(1, 1, 2, 1, 1)
    depth_v = torch.randn_like(depth_k)
    assert logged(config(), q, k, v, depth_k, depth_v, num_depth=2)["depth_attn/layer_01/mass"] < 1e-4
    scalars = logged(config(), q, k, v, depth_k, depth_v, num_depth=2, q_depth=q_depth)
    assert scalars["depth_attn/layer_01/mass"] > 0.999

    # The probe hands q_depth on to the backend, and its mass is the op's own by-product.
    records = []
    weak = 0.1 * q_depth  # logits near 1.4: depth and sequence share the mass
    o = _ProbeBackend(build_backend("moda_torch"), records)(q, k, v, depth_k, depth_v, num_depth=1, q_depth=weak)
    o_op, lse, lse_depth = moda_attention(q, k, v, depth_k, depth_v, num_depth=1, q_depth=weak, return_lse=True)
    assert torch.equal(o, o_op)
    torch.testing.assert_close(records[0].mass, torch.exp(lse_depth - lse))
    assert 0.05 < records[0].mass.mean() < 0.95  # a row that splits its mass: the check has something to compare


def test_probe_restores_the_backends_and_rows_are_distributions():
    torch.manual_seed(4)
    cfg = MoDAConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16)
    model = MoDATransformer(cfg)
    idx = torch.randint(50, (2, 16))
    backends = [m.backend for m in model.modules() if isinstance(m, MoDAAttention)]
    stats = DepthAttentionStats().collect(model, cfg, idx)
    assert [m.backend for m in model.modules() if isinstance(m, MoDAAttention)] == backends
    assert [st.num_depth for st in stats] == [0, 2, 4]
    for st in stats:  # rows are distributions: depth + sequence mass add up, entropy is non-negative
        assert (st.mass <= 1 + 1e-6).all() and (st.entropy >= -1e-5).all()
        assert st.sink[:, 0].add(st.mass[:, 0]).sub(1).abs().max() < 1e-5  # token 0's row: sink + depth = 1


def test_sdpa_baseline_logs_sink_and_entropy_only_and_says_so(caplog):
    cfg = MoDAConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, attention="sdpa")
    callback = DepthAttentionStats()
    stats = callback.collect(MoDATransformer(cfg), cfg, torch.randint(50, (1, 16)))
    scalars = callback.scalars(stats, cfg)
    assert {"depth_attn/layer_00/sink", "depth_attn/layer_01/entropy", "depth_attn/mean_sink"} <= set(scalars)
    assert not any("mass" in tag for tag in scalars) and callback.figures(stats, cfg, step=0) == {}
    with caplog.at_level(logging.INFO):
        callback.on_fit_start(SimpleNamespace(), SimpleNamespace(config=cfg))
    assert "depth statistics do not apply" in caplog.text


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        DepthAttentionStats(every_n_steps=0)
    with pytest.raises(ValueError, match="figures_every_n_steps=75 must be a positive multiple of every_n_steps=50"):
        DepthAttentionStats(figures_every_n_steps=75)
    assert DepthAttentionStats(every_n_steps=20).figures_every_n_steps == 200
