"""The depth stream as lists of slots, under ``TRITON_INTERPRET=1`` on CPU.

``moda_attn`` takes ``depth_k, depth_v`` as lists of ``S`` tensors ``[B, T, Hk, d]`` (the form of a
functional depth stream) and reads them in place through a device-side table of slot offsets
(``slot_table.py``). Here: the table kernel against its reference; the list form against the
tensor form of the same slots (bitwise: the same kernels, addressed differently) and against
the float64 reference, forward and every gradient, on both Triton paths and both routes (plain
eager, registered op); slots scattered in memory; the errors. fp32 and fp16 only: bf16
arithmetic does not run under the interpreter. ``test_moda_attn_cuda.py`` covers the GPU.
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

# check_against_reference runs moda_attn_reference on the slots stacked at dim 2 (the tensor form)
from _reference_check import NAMES, NAMES_Q_DEPTH, check_against_reference, outputs_and_grads, with_q_depth  # noqa: E402


def _inputs(B, T, Hq, Hk, d, S, dtype, *, q_depth=False, seed=0):
    """``q, k, v``, the slots as two lists of separately allocated tensors, ``q_depth`` (or None) and ``do``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = rand(B, T, Hq, d), rand(B, T, Hk, d), rand(B, T, Hk, d)
    slots_k = [rand(B, T, Hk, d) for _ in range(S)]
    slots_v = [rand(B, T, Hk, d) for _ in range(S)]
    return q, k, v, slots_k, slots_v, rand(B, T, Hq, d) if q_depth else None, rand(B, T, Hq, d)


def _list_outputs_and_grads(fn, q, k, v, slots_k, slots_v, q_depth, do, **kw):
    """Like ``outputs_and_grads`` for the list form, the slot gradients stacked at dim 2 as the tensor form has them."""
    # detach, not clone: the slots stay where they are in memory (scattered, unaligned), which is under test
    xs = [x.detach().requires_grad_() for x in (q, k, v, *slots_k, *slots_v)]
    qd = None if q_depth is None else q_depth.detach().requires_grad_()
    S = len(slots_k)
    lists = xs[3 : 3 + S], xs[3 + S :]
    o, lse, lse_depth = fn(*xs[:3], *lists, return_lse=True, q_depth=qd, **kw)
    grads = torch.autograd.grad(o, xs + ([] if qd is None else [qd]), do.to(o.dtype))
    dq, dk, dv = grads[:3]
    out = [o, lse, lse_depth, dq, dk, dv, torch.stack(grads[3 : 3 + S], 2), torch.stack(grads[3 + S : 3 + 2 * S], 2)]
    return out + list(grads[3 + 2 * S :])


def _tensor_inputs(q, k, v, slots_k, slots_v, q_depth):
    """The same inputs in the tensor form (``outputs_and_grads`` order)."""
    inputs = [q, k, v, torch.stack(slots_k, 2), torch.stack(slots_v, 2)]
    return inputs if q_depth is None else [*inputs, q_depth]


def _on(seq: str, route: str, fn, *args, **kw):
    """``fn(*args, **kw)`` with the sequence backend ``seq``, through the eager route or the registered ops."""
    from moda_kernels.moda_attn import function

    original = function._through_custom_op
    function._through_custom_op = (lambda: True) if route == "registered op" else original
    function.set_seq_backend(seq)
    try:
        return fn(*args, **kw)
    finally:
        function._through_custom_op = original
        function.set_seq_backend("auto")


def _assert_equal(names, got, expected, where=""):
    for name, a, b in zip(names, got, expected):
        assert a.shape == b.shape and torch.equal(a, b), f"{where}{name}: list form differs from the tensor form"


# ----------------------------------------------------------------------------- the offset table


def _scattered_slots(S, dtype, *, unaligned=True):
    """Slots all over memory: views of one slot-major buffer out of order (offsets of both signs),
    separately allocated tensors, a slot inside a larger tensor, and one at an odd element offset."""
    shape = (2, 3, 2, 16)
    n = 2 * 3 * 2 * 16
    buf = torch.randn(S + 2, *shape).to(dtype)
    pool = [buf[S + 1], buf[0], buf[S], torch.randn(shape).to(dtype), torch.randn(4, *shape).to(dtype)[2]]
    if unaligned:
        pool.append(torch.randn(n + 5).to(dtype)[3 : 3 + n].view(shape))
    return [pool[s] if s < len(pool) else buf[s] for s in range(S)]


