"""The MoDA model: every backend x norm x depth option trains; the depth stream is wired as the spec says."""

from __future__ import annotations

import itertools

import pytest
import torch

from moda_lightning.attention import AttentionBackend, register_backend
from moda_lightning.config import MoDAConfig
from moda_lightning.depth_stream import DepthStream
from moda_lightning.model import MoDATransformer

VOCAB = 50

# (depth_kv, ffn_kv, attn_kv_proj): the paper's Table 3 rows 3, 4, 5 and FFN-only slots.
DEPTH_OPTIONS = [(True, False, False), (True, True, False), (True, True, True), (False, True, False)]
COMBOS = [("sdpa", norm, (False, False, False)) for norm in ("pre", "post", "olmo2")] + [
    ("moda_torch", norm, opts) for norm, opts in itertools.product(("pre", "post", "olmo2"), DEPTH_OPTIONS)
]


def tiny_config(**overrides) -> MoDAConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return MoDAConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "attention,norm,opts", COMBOS, ids=[f"{a}-{n}-depth{int(o[0])}{int(o[1])}{int(o[2])}" for a, n, o in COMBOS]
)
def test_forward_backward_every_combination(attention, norm, opts):
    depth_kv, ffn_kv, attn_kv_proj = opts
    torch.manual_seed(0)
    cfg = tiny_config(attention=attention, norm=norm, depth_kv=depth_kv, ffn_kv=ffn_kv, attn_kv_proj=attn_kv_proj)
    model = MoDATransformer(cfg)
    idx = torch.randint(0, VOCAB, (2, 11))
    logits = model(idx)
    assert logits.shape == (2, 11, VOCAB)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} got no finite gradient"


def test_table3_parameter_counts_differ_by_the_projections():
    """Rows 4 and 5 add 2*(L-1)*D*Hk*d parameters each over row 3 (docs/method.md, section 5; the
    last layer writes no slot that anyone reads, as in the paper's 700M counts)."""
    counts = {
        row: MoDATransformer(tiny_config(depth_kv=True, ffn_kv=ffn, attn_kv_proj=proj, qk_norm=False)).num_parameters()
        for row, ffn, proj in [(3, False, False), (4, True, False), (5, True, True)]
    }
    cfg = tiny_config()
    extra = 2 * (cfg.n_layers - 1) * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    assert counts[4] - counts[3] == extra and counts[5] - counts[4] == extra
    baseline = MoDATransformer(tiny_config(attention="sdpa", qk_norm=False)).num_parameters()
    assert counts[3] == baseline


def test_depth_projections_are_modules_named_apart_from_the_config_switch():
    """``config.depth_kv`` is a bool; the modules that project depth K/V are ``depth_kv_proj`` in both
    sublayers, and the model keeps its config as ``.config``."""
    config = tiny_config(attn_kv_proj=True)
    model = MoDATransformer(config)
    assert model.config is config and config.depth_kv is True
    keys = set(model.state_dict())
    for layer in range(config.n_layers - 1):
        for sublayer in ("attn", "ffn"):
            assert f"layers.{layer}.{sublayer}.sublayer.depth_kv_proj.kv_proj.weight" in keys
    last = config.n_layers - 1  # writes no slot anyone reads: no projections
    assert not any(key.startswith(f"layers.{last}.") and "depth_kv_proj" in key for key in keys)
    assert not any(".depth_kv." in key for key in keys)


@register_backend("_test_recording")
class RecordingBackend(AttentionBackend):
    """MoDA reference backend that also records what each layer read."""

    log: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []

    def __call__(self, q, k, v, depth_k=None, depth_v=None, *, num_depth=0, scale=None):
        from moda_lightning.ops import moda_attention

        o = moda_attention(q, k, v, depth_k, depth_v, num_depth=num_depth, scale=scale)
        RecordingBackend.log.append((num_depth, None if depth_k is None else depth_k.detach().clone(), o.detach()))
        return o


