"""The compiled decode kernels (``decode.py``) on a GPU, against the float64 reference.

Run on a CUDA machine: ``pytest tests/kernels -m cuda``. Decode steps (``Tq`` in {1, 7}) against
caches up to 4096 keys at the model's head sizes (d in {64, 128}), with and without a left-padding
``key_mask``, the depth stream as a strided slice (the model's buffer) and as slot lists, a
separate depth query; bf16 and fp16 by the rule of ``_tolerance.py``, fp32 (tf32 matmuls) by
relative error. The key axis is split across programs by occupancy; one case forces one chunk.
Then the model: cached greedy generation on ``moda_triton`` runs the decode kernels and follows
recomputation of the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from _tolerance import check_close  # noqa: E402

from moda_kernels.moda_attn import moda_attn_reference  # noqa: E402

CASES = [
    # B, Tk, Hq, Hk, d, S, num_depth
    (1, 4096, 16, 8, 64, 70, 70),  # the 700M shape: G = 2, 35 layers of FFN KV
    (4, 1000, 6, 2, 64, 46, 45),  # G = 3 (Table 6), odd Tk, slots past num_depth unread
    (2, 4096, 32, 8, 128, 16, 16),  # G = 4, d = 128
    (8, 513, 8, 1, 128, 4, 0),  # G = 8, no depth slots
]


def _case_id(c):
    B, Tk, Hq, Hk, d, S, L = c
    return f"B{B}-Tk{Tk}-Hq{Hq}-Hk{Hk}-L{L}-D{d}"


def _inputs(B, Tq, Tk, Hq, Hk, d, S, dtype, *, masked: bool, seed=0):
    """``q, k, v, depth_k, depth_v, q_depth, key_mask``; the depth stream a slice of a larger buffer and
    ``k, v`` the first ``Tk`` positions of a longer cache, as the model hands them over. The mask pads
    row ``b`` over its first ``b * Tk // (2 B)`` keys."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    q = rand(B, Tq, Hq, d)
    k, v = rand(B, Tk + 5, Hk, d)[:, :Tk], rand(B, Tk + 5, Hk, d)[:, :Tk]
    buf_k, buf_v = rand(B, Tq, S + 1, Hk, d), rand(B, Tq, S + 1, Hk, d)
    key_mask = None
    if masked:
        key_mask = torch.ones(B, Tk, dtype=torch.bool, device="cuda")
        for b in range(B):
            key_mask[b, : b * Tk // (2 * B)] = False
    return q, k, v, buf_k[:, :, :S], buf_v[:, :, 1:], rand(B, Tq, Hq, d), key_mask


def _check(out, inputs, *, num_depth, q_depth, key_mask, dtype):
    kw = dict(num_depth=num_depth, key_mask=key_mask, return_lse=True)
    q_depth64 = None if q_depth is None else q_depth.double()
    ref64 = moda_attn_reference(*[x.double() for x in inputs], q_depth=q_depth64, **kw)
    if dtype == torch.float32:  # tf32 matmuls: ~1e-3 relative
        for name, a, r in zip(["o", "lse", "lse_depth"], out, ref64):
            if name == "o":
                rel = ((a.double() - r).norm() / r.norm()).item()
                assert rel < 5e-3, f"o: relative error {rel:.2e}"
            else:
                torch.testing.assert_close(a.double(), r, atol=1e-2, rtol=1e-3, msg=lambda m: f"{name}: {m}")
        return
    ref_lowp = moda_attn_reference(*inputs, q_depth=q_depth, **kw)
    for name, a, r64, rl in zip(["o", "lse", "lse_depth"], out, ref64, ref_lowp):
        check_close(name, a, r64, rl, floor=1e-3)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("Tq", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_matches_float64_reference(case, dtype, Tq, masked):
    from moda_kernels.moda_attn import moda_attn

    B, Tk, Hq, Hk, d, S, L = case
    q, k, v, depth_k, depth_v, _, key_mask = _inputs(B, Tq, Tk, Hq, Hk, d, S, dtype, masked=masked, seed=Tk + Tq)
    out = moda_attn(q, k, v, depth_k, depth_v, num_depth=L, key_mask=key_mask, return_lse=True)
    _check(out, [q, k, v, depth_k, depth_v], num_depth=L, q_depth=None, key_mask=key_mask, dtype=dtype)


@pytest.mark.parametrize("form", ["tensor", "slots"])
@pytest.mark.parametrize("Tq", [1, 7])
def test_slot_lists_and_a_depth_query_of_its_own(Tq, form):
    from moda_kernels.moda_attn import moda_attn

    q, k, v, depth_k, depth_v, q_depth, key_mask = _inputs(2, Tq, 2048, 6, 2, 64, 46, torch.bfloat16, masked=True)
    dk, dv = depth_k, depth_v
    if form == "slots":
        dk, dv = [t.contiguous() for t in depth_k.unbind(2)], [t.contiguous() for t in depth_v.unbind(2)]
    out = moda_attn(q, k, v, dk, dv, q_depth=q_depth, key_mask=key_mask, return_lse=True)
    _check(out, [q, k, v, depth_k, depth_v], num_depth=46, q_depth=q_depth, key_mask=key_mask, dtype=torch.bfloat16)


def test_one_chunk_equals_the_split_key_axis(monkeypatch):
    """A decode step over 4096 keys splits the key axis; one program per row block gives the same result."""
    from moda_kernels.moda_attn import decode, moda_attn

    q, k, v, depth_k, depth_v, _, key_mask = _inputs(1, 1, 4096, 16, 8, 64, 70, torch.bfloat16, masked=True)
    B, Hk = 1, 8
    assert decode.decode_splits(B * Hk, 4096, 128, q.device) > 1
    split = moda_attn(q, k, v, depth_k, depth_v, key_mask=key_mask, return_lse=True)
    monkeypatch.setattr(decode, "decode_splits", lambda *args: 1)
    whole = moda_attn(q, k, v, depth_k, depth_v, key_mask=key_mask, return_lse=True)
    for name, a, b in zip(["o", "lse", "lse_depth"], split, whole):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("options", [{}, dict(depth_keys="reader", qk_norm_scope="full")], ids=["writer", "reader"])
@torch.no_grad()
def test_cached_generation_runs_the_decode_kernels(options, monkeypatch):
    """``moda_triton``'s decode steps and padded prompt pass run ``decode.py``, and a greedy
    continuation follows recomputing the whole sequence (fp32 weights, bf16 autocast)."""
    from moda_kernels.moda_attn import decode
    from moda_lightning.config import MoDAConfig
    from moda_lightning.model import MoDATransformer

    calls = []
    kernel = decode.moda_decode_fwd
    monkeypatch.setattr(decode, "moda_decode_fwd", lambda *a, **kw: calls.append(a[0].shape[1]) or kernel(*a, **kw))
    torch.manual_seed(0)
    config = MoDAConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                        attention="moda_triton", **options)  # fmt: skip
    model = MoDATransformer(config).cuda().eval()
    prompts = [list(range(1, 40)), [7, 8, 9]]
    generated = model.generate(prompts, 8, temperature=0)
    assert calls and min(calls) == 1 and max(calls) == 39
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for prompt, continuation in zip(prompts, generated):
            sequence = prompt + continuation
            logits = model(torch.tensor([sequence[:-1]], device="cuda"))[0, len(prompt) - 1 :].float()
            chosen = logits.gather(1, torch.tensor(continuation, device="cuda")[:, None])[:, 0]
            # each chosen token is the argmax of the recomputed logits, up to bf16 near-ties
            assert (logits.max(1).values - chosen).max() < 0.05