@pytest.mark.parametrize("S", [1, 5, 16, 17, 33])  # 16 per launch: one launch, exactly one, two, three
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_slot_table_matches_reference(S, dtype):
    from moda_kernels.moda_attn.slot_table import slot_list, slot_offsets, slot_offsets_reference

    slots = _scattered_slots(S, dtype)
    table = slot_offsets(slots)
    assert table.dtype == torch.int64 and torch.equal(table, slot_offsets_reference(slots))
    assert table[0] == 0 and (table < 0).any() == (S > 1)
    # an odd element offset (slot 5 when S > 5) must not be promised to the compiler as aligned
    assert slot_list(slots).aligned == (S <= 5)


def test_slot_tables_are_kept_by_address(monkeypatch: pytest.MonkeyPatch):
    """A read of slots already read (the backward's, or a later step's at the same addresses) gets the
    kept table and launches nothing; other slots, or the same ones in another order, get their own
    right table; at most TABLES_KEPT tables are kept, the least recently used dropped."""
    from moda_kernels.moda_attn import slot_table

    monkeypatch.setattr(slot_table, "_kept_tables", type(slot_table._kept_tables)())
    monkeypatch.setattr(slot_table, "TABLES_KEPT", 3)
    launches = []
    built = slot_table._built_table
    monkeypatch.setattr(slot_table, "_built_table", lambda slots: launches.append(len(slots)) or built(slots))

    slots = _scattered_slots(17, torch.float32)
    table = slot_table.slot_offsets(slots)
    assert slot_table.slot_offsets(list(slots)) is table and launches == [17]
    for other in (slots[:5], slots[::-1], [torch.randn_like(slots[0]), *slots[1:]]):
        assert torch.equal(slot_table.slot_offsets(other), slot_table.slot_offsets_reference(other))
    assert launches == [17, 5, 17, 17] and len(slot_table._kept_tables) == 3
    slot_table.slot_offsets(slots)  # dropped as the least recently used: built again, still right
    assert launches[-1] == 17 and len(launches) == 5
    assert torch.equal(slot_table.slot_offsets(slots), slot_table.slot_offsets_reference(slots))


# ----------------------------------------------------------------------------- list form = tensor form = reference

CASES = [
    # B, T, Hq, Hk, d, S, causal
    (2, 19, 2, 2, 16, 1, True),  # G = 1, S = 1, T past one row block
    (1, 17, 6, 2, 16, 5, True),  # G = 3: padded tile rows
    (1, 21, 4, 1, 32, 5, False),  # G = 4, non-causal
]


def _case_id(c):
    B, T, Hq, Hk, d, S, causal = c
    return f"B{B}-T{T}-G{Hq // Hk}-S{S}-D{d}" + ("" if causal else "-noncausal")


