"""The decode kernels (``decode.py``) under ``TRITON_INTERPRET=1`` on CPU, against the PyTorch reference.

Fewer queries than keys (``Tq`` in {1, 3, Tk}), a left-padding ``key_mask``, the depth stream as a
tensor and as slot lists, a separate depth query, GQA with padded tile rows (G = 3), the key axis
split in chunks and merged; then greedy cached generation of a tiny model on the ``moda_triton``
backend against ``moda_torch``, token by token. fp32 and fp16 only: bf16 arithmetic does not run
under the interpreter. ``test_decode_cuda.py`` covers the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="interpreter tests run on CPU-only machines (tests/conftest.py sets TRITON_INTERPRET=1)",
)

triton = pytest.importorskip("triton")

from _tolerance import check_close  # noqa: E402

from moda_kernels.moda_attn import moda_attn_reference  # noqa: E402

CASES = [
    # B, Tk, Hq, Hk, d, S, num_depth
    (2, 21, 4, 2, 16, 3, 2),
    (1, 19, 6, 2, 32, 2, 2),  # G = 3: padded rows in the tile
    (2, 13, 2, 2, 16, 1, 0),  # no depth slots read
]


def _case_id(c):
    B, Tk, Hq, Hk, d, S, L = c
    return f"B{B}-Tk{Tk}-Hq{Hq}-Hk{Hk}-L{L}-D{d}"


def _inputs(B, Tq, Tk, Hq, Hk, d, S, dtype, *, masked: bool, seed=0):
    """``q, k, v, depth_k, depth_v, q_depth`` and a key mask: row 0 left-padded over 5 keys, row 1 (if
    any) padded everywhere, so each of its queries sees its own key and the keys after it only."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rand(B, Tq, Hq, d), rand(B, Tk, Hk, d), rand(B, Tk, Hk, d)
    depth_k, depth_v, q_depth = rand(B, Tq, S, Hk, d), rand(B, Tq, S, Hk, d), rand(B, Tq, Hq, d)
    key_mask = None
    if masked:
        key_mask = torch.ones(B, Tk, dtype=torch.bool)
        key_mask[0, :5] = False
        key_mask[1:] = False
    return q, k, v, depth_k, depth_v, q_depth, key_mask


def _check(out, inputs, *, num_depth, q_depth, key_mask, dtype, causal=True):
    """``(o, lse, lse_depth)`` within the tolerance rule of the float64 reference."""
    q, k, v, depth_k, depth_v = inputs
    kw = dict(num_depth=num_depth, causal=causal, key_mask=key_mask, return_lse=True)
    q_depth64 = None if q_depth is None else q_depth.double()
    ref64 = moda_attn_reference(*[x.double() for x in inputs], q_depth=q_depth64, **kw)
    ref_lowp = moda_attn_reference(*inputs, q_depth=q_depth, **kw)
    for name, a, r64, rl in zip(["o", "lse", "lse_depth"], out, ref64, ref_lowp):
        check_close(name, a, r64, rl, floor=1e-5 if dtype == torch.float32 else 1e-3)


