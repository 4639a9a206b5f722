"""The public op ``moda_attention`` (its ``moda_torch`` backend) against an independent float64 computation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from moda_lightning.ops import moda_attention

S_SLOTS = 6


def dense_moda_float64(q, k, v, depth_k, depth_v, num_depth, causal, scale=None, q_depth=None):
    """MoDA written the long way: repeat K/V per query head, build each token's logit row
    [sequence keys | its own depth keys] explicitly, one softmax, weighted sum. The depth
    logits use ``q_depth`` when given."""
    q_depth = (q if q_depth is None else q_depth).double()
    q, k, v = q.double(), k.double(), v.double()
    B, T, Hq, d = q.shape
    G = Hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    k_rep = k.repeat_interleave(G, dim=2)  # [B, T, Hq, d]
    v_rep = v.repeat_interleave(G, dim=2)
    seq = torch.einsum("bthd,bshd->bhts", q, k_rep) * scale  # [B, Hq, T, T]
    if causal:
        seq = seq.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    dk = depth_k[:, :, :num_depth].double().repeat_interleave(G, dim=3)  # [B, T, n, Hq, d]
    dv = depth_v[:, :, :num_depth].double().repeat_interleave(G, dim=3)
    dep = torch.einsum("bthd,btshd->bhts", q_depth, dk) * scale  # [B, Hq, T, n]
    p = torch.softmax(torch.cat([seq, dep], -1), -1)
    o = torch.einsum("bhts,bshd->bthd", p[..., :T], v_rep) + torch.einsum("bhts,btshd->bthd", p[..., T:], dv)
    lse = torch.logsumexp(torch.cat([seq, dep], -1), -1).transpose(1, 2)
    lse_depth = torch.logsumexp(dep, -1).transpose(1, 2)
    return o, lse, lse_depth


def make_inputs(B, T, Hk, G, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    return rand(B, T, Hk * G, d), rand(B, T, Hk, d), rand(B, T, Hk, d), rand(B, T, S_SLOTS, Hk, d), rand(B, T, S_SLOTS, Hk, d)


CASES = [
    pytest.param(T, G, n, causal, id=f"T{T}-G{G}-n{n}-{'causal' if causal else 'full'}")
    for T, G, n, causal in itertools.product([1, 7, 63, 130], [1, 2, 3, 4], [0, 1, 5, S_SLOTS], [True, False])
    # Every T with every G and every num_depth; non-causal on a subset keeps the suite quick.
    if causal or (n in (1, S_SLOTS))
]


@pytest.mark.parametrize("T,G,num_depth,causal", CASES)
def test_reference_matches_float64_fp32(T, G, num_depth, causal):
    inputs = make_inputs(2, T, 2, G, 16, torch.float32, seed=T * 100 + G * 10 + num_depth)
    o, lse, lse_depth = moda_attention(*inputs, num_depth=num_depth, causal=causal, return_lse=True)
    o64, lse64, lse_depth64 = dense_moda_float64(*inputs, num_depth, causal)
    torch.testing.assert_close(o.double(), o64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)
    if num_depth == 0:
        assert torch.isneginf(lse_depth).all()
    else:
        torch.testing.assert_close(lse_depth.double(), lse_depth64, atol=2e-5, rtol=1e-5)

    grad_o = torch.randn_like(o)
    grads = torch.autograd.grad((o * grad_o).sum() + lse.sum(), inputs, materialize_grads=True)
    grads64 = torch.autograd.grad((o64 * grad_o.double()).sum() + lse64.sum(), inputs, materialize_grads=True)
    for name, g, g64 in zip(["dq", "dk", "dv", "d_depth_k", "d_depth_v"], grads, grads64):
        torch.testing.assert_close(g.double(), g64.double(), atol=5e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        if name.startswith("d_depth"):
            # Slots past num_depth are never read, so they get exactly zero gradient.
            assert (g[:, :, num_depth:] == 0).all(), f"{name} leaks into unread slots"


BF16_CASES = [
    pytest.param(T, G, n, causal, id=f"T{T}-G{G}-n{n}-{'causal' if causal else 'full'}")
    for T, G, n, causal in itertools.product([1, 7, 63, 130], [1, 2, 3, 4], [0, 1, 5, S_SLOTS], [True, False])
    if (T + G + n) % 3 == 0 or (T, G, n) in {(1, 1, 0), (130, 4, S_SLOTS)}  # a spread of the fp32 grid
]


@pytest.mark.parametrize("T,G,num_depth,causal", BF16_CASES)
def test_reference_bf16_error_is_bf16_sized(T, G, num_depth, causal):
    """bf16 runs (matmuls in bf16, softmax in fp32) stay within bf16 rounding of the float64 result:
    output, both log-sum-exps and every gradient."""
    inputs32 = make_inputs(2, T, 2, G, 32, torch.float32, seed=T + G + num_depth)
    inputs16 = [x.detach().bfloat16().requires_grad_() for x in inputs32]
    o, lse, lse_depth = moda_attention(*inputs16, num_depth=num_depth, causal=causal, return_lse=True)
    assert o.dtype == torch.bfloat16
    o64, lse64, lse_depth64 = dense_moda_float64(*inputs32, num_depth, causal)
    torch.testing.assert_close(o.double(), o64, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.double(), lse64, atol=3e-2, rtol=1e-2)
    if num_depth:
        torch.testing.assert_close(lse_depth.double(), lse_depth64, atol=3e-2, rtol=1e-2)
    grad_o = torch.randn_like(o64)
    grads = torch.autograd.grad((o.double() * grad_o).sum(), inputs16, materialize_grads=True)
    grads64 = torch.autograd.grad((o64 * grad_o).sum(), inputs32, materialize_grads=True)
    for name, g, g64 in zip(["dq", "dk", "dv", "d_depth_k", "d_depth_v"], grads, grads64):
        scale = g64.double().norm()
        if scale == 0:  # depth gradients with num_depth=0
            assert (g == 0).all(), name
            continue
        rel = (g.double() - g64.double()).norm() / scale
        assert rel < 3e-2, f"{name}: relative error {rel:.3g}"


@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 7, 130])
def test_no_depth_equals_sdpa(T, G):
    q, k, v, depth_k, depth_v = make_inputs(2, T, 2, G, 16, torch.float32)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(moda_attention(q, k, v, depth_k, depth_v, num_depth=0), expected)
    torch.testing.assert_close(moda_attention(q, k, v), expected)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T,G,num_depth", [(1, 2, 1), (7, 3, 5), (63, 2, 3), (9, 1, 0)])
def test_q_depth_is_the_query_of_the_depth_logits(T, G, num_depth, causal):
    """``moda_torch`` with a separate ``q_depth`` against the dense float64 computation, all six gradients:
    ``q`` gets only the sequence part of the query gradient, ``q_depth`` only the depth part."""
    inputs = make_inputs(2, T, 2, G, 16, torch.float32, seed=T + G)
    q_depth = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    o, lse, lse_depth = moda_attention(*inputs, num_depth=num_depth, causal=causal, return_lse=True, q_depth=q_depth)
    o64, lse64, lse_depth64 = dense_moda_float64(*inputs, num_depth, causal, q_depth=q_depth)
    torch.testing.assert_close(o.double(), o64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-5, rtol=1e-5)
    if num_depth:
        torch.testing.assert_close(lse_depth.double(), lse_depth64, atol=2e-5, rtol=1e-5)
    grad_o = torch.randn_like(o)
    leaves = [*inputs, q_depth]
    grads = torch.autograd.grad((o * grad_o).sum(), leaves, materialize_grads=True)
    grads64 = torch.autograd.grad((o64 * grad_o.double()).sum(), leaves, materialize_grads=True)
    for name, g, g64 in zip(["dq", "dk", "dv", "d_depth_k", "d_depth_v", "dq_depth"], grads, grads64):
        torch.testing.assert_close(g.double(), g64.double(), atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    if num_depth == 0:
        assert (grads[5] == 0).all()


def test_q_depth_equal_to_q_is_the_plain_call():
    """Passing ``q`` itself as ``q_depth`` gives exactly the call without it, output and gradients."""
    inputs = make_inputs(2, 63, 2, 2, 16, torch.float32, seed=5)
    grad_o = torch.randn(inputs[0].shape)
    plain = moda_attention(*inputs, num_depth=3, return_lse=True)
    same = moda_attention(*inputs, num_depth=3, return_lse=True, q_depth=inputs[0])
    for a, b in zip(plain, same):
        assert torch.equal(a, b)
    grads_plain = torch.autograd.grad((plain[0] * grad_o).sum(), inputs)
    grads_same = torch.autograd.grad((same[0] * grad_o).sum(), inputs)
    for g, h in zip(grads_plain, grads_same):
        assert torch.equal(g, h)


def test_q_depth_gradcheck_float64():
    """Analytic against numerical gradients of the reference with ``q_depth``, every input, tiny float64 shapes."""
    from moda_kernels.moda_attn import moda_attn_reference

    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    q, q_depth, k, v = rand(1, 5, 4, 4), rand(1, 5, 4, 4), rand(1, 5, 2, 4), rand(1, 5, 2, 4)
    depth_k, depth_v = rand(1, 5, 3, 2, 4), rand(1, 5, 3, 2, 4)

    def f(q, k, v, depth_k, depth_v, q_depth):
        o, lse, _ = moda_attn_reference(q, k, v, depth_k, depth_v, num_depth=2, return_lse=True, q_depth=q_depth)
        return o, lse

    assert torch.autograd.gradcheck(f, (q, k, v, depth_k, depth_v, q_depth))


def test_a_gain_on_the_depth_query_is_a_gain_on_every_slot_key():
    """Why ``q_depth`` exists: ``(q * g) . k_s = q . (k_s * g)``, so a reader's per-channel gain ``g``
    on the slots it reads can ride on its query instead of a copy of the slots."""
    q, k, v, depth_k, depth_v = make_inputs(2, 9, 2, 2, 16, torch.float32, seed=6)
    gain = torch.rand(16, generator=torch.Generator().manual_seed(2)) + 0.5
    on_query = moda_attention(q, k, v, depth_k, depth_v, num_depth=4, q_depth=q * gain)
    on_slots = moda_attention(q, k, v, depth_k * gain, depth_v, num_depth=4)
    torch.testing.assert_close(on_query, on_slots, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(on_query, moda_attention(q, k, v, depth_k, depth_v, num_depth=4), atol=1e-3)


def test_model_backends_pass_q_depth_on():
    """``moda_torch`` hands ``q_depth`` to the op; ``sdpa`` (no depth logits) accepts it and is unchanged."""
    from moda_kernels.moda_attn import moda_attn_reference
    from moda_lightning.attention import build_backend

    q, k, v, depth_k, depth_v = make_inputs(1, 7, 2, 2, 8, torch.float32, seed=4)
    q_depth = 3 * q
    expected = moda_attn_reference(q, k, v, depth_k, depth_v, num_depth=3, q_depth=q_depth)
    assert torch.equal(build_backend("moda_torch")(q, k, v, depth_k, depth_v, num_depth=3, q_depth=q_depth), expected)
    sdpa = build_backend("sdpa")
    assert torch.equal(sdpa(q, k, v, q_depth=q_depth), sdpa(q, k, v))


def test_q_depth_unlike_q_is_refused():
    q = torch.randn(1, 5, 4, 8)
    k, depth = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 3, 2, 8)
    with pytest.raises(ValueError, match=r"q_depth \(the query of the depth logits\) must match q \(\[1, 5, 4, 8\]"):
        moda_attention(q, k, k, depth, depth, q_depth=q[:, :, :2])


def test_depth_mass_from_lse():
    """exp(lse_depth - lse) is the share of softmax mass on depth: near 1 for dominant depth keys."""
    q, k, v, depth_k, depth_v = make_inputs(1, 9, 1, 2, 8, torch.float32)
    strong = 50 * q.detach()[:, :, :1, None, :].expand(1, 9, S_SLOTS, 1, 8)  # depth keys aligned with head 0
    _, lse, lse_depth = moda_attention(q, k, v, strong, depth_v, return_lse=True)
    assert (torch.exp(lse_depth - lse)[:, :, 0] > 0.99).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=(2, 5, 3, 8), k=(2, 5, 2, 8)), "multiple of the 2 key/value heads"),
        (dict(q=(2, 5, 4, 8), k=(3, 5, 2, 8)), "k/v must be"),
        (dict(depth=(2, 5, 3, 2, 4)), "depth_k must be"),
        (dict(num_depth=4), "num_depth=4 but the depth stream holds S=3"),
    ],
)
def test_bad_shapes_say_what_was_wrong(kwargs, match):
    q = torch.randn(*kwargs.get("q", (2, 5, 4, 8)))
    k = torch.randn(*kwargs.get("k", (2, 5, 2, 8)))
    depth = torch.randn(*kwargs.get("depth", (2, 5, 3, 2, 8)))
    with pytest.raises(ValueError, match=match):
        moda_attention(q, k, k.clone(), depth, depth.clone(), num_depth=kwargs.get("num_depth"))


@pytest.mark.parametrize(
    "backend,match",
    [
        ("moda_troch", r"^moda_attention: unknown backend 'moda_troch'; registered: \['moda_torch', 'moda_triton'\] "
         r"\(did you mean 'moda_torch'\?\)"),
        ("reference", r"backend 'reference' was renamed to 'moda_torch'.*pass backend='moda_torch'"),
        ("triton", r"backend 'triton' was renamed to 'moda_triton'.*pass backend='moda_triton'"),
    ],
    ids=["typo", "old-reference", "old-triton"],
)
def test_op_backend_keys_are_the_model_backend_keys(backend, match):
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match=match):
        moda_attention(q, q, q, backend=backend)


def test_moda_torch_runs_the_reference():
    """The op's default key and the model's portable backend are the same path: moda_attn_reference."""
    from moda_kernels.moda_attn import moda_attn_reference
    from moda_lightning.attention import build_backend

    q, k, v, depth_k, depth_v = make_inputs(1, 5, 2, 2, 8, torch.float32)
    expected = moda_attn_reference(q, k, v, depth_k, depth_v, num_depth=3)
    assert torch.equal(moda_attention(q, k, v, depth_k, depth_v, num_depth=3, backend="moda_torch"), expected)
    assert torch.equal(build_backend("moda_torch")(q, k, v, depth_k, depth_v, num_depth=3), expected)


def test_triton_backend_is_counted_by_a_flop_counter_created_first():
    """Regression: FlopCounterMode copies the FLOP-formula registry when it is created, and the
    fused op registered its formula on first use, so the first counted step (the FLOPs callback's
    cross-check at fit start) missed MoDA attention entirely. Building the backend registers it."""
    import subprocess
    import sys

    on_gpu = torch.cuda.is_available()  # there the real kernels run; elsewhere Triton's interpreter
    code = (
        ("" if on_gpu else "import os; os.environ['TRITON_INTERPRET'] = '1'\n")
        + "import torch\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "from moda_lightning.attention import moda_triton\n"
        + ("" if on_gpu else "moda_triton.torch.cuda.is_available = lambda: True  # let the backend build on CPU\n")
        + "from moda_lightning.attention import build_backend\n"
        "backend = build_backend('moda_triton')\n"
        f"dev = {'cuda' if on_gpu else 'cpu'!r}; dt = {'torch.bfloat16' if on_gpu else 'torch.float32'}\n"
        "q = torch.randn(1, 16, 4, 32, device=dev, dtype=dt); k = torch.randn(1, 16, 2, 32, device=dev, dtype=dt)\n"
        "dk = torch.randn(1, 16, 3, 2, 32, device=dev, dtype=dt)\n"
        "with FlopCounterMode(display=False) as counter:\n"
        "    backend(q, k, k, dk, dk, num_depth=3)\n"
        "print(sorted(str(op) for op in counter.get_flop_counts().get('Global', {})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "moda.attn_fwd" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("S,with_q_depth", [(1, False), (5, True)])
def test_slot_lists_are_the_stacked_stream(S, with_q_depth):
    """Depth slots passed as lists of [B, T, Hk, d] give the stacked tensor's output, lse and gradients."""
    torch.manual_seed(0)
    B, T, Hq, Hk, d = 2, 7, 6, 2, 8
    q = torch.randn(B, T, Hq, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, T, Hk, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keys = [torch.randn(B, T, Hk, d, dtype=torch.float64, requires_grad=True) for _ in range(S)]
    values = [torch.randn(B, T, Hk, d, dtype=torch.float64, requires_grad=True) for _ in range(S)]
    q_depth = torch.randn_like(q, requires_grad=True) if with_q_depth else None
    leaves = [q, k, v, *keys, *values] + ([q_depth] if with_q_depth else [])
    listed = moda_attention(q, k, v, keys, values, q_depth=q_depth, return_lse=True)
    stacked = moda_attention(q, k, v, torch.stack(keys, 2), torch.stack(values, 2), q_depth=q_depth, return_lse=True)
    for got, want in zip(listed, stacked):
        torch.testing.assert_close(got, want)
    do = torch.randn_like(listed[0])
    for got, want in zip(torch.autograd.grad(listed[0], leaves, do), torch.autograd.grad(stacked[0], leaves, do)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "depth,kwargs,match",
    [
        ("uneven", {}, "same number of slots"),
        ("bad_slot", {}, r"depth_v\[1\] must be"),
        ("mixed", {}, "both be"),
        ("ok", {"num_depth": 1}, "read whole"),
        ("ok", {"depth_grad_into": (torch.zeros(1), torch.zeros(1))}, "through autograd"),
    ],
)
def test_bad_slot_lists_say_what_was_wrong(depth, kwargs, match):
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    depth_k, depth_v = {
        "uneven": ([k, k], [k]),
        "bad_slot": ([k, k], [k, q]),
        "mixed": ([k], torch.stack([k], 2)),
        "ok": ([k, k], [k, k]),
    }[depth]
    with pytest.raises(ValueError, match=match):
        moda_attention(q, k, k, depth_k, depth_v, **kwargs)


@pytest.mark.parametrize("Tq", [1, 3, 11])
@pytest.mark.parametrize("slot_lists", [False, True])
def test_fewer_queries_than_keys_are_the_last_rows_of_the_full_call(Tq, slot_lists):
    """Decoding: q holds the last Tq positions, k/v all Tk, depth the Tq query tokens' own slots."""
    torch.manual_seed(0)
    B, Tk, Hq, Hk, d, S = 2, 11, 6, 2, 8, 3
    q = torch.randn(B, Tk, Hq, d, dtype=torch.float64)
    k, v = torch.randn(B, Tk, Hk, d, dtype=torch.float64), torch.randn(B, Tk, Hk, d, dtype=torch.float64)
    depth_k, depth_v = torch.randn(B, Tk, S, Hk, d, dtype=torch.float64), torch.randn(B, Tk, S, Hk, d, dtype=torch.float64)
    full = moda_attention(q, k, v, depth_k, depth_v, return_lse=True)
    dk, dv = depth_k[:, -Tq:], depth_v[:, -Tq:]
    if slot_lists:
        dk, dv = list(dk.unbind(2)), list(dv.unbind(2))
    last = moda_attention(q[:, -Tq:], k, v, dk, dv, return_lse=True)
    for got, want in zip(last, full):
        torch.testing.assert_close(got, want[:, -Tq:])


def test_a_key_mask_hides_left_padding():
    """A row left-padded by 3 tokens and masked gives, at its real tokens, the unpadded row's output."""
    torch.manual_seed(0)
    B, T, Hq, Hk, d, S, pad = 2, 9, 4, 2, 8, 2, 3
    q = torch.randn(B, T, Hq, d, dtype=torch.float64)
    k, v = torch.randn(B, T, Hk, d, dtype=torch.float64), torch.randn(B, T, Hk, d, dtype=torch.float64)
    depth_k, depth_v = torch.randn(B, T, S, Hk, d, dtype=torch.float64), torch.randn(B, T, S, Hk, d, dtype=torch.float64)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[0, :pad] = False
    masked = moda_attention(q, k, v, depth_k, depth_v, key_mask=key_mask)
    alone = moda_attention(q[:1, pad:], k[:1, pad:], v[:1, pad:], depth_k[:1, pad:], depth_v[:1, pad:])
    torch.testing.assert_close(masked[:1, pad:], alone)
    torch.testing.assert_close(masked[1:], moda_attention(q, k, v, depth_k, depth_v)[1:])
    assert torch.isfinite(masked).all()  # padded queries see their own key: no empty softmax row


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q_len=5, k_len=3), "q has 5 positions but k/v only 3"),
        (dict(key_mask=torch.ones(2, 4)), "key_mask must be a bool"),
    ],
    ids=["more-queries", "mask-dtype"],
)
def test_bad_decode_inputs_say_what_was_wrong(kwargs, match):
    q_len, k_len = kwargs.pop("q_len", 5), kwargs.pop("k_len", 5)
    q, k = torch.randn(2, q_len, 4, 8), torch.randn(2, k_len, 2, 8)
    with pytest.raises(ValueError, match=match):
        moda_attention(q, k, k, **kwargs)
