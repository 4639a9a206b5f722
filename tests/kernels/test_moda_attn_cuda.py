"""The compiled MoDA Triton kernels on a GPU: a sweep of shapes against a float64 reference.

Run on a CUDA machine: ``pytest tests/kernels -m cuda``. Every case runs the three paths
of the op (``fused``; ``triton_split`` or ``cudnn`` sequence part + Triton depth kernel) and checks the output, both
log-sum-exps and all five gradients with the rule of ``_tolerance.py``; the ``q_depth`` cases add a separate
query for the depth logits and its gradient. The slot-list cases give the depth stream as lists of slots
(``slot_table.py``) and add ``torch.compile(fullgraph=True)`` and CUDA-graph capture of that form.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from _reference_check import (  # noqa: E402
    NAMES,
    NAMES_Q_DEPTH,
    check_against_reference,
    outputs_and_grads,
    with_q_depth,
)

from moda_kernels.moda_attn import moda_attn_reference  # noqa: E402


CASES = [
    # B, T, Hq, Hk, d, S, num_depth, causal
    (2, 1, 8, 8, 64, 4, 4, True),
    (1, 17, 16, 1, 128, 8, 7, True),  # G = 16
    (2, 128, 8, 2, 64, 64, 64, True),
    (1, 128, 4, 4, 32, 3, 3, False),
    (1, 1000, 12, 4, 128, 40, 33, True),  # G = 3, odd T, slots past num_depth unread
    (1, 1000, 8, 2, 64, 8, 0, False),
    (1, 4096, 16, 2, 64, 256, 256, True),
    (1, 4096, 8, 8, 128, 1, 0, True),
]


def _case_id(c):
    B, T, Hq, Hk, d, S, L, causal = c
    return f"B{B}-T{T}-Hq{Hq}-Hk{Hk}-L{L}-D{d}" + ("" if causal else "-noncausal")


def _inputs(B, T, Hq, Hk, d, S, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    # the depth stream as the model holds it: a slice of a larger buffer, read in place
    buf_k, buf_v = rand(B, T, S + 1, Hk, d), rand(B, T, S + 1, Hk, d)
    return [rand(B, T, Hq, d), rand(B, T, Hk, d), rand(B, T, Hk, d), buf_k[:, :, :S], buf_v[:, :, 1:]], rand(B, T, Hq, d)


PATHS = ["fused", "triton_split", "cudnn", "cudnn_overlap"]


def _set_path(path: str) -> None:
    """``cudnn``: depth kernels after cuDNN; ``cudnn_overlap``: on a side stream beside it."""
    from moda_kernels.moda_attn.function import set_overlap, set_seq_backend

    set_seq_backend(path.removesuffix("_overlap"))
    set_overlap(path.endswith("_overlap"))


CUDNN_GRADIENTS = {"dq", "dk", "dv"}


def assert_same(path: str, name: str, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bitwise equality, except for the sequence gradients on the cuDNN paths. cuDNN's attention
    backward (its default, non-deterministic algorithm) sums them in an order that follows how its
    blocks are scheduled, so their last bits can change from call to call while other work runs on
    the GPU: the overlap path's side stream, or another process (seen under CUDA MPS). Those are
    held to bf16 rounding instead; the float64 reference check bounds them as well."""
    if path.startswith("cudnn") and name in CUDNN_GRADIENTS:
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {what}: {m}")
    else:
        assert torch.equal(a, b), f"{name}: {what}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_float64_reference(case, dtype, path):
    from moda_kernels.moda_attn import moda_attn

    B, T, Hq, Hk, d, S, L, causal = case
    if T == 1 and path.startswith("cudnn"):
        pytest.skip("cuDNN rejects s_q = s_kv = 1; 'auto' sends T = 1 to the Triton kernels")
    inputs, do = _inputs(B, T, Hq, Hk, d, S, dtype, seed=T + Hq)
    kw = dict(num_depth=L, causal=causal)
    _set_path(path)
    try:
        out = outputs_and_grads(moda_attn, inputs, do, **kw)
    finally:
        _set_path("auto")
    check_against_reference(out, inputs, do, floor=1e-3, **kw)