@pytest.mark.parametrize("own_query", [False, True], ids=["q", "q_depth"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seq", ["fused", "triton_split"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_list_form_matches_tensor_form_and_reference(case, seq, dtype, own_query):
    """Output, both LSEs and every gradient (q, k, v, each slot, q_depth)."""
    from moda_kernels.moda_attn import moda_attn

    B, T, Hq, Hk, d, S, causal = case
    q, k, v, slots_k, slots_v, q_depth, do = _inputs(B, T, Hq, Hk, d, S, dtype, q_depth=own_query, seed=T + S)
    got = _on(seq, "eager", _list_outputs_and_grads, moda_attn, q, k, v, slots_k, slots_v, q_depth, do, causal=causal)
    inputs = _tensor_inputs(q, k, v, slots_k, slots_v, q_depth)
    op = moda_attn if q_depth is None else with_q_depth(moda_attn)
    expected = _on(seq, "eager", outputs_and_grads, op, inputs, do, causal=causal)
    names = NAMES if q_depth is None else NAMES_Q_DEPTH
    assert len(got) == len(names)
    _assert_equal(names, got, expected)
    check_against_reference(got, inputs, do, floor=1e-5 if dtype == torch.float32 else 1e-3, causal=causal)


@pytest.mark.parametrize("own_query", [False, True], ids=["q", "q_depth"])
@pytest.mark.parametrize("seq", ["fused", "triton_split"])
def test_registered_ops_equal_the_eager_route(seq, own_query):
    """``moda::attn_fwd_slots`` / ``attn_bwd_slots`` (what torch.compile and dispatch modes see) give the eager results."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, q_depth, do = _inputs(1, 19, 6, 2, 16, 5, torch.float32, q_depth=own_query, seed=3)
    args = (moda_attn, q, k, v, slots_k, slots_v, q_depth, do)
    eager = _on(seq, "eager", _list_outputs_and_grads, *args)
    registered = _on(seq, "registered op", _list_outputs_and_grads, *args)
    _assert_equal(NAMES_Q_DEPTH, registered, eager, "registered op: ")


@pytest.mark.parametrize("seq", ["fused", "triton_split"])
def test_slots_scattered_in_memory(seq):
    """Slots that are not adjacent, in any order, one at an odd element offset: read where they are."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, _, _, _, do = _inputs(2, 3, 4, 2, 16, 0, torch.float32, seed=4)
    from moda_kernels.moda_attn.slot_table import slot_list

    slots_k, slots_v = _scattered_slots(7, torch.float32), _scattered_slots(7, torch.float32)[::-1]
    assert not slot_list(slots_k).aligned  # the slot at an odd element offset is among them
    got = _on(seq, "eager", _list_outputs_and_grads, moda_attn, q, k, v, slots_k, slots_v, None, do)
    check_against_reference(got, _tensor_inputs(q, k, v, slots_k, slots_v, None), do, floor=1e-5)


def test_slot_gradients_are_views_of_one_slot_major_tensor():
    """Each slot's gradient is block ``s`` of one ``[S, B, T, Hk, d]`` allocation: no per-slot copies."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, _, do = _inputs(1, 9, 4, 2, 16, 3, torch.float32, seed=5)
    slots = [t.requires_grad_() for t in (*slots_k, *slots_v)]
    grads = torch.autograd.grad(moda_attn(q, k, v, slots[:3], slots[3:]), slots, do)
    for part in (grads[:3], grads[3:]):
        first = part[0]
        assert all(g.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for g in part)
        assert [g.data_ptr() - first.data_ptr() for g in part] == [s * first.numel() * 4 for s in range(3)]


@pytest.mark.parametrize("route,lazy", [("eager", False), ("eager", True), ("registered op", True)])
@pytest.mark.parametrize("seq", ["fused", "triton_split"])
def test_depth_grad_into_with_slot_lists(seq, route, lazy):
    """``depth_grad_into`` for lists: two ``[B, T, S, Hk, d]`` buffers get the slot gradients added; the slots get none."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, q_depth, do = _inputs(2, 7, 4, 2, 16, 3, torch.float32, q_depth=True, seed=6)
    expected = _on(seq, route, _list_outputs_and_grads, moda_attn, q, k, v, slots_k, slots_v, q_depth, do)
    g = torch.Generator().manual_seed(9)
    into = tuple(torch.randn(3, 2, 7, 2, 16, generator=g).permute(1, 2, 0, 3, 4) for _ in range(2))  # slot-major
    start = [t.clone() for t in into]
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, q_depth, *slots_k, *slots_v)]
    grad_into = (lambda: into) if lazy else into
    o = _on(seq, route, moda_attn, *xs[:3], xs[4:7], xs[7:], q_depth=xs[3], depth_grad_into=grad_into)
    o.backward(do)
    assert all(x.grad is None for x in xs[4:])
    for name, x, ref in zip(["dq", "dk", "dv", "dq_depth"], xs[:4], [*expected[3:6], expected[8]]):
        torch.testing.assert_close(x.grad, ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    for name, total, first, ref in zip(["d_depth_k", "d_depth_v"], into, start, expected[6:8]):
        torch.testing.assert_close(total - first, ref, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_empty_lists_are_no_depth_stream():
    from moda_kernels.moda_attn import moda_attn

    q, k, v, _, _, _, _ = _inputs(1, 13, 4, 2, 16, 0, torch.float32)
    o, lse, lse_depth = moda_attn(q, k, v, [], [], return_lse=True)
    assert torch.equal(o, moda_attn(q, k, v)) and torch.isneginf(lse_depth).all()


# ----------------------------------------------------------------------------- torch.compile, FLOPs, fake tensors


@pytest.mark.parametrize("sums", [False, True], ids=["autograd sums", "slot sums"])
def test_flop_counter_counts_the_slots_ops(sums):
    from torch.utils.flop_counter import FlopCounterMode

    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.grad_into import SlotGradSums

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 9, 4, 2, 16, 3, torch.float32)
    q.requires_grad_()
    into = SlotGradSums([torch.zeros_like(t) for t in slots_k], [torch.zeros_like(t) for t in slots_v], 0) if sums else None
    with FlopCounterMode(display=False) as counter:
        moda_attn(q, k, v, slots_k, slots_v, depth_grad_into=into).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    fwd = 4 * 1 * 4 * 16 * (9 * 10 // 2 + 9 * 3)
    name = "moda.attn_{}_slots_summed" if sums else "moda.attn_{}_slots"
    assert counts == {name.format("fwd"): fwd, name.format("bwd"): fwd * 5 // 2}


def test_fake_tensor_shapes_of_the_slots_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import moda_kernels.moda_attn.function  # noqa: F401  (registers the ops)

    with FakeTensorMode():
        q, k = torch.empty(2, 5, 4, 16), torch.empty(2, 5, 2, 16)
        slots = [torch.empty(2, 5, 2, 16) for _ in range(3)]
        o, lse, lse_depth = torch.ops.moda.attn_fwd_slots(q, k, k, slots, slots, True, 0.25, None)
        grads = torch.ops.moda.attn_bwd_slots(o, q, k, k, slots, slots, o, lse, True, 0.25, q.clone())
    assert o.shape == q.shape and lse.shape == lse_depth.shape == (2, 4, 5)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape, (3, 2, 5, 2, 16), (3, 2, 5, 2, 16), q.shape]


def test_torch_compile_fullgraph_traces_the_list_form():
    """Dynamo and AOT autograd trace the list form (fake impls, autograd formula) with no graph break;
    ``aot_eager`` runs the traced graphs without inductor, so no C++ compiler is needed."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, q_depth, do = _inputs(1, 9, 4, 2, 16, 3, torch.float32, q_depth=True, seed=8)

    def f(q, k, v, dk0, dk1, dk2, dv0, dv1, dv2, qd):
        # slots computed inside the graph, as a functional depth stream makes them
        return moda_attn(q, k, v, [dk0, dk1 * 2, dk2], [dv0, dv1, dv2 + 1], q_depth=qd) * 2

    args = [x.detach().clone().requires_grad_() for x in (q, k, v, *slots_k, *slots_v, q_depth)]
    assert torch._dynamo.explain(f)(*args).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    compiled(*args).backward(do)
    ref_args = [x.detach().clone().requires_grad_() for x in args]
    f(*ref_args).backward(do)
    for i, (a, r) in enumerate(zip(args, ref_args)):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-6, rtol=1e-5, msg=lambda m, i=i: f"input {i}: {m}")


# ----------------------------------------------------------------------------- per-slot gradient sums


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("seq", ["fused", "triton_split"])
def test_slot_grad_sums_give_the_gradients_autograd_sums(seq, compiled):
    """Every reader adds into the per-slot sums and the first reader hands them on: the weights' and
    the input's gradients equal those of plain slot lists, whose slot gradients autograd sums.
    ``triton_split`` adds through the depth kernel's gradient offset table; ``fused`` adds after."""
    from benchmarks.compiled_backward_memory import reading_chain

    g = torch.Generator().manual_seed(11)
    weights = [(0.2 * torch.randn(32, 96, generator=g)).requires_grad_() for _ in range(4)]
    x = torch.randn(2, 7, 32, generator=g).requires_grad_()

    def grads(sums: bool, compile_it: bool) -> list[torch.Tensor]:
        fn = torch.compile(reading_chain, fullgraph=True) if compile_it else reading_chain
        torch._dynamo.reset()
        # the path is chosen when the op runs, so the backend is set around forward and backward
        return _on(seq, "eager", lambda: list(torch.autograd.grad(fn(weights, x, sums).square().sum(), [x, *weights])))

    expected = grads(sums=False, compile_it=False)
    for i, (got, ref) in enumerate(zip(grads(sums=True, compile_it=compiled), expected)):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m, i=i: f"input {i}: {m}")


def test_compiled_backward_memory_is_linear_in_depth_with_slot_grad_sums():
    """Left to autograd, the compiled backward sums each slot's gradients where the slot's writer
    needs them, so every reader's slot gradients stay alive until then (quadratic in depth). With
    the sums it needs a few slots per layer. The plain form shows the test can tell the two apart.
    The weights take no gradient (benchmarks/compiled_backward_memory.py), so the peak is the stream's."""
    from benchmarks.compiled_backward_memory import backward_peak_bytes
    from tests.test_depth_stream import quadratic_coefficient

    shape = dict(B=1, T=16, kv_heads=2, d=16, device="cpu", dtype=torch.float32)
    slot = 16 * 2 * 16 * 4
    plain = {n: backward_peak_bytes(n, sums=False, compiled=True, **shape) / slot for n in (3, 6, 9)}
    summed = {n: backward_peak_bytes(n, sums=True, compiled=True, **shape) / slot for n in (3, 6, 9)}
    assert quadratic_coefficient(plain) > 0.25, plain
    assert quadratic_coefficient(summed) < 0.1 * quadratic_coefficient(plain), f"summed {summed}, plain {plain}"


def test_slot_grad_sums_must_match_the_slots():
    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.grad_into import SlotGradSums

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 5, 2, 1, 16, 3, torch.float32)
    zeros = [torch.zeros_like(t) for t in slots_k]
    with pytest.raises(ValueError, match=r"one key and one value sum per slot \(3\)"):
        moda_attn(q, k, v, slots_k, slots_v, depth_grad_into=SlotGradSums(zeros[:2], zeros, 0))
    with pytest.raises(ValueError, match="0 <= first_unread <= 3"):
        moda_attn(q, k, v, slots_k, slots_v, depth_grad_into=SlotGradSums(zeros, zeros, 4))
    with pytest.raises(ValueError, match="must be contiguous and match the slots"):
        moda_attn(q, k, v, slots_k, slots_v, depth_grad_into=SlotGradSums(zeros, [z.half() for z in zeros], 0))


