"""The MoDA Triton kernels under ``TRITON_INTERPRET=1`` on CPU, against the PyTorch reference.

Tiny shapes (odd T, G in {1, 2, 3, 4}, num_depth in {0, 1, 3}), forward, both log-sum-exps and
every gradient, also with a separate query for the depth logits (``q_depth``). fp32 and fp16
only: bf16 arithmetic does not run under the interpreter.
On a CUDA machine these are skipped; ``test_moda_attn_cuda.py`` covers the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="interpreter tests run on CPU-only machines (tests/kernels/conftest.py sets TRITON_INTERPRET=1)",
)

triton = pytest.importorskip("triton")

from _reference_check import (  # noqa: E402
    NAMES,
    NAMES_Q_DEPTH,
    check_against_reference,
    outputs_and_grads,
    with_q_depth,
)

from moda_kernels.moda_attn import moda_attn_reference  # noqa: E402


def _inputs(B, T, Hq, Hk, d, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, d, generator=g).to(dtype)
    k = torch.randn(B, T, Hk, d, generator=g).to(dtype)
    v = torch.randn(B, T, Hk, d, generator=g).to(dtype)
    depth_k = torch.randn(B, T, S, Hk, d, generator=g).to(dtype)
    depth_v = torch.randn(B, T, S, Hk, d, generator=g).to(dtype)
    do = torch.randn(B, T, Hq, d, generator=g).to(dtype)
    return [q, k, v, depth_k, depth_v], do


def _compare(inputs, do, *, num_depth, causal, dtype, seq="fused"):
    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.function import set_seq_backend

    kw = dict(num_depth=num_depth, causal=causal)
    set_seq_backend(seq)
    try:
        out = outputs_and_grads(moda_attn, inputs, do, **kw)
    finally:
        set_seq_backend("auto")
    check_against_reference(out, inputs, do, floor=1e-5 if dtype == torch.float32 else 1e-3, **kw)


CASES = [
    # B, T, Hq, Hk, d, S, num_depth
    (1, 7, 1, 1, 16, 1, 1),
    (2, 19, 2, 2, 16, 3, 3),
    (1, 19, 4, 2, 32, 4, 3),
    (1, 21, 4, 1, 16, 3, 0),
    (1, 23, 8, 2, 16, 2, 1),
    (1, 17, 6, 2, 16, 5, 3),  # G = 3: padded rows in the tile
]


def _case_id(c):
    B, T, Hq, Hk, d, S, L = c
    return f"B{B}-T{T}-Hq{Hq}-Hk{Hk}-L{L}-D{d}"


@pytest.mark.parametrize("seq", ["fused", "triton_split"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_fp32(case, causal, seq):
    """Both Triton designs: fully fused, and sequence kernel + depth kernel merged by LSE."""
    B, T, Hq, Hk, d, S, L = case
    inputs, do = _inputs(B, T, Hq, Hk, d, S, torch.float32)
    _compare(inputs, do, num_depth=L, causal=causal, dtype=torch.float32, seq=seq)


@pytest.mark.parametrize("seq", ["fused", "triton_split"])
def test_matches_reference_fp16(seq):
    inputs, do = _inputs(1, 19, 4, 2, 32, 3, torch.float16, seed=1)
    _compare(inputs, do, num_depth=2, causal=True, dtype=torch.float16, seq=seq)


def test_no_depth_stream_is_plain_causal_attention():
    """num_depth=0 without a depth stream equals causal GQA SDPA; lse_depth is -inf."""
    from moda_kernels.moda_attn import moda_attn

    (q, k, v, _, _), _ = _inputs(1, 13, 4, 2, 16, 1, torch.float32)
    o, lse, lse_depth = moda_attn(q, k, v, return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(o, sdpa, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse_depth).all() and lse.isfinite().all()


@pytest.mark.parametrize("seq", ["fused", "triton_split", "triton_split-token_grid"])
def test_depth_read_in_place_from_strided_view(seq):
    """Depth slots come from a slice of a larger buffer (non-contiguous) and only num_depth are read."""
    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.function import set_seq_backend

    (q, k, v, _, _), do = _inputs(1, 11, 4, 2, 16, 1, torch.float32)
    buf = torch.randn(1, 11, 6, 4, 16)
    depth_k, depth_v = buf[:, :, :4, :2], buf[:, :, 1:5, 2:]
    buf_poisoned = buf.clone()
    buf_poisoned[:, :, 3:] = float("nan")  # slots past num_depth=2 of both views
    dk_p, dv_p = buf_poisoned[:, :, :4, :2], buf_poisoned[:, :, 1:5, 2:]
    token_grid = seq.endswith("-token_grid")  # depth kernels with token blocks on the fast grid axis
    set_seq_backend(seq.removesuffix("-token_grid"))
    try:
        from moda_kernels.moda_attn.fwd import depth_config, depth_grid, depth_tile_overrides

        with depth_tile_overrides({"MODA_DEPTH_HK_FAST": "0"} if token_grid else {}):

            assert depth_grid(depth_config(2, True), 11, 1, 2)[1] is not token_grid  # the override took effect
            out = outputs_and_grads(moda_attn, [q, k, v, dk_p, dv_p], do, num_depth=2)
    finally:
        set_seq_backend("auto")
    ref = outputs_and_grads(moda_attn_reference, [q, k, v, depth_k, depth_v], do, num_depth=2)
    for name, a, r in zip(NAMES, out, ref):
        if name == "d_depth_k":
            r = torch.cat([r[:, :, :2], torch.zeros_like(r[:, :, 2:])], dim=2)
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cols", [None, "16", "64"], ids=["shipped", "cols16", "cols64"])
@pytest.mark.parametrize("case", [(1, 19, 2, 2, 16, 13, 11), (1, 17, 6, 2, 16, 21, 19), (2, 9, 8, 2, 16, 7, 5)],
                         ids=["G1", "G3", "G4"])  # fmt: skip
def test_depth_kernels_with_the_gpu_tiles(case, cols, monkeypatch):
    """The depth kernels with the (token, slot) columns a GPU step takes (``depth_config``'s GPU tile,
    not the interpreter's two slots a step): partial token blocks and a last slot step that is cut."""
    from moda_kernels.moda_attn import bwd, fwd

    gpu_tile = fwd.depth_config
    monkeypatch.setattr(fwd, "depth_config", lambda G, interpret: {**gpu_tile(G, False), "num_stages": 1})
    monkeypatch.setattr(bwd, "depth_config", fwd.depth_config)
    B, T, Hq, Hk, d, S, L = case
    inputs, do = _inputs(B, T, Hq, Hk, d, S, torch.float32, seed=3)
    with fwd.depth_tile_overrides({"MODA_DEPTH_COLS": cols} if cols else {}):
        G = Hq // Hk
        cfg = fwd.depth_config(G, True)
        assert T % cfg["BLOCK_T"] and (cfg["SC"] == 1 or L % cfg["SC"]), cfg  # partial blocks both ways
        _compare(inputs, do, num_depth=L, causal=True, dtype=torch.float32, seq="triton_split")


def test_depth_kernels_merge_into_reference_sequence_part():
    """The split design with the sequence part from the reference (standing in for cuDNN).

    Forward: the depth kernel starts from the reference's sequence-only (o, lse) and must give the
    full op. Backward: the sequence grads come from a sequence-only backward run with the *merged*
    o and lse (our fused kernel with num_depth=0 plays cuDNN here), then the depth kernel writes
    the depth grads and adds its part of dq.
    """
    from moda_kernels.moda_attn.bwd import moda_bwd, moda_depth_bwd
    from moda_kernels.moda_attn.fwd import moda_depth_fwd

    B, T, Hq, Hk, d, S, L = 1, 19, 4, 2, 16, 4, 3
    (q, k, v, depth_k, depth_v), do = _inputs(B, T, Hq, Hk, d, S, torch.float32, seed=3)
    scale = d**-0.5
    o_seq, lse_seq, _ = moda_attn_reference(q, k, v, return_lse=True)
    o = o_seq.clone()
    lse = lse_seq.transpose(1, 2).contiguous()
    lse_depth = torch.empty_like(lse)
    moda_depth_fwd(q, depth_k, depth_v, L, scale, o, lse, lse_depth)
    o_ref, lse_ref, lse_depth_ref = moda_attn_reference(q, k, v, depth_k, depth_v, num_depth=L, return_lse=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.transpose(1, 2), lse_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_depth.transpose(1, 2), lse_depth_ref, atol=1e-5, rtol=1e-5)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    g_dk, g_dv = torch.zeros_like(depth_k), torch.zeros_like(depth_v)
    moda_bwd(do, q, k, v, depth_k, depth_v, o, lse, 0, True, scale, dq, dk, dv, g_dk, g_dv)  # "cuDNN"
    moda_depth_bwd(do, q, depth_k, depth_v, o, lse, L, scale, dq, g_dk, g_dv)
    ref = outputs_and_grads(moda_attn_reference, [q, k, v, depth_k, depth_v], do, num_depth=L)
    for name, a, r in zip(NAMES[3:], [dq, dk, dv, g_dk, g_dv], ref[3:]):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("own_depth_query", [False, True], ids=["q", "q_depth"])
def test_flop_counter_counts_the_op(own_depth_query):
    """A separate depth query changes which query the depth logits use, not how many FLOPs they take."""
    from torch.utils.flop_counter import FlopCounterMode

    from moda_kernels.moda_attn import moda_attn

    (q, k, v, depth_k, depth_v), _ = _inputs(1, 9, 4, 2, 16, 3, torch.float32)
    q.requires_grad_()
    q_depth = 2 * q if own_depth_query else None
    with FlopCounterMode(display=False) as counter:
        moda_attn(q, k, v, depth_k, depth_v, num_depth=3, q_depth=q_depth).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    fwd = 4 * 1 * 4 * 16 * (9 * 10 // 2 + 9 * 3)
    assert counts == {"moda.attn_fwd": fwd, "moda.attn_bwd": fwd * 5 // 2}


def test_eager_path_equals_the_registered_op():
    """Plain eager calls skip the custom-op dispatch; both routes must give identical results."""
    from moda_kernels.moda_attn import function

    inputs, do = _inputs(2, 11, 4, 2, 16, 3, torch.float32, seed=3)
    eager = outputs_and_grads(function.moda_attn, inputs, do, num_depth=2)
    original = function._through_custom_op
    function._through_custom_op = lambda: True
    try:
        registered = outputs_and_grads(function.moda_attn, inputs, do, num_depth=2)
    finally:
        function._through_custom_op = original
    for name, a, b in zip(NAMES, eager, registered):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("q_depth", [False, True], ids=["q", "q_depth"])
@pytest.mark.parametrize("lazy", [False, True], ids=["tensors", "function"])
@pytest.mark.parametrize("seq", ["fused", "triton_split"])
@pytest.mark.parametrize("route", ["eager", "registered op"])
def test_depth_gradients_are_added_into_depth_grad_into(seq, route, lazy, q_depth):
    """The backward adds d(depth_k), d(depth_v) of the first num_depth slots into the given tensors;
    with ``q_depth`` (slots read by a separate depth query) that query gets its own gradient."""
    from moda_kernels.moda_attn import function

    make, op = (_q_depth_inputs, with_q_depth(moda_attn_reference)) if q_depth else (_inputs, moda_attn_reference)
    inputs, do = make(2, 7, 4, 2, 16, 3, torch.float32, seed=5)
    expected = outputs_and_grads(op, inputs, do, num_depth=2)
    g = torch.Generator().manual_seed(9)
    into = (torch.randn(inputs[3].shape, generator=g), torch.randn(inputs[4].shape, generator=g))
    start = [t.clone() for t in into]
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    extra = {"q_depth": xs[5]} if q_depth else {}
    original = function._through_custom_op
    function._through_custom_op = (lambda: True) if route == "registered op" else original
    function.set_seq_backend(seq)
    try:
        o = function.moda_attn(*xs[:5], num_depth=2, depth_grad_into=(lambda: into) if lazy else into, **extra)
        o.backward(do)
    finally:
        function._through_custom_op = original
        function.set_seq_backend("auto")
    assert xs[3].grad is None and xs[4].grad is None  # added into `into`, not returned
    names, grads, refs = ["dq", "dk", "dv"], [x.grad for x in xs[:3]], list(expected[3:6])
    if q_depth:
        names, grads, refs = [*names, "dq_depth"], [*grads, xs[5].grad], [*refs, expected[8]]
    for name, got, ref in zip(names, grads, refs):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    for name, total, first, ref in zip(["d_depth_k", "d_depth_v"], into, start, expected[6:8]):
        torch.testing.assert_close(total - first, ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["buffer", "slot lists"])
def test_early_sum_loads_add_the_same_gradients(layout):
    """``early_sums``: the depth backward loads the sums it adds to before its products instead of
    after them. The same additions in the same order: bitwise the same sums and gradients, with the
    stream as one buffer and as slot lists (whose sums it addresses through the gradient table)."""
    from moda_kernels.moda_attn import function
    from moda_kernels.moda_attn.fwd import depth_tile_overrides

    inputs, do = _inputs(2, 9, 6, 2, 16, 5, torch.float32, seed=4)
    g = torch.Generator().manual_seed(2)
    start = (torch.randn(inputs[3].shape, generator=g), torch.randn(inputs[4].shape, generator=g))

    def run(early: bool) -> list[torch.Tensor]:
        xs = [x.detach().clone().requires_grad_() for x in inputs[:3]]
        into = tuple(t.clone() for t in start)
        depth_k, depth_v, num_depth = inputs[3], inputs[4], 4  # the first 4 of 5 slots
        if layout == "slot lists":  # a list is read whole; its sums are [B, T, 4, Hk, d]
            depth_k, depth_v = [t.contiguous() for t in depth_k.unbind(2)[:4]], [t.contiguous() for t in depth_v.unbind(2)[:4]]
            num_depth = None
            into = tuple(t[:, :, :4].contiguous() for t in start)
        function.set_seq_backend("triton_split")
        try:
            with depth_tile_overrides({"MODA_DEPTH_EARLY_SUMS": "1"} if early else {}):
                function.moda_attn(*xs, depth_k, depth_v, num_depth=num_depth, depth_grad_into=into).backward(do)
        finally:
            function.set_seq_backend("auto")
        return [x.grad for x in xs] + list(into)

    late, early = run(False), run(True)
    assert not torch.equal(late[3], start[0][:, :, : late[3].shape[2]])  # the sums were added to
    for name, a, b in zip(["dq", "dk", "dv", "d_depth_k sums", "d_depth_v sums"], late, early):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- separate depth query


def _q_depth_inputs(B, T, Hq, Hk, d, S, dtype, seed=0):
    """The inputs plus ``q_depth``, drawn independently of ``q``: an op that reads the wrong query fails."""
    inputs, do = _inputs(B, T, Hq, Hk, d, S, dtype, seed)
    q_depth = torch.randn(B, T, Hq, d, generator=torch.Generator().manual_seed(seed + 1000)).to(dtype)
    return [*inputs, q_depth], do


def _run_q_depth(inputs, do, *, seq, route, **kw):
    """``outputs_and_grads`` of ``moda_attn(..., q_depth=inputs[5])`` on one path and route."""
    from moda_kernels.moda_attn import function

    original = function._through_custom_op
    function._through_custom_op = (lambda: True) if route == "registered op" else original
    function.set_seq_backend(seq)
    try:
        return outputs_and_grads(with_q_depth(function.moda_attn), inputs, do, **kw)
    finally:
        function._through_custom_op = original
        function.set_seq_backend("auto")


Q_DEPTH_CASES = [
    # B, T, Hq, Hk, d, S, num_depth, causal
    (1, 63, 4, 2, 16, 3, 3, True),  # odd T over several row blocks
    (2, 17, 6, 2, 16, 5, 3, False),  # G = 3 (padded rows), slots past num_depth unread
    (1, 21, 4, 1, 16, 2, 0, True),  # no slot read: d(q_depth) is zero
]


def _q_depth_case_id(c):
    return _case_id(c[:7]) + ("" if c[7] else "-noncausal")


@pytest.mark.parametrize("route", ["eager", "registered op"])
@pytest.mark.parametrize("seq", ["fused", "triton_split"])
@pytest.mark.parametrize("case", Q_DEPTH_CASES, ids=_q_depth_case_id)
def test_q_depth_matches_reference_fp32(case, seq, route):
    """Sequence logits from q, depth logits from q_depth: output, LSEs and all six gradients.

    A ``fused`` request runs ``triton_split`` (the fused kernels take one query); were it to run
    the fused kernels, the depth logits would use q and this check would fail.
    """
    B, T, Hq, Hk, d, S, L, causal = case
    inputs, do = _q_depth_inputs(B, T, Hq, Hk, d, S, torch.float32, seed=T)
    out = _run_q_depth(inputs, do, seq=seq, route=route, num_depth=L, causal=causal)
    check_against_reference(out, inputs, do, floor=1e-5, num_depth=L, causal=causal)
    if L == 0:
        assert torch.equal(out[-1], torch.zeros_like(inputs[5]))


@pytest.mark.parametrize("seq", ["fused", "triton_split"])
def test_q_depth_matches_reference_fp16(seq):
    inputs, do = _q_depth_inputs(1, 63, 4, 2, 32, 3, torch.float16, seed=2)
    out = _run_q_depth(inputs, do, seq=seq, route="eager", num_depth=3, causal=True)
    check_against_reference(out, inputs, do, floor=1e-3, num_depth=3, causal=True)


def test_q_depth_equal_to_q_splits_the_plain_query_gradient():
    """With ``q_depth = q`` the op is the plain call: same output and LSEs, and ``dq + dq_depth`` is the
    plain ``dq`` (bitwise in fp32: the plain depth kernel adds its part to the same sequence dq)."""
    (q, k, v, depth_k, depth_v), do = _inputs(1, 63, 4, 2, 16, 3, torch.float32, seed=7)
    from moda_kernels.moda_attn import function

    function.set_seq_backend("triton_split")
    try:
        ref = outputs_and_grads(function.moda_attn, [q, k, v, depth_k, depth_v], do, num_depth=3)
    finally:
        function.set_seq_backend("auto")
    for route in ("eager", "registered op"):
        out = _run_q_depth([q, k, v, depth_k, depth_v, q], do, seq="triton_split", route=route, num_depth=3)
        for name, a, r in zip(NAMES, out, ref):
            if name != "dq":
                assert torch.equal(a, r), f"{route}: {name}"
        assert torch.equal(out[3] + out[8], ref[3]), f"{route}: dq + dq_depth"


def test_fused_request_with_q_depth_runs_the_split_path():
    """Bitwise the ``triton_split`` results: the fallback, not a second implementation."""
    inputs, do = _q_depth_inputs(1, 19, 4, 2, 16, 3, torch.float32, seed=8)
    split = _run_q_depth(inputs, do, seq="triton_split", route="eager", num_depth=2)
    fused = _run_q_depth(inputs, do, seq="fused", route="eager", num_depth=2)
    for name, a, b in zip(NAMES_Q_DEPTH, fused, split):
        assert torch.equal(a, b), name


def test_depth_grad_into_must_match_the_depth_stream():
    from moda_kernels.moda_attn import moda_attn

    (q, k, v, depth_k, depth_v), _ = _inputs(1, 5, 2, 1, 16, 3, torch.float32)
    with pytest.raises(ValueError, match="depth_grad_into keys must match depth_k"):
        moda_attn(q, k, v, depth_k, depth_v, depth_grad_into=(torch.zeros(1, 5, 2, 1, 16), torch.zeros_like(depth_v)))


def test_fake_tensor_shapes():
    """The fake implementations give torch.compile the right output shapes without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import moda_kernels.moda_attn.function  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        q, k, v = torch.empty(2, 5, 4, 16), torch.empty(2, 5, 2, 16), torch.empty(2, 5, 2, 16)
        dk = torch.empty(2, 5, 3, 2, 16)
        o, lse, lse_depth = torch.ops.moda.attn_fwd(q, k, v, dk, dk, 3, True, 0.25)
        grads = torch.ops.moda.attn_bwd(o, q, k, v, dk, dk, o, lse, 3, True, 0.25)
        o2, _, _ = torch.ops.moda.attn_fwd(q, k, v, dk, dk, 3, True, 0.25, q.clone())
        grads_q_depth = torch.ops.moda.attn_bwd(o, q, k, v, dk, dk, o, lse, 3, True, 0.25, q.clone())
    assert o.shape == q.shape and lse.shape == (2, 4, 5) and lse_depth.shape == (2, 4, 5) and o2.shape == q.shape
    # the sixth result is d(q_depth): empty without a q_depth (its part of the gradient is in dq)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, dk.shape, dk.shape, (0,)]
    assert [g.shape for g in grads_q_depth] == [q.shape, k.shape, v.shape, dk.shape, dk.shape, q.shape]


def test_errors_name_the_problem():
    from moda_kernels.moda_attn import moda_attn

    q, k = torch.randn(1, 4, 2, 24), torch.randn(1, 4, 1, 24)
    with pytest.raises(ValueError, match="head dim d=24"):
        moda_attn(q, k, k)
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="share q's device and dtype"):
        moda_attn(q, k.half(), k)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        moda_attn(q.double(), k.double(), k.double())


def test_cpu_tensors_without_interpreter_name_the_reference(monkeypatch):
    from moda_kernels.moda_attn import moda_attn

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*use moda_attn_reference"):
        moda_attn(q, q, q)


@pytest.mark.parametrize(
    "name,match",
    [
        ("triton", r"'triton' \(passed to set_seq_backend\) was renamed to 'fused'"),
        ("trition_split", r"unknown sequence backend 'trition_split'.*'auto', 'cudnn', 'triton_split', 'fused'"),
    ],
    ids=["renamed", "unknown"],
)
def test_sequence_backend_names_are_checked(name, match):
    from moda_kernels.moda_attn import function

    before = function._seq_backend
    with pytest.raises(ValueError, match=match):
        function.set_seq_backend(name)
    assert function._seq_backend == before  # a refused name leaves the choice as it was