def _q_depth_inputs(B, T, Hq, Hk, d, S, dtype, seed=0):
    """The inputs plus ``q_depth = q * gain`` (per-channel, as the model builds it), drawn apart from ``q``."""
    inputs, do = _inputs(B, T, Hq, Hk, d, S, dtype, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1000)
    gain = 0.5 + torch.rand(d, device="cuda", generator=g)
    q_depth = (torch.randn(B, T, Hq, d, device="cuda", generator=g) * gain).to(dtype)
    return [*inputs, q_depth], do


Q_DEPTH_CASES = [
    # B, T, Hq, Hk, d, S, num_depth, causal
    (2, 1, 8, 8, 64, 4, 4, True),
    (2, 128, 8, 2, 64, 64, 64, True),
    (1, 1000, 12, 4, 128, 40, 33, True),  # G = 3, odd T, slots past num_depth unread
    (1, 257, 4, 4, 32, 3, 3, False),
    (1, 300, 8, 2, 64, 4, 0, True),  # no slot read: d(q_depth) is zero
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", Q_DEPTH_CASES, ids=_case_id)
def test_q_depth_matches_float64_reference(case, path):
    """bf16; sequence logits from q, depth logits from q_depth; ``fused`` requests run ``triton_split``."""
    from moda_kernels.moda_attn import moda_attn

    B, T, Hq, Hk, d, S, L, causal = case
    if T == 1 and path.startswith("cudnn"):
        pytest.skip("cuDNN rejects s_q = s_kv = 1; 'auto' sends T = 1 to the Triton kernels")
    inputs, do = _q_depth_inputs(B, T, Hq, Hk, d, S, torch.bfloat16, seed=T + Hq)
    kw = dict(num_depth=L, causal=causal)
    _set_path(path)
    try:
        out = outputs_and_grads(with_q_depth(moda_attn), inputs, do, **kw)
    finally:
        _set_path("auto")
    check_against_reference(out, inputs, do, floor=1e-3, **kw)
    if L == 0:
        assert torch.equal(out[-1], torch.zeros_like(inputs[5]))


@pytest.mark.parametrize("path", PATHS)
def test_q_depth_with_depth_grad_into(path):
    """``depth_grad_into`` with ``q_depth``: the same gradients as the plain call, added into the buffers."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _q_depth_inputs(2, 300, 8, 2, 64, 12, torch.bfloat16, seed=4)
    _set_path(path)
    try:
        plain = outputs_and_grads(with_q_depth(moda_attn), inputs, do, num_depth=9)
        into = [torch.zeros_like(inputs[3]), torch.zeros_like(inputs[4])]
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        moda_attn(*xs[:5], num_depth=9, q_depth=xs[5], depth_grad_into=tuple(into)).backward(do)
    finally:
        _set_path("auto")
    assert xs[3].grad is None and xs[4].grad is None
    got = [x.grad for x in (*xs[:3], xs[5])]
    for name, g, ref in zip(["dq", "dk", "dv", "dq_depth"], got, [*plain[3:6], plain[8]]):
        assert_same(path, name, g, ref, "differs with depth_grad_into")
    for total, ref in zip(into, plain[6:8]):
        assert torch.equal(total, ref)


def test_q_depth_torch_compile_fullgraph():
    """The registered ops with their optional ``q_depth`` argument trace without a graph break."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _q_depth_inputs(1, 257, 8, 2, 64, 5, torch.bfloat16)
    xs = [x.detach().clone().requires_grad_() for x in inputs]

    @torch.compile(fullgraph=True)
    def f(q, k, v, dk, dv, qd):
        return moda_attn(q, k, v, dk, dv, num_depth=4, q_depth=qd) * 2

    f(*xs).backward(do)
    ref = outputs_and_grads(with_q_depth(moda_attn), inputs, 2 * do, num_depth=4)
    for name, x, r in zip(NAMES_Q_DEPTH[3:], xs, ref[3:]):
        torch.testing.assert_close(x.grad, r, msg=lambda m, name=name: f"{name}: {m}")


def test_no_depth_matches_sdpa():
    from moda_kernels.moda_attn import moda_attn

    (q, k, v, _, _), _ = _inputs(2, 300, 8, 2, 64, 1, torch.bfloat16)
    o = moda_attn(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(o, sdpa, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("path", PATHS)
def test_deterministic(path):
    """Forward and backward: repeated runs are bitwise equal (no atomics in the Triton kernels);
    cuDNN's sequence gradients within rounding (:func:`assert_same`)."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _inputs(1, 1000, 16, 2, 64, 16, torch.bfloat16)
    _set_path(path)
    try:
        runs = [outputs_and_grads(moda_attn, inputs, do, num_depth=16) for _ in range(3)]
    finally:
        _set_path("auto")
    for other in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], other):
            assert_same(path, name, a, b, "differs between runs")


def test_torch_compile_fullgraph():
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _inputs(1, 257, 8, 2, 64, 5, torch.bfloat16)
    xs = [x.detach().clone().requires_grad_() for x in inputs]

    @torch.compile(fullgraph=True)
    def f(q, k, v, dk, dv):
        return moda_attn(q, k, v, dk, dv, num_depth=4) * 2

    o = f(*xs)
    o.backward(do)
    ref = moda_attn(*[x.detach() for x in inputs], num_depth=4) * 2
    torch.testing.assert_close(o, ref)
    assert all(x.grad is not None for x in xs[:3])


@pytest.mark.parametrize("path", PATHS)
def test_depth_grad_into_adds_the_depth_gradients(path):
    """``depth_grad_into`` gets exactly the depth gradients the op would otherwise return, added."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _inputs(2, 300, 8, 2, 64, 12, torch.bfloat16, seed=4)
    _set_path(path)
    try:
        plain = outputs_and_grads(moda_attn, inputs, do, num_depth=9)
        # zeros: the sum then equals the returned gradient exactly (the interpreter tests add to random values)
        into = [torch.zeros_like(inputs[3]), torch.zeros_like(inputs[4])]
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        moda_attn(*xs, num_depth=9, depth_grad_into=tuple(into)).backward(do)
    finally:
        _set_path("auto")
    assert xs[3].grad is None and xs[4].grad is None
    for name, got, ref in zip(["dq", "dk", "dv"], [x.grad for x in xs[:3]], plain[3:6]):
        assert_same(path, name, got, ref, "differs with depth_grad_into")
    for total, ref in zip(into, plain[6:]):
        assert torch.equal(total, ref)


def test_model_backend_matches_moda_torch():
    """The 'moda_triton' model backend gives the same logits and gradients as 'moda_torch'."""
    from moda_lightning.config import MoDAConfig
    from moda_lightning.model import MoDATransformer

    results = {}
    for backend in ("moda_torch", "moda_triton"):
        torch.manual_seed(0)
        cfg = MoDAConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, attention=backend)
        model = MoDATransformer(cfg).cuda().to(torch.bfloat16)
        idx = torch.randint(0, 256, (2, 200), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        results[backend] = (logits.float(), model.layers[0].attn.sublayer.qkv_proj.weight.grad.float())
    for a, b in zip(results["moda_torch"], results["moda_triton"]):
        assert (a - b).norm() / b.norm() < 2e-2


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_fp32_runs_in_tf32():
    """fp32 inputs take the Triton path with tf32 matmuls: relative error near tf32's ~1e-3."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _inputs(1, 300, 8, 2, 64, 6, torch.float32)
    out = outputs_and_grads(moda_attn, inputs, do, num_depth=5)
    ref = outputs_and_grads(moda_attn_reference, [x.double() for x in inputs], do.double(), num_depth=5)
    for name, a, r in zip(NAMES, out, ref):
        if name == "lse_depth" or name == "lse":
            torch.testing.assert_close(a.double(), r, atol=1e-2, rtol=1e-3)
        else:
            assert a.dtype == torch.float32 and _rel_err(a, r) < 5e-3, f"{name}: relative error {_rel_err(a, r):.2e}"


def test_autocast_casts_mixed_inputs():
    """Under bf16 autocast, fp32 and bf16 inputs mix as they do for SDPA: the op runs in bf16."""
    from moda_kernels.moda_attn import moda_attn

    (q, k, v, depth_k, depth_v), _ = _inputs(1, 200, 8, 2, 64, 4, torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = moda_attn(q.float(), k, v, depth_k.float(), depth_v, num_depth=4)
    ref = moda_attn_reference(*[x.double() for x in (q, k, v, depth_k, depth_v)], num_depth=4)
    assert o.dtype == torch.bfloat16 and _rel_err(o, ref) < 2e-2


# ----------------------------------------------------------------------------- the depth stream as lists of slots


def _slot_list_inputs(B, T, Hq, Hk, d, S, dtype, *, seed=0, q_depth=False, unaligned=False):
    """``[q, k, v, slots_k, slots_v]`` (plus ``q_depth``) and ``do``; the slots are separate allocations, as a
    functional depth stream makes them. ``unaligned``: one key slot and one value slot sit at an odd element
    offset of a larger buffer, so the kernels may not assume aligned slot offsets."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    slots_k = [rand(B, T, Hk, d) for _ in range(S)]
    slots_v = [rand(B, T, Hk, d) for _ in range(S)]
    if unaligned:
        n = B * T * Hk * d
        for slots in (slots_k, slots_v):
            slots[S // 2] = rand(n + 8)[3 : 3 + n].view(B, T, Hk, d)
    inputs = [rand(B, T, Hq, d), rand(B, T, Hk, d), rand(B, T, Hk, d), slots_k, slots_v]
    if q_depth:
        inputs.append(rand(B, T, Hq, d))
    return inputs, rand(B, T, Hq, d)


def _list_outputs_and_grads(fn, inputs, do, **kw):
    """``outputs_and_grads`` for the list form; the slot gradients stacked at dim 2, as the tensor form has them."""
    q, k, v, slots_k, slots_v, *q_depth = inputs
    S = len(slots_k)
    # detach, not clone: the slots stay where they are in memory (an unaligned one stays unaligned)
    xs = [x.detach().requires_grad_() for x in (q, k, v, *slots_k, *slots_v, *q_depth)]
    qd = xs[3 + 2 * S] if q_depth else None
    o, lse, lse_depth = fn(*xs[:3], xs[3 : 3 + S], xs[3 + S : 3 + 2 * S], return_lse=True, q_depth=qd, **kw)
    grads = torch.autograd.grad(o, xs, do.to(o.dtype))
    stacked = [torch.stack(grads[3 : 3 + S], 2), torch.stack(grads[3 + S : 3 + 2 * S], 2)]
    return [o, lse, lse_depth, *grads[:3], *stacked, *grads[3 + 2 * S :]]


def _stacked(inputs):
    """The same inputs in the tensor form (what ``outputs_and_grads`` and the reference take)."""
    q, k, v, slots_k, slots_v, *q_depth = inputs
    return [q, k, v, torch.stack(slots_k, 2), torch.stack(slots_v, 2), *q_depth]


SLOT_CASES = [
    # B, T, Hq, Hk, d, S, causal
    (2, 1, 8, 8, 64, 4, True),
    (2, 300, 8, 2, 64, 1, True),
    (1, 1000, 12, 4, 128, 33, True),  # G = 3, odd T, three table launches
    (1, 257, 4, 4, 32, 5, False),
]


def _slot_case_id(c):
    B, T, Hq, Hk, d, S, causal = c
    return f"B{B}-T{T}-Hq{Hq}-Hk{Hk}-S{S}-D{d}" + ("" if causal else "-noncausal")


@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", SLOT_CASES, ids=_slot_case_id)
def test_slot_lists_match_tensor_form(case, path, unaligned):
    """bf16, every path: the list form passes the float64 reference check, and with aligned slots gives the
    tensor form's results bitwise (the same kernels, the slots addressed through the offset table; cuDNN's
    sequence gradients within rounding, :func:`assert_same`).

    Unaligned slots are read with narrower loads, whose register layout can change the order of the
    fused kernel's in-register sums: there only the reference check applies.
    """
    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.slot_table import slot_list

    B, T, Hq, Hk, d, S, causal = case
    if T == 1 and path.startswith("cudnn"):
        pytest.skip("cuDNN rejects s_q = s_kv = 1; 'auto' sends T = 1 to the Triton kernels")
    inputs, do = _slot_list_inputs(B, T, Hq, Hk, d, S, torch.bfloat16, seed=T + S, unaligned=unaligned)
    assert slot_list(inputs[3]).aligned == (not unaligned or S == 1)  # a single slot is at offset 0
    _set_path(path)
    try:
        got = _list_outputs_and_grads(moda_attn, inputs, do, causal=causal)
        expected = outputs_and_grads(moda_attn, _stacked(inputs), do, causal=causal)
    finally:
        _set_path("auto")
    if not unaligned:
        for name, a, b in zip(NAMES, got, expected):
            assert_same(path, name, a, b, "list form differs from the tensor form")
    check_against_reference(got, _stacked(inputs), do, floor=1e-3, causal=causal)


@pytest.mark.parametrize("path", PATHS)
def test_slot_lists_with_q_depth(path):
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _slot_list_inputs(1, 1000, 12, 4, 128, 9, torch.bfloat16, seed=5, q_depth=True)
    _set_path(path)
    try:
        got = _list_outputs_and_grads(moda_attn, inputs, do)
        expected = outputs_and_grads(with_q_depth(moda_attn), _stacked(inputs), do)
    finally:
        _set_path("auto")
    for name, a, b in zip(NAMES_Q_DEPTH, got, expected):
        assert_same(path, name, a, b, "list form differs from the tensor form")
    check_against_reference(got, _stacked(inputs), do, floor=1e-3)


@pytest.mark.parametrize("path", PATHS)
def test_slot_lists_with_depth_grad_into(path):
    """Slot-major ``[B, T, S, Hk, d]`` buffers get exactly the slot gradients the list form would return."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _slot_list_inputs(2, 300, 8, 2, 64, 12, torch.bfloat16, seed=4)
    S = 12
    _set_path(path)
    try:
        plain = _list_outputs_and_grads(moda_attn, inputs, do)
        into = [torch.zeros(S, 2, 300, 2, 64, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3, 4) for _ in range(2)]
        xs = [x.detach().clone().requires_grad_() for x in (*inputs[:3], *inputs[3], *inputs[4])]
        moda_attn(*xs[:3], xs[3 : 3 + S], xs[3 + S :], depth_grad_into=tuple(into)).backward(do)
    finally:
        _set_path("auto")
    assert all(x.grad is None for x in xs[3:])
    for name, x, ref in zip(["dq", "dk", "dv"], xs[:3], plain[3:6]):
        assert_same(path, name, x.grad, ref, "differs with depth_grad_into")
    for total, ref in zip(into, plain[6:8]):
        assert torch.equal(total, ref)


@pytest.mark.parametrize("own_query", [False, True], ids=["q", "q_depth"])
def test_slot_lists_torch_compile_fullgraph(own_query):
    """A function that builds its slots and reads them as lists compiles with no graph break (inductor),
    and its gradients match eager."""
    from moda_kernels.moda_attn import moda_attn

    inputs, do = _slot_list_inputs(1, 257, 8, 2, 64, 3, torch.bfloat16, seed=6, q_depth=True)
    q, k, v, slots_k, slots_v, q_depth = inputs

    def f(q, k, v, dk0, dk1, dk2, dv0, dv1, dv2, qd):
        # slots computed in the graph, as a functional depth stream produces them
        depth_k, depth_v = [dk0, dk1 * 0.5, dk2], [dv0, dv1, dv2 + 1]
        return moda_attn(q, k, v, depth_k, depth_v, q_depth=qd if own_query else None) * 2

    args = [x.detach().clone().requires_grad_() for x in (q, k, v, *slots_k, *slots_v, q_depth)]
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    o = torch.compile(f, fullgraph=True)(*args)
    o.backward(do)
    ref_args = [x.detach().clone().requires_grad_() for x in args]
    ref = f(*ref_args)
    ref.backward(do)
    torch.testing.assert_close(o, ref)
    for i, (a, r) in enumerate(zip(args, ref_args)):
        if r.grad is None:  # q_depth when unused
            assert a.grad is None
            continue
        torch.testing.assert_close(a.grad, r.grad, msg=lambda m, i=i: f"input {i}: {m}")


def test_slot_tables_are_kept_on_the_default_stream_only():
    """The default stream keeps its offset tables; another stream and a CUDA graph capture build their
    own and keep nothing, and the captured table replays right."""
    from moda_kernels.moda_attn import slot_table

    slots = [torch.randn(2, 8, 2, 64, device="cuda") for _ in range(5)]
    table = slot_table.slot_offsets(slots)
    assert slot_table.slot_offsets(slots) is table
    kept = [(key, id(t)) for key, t in slot_table._kept_tables.items()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = slot_table.slot_offsets(slots)
    torch.cuda.current_stream().wait_stream(side)
    assert other is not table and torch.equal(other, table)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = slot_table.slot_offsets(slots)
    assert captured is not table and captured is not other
    assert [(key, id(t)) for key, t in slot_table._kept_tables.items()] == kept  # nothing kept or moved
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, slot_table.slot_offsets_reference(slots))


def test_slot_lists_under_compiled_cuda_graphs_keep_nothing_in_the_graph_pool():
    """``torch.compile(mode="reduce-overhead")`` warms its graphs up and records them on its own
    stream, allocating in the graphs' private pool, whose live blocks it checks against what it
    knows of: a table kept from there would fail that check (or be overwritten by a replay).
    Replays on new values equal eager, and the compiled calls keep no table."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    from moda_kernels.moda_attn import moda_attn, slot_table

    def f(q, k, v, dk0, dk1, dk2, dv0, dv1, dv2):
        return moda_attn(q, k, v, [dk0, dk1 * 0.5, dk2], [dv0, dv1, dv2 + 1]) * 2

    torch._dynamo.reset()
    counters.clear()
    graphed = torch.compile(f, mode="reduce-overhead")
    with inductor_config.patch({"triton.slow_path_cudagraph_asserts": True}):  # the pool check (on by default)
        for seed in range(4):  # warm-up, recording, then replays
            inputs, do = _slot_list_inputs(1, 257, 8, 2, 64, 3, torch.bfloat16, seed=seed)
            args = [x.detach().clone().requires_grad_() for x in (*inputs[:3], *inputs[3], *inputs[4])]
            kept = list(slot_table._kept_tables)
            o = graphed(*args)
            grads = torch.autograd.grad(o, args, do)
            torch.cuda.synchronize()
            assert list(slot_table._kept_tables) == kept, f"call {seed}: the compiled call kept a table"
            ref_args = [x.detach().clone().requires_grad_() for x in args]
            ref = f(*ref_args)
            ref_grads = torch.autograd.grad(ref, ref_args, do)
            torch.testing.assert_close(o, ref)
            for i, (g, r) in enumerate(zip(grads, ref_grads)):
                torch.testing.assert_close(g, r, msg=lambda m, i=i: f"call {seed}, input {i}: {m}")
    assert counters["inductor"]["cudagraph_skips"] == 0  # the calls above did run as CUDA graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("path", PATHS)
def test_slot_lists_under_cuda_graph_capture(path):
    """Forward and backward of the list form captured in one CUDA graph, replayed on new values in the same
    tensors, equal eager: the offset table is built on the device, from the captured slot addresses."""
    from moda_kernels.moda_attn import moda_attn

    S = 5
    inputs, do = _slot_list_inputs(2, 300, 8, 2, 64, S, torch.bfloat16, seed=7, unaligned=True)
    static = [x.detach().requires_grad_() for x in (*inputs[:3], *inputs[3], *inputs[4])]  # in place: unaligned stays
    static_do = do.clone()

    def step():
        o = moda_attn(*static[:3], static[3 : 3 + S], static[3 + S :])
        return [o, *torch.autograd.grad(o, static, static_do)]

    _set_path(path)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the default stream: Triton compiles, cuDNN plans
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        fresh, fresh_do = _slot_list_inputs(2, 300, 8, 2, 64, S, torch.bfloat16, seed=8)
        with torch.no_grad():
            for x, new in zip(static, (*fresh[:3], *fresh[3], *fresh[4])):
                x.copy_(new)
            static_do.copy_(fresh_do)
        graph.replay()
        torch.cuda.synchronize()
        xs = [x.detach().requires_grad_() for x in static]  # the same memory: the same kernel variants
        o = moda_attn(*xs[:3], xs[3 : 3 + S], xs[3 + S :])
        eager = [o, *torch.autograd.grad(o, xs, fresh_do)]
    finally:
        _set_path("auto")
    names = ["o", "dq", "dk", "dv", *(f"d_depth_{s}" for s in range(2 * S))]
    for name, a, b in zip(names, captured, eager):
        assert_same(path, name, a, b, "graph replay differs from eager")
