"""Model options of the paper's recipes: paired initialisation, QK-norm scope, init schemes, biases,
last-layer projections, z-loss, and that the analytic parameter count follows every one of them."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moda_lightning.config import MoDAConfig
from moda_lightning.flops import parameter_counts
from moda_lightning.lightning_module import MoDALightningModule
from moda_lightning.model import MoDATransformer
from moda_lightning.norms import QKNorm

VOCAB = 64


def config(**overrides) -> MoDAConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return MoDAConfig(**{**base, **overrides})


def build(seed: int, **overrides) -> MoDATransformer:
    torch.manual_seed(seed)
    return MoDATransformer(config(**overrides))


VARIANTS = {
    "baseline": dict(attention="sdpa"),
    "depth_only": dict(depth_kv=True, ffn_kv=False),
    "ffn_kv": dict(depth_kv=True, ffn_kv=True),
    "attn_kv_proj": dict(depth_kv=True, ffn_kv=True, attn_kv_proj=True),
    "ffn_kv_post": dict(depth_kv=True, ffn_kv=True, norm="post"),
}


def test_shared_parameters_start_identical_across_variants():
    """Before paired initialisation the depth projections consumed random numbers mid-stack, so at one
    seed only the embedding and layer 0 of a baseline and a MoDA model matched."""
    models = {name: build(7, **kw).state_dict() for name, kw in VARIANTS.items()}
    for (a, sa), (b, sb) in itertools.combinations(models.items(), 2):
        shared = set(sa) & set(sb)
        assert len(shared) >= 4 * 8 + 3, (a, b)  # at least every parameter of the baseline
        for key in shared:
            assert torch.equal(sa[key], sb[key]), f"{key} differs between {a} and {b}"
    extra = set(models["ffn_kv"]) - set(models["baseline"])
    assert extra and all("depth_kv_proj" in key for key in extra)
    # The extra projections are not copies of one another either.
    assert not torch.equal(models["ffn_kv"]["layers.0.ffn.sublayer.depth_kv_proj.kv_proj.weight"],
                           models["ffn_kv"]["layers.1.ffn.sublayer.depth_kv_proj.kv_proj.weight"])  # fmt: skip


def test_seed_decides_the_weights():
    same, other = build(3).state_dict(), build(4).state_dict()
    again = build(3).state_dict()
    assert all(torch.equal(same[k], again[k]) for k in same)
    weights = [k for k in same if k.endswith("weight") and "norm" not in k]
    assert all(not torch.equal(same[k], other[k]) for k in weights)


@pytest.mark.parametrize("scheme", ["gpt2", "olmo2"])
def test_init_schemes(scheme):
    model = build(0, init_scheme=scheme, n_layers=8, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=256)
    std = 0.02
    qkv = model.layers[3].attn.sublayer.qkv_proj.weight
    w_down = model.layers[3].ffn.sublayer.w_down.weight
    assert qkv.std().item() == pytest.approx(std * (0.987 if scheme == "olmo2" else 1.0), rel=0.1)
    if scheme == "gpt2":
        assert w_down.std().item() == pytest.approx(std / math.sqrt(16), rel=0.1)
        assert qkv.abs().max() > 3 * std
    else:  # truncated at 3 std, not scaled: the std of a normal truncated at +-3 sd is 0.987 sd
        assert w_down.std().item() == pytest.approx(0.987 * std, rel=0.1)
        for p in (qkv, w_down, model.embed.weight):
            assert p.abs().max() <= 3 * std + 1e-7
    assert torch.equal(model.layers[0].attn.norm.weight, torch.ones(64))


def test_qk_norm_scopes():
    head = build(0, qk_norm_scope="head").layers[0].attn.sublayer
    full = build(0, qk_norm_scope="full").layers[0].attn.sublayer
    assert head.q_norm.weight.shape == (8,) and head.k_norm.weight.shape == (8,)
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (16,)
    x = torch.randn(2, 5, 2, 8)
    # 'full' normalises over both heads together: each head alone is not unit-RMS, the pair is.
    y = full.k_norm(x)
    assert torch.allclose(y.pow(2).mean(dim=(-2, -1)), torch.ones(2, 5), atol=1e-4)
    assert not torch.allclose(y.pow(2).mean(dim=-1), torch.ones(2, 5, 2), atol=1e-2)
    assert torch.allclose(head.k_norm(x).pow(2).mean(dim=-1), torch.ones(2, 5, 2), atol=1e-4)
    # The gain as query heads see it: query head h reads KV head h // G.
    norm = QKNorm(2, 8, "full")
    with torch.no_grad():
        norm.weight.copy_(torch.arange(16.0))
    per_head = norm.gain_per_head(4)
    assert torch.equal(per_head[0], per_head[1]) and torch.equal(per_head[2], torch.arange(8.0, 16.0))
    assert torch.allclose(norm(x), norm.unit(x) * norm.weight.view(2, 8))


def test_biases_and_last_layer_projections():
    plain = build(0, ffn_kv=True)
    biased = build(0, ffn_kv=True, linear_bias=True, last_layer_depth_proj=True)
    assert biased.layers[1].attn.sublayer.qkv_proj.bias is not None and plain.layers[1].attn.sublayer.qkv_proj.bias is None
    assert biased.lm_head.bias is None
    assert plain.layers[-1].ffn.sublayer.depth_kv_proj is None
    last = biased.layers[-1].ffn.sublayer.depth_kv_proj
    assert last is not None
    # The last layer's projection exists but no layer reads its slot: it gets no gradient.
    idx = torch.randint(0, VOCAB, (2, 9))
    biased(idx).logsumexp(-1).mean().backward()
    assert last.kv_proj.weight.grad is None and not last.kv_proj.weight.requires_grad  # frozen: DDP needs no flag
    assert biased.layers[-2].ffn.sublayer.depth_kv_proj.kv_proj.weight.grad is not None


GRID = list(itertools.product(["sdpa", "moda_torch"], [False, True], [False, True], ["head", "full"], [False, True], ["writer", "reader"]))


@pytest.mark.parametrize("attention,bias,last,scope,tied,keys", GRID)
def test_parameter_counts_follow_every_option(attention, bias, last, scope, tied, keys):
    depth = attention == "moda_torch"
    cfg = config(attention=attention, linear_bias=bias, last_layer_depth_proj=last and depth, qk_norm_scope=scope,
                 tie_embeddings=tied, depth_keys=keys, attn_kv_proj=depth)  # fmt: skip
    with torch.device("meta"):
        real = sum(p.numel() for p in MoDATransformer(cfg).parameters())
    assert parameter_counts(cfg).total == real


def test_bad_option_values_are_reported_together():
    with pytest.raises(ValueError) as err:
        config(depth_keys="both", qk_norm_scope="layer", init_scheme="xavier")
    text = str(err.value)
    assert "depth_keys='both'; expected one of ['writer', 'reader']" in text
    assert "qk_norm_scope='layer'" in text and "init_scheme='xavier'" in text
    with pytest.raises(ValueError, match="last_layer_depth_proj=true adds depth projections"):
        config(attention="sdpa", last_layer_depth_proj=True)


def test_z_loss_is_added_to_the_training_loss_only():
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
    plain, with_z = MoDALightningModule(**kwargs), MoDALightningModule(**kwargs, z_loss=1e-2)
    with_z.load_state_dict(plain.state_dict())
    batch = torch.randint(0, VOCAB, (2, 9))
    ce, none = plain._loss(batch)
    ce_z, z = with_z._loss(batch)
    assert none is None and torch.allclose(ce, ce_z)
    logits = plain.model(batch[:, :-1]).float().flatten(0, 1)
    assert torch.allclose(z, torch.logsumexp(logits, -1).square().mean())


class _Recorder:
    """Stands in for a layer's backend: records what the layer passes and returns the real output."""

    def __init__(self, backend, calls: list) -> None:
        self.backend, self.calls = backend, calls
        self.reads_depth, self.takes_depth_grad_into = backend.reads_depth, False

    def check_device(self, device_type: str) -> None:
        pass

    def __call__(self, q, k, v, depth_k=None, depth_v=None, *, num_depth=0, scale=None, q_depth=None, **_):
        out = self.backend(q, k, v, depth_k, depth_v, num_depth=num_depth, scale=scale, q_depth=q_depth)
        if isinstance(depth_k, list):  # the slot-list stream: seen here as the [B, T, S, Hk, d] stack
            depth_k, depth_v = torch.stack(depth_k, 2), torch.stack(depth_v, 2)
        self.calls.append(dict(q=q, k=k, v=v, depth_k=depth_k, depth_v=depth_v, num_depth=num_depth, q_depth=q_depth, o=out))
        return out