@pytest.fixture(params=[1, 3], ids=["one-chunk", "three-chunks"])
def splits(request, monkeypatch):
    """Cut the key axis in this many chunks (on CPU the kernels would use one)."""
    from moda_kernels.moda_attn import decode

    monkeypatch.setattr(decode, "decode_splits", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("form", ["tensor", "slots"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("Tq", [1, 3, "Tk"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_matches_reference_fp32(case, Tq, masked, form, splits):
    from moda_kernels.moda_attn import moda_attn

    B, Tk, Hq, Hk, d, S, L = case
    Tq = Tk if Tq == "Tk" else Tq
    q, k, v, depth_k, depth_v, _, key_mask = _inputs(B, Tq, Tk, Hq, Hk, d, S, torch.float32, masked=masked)
    if form == "slots":  # a list is read whole: pass its first num_depth slots
        dk, dv = list(depth_k[:, :, :L].unbind(2)), list(depth_v[:, :, :L].unbind(2))
        dk, dv = [t.contiguous() for t in dk], [t.contiguous() for t in dv]
        out = moda_attn(q, k, v, dk, dv, key_mask=key_mask, return_lse=True)
    else:
        out = moda_attn(q, k, v, depth_k, depth_v, num_depth=L, key_mask=key_mask, return_lse=True)
    _check(out, [q, k, v, depth_k, depth_v], num_depth=L, q_depth=None, key_mask=key_mask, dtype=torch.float32)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("Tq", [1, 3, 19])
def test_decode_matches_reference_fp16(Tq, masked, splits):
    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, _, key_mask = _inputs(2, Tq, 19, 6, 2, 32, 3, torch.float16, masked=masked, seed=1)
    out = moda_attn(q, k, v, depth_k, depth_v, num_depth=3, key_mask=key_mask, return_lse=True)
    _check(out, [q, k, v, depth_k, depth_v], num_depth=3, q_depth=None, key_mask=key_mask, dtype=torch.float16)


@pytest.mark.parametrize("form", ["tensor", "slots"])
def test_decode_with_a_depth_query_of_its_own(form, splits):
    """``q_depth`` (the model's ``depth_keys="reader"``) takes the depth logits, ``q`` the sequence ones."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, q_depth, key_mask = _inputs(2, 3, 21, 6, 2, 16, 2, torch.float32, masked=True, seed=2)
    dk, dv = (list(depth_k.unbind(2)), list(depth_v.unbind(2))) if form == "slots" else (depth_k, depth_v)
    if form == "slots":
        dk, dv = [t.contiguous() for t in dk], [t.contiguous() for t in dv]
    out = moda_attn(q, k, v, dk, dv, q_depth=q_depth, key_mask=key_mask, return_lse=True)
    _check(out, [q, k, v, depth_k, depth_v], num_depth=2, q_depth=q_depth, key_mask=key_mask, dtype=torch.float32)


def test_non_causal_decode_sees_every_key():
    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, _, key_mask = _inputs(2, 3, 21, 4, 2, 16, 2, torch.float32, masked=True, seed=3)
    out = moda_attn(q, k, v, depth_k, depth_v, causal=False, key_mask=key_mask, return_lse=True)
    inputs = [q, k, v, depth_k, depth_v]
    _check(out, inputs, num_depth=2, q_depth=None, key_mask=key_mask, dtype=torch.float32, causal=False)


def test_cache_views_are_read_through_their_strides():
    """The KV cache hands the op slices of a longer buffer ``[B, max_len, Hk, d]`` and of its mask."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, _, key_mask = _inputs(2, 1, 30, 4, 2, 16, 2, torch.float32, masked=True, seed=4)
    end = 17
    out = moda_attn(q, k[:, :end], v[:, :end], depth_k, depth_v, key_mask=key_mask[:, :end], return_lse=True)
    _check(out, [q, k[:, :end], v[:, :end], depth_k, depth_v], num_depth=2, q_depth=None, key_mask=key_mask[:, :end],
           dtype=torch.float32)  # fmt: skip


def test_decode_through_the_registered_op_is_counted_and_equal():
    """Under a dispatch mode the call goes through ``moda::attn_decode``: same results, FLOPs counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, _, key_mask = _inputs(1, 3, 21, 4, 2, 16, 2, torch.float32, masked=True, seed=5)
    eager = moda_attn(q, k, v, depth_k, depth_v, key_mask=key_mask, return_lse=True)
    with FlopCounterMode(display=False) as counter:
        registered = moda_attn(q, k, v, depth_k, depth_v, key_mask=key_mask, return_lse=True)
    for name, a, b in zip(["o", "lse", "lse_depth"], eager, registered):
        assert torch.equal(a, b), name
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"moda.attn_decode": 4 * 4 * 16 * (3 * 18 + 3 * 4 // 2 + 3 * 2)}


def test_decoding_with_gradients_is_refused():
    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, _, _ = _inputs(1, 1, 9, 4, 2, 16, 2, torch.float32, masked=False)
    with pytest.raises(ValueError, match=r"runs forward only, but \['q'\] require grad; decode under torch.no_grad"):
        moda_attn(q.requires_grad_(), k, v, depth_k, depth_v)
    with torch.no_grad():
        moda_attn(q, k, v, depth_k, depth_v)


# ----------------------------------------------------------------------------- the model


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Let the ``moda_triton`` backend build and run on CPU tensors (the interpreter runs its kernels)."""
    from moda_lightning.attention.moda_triton import MoDATritonBackend

    monkeypatch.setattr(MoDATritonBackend, "check_available", lambda self: None)
    monkeypatch.setattr(MoDATritonBackend, "check_device", lambda self, device_type: None)


@pytest.mark.parametrize("options", [{}, dict(depth_keys="reader", qk_norm_scope="full")], ids=["writer", "reader"])
@torch.no_grad()
def test_cached_generation_on_the_triton_backend_equals_the_reference_backend(triton_on_cpu, options, monkeypatch):
    """Greedy continuations of a left-padded batch (the padded prompt pass and every decode step run
    the decode kernels) pick the same tokens as ``moda_torch``, and the logits agree."""
    from moda_kernels.moda_attn import decode
    from moda_lightning.config import MoDAConfig
    from moda_lightning.model import MoDATransformer

    calls = []
    kernel = decode.moda_decode_fwd
    monkeypatch.setattr(decode, "moda_decode_fwd", lambda *a, **kw: calls.append(a[0].shape[1]) or kernel(*a, **kw))
    models = {}
    for attention in ("moda_torch", "moda_triton"):
        torch.manual_seed(0)
        config = MoDAConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                            attention=attention, **options)  # fmt: skip
        models[attention] = MoDATransformer(config).eval()
    models["moda_triton"].load_state_dict(models["moda_torch"].state_dict())
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    reference = models["moda_torch"].generate(prompts, 6, temperature=0)
    assert models["moda_triton"].generate(prompts, 6, temperature=0) == reference
    assert calls and min(calls) == 1 and max(calls) == 5  # decode steps and the padded prompt pass

    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    logits = {}
    for attention, model in models.items():
        cache = model_cache(model, 1, 7)
        logits[attention] = torch.cat([model(tokens[:, :4], cache=cache), model(tokens[:, 4:5], cache=cache),
                                       model(tokens[:, 5:], cache=cache)], dim=1)  # fmt: skip
    torch.testing.assert_close(logits["moda_triton"], logits["moda_torch"], atol=1e-4, rtol=1e-4)


def model_cache(model, batch: int, max_len: int):
    from moda_lightning.generation import KVCache

    cfg = model.config
    return KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, device="cpu", dtype=torch.float32)