# ----------------------------------------------------------------------------- errors


def test_non_contiguous_slot_is_refused():
    """Slots are never copied: a slot the kernels cannot read with slot 0's strides is an error (one line)."""
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 5, 2, 1, 16, 3, torch.float32)
    stream = torch.randn(1, 5, 3, 1, 16)  # [B, T, S, Hk, d]: a slot of it is strided
    slots_v[1] = stream[:, :, 1]
    with pytest.raises(ValueError, match=r"depth slot depth_v\[1\] must be contiguous") as err:
        moda_attn(q, k, v, slots_k, slots_v)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda ks, vs: (ks, vs[:2]), "same number of slots; got 3 and 2"),
        (lambda ks, vs: (ks, torch.stack(vs, 2)), "both be lists"),
        (lambda ks, vs: ([ks[0], ks[1][:, :4], ks[2]], vs), r"depth_k\[1\] must be \[B=1, T=5, Hk=1, d=16\]"),
        (lambda ks, vs: (ks, [vs[0], vs[1].half(), vs[2]]), r"depth_v\[1\] is torch.float16"),
    ],
    ids=["lengths", "mixed forms", "slot shape", "slot dtype"],
)
def test_bad_slot_lists_name_the_problem(change, match):
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 5, 2, 1, 16, 3, torch.float32)
    with pytest.raises(ValueError, match=match) as err:
        moda_attn(q, k, v, *change(slots_k, slots_v))
    assert "\n" not in str(err.value)