@pytest.mark.parametrize("ffn_kv", [False, True])
def test_layer_reads_exactly_the_slots_of_earlier_layers(monkeypatch, ffn_kv):
    """Layer l reads S_valid = l (or 2l with FFN KV) slots, and perturbing the slot written by
    sublayer j changes the attention output of exactly the layers after j's layer."""
    torch.manual_seed(0)
    cfg = tiny_config(attention="_test_recording", n_layers=4, ffn_kv=ffn_kv)
    model = MoDATransformer(cfg).eval()
    idx = torch.randint(0, VOCAB, (1, 9))
    per_layer = cfg.slots_per_layer

    RecordingBackend.log = []
    with torch.no_grad():
        model(idx)
    clean = list(RecordingBackend.log)
    assert [n for n, _, _ in clean] == [per_layer * layer for layer in range(cfg.n_layers)]

    original_append = DepthStream.append
    for slot in range(per_layer * (cfg.n_layers - 1)):
        writer_layer = slot // per_layer

        def perturbed_append(self, k, v, slot=slot):
            if len(self) == slot:
                v = v + 1.0
            original_append(self, k, v)

        monkeypatch.setattr(DepthStream, "append", perturbed_append)
        RecordingBackend.log = []
        with torch.no_grad():
            model(idx)
        monkeypatch.setattr(DepthStream, "append", original_append)
        changed = [not torch.equal(o, o_clean) for (_, _, o), (_, _, o_clean) in zip(RecordingBackend.log, clean)]
        # Attention outputs of layers up to the writer are untouched; the next layer reads the slot.
        assert changed[: writer_layer + 1] == [False] * (writer_layer + 1), f"slot {slot} read too early"
        assert changed[writer_layer + 1], f"slot {slot} written by layer {writer_layer} is not read by the next layer"


def test_depth_keys_carry_their_own_tokens_rotary_phase():
    """A reused attention key is rotated at its token: the layer-1 read of slot 0 equals layer 0's rotated k."""
    torch.manual_seed(0)
    cfg = tiny_config(attention="_test_recording", n_layers=2, ffn_kv=False)
    model = MoDATransformer(cfg).eval()
    idx = torch.randint(0, VOCAB, (1, 8))
    attn0 = model.layers[0].attn
    h = attn0.norm(model.embed(idx))
    B, T, _ = h.shape
    _, k0, _ = attn0.sublayer.qkv_proj(h).split(attn0.sublayer.qkv_split, dim=-1)
    k0 = k0.view(B, T, cfg.n_kv_heads, cfg.head_dim)
    expected = model.rope(attn0.sublayer.k_norm(k0))
    RecordingBackend.log = []
    with torch.no_grad():
        model(idx)
    _, depth_k_read_by_layer1, _ = RecordingBackend.log[1]
    torch.testing.assert_close(depth_k_read_by_layer1[:, :, 0], expected.detach())


@pytest.mark.parametrize("attention,norm", [("sdpa", "pre"), ("moda_torch", "pre"), ("moda_torch", "post"), ("moda_torch", "olmo2")])
def test_causality(attention, norm):
    """Changing token t+1 never changes the logits at positions <= t (depth reads stay per-token)."""
    torch.manual_seed(0)
    model = MoDATransformer(tiny_config(attention=attention, norm=norm, attn_kv_proj=attention != "sdpa")).eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 14):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
            out = model(changed)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_sequence_longer_than_max_fails_with_advice():
    model = MoDATransformer(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match=r"longer than the model's max_seq_len=8.*--data.seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_heads=6, n_kv_heads=4), r"n_heads=6 is not a multiple of n_kv_heads=4"),
        (dict(d_model=30, n_heads=4), r"d_model=30 is not divisible by n_heads=4"),
        (dict(attention="mod_torch"), r"unknown attention backend 'mod_torch'.*registered: .*did you mean 'moda_torch'"),
        (dict(norm="peri"), r"unknown norm placement 'peri'; registered: \['olmo2', 'post', 'pre'\]"),
        (dict(attention="sdpa", ffn_kv=True), r"'sdpa' reads no depth stream, but ffn_kv is on.*--model.ffn_kv=false"),
        (dict(attn_kv_proj=True, depth_kv=False), r"attn_kv_proj=true .* needs depth_kv=true"),
    ],
)
def test_bad_config_says_what_to_do(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        tiny_config(n_heads=6, n_kv_heads=4, norm="peri", attention="nope")
    assert str(err.value).count("\n  - ") == 4  # backend, norm, head ratio, head size


def test_depth_defaults_follow_the_backend():
    assert tiny_config(attention="sdpa").reads_depth is False
    moda = tiny_config(attention="moda_torch")
    assert moda.depth_kv and moda.ffn_kv and moda.slots_per_layer == 2


def test_triton_backend_on_cpu_names_the_portable_backend():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU message does not apply")
    with pytest.raises(RuntimeError, match=r"'moda_triton' needs a CUDA GPU.*--model.attention=moda_torch"):
        MoDATransformer(tiny_config(attention="moda_triton"))


def test_importing_the_package_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, moda_lightning, moda_lightning.attention, moda_lightning.ops; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