@pytest.mark.parametrize("scope", ["head", "full"])
def test_reader_keys_are_raw_and_normed_by_the_reading_layer(scope):
    """depth_keys='reader': a slot holds the writer's pre-norm, pre-RoPE key (stored at unit RMS), and
    the reading layer applies its own key norm, gain included, and no rotation. The model carries the
    reader's gain on the depth query (q_depth); the output must equal attention over explicitly
    normed slots."""
    from moda_kernels.moda_attn import moda_attn_reference

    model = build(0, n_layers=3, depth_keys="reader", qk_norm_scope=scope, ffn_kv=True)
    with torch.no_grad():  # gains away from 1, so a missing or misplaced gain shows
        for layer in model.layers:
            layer.attn.sublayer.k_norm.weight.uniform_(0.5, 1.5)
    calls, raw_keys = [], []
    for layer in model.layers:
        attn = layer.attn.sublayer
        attn.backend = _Recorder(attn.backend, calls)
        attn.qkv_proj.register_forward_hook(lambda m, i, out, a=attn: raw_keys.append(out.split(a.qkv_split, -1)[1]))
    model(torch.randint(0, VOCAB, (2, 9)))
    B, T = 2, 9
    for layer_idx in (1, 2):
        call, attn = calls[layer_idx], model.layers[layer_idx].attn.sublayer
        assert call["num_depth"] == 2 * layer_idx and call["q_depth"] is not None
        # the attention slot of layer 0: its raw key at unit RMS, not rotated
        raw = raw_keys[0].view(B, T, 2, 8)
        flat = raw.flatten(-2) if scope == "full" else raw
        unit = (flat / flat.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).view_as(raw)
        assert torch.allclose(call["depth_k"][:, :, 0], unit, atol=1e-5)
        gain = attn.k_norm.weight.view(-1, 8) if scope == "full" else attn.k_norm.weight
        normed = call["depth_k"][:, :, : call["num_depth"]] * gain  # [B, T, S, Hk, d] * [Hk or 1, d]
        expected = moda_attn_reference(call["q"], call["k"], call["v"], normed, call["depth_v"][:, :, : call["num_depth"]])
        assert torch.allclose(call["o"], expected, atol=1e-5)


def test_bad_training_arguments_are_refused_together():
    """lr=0 used to train with a flat loss, and a negative warmup bent the schedule silently."""
    kwargs = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
    with pytest.raises(ValueError) as err:
        MoDALightningModule(**kwargs, lr=0.0, warmup_steps=-5, min_lr_ratio=1.5, z_loss=-1.0)
    text = str(err.value)
    for problem in ("lr=0.0: the peak learning rate must be > 0", "warmup_steps=-5", "min_lr_ratio=1.5", "z_loss=-1.0"):
        assert problem in text