def test_slot_lists_are_read_whole():
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 5, 2, 1, 16, 3, torch.float32)
    with pytest.raises(ValueError, match="a list is read whole"):
        moda_attn(q, k, v, slots_k, slots_v, num_depth=2)


def test_depth_grad_into_must_match_the_stacked_slots():
    from moda_kernels.moda_attn import moda_attn

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 5, 2, 1, 16, 3, torch.float32)
    wrong = (torch.zeros(1, 5, 2, 1, 16), torch.zeros(1, 5, 2, 1, 16))
    with pytest.raises(ValueError, match=r"must match the 3 depth_k slots stacked at dim 2 \(\[1, 5, 3, 1, 16\]"):
        moda_attn(q, k, v, slots_k, slots_v, depth_grad_into=wrong)


def test_slot_layouts_must_agree_at_the_op():
    """The registered op, called directly (past ``moda_attn``'s checks), still refuses slots of two layouts."""
    import moda_kernels.moda_attn.function  # noqa: F401  (registers the ops)

    q, k, v, slots_k, slots_v, _, _ = _inputs(1, 5, 2, 1, 16, 2, torch.float32)
    slots_v[1] = torch.randn(1, 16, 5, 1).permute(0, 2, 3, 1)  # [B, T, Hk, d] with d the slowest dim
    with pytest.raises(ValueError, match="every depth slot must have slot 0's shape, dtype and strides"):
        torch.ops.moda.attn_fwd_slots(q, k, v, slots_k, slots_v, True, 0.25, None)
