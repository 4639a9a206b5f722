"""The fused MoDA attention op: ``torch.library`` registration, autograd, FLOP formula, and ``moda_attn()``.

Two custom ops, ``moda::attn_fwd`` and ``moda::attn_bwd``, each with a fake (meta) implementation
so ``torch.compile`` traces through them without a graph break, and a FLOP formula so
``torch.utils.flop_counter.FlopCounterMode`` counts them. Autograd is registered on the forward op.
``moda::attn_fwd_slots`` and ``moda::attn_bwd_slots`` are the same pair for a depth stream given as
lists of slots (``Tensor[]``), read in place through a device-side offset table (``slot_table.py``).

Where the sequence part runs (``MODA_ATTN_SEQ`` environment variable, or :func:`set_seq_backend`):

- ``"cudnn"``: the sequence part through cuDNN's attention with its log-sum-exp (a private aten
  op), then a Triton depth kernel merges the depth slots into the output by log-sum-exp, in place.
  The backward calls cuDNN's backward with the *merged* output and log-sum-exp, which gives the
  exact sequence gradients, and the Triton depth kernel adds the depth part of dq.
- ``"triton_split"``: the same split, with the Triton sequence kernels (run without depth) in
  place of cuDNN.
- ``"fused"``: sequence and depth in one Triton kernel each way (``fwd.py`` / ``bwd.py``), the
  paper's Algorithm 1. These kernels take one query for both parts, so a call with a separate
  depth query (``q_depth``) and depth slots to read runs ``"triton_split"`` instead.
- ``"auto"`` (default): ``"cudnn"`` on CUDA for fp16/bf16 where the private op exists and
  works, else ``"triton_split"`` on CUDA and ``"fused"`` elsewhere (the interpreter on CPU). A
  failing cuDNN call falls back to ``"triton_split"`` (with one warning).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from moda_kernels.moda_attn.bwd import moda_bwd, moda_depth_bwd
from moda_kernels.moda_attn.checks import check_moda_inputs
from moda_kernels.moda_attn.decode import decode_attn
from moda_kernels.moda_attn.fwd import Depth, moda_depth_fwd, moda_fwd, moda_merge
from moda_kernels.moda_attn.grad_into import (
    GradInto,
    SlotGradSums,
    add_grad_into,
    check_grad_into,
    resolve_grad_into,
)
from moda_kernels.moda_attn.slot_table import slot_list

_SEQ_BACKENDS = ("auto", "cudnn", "triton_split", "fused")
_RENAMED_SEQ_BACKENDS = {"triton": "fused"}


def _checked_seq_backend(name: str, source: str) -> str:
    """``name`` if it is a sequence backend; else a ``ValueError`` that says what ``source`` should say."""
    if name in _RENAMED_SEQ_BACKENDS:
        new = _RENAMED_SEQ_BACKENDS[name]
        raise ValueError(
            f"moda_attn: sequence backend {name!r} ({source}) was renamed to {new!r} (sequence and depth in one "
            f"Triton kernel each way); use {new!r}."
        )
    if name not in _SEQ_BACKENDS:
        raise ValueError(f"moda_attn: unknown sequence backend {name!r} ({source}); choose one of {_SEQ_BACKENDS}.")
    return name


_seq_backend = _checked_seq_backend(os.environ.get("MODA_ATTN_SEQ", "auto"), "from MODA_ATTN_SEQ")
_cudnn_broken: str | None = None  # the first error cuDNN raised, if any


def set_seq_backend(name: str) -> None:
    """Choose where the sequence part runs: ``"auto"``, ``"cudnn"``, ``"triton_split"`` or ``"fused"``."""
    global _seq_backend
    _seq_backend = _checked_seq_backend(name, "passed to set_seq_backend")


# Private aten ops: looked up once, since every call's path depends on them.
_HAS_CUDNN_OPS = hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention") and hasattr(
    torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward"
)


def _seq_path(q: Tensor, own_depth_query: bool = False) -> str:
    """The path this call takes: ``"cudnn"``, ``"triton_split"`` or ``"fused"``.

    ``own_depth_query``: the depth logits use a query of their own (``q_depth``, with slots to
    read), which the split paths give the depth kernels and the fused kernels cannot take.
    """
    cudnn_ok = (
        _HAS_CUDNN_OPS
        and q.is_cuda
        and q.shape[1] > 1  # cuDNN rejects s_q = s_kv = 1
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    if _seq_backend == "cudnn" and not cudnn_ok:
        raise RuntimeError(
            "moda_attn: sequence backend 'cudnn' needs fp16/bf16 CUDA tensors and torch's private "
            f"aten._scaled_dot_product_cudnn_attention op (last cuDNN error: {_cudnn_broken}); "
            "use set_seq_backend('triton_split') (the same split with Triton sequence kernels) or 'auto'."
        )
    path = _seq_backend
    if path == "auto":
        path = "cudnn" if cudnn_ok else ("triton_split" if q.is_cuda else "fused")
    return "triton_split" if path == "fused" and own_depth_query else path


def _cudnn_failed(err: Exception) -> str:
    """Re-raise when cuDNN was asked for; else warn (once) and name the fallback path."""
    global _cudnn_broken
    if _seq_backend == "cudnn":
        raise err
    if _cudnn_broken is None:
        _cudnn_broken = f"{type(err).__name__}: {err}"
        warnings.warn(f"moda_attn: cuDNN attention failed ({_cudnn_broken}); this call uses the Triton kernels.", stacklevel=3)
    return "triton_split"


_overlap = os.environ.get("MODA_ATTN_OVERLAP", "0") == "1"  # measured slower on H100: cuDNN fills the SMs
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def set_overlap(on: bool) -> None:
    """Run the depth kernels on a second CUDA stream beside cuDNN's attention, or after it (the default)."""
    global _overlap
    _overlap = bool(on)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _cudnn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Sequence-only attention through cuDNN: ``o [B,T,Hq,d]`` and ``lse [B,Hq,T]``, both contiguous."""
    B, T, Hq, _ = q.shape
    o_BHTd, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _BHTd(q), _BHTd(k), _BHTd(v), None, True, 0.0, causal, False, scale=scale
    )[:2]
    return _BHTd(o_BHTd).contiguous(), lse.reshape(B, Hq, T).contiguous()


def _cudnn_bwd(do, q, k, v, o, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """cuDNN's attention backward, fed the *merged* ``o`` and ``lse``: the exact sequence gradients."""
    T = q.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _BHTd(do), _BHTd(q), _BHTd(k), _BHTd(v), _BHTd(o), lse.unsqueeze(-1),
        None, None, None, None, None, T, T, 0.0, causal, scale=scale,
    )  # fmt: skip
    return _BHTd(dq), _BHTd(dk), _BHTd(dv)


def _BHTd(x: Tensor) -> Tensor:  # [B, T, H, d] -> [B, H, T, d] view, the layout SDPA ops take
    return x.transpose(1, 2)


# ----------------------------------------------------------------------------- forward op


def _attn_fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: Tensor,
    depth_v: Tensor,
    num_depth: int,
    causal: bool,
    scale: float,
    q_depth: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``o [B,T,Hq,d]`` (contiguous), ``lse, lse_depth [B,Hq,T]`` (fp32, natural log).

    The sequence part reads ``q``; the depth kernels read ``q_depth`` (default ``q``).
    """
    return _attn_fwd(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth)


def _attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, depth_k: Depth, depth_v: Depth, num_depth: int, causal: bool, scale: float,
    q_depth: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`_attn_fwd_impl` for either form of the depth stream (every path reads both)."""
    B, T, Hq, d = q.shape
    qd = q if q_depth is None else q_depth
    lse_depth = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    path = _seq_path(q, q_depth is not None and num_depth > 0)
    if path == "cudnn":
        overlap = _overlap and num_depth > 0
        if overlap:  # depth-only part on a side stream while cuDNN runs the sequence part
            main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
            o_depth = torch.empty(B, T, Hq, d, device=q.device, dtype=torch.float32)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                moda_depth_fwd(qd, depth_k, depth_v, num_depth, scale, o_depth, lse_depth, lse_depth, merge=False)
        try:
            o, lse = _cudnn_fwd(q, k, v, causal, scale)
        except RuntimeError as err:
            path = _cudnn_failed(err)
        if overlap:
            main.wait_stream(side)
        if path == "cudnn":
            if overlap:
                moda_merge(o, lse, o_depth, lse_depth)
            elif num_depth > 0:
                moda_depth_fwd(qd, depth_k, depth_v, num_depth, scale, o, lse, lse_depth)
            else:
                lse_depth.fill_(float("-inf"))
            return o, lse, lse_depth
    o = torch.empty(B, T, Hq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    # fully fused: sequence and depth in one kernel; split: sequence only, then the depth kernel
    moda_fwd(q, k, v, depth_k, depth_v, num_depth if path == "fused" else 0, causal, scale, o, lse, lse_depth)
    if path == "triton_split" and num_depth > 0:
        moda_depth_fwd(qd, depth_k, depth_v, num_depth, scale, o, lse, lse_depth)
    return o, lse, lse_depth


moda_attn_fwd = torch.library.custom_op("moda::attn_fwd", _attn_fwd_impl, mutates_args=())


@moda_attn_fwd.register_fake
def _(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth=None):
    return _fake_fwd_outputs(q)


def _fake_fwd_outputs(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, Hq, d = q.shape
    lse = q.new_empty(B, Hq, T, dtype=torch.float32)
    return q.new_empty(B, T, Hq, d), lse, torch.empty_like(lse)


def _attn_fwd_slots_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: list[Tensor],
    depth_v: list[Tensor],
    causal: bool,
    scale: float,
    q_depth: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_attn_fwd_impl` with the depth stream as ``S >= 1`` slots ``[B,T,Hk,d]`` (one layout), all read.

    The slots are read where they are, through a table of their offsets built on the device: no
    stacked copy, so memory stays linear in depth.

    ``q_depth`` has no default on purpose: the dispatcher drops arguments equal to their default,
    and torch's autograd wrapper for ops with ``Tensor[]`` inputs then expects one gradient fewer
    than the backward formula returns.
    """
    return _attn_fwd(q, k, v, slot_list(depth_k), slot_list(depth_v), len(depth_k), causal, scale, q_depth)


moda_attn_fwd_slots = torch.library.custom_op("moda::attn_fwd_slots", _attn_fwd_slots_impl, mutates_args=())


@moda_attn_fwd_slots.register_fake
def _(q, k, v, depth_k, depth_v, causal, scale, q_depth):
    return _fake_fwd_outputs(q)


# ----------------------------------------------------------------------------- backward op


def _attn_bwd_impl(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: Tensor,
    depth_v: Tensor,
    o: Tensor,
    lse: Tensor,
    num_depth: int,
    causal: bool,
    scale: float,
    q_depth: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``dq, dk, dv`` (shapes of q, k, v), ``d(depth_k), d(depth_v)`` ``[B,T,S,Hk,d]`` (zero past
    ``num_depth``) and ``d(q_depth)``: an empty tensor when ``q_depth`` is None (a custom op returns
    tensors only), the depth part of the query gradient then being in ``dq``."""
    S = depth_k.shape[2]
    # *_like keeps a dense input's layout; slots past num_depth get no gradient
    new_depth_grad = torch.empty_like if num_depth == S else torch.zeros_like
    d_depth_k, d_depth_v = new_depth_grad(depth_k), new_depth_grad(depth_v)
    dq, dk, dv, dq_depth = _attn_bwd_into(
        do, q, k, v, depth_k, depth_v, o, lse, num_depth, causal, scale, d_depth_k, d_depth_v, False, q_depth
    )
    return dq, dk, dv, d_depth_k, d_depth_v, q.new_empty(0) if dq_depth is None else dq_depth


def _attn_bwd_into(
    do, q, k, v, depth_k, depth_v, o, lse, num_depth: int, causal: bool, scale: float,
    d_depth_k: Tensor, d_depth_v: Tensor, accum_depth: bool, q_depth: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """``dq, dk, dv, d(q_depth)``; the depth gradients of the first ``num_depth`` slots are written to
    ``d_depth_k, d_depth_v``, or added to them with ``accum_depth``.

    Without ``q_depth`` the depth part of the query gradient is added to ``dq`` and ``d(q_depth)``
    is None; with it, the depth kernel writes that part (``accum_dq=False``) to its own tensor.
    """
    do = do.contiguous()
    own = q_depth is not None
    qd = q if q_depth is None else q_depth
    # the depth kernel casts its fp32 accumulator once on store: no fp32 buffer needed for d(q_depth)
    dq_depth = None if q_depth is None else (torch.empty_like if num_depth > 0 else torch.zeros_like)(q_depth)
    path = _seq_path(q, own and num_depth > 0)
    if path == "cudnn":
        overlap = _overlap and num_depth > 0
        if overlap:  # depth gradients on a side stream while cuDNN runs the sequence backward
            main, side = torch.cuda.current_stream(q.device), _side_stream(q.device)
            dq_side = dq_depth if own else torch.empty(q.shape, device=q.device, dtype=torch.float32)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                moda_depth_bwd(do, qd, depth_k, depth_v, o, lse, num_depth, scale, dq_side, d_depth_k, d_depth_v,
                               accum_dq=False, accum_depth=accum_depth)  # fmt: skip
        try:
            dq, dk, dv = _cudnn_bwd(do, q, k, v, o, lse, causal, scale)
        except RuntimeError as err:
            path = _cudnn_failed(err)
        if overlap:
            main.wait_stream(side)
        if path == "cudnn":
            if overlap and not own:
                dq.add_(dq_side)
            elif num_depth > 0 and not overlap:  # the depth gradients, and the depth part of dq (added unless own)
                moda_depth_bwd(do, qd, depth_k, depth_v, o, lse, num_depth, scale, dq_depth if own else dq,
                               d_depth_k, d_depth_v, accum_dq=not own, accum_depth=accum_depth)  # fmt: skip
            return dq.contiguous(), dk.contiguous(), dv.contiguous(), dq_depth
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if path == "fused" and num_depth > 0 and accum_depth:  # the fused kernel only writes: add after
        fresh_k, fresh_v = torch.zeros_like(d_depth_k), torch.zeros_like(d_depth_v)
        moda_bwd(do, q, k, v, depth_k, depth_v, o, lse, num_depth, causal, scale, dq, dk, dv, fresh_k, fresh_v)
        d_depth_k.add_(fresh_k)
        d_depth_v.add_(fresh_v)
        return dq, dk, dv, dq_depth
    moda_bwd(do, q, k, v, depth_k, depth_v, o, lse, num_depth if path == "fused" else 0, causal, scale,
             dq, dk, dv, d_depth_k, d_depth_v)  # fmt: skip
    if path == "triton_split" and num_depth > 0:
        moda_depth_bwd(do, qd, depth_k, depth_v, o, lse, num_depth, scale, dq_depth if own else dq,
                       d_depth_k, d_depth_v, accum_dq=not own, accum_depth=accum_depth)  # fmt: skip
    return dq, dk, dv, dq_depth


moda_attn_bwd = torch.library.custom_op("moda::attn_bwd", _attn_bwd_impl, mutates_args=())


def _attn_bwd_slots_impl(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: list[Tensor],
    depth_v: list[Tensor],
    o: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    q_depth: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_attn_bwd_impl` for slot lists: the depth gradients come as two ``[S, B, T, Hk, d]`` tensors.

    Slot-major, so that slot ``s``'s gradient is the dense block ``[s]``: autograd hands each slot
    its view (``unbind``). A custom op may not return outputs that alias one another, hence one
    tensor per stream here and the views outside the op.
    """
    S = len(depth_k)
    grad_k = depth_k[0].new_empty((S, *depth_k[0].shape))  # every slot is read: no zero fill
    grad_v = depth_v[0].new_empty((S, *depth_v[0].shape))
    dq, dk, dv, dq_depth = _attn_bwd_into(
        do, q, k, v, slot_list(depth_k), slot_list(depth_v), o, lse, S, causal, scale,
        _slot_major(grad_k), _slot_major(grad_v), False, q_depth,
    )  # fmt: skip
    return dq, dk, dv, grad_k, grad_v, q.new_empty(0) if dq_depth is None else dq_depth


def _slot_major(storage: Tensor) -> Tensor:
    """``[S, B, T, Hk, d]`` memory seen as the ``[B, T, S, Hk, d]`` the kernels write."""
    return storage.permute(1, 2, 0, 3, 4)


moda_attn_bwd_slots = torch.library.custom_op("moda::attn_bwd_slots", _attn_bwd_slots_impl, mutates_args=())


@moda_attn_bwd_slots.register_fake
def _(do, q, k, v, depth_k, depth_v, o, lse, causal, scale, q_depth):
    S = len(depth_k)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        depth_k[0].new_empty((S, *depth_k[0].shape)),
        depth_v[0].new_empty((S, *depth_v[0].shape)),
        q.new_empty(0) if q_depth is None else torch.empty_like(q_depth),
    )


@moda_attn_bwd.register_fake
def _(do, q, k, v, depth_k, depth_v, o, lse, num_depth, causal, scale, q_depth=None):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(depth_k),
        torch.empty_like(depth_v),
        q.new_empty(0) if q_depth is None else torch.empty_like(q_depth),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth = inputs
    o, lse, lse_depth = output
    ctx.save_for_backward(q, k, v, depth_k, depth_v, o, lse, q_depth)
    ctx.num_depth, ctx.causal, ctx.scale = num_depth, causal, scale
    ctx.mark_non_differentiable(lse, lse_depth)


def _grads(ctx, do: Tensor | None, attn_bwd) -> tuple:
    """Gradients of the forward op's nine inputs."""
    q, k, v, depth_k, depth_v, o, lse, q_depth = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, d_depth_k, d_depth_v, dq_depth = attn_bwd(
        do, q, k, v, depth_k, depth_v, o, lse, ctx.num_depth, ctx.causal, ctx.scale, q_depth
    )
    return dq, dk, dv, d_depth_k, d_depth_v, None, None, None, None if q_depth is None else dq_depth


def _backward(ctx, do, _dlse, _dlse_depth):
    return _grads(ctx, do, moda_attn_bwd)


moda_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _setup_slots_context(ctx, inputs, output):
    q, k, v, depth_k, depth_v, causal, scale, q_depth = inputs
    o, lse, lse_depth = output
    # the slots themselves, not a stacked copy: saving references costs no memory
    ctx.save_for_backward(q, k, v, o, lse, q_depth, *depth_k, *depth_v)
    ctx.num_slots, ctx.causal, ctx.scale = len(depth_k), causal, scale
    ctx.mark_non_differentiable(lse, lse_depth)


def _saved_slots(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, list[Tensor], list[Tensor]]:
    q, k, v, o, lse, q_depth, *slots = ctx.saved_tensors
    return q, k, v, o, lse, q_depth, slots[: ctx.num_slots], slots[ctx.num_slots :]


def _slot_grads(ctx, do: Tensor | None, attn_bwd_slots) -> tuple:
    """Gradients of the slots op's eight inputs; each slot gets its view of the slot-major gradient."""
    q, k, v, o, lse, q_depth, depth_k, depth_v = _saved_slots(ctx)
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, grad_k, grad_v, dq_depth = attn_bwd_slots(
        do, q, k, v, depth_k, depth_v, o, lse, ctx.causal, ctx.scale, q_depth
    )
    return dq, dk, dv, list(grad_k.unbind(0)), list(grad_v.unbind(0)), None, None, None if q_depth is None else dq_depth


def _backward_slots(ctx, do, _dlse, _dlse_depth):
    return _slot_grads(ctx, do, moda_attn_bwd_slots)


moda_attn_fwd_slots.register_autograd(_backward_slots, setup_context=_setup_slots_context)


# ----------------------------------------------------------------------------- slot lists with gradient sums


def _attn_fwd_slots_summed_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: list[Tensor],
    depth_v: list[Tensor],
    causal: bool,
    scale: float,
    q_depth: Tensor | None,
    sum_k: list[Tensor],
    sum_v: list[Tensor],
    first_unread: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_attn_fwd_slots_impl`; the backward adds the slots' gradients into ``sum_k, sum_v``
    (one per slot, see :class:`SlotGradSums`) and returns the sums of slots ``first_unread`` on."""
    return _attn_fwd_slots_impl(q, k, v, depth_k, depth_v, causal, scale, q_depth)


moda_attn_fwd_slots_summed = torch.library.custom_op(
    "moda::attn_fwd_slots_summed", _attn_fwd_slots_summed_impl, mutates_args=()
)


@moda_attn_fwd_slots_summed.register_fake
def _(q, k, v, depth_k, depth_v, causal, scale, q_depth, sum_k, sum_v, first_unread):
    return _fake_fwd_outputs(q)


def _attn_bwd_slots_summed_impl(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: list[Tensor],
    depth_v: list[Tensor],
    o: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    q_depth: Tensor | None,
    sum_k: list[Tensor],
    sum_v: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq, dk, dv, d(q_depth)`` (empty when ``q_depth`` is None); every slot's gradient is added
    into its sum in place, by the depth kernel itself where it runs apart from the sequence part."""
    S = len(depth_k)
    keys, values = slot_list(depth_k), slot_list(depth_v)
    if _seq_path(q, q_depth is not None) == "fused":  # the fused kernel writes a [B,T,S,Hk,d] gradient
        fresh_k = _slot_major(depth_k[0].new_zeros((S, *depth_k[0].shape)))
        fresh_v = torch.zeros_like(fresh_k)
        dq, dk, dv, dq_depth = _attn_bwd_into(do, q, k, v, keys, values, o, lse, S, causal, scale, fresh_k, fresh_v,
                                              False, q_depth)  # fmt: skip
        for s in range(S):
            sum_k[s].add_(fresh_k[:, :, s])
            sum_v[s].add_(fresh_v[:, :, s])
    else:
        dq, dk, dv, dq_depth = _attn_bwd_into(do, q, k, v, keys, values, o, lse, S, causal, scale, slot_list(sum_k),
                                              slot_list(sum_v), True, q_depth)  # fmt: skip
    return dq, dk, dv, q.new_empty(0) if dq_depth is None else dq_depth


moda_attn_bwd_slots_summed = torch.library.custom_op(
    "moda::attn_bwd_slots_summed", _attn_bwd_slots_summed_impl, mutates_args=("sum_k", "sum_v")
)


@moda_attn_bwd_slots_summed.register_fake
def _(do, q, k, v, depth_k, depth_v, o, lse, causal, scale, q_depth, sum_k, sum_v):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(0) if q_depth is None else torch.empty_like(q_depth),
    )


def _setup_summed_context(ctx, inputs, output):
    q, k, v, depth_k, depth_v, causal, scale, q_depth, sum_k, sum_v, first_unread = inputs
    _setup_slots_context(ctx, (q, k, v, depth_k, depth_v, causal, scale, q_depth), output)
    # attributes, not saved tensors: every reader mutates the sums, which would trip autograd's
    # check that a saved tensor is unchanged when its backward runs
    ctx.sums, ctx.first_unread = (sum_k, sum_v), first_unread


def _backward_summed(ctx, do, _dlse, _dlse_depth):
    q, k, v, o, lse, q_depth, depth_k, depth_v = _saved_slots(ctx)
    if do is None:
        do = torch.zeros_like(o)
    sum_k, sum_v = ctx.sums
    dq, dk, dv, dq_depth = torch.ops.moda.attn_bwd_slots_summed(
        do, q, k, v, depth_k, depth_v, o, lse, ctx.causal, ctx.scale, q_depth, sum_k, sum_v
    )
    S, first = ctx.num_slots, ctx.first_unread
    # a slot's sum is complete once its first reader (the last one backward reaches) has added to it
    grads_k = [sum_k[s] if s >= first else None for s in range(S)]
    grads_v = [sum_v[s] if s >= first else None for s in range(S)]
    no_grads = [None] * S
    return dq, dk, dv, grads_k, grads_v, None, None, None if q_depth is None else dq_depth, no_grads, no_grads, None


moda_attn_fwd_slots_summed.register_autograd(_backward_summed, setup_context=_setup_summed_context)


class _EagerAttn(torch.autograd.Function):
    """The op's forward and backward called directly, for plain eager calls.

    The custom ops cost a dispatcher round trip and a generated autograd wrapper per call,
    about as much host time as a layer's other kernels put together; a training step is
    launch-bound, so eager calls skip them. ``torch.compile`` and dispatch modes (such as
    ``FlopCounterMode``) still see ``moda::attn_fwd`` and ``moda::attn_bwd``.

    With ``grad_into`` (see ``grad_into.py``) the depth gradients are added into it by the
    backward kernel and not returned: the depth stream sums every reader's gradient of a slot
    that way.
    """

    @staticmethod
    def forward(ctx, q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth=None, grad_into=None):
        output = _attn_fwd_impl(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth)
        _setup_context(ctx, (q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth), output)
        ctx.grad_into = grad_into
        ctx.set_materialize_grads(False)  # the log-sum-exps get no gradient; do not fill zeros for them
        return output

    @staticmethod
    def backward(ctx, do, _dlse, _dlse_depth):
        if ctx.grad_into is None:
            return *_grads(ctx, do, _attn_bwd_impl), None
        q, k, v, depth_k, depth_v, o, lse, q_depth = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        into_k, into_v = resolve_grad_into(ctx.grad_into, depth_k)
        dq, dk, dv, dq_depth = _attn_bwd_into(do, q, k, v, depth_k, depth_v, o, lse, ctx.num_depth, ctx.causal,
                                              ctx.scale, into_k, into_v, True, q_depth)  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, dq_depth, None


class _EagerAttnSlots(torch.autograd.Function):
    """:class:`_EagerAttn` for slot lists. The slots come last, flattened (keys, then values), so that
    autograd sees each one as an input; ``num_slots`` splits them."""

    @staticmethod
    def forward(ctx, q, k, v, q_depth, causal, scale, grad_into, num_slots, *slots):
        depth_k, depth_v = list(slots[:num_slots]), list(slots[num_slots:])
        output = _attn_fwd_slots_impl(q, k, v, depth_k, depth_v, causal, scale, q_depth)
        _setup_slots_context(ctx, (q, k, v, depth_k, depth_v, causal, scale, q_depth), output)
        ctx.grad_into = grad_into
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, do, _dlse, _dlse_depth):
        no_slot_grads = [None] * (2 * ctx.num_slots)
        if ctx.grad_into is None:
            dq, dk, dv, grads_k, grads_v, _, _, dq_depth = _slot_grads(ctx, do, _attn_bwd_slots_impl)
            return dq, dk, dv, dq_depth, None, None, None, None, *grads_k, *grads_v
        q, k, v, o, lse, q_depth, depth_k, depth_v = _saved_slots(ctx)
        do = torch.zeros_like(o) if do is None else do
        into_k, into_v = resolve_grad_into(ctx.grad_into, depth_k)
        dq, dk, dv, dq_depth = _attn_bwd_into(do, q, k, v, slot_list(depth_k), slot_list(depth_v), o, lse,
                                              ctx.num_slots, ctx.causal, ctx.scale, into_k, into_v, True,
                                              q_depth)  # fmt: skip
        return dq, dk, dv, dq_depth, None, None, None, None, *no_slot_grads


def _through_custom_op() -> bool:
    """Whether a call must go through the registered op: under compile or a dispatch mode."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


# ----------------------------------------------------------------------------- FLOP formulas


def _attn_flops(q_shape, num_depth: int, causal: bool) -> int:
    """Matmul FLOPs of the forward: ``4 * B * Hq * d * (visible sequence pairs + T * num_depth)``.

    Counts ``q.k`` and ``p.v`` (2 FLOPs per multiply-add) over the keys each row actually sees:
    ``T (T + 1) / 2`` sequence pairs when causal, ``T^2`` otherwise, plus ``num_depth`` depth
    slots per row. Leaves out the softmax. (torch's own SDPA formula counts ``T^2`` even when
    causal.)
    """
    B, T, Hq, d = q_shape
    pairs = T * (T + 1) // 2 if causal else T * T
    return 4 * B * Hq * d * (pairs + T * num_depth)


# q_depth, the ops' last argument, changes which query the depth logits use, not their count.
@register_flop_formula(torch.ops.moda.attn_fwd)
def _fwd_flop(q_shape, k_shape, v_shape, dk_shape, dv_shape, num_depth, causal, scale, *args, out_shape=None, **kwargs) -> int:
    return _attn_flops(q_shape, num_depth, causal)


@register_flop_formula(torch.ops.moda.attn_bwd)
def _bwd_flop(do_shape, q_shape, *args, out_shape=None, **kwargs) -> int:
    # recompute q.k, then dv, dp, dq, dk: 5 products where the forward has 2 (torch's SDPA ratio)
    num_depth, causal = args[6], args[7]
    return _attn_flops(q_shape, num_depth, causal) * 5 // 2


# The slot lists arrive as lists of shapes; all of them are read.
@register_flop_formula(torch.ops.moda.attn_fwd_slots)
def _fwd_slots_flop(q_shape, k_shape, v_shape, dk_shapes, dv_shapes, causal, *args, out_shape=None, **kwargs) -> int:
    return _attn_flops(q_shape, len(dk_shapes), causal)


@register_flop_formula(torch.ops.moda.attn_fwd_slots_summed)
def _fwd_slots_summed_flop(q_shape, k_shape, v_shape, dk_shapes, dv_shapes, causal, *args, out_shape=None,
                           **kwargs) -> int:  # fmt: skip
    return _attn_flops(q_shape, len(dk_shapes), causal)


@register_flop_formula(torch.ops.moda.attn_bwd_slots_summed)
def _bwd_slots_summed_flop(do_shape, q_shape, k_shape, v_shape, dk_shapes, dv_shapes, o_shape, lse_shape, causal,
                           *args, out_shape=None, **kwargs) -> int:  # fmt: skip
    return _attn_flops(q_shape, len(dk_shapes), causal) * 5 // 2


@register_flop_formula(torch.ops.moda.attn_bwd_slots)
def _bwd_slots_flop(do_shape, q_shape, k_shape, v_shape, dk_shapes, dv_shapes, o_shape, lse_shape, causal, *args,
                    out_shape=None, **kwargs) -> int:  # fmt: skip
    return _attn_flops(q_shape, len(dk_shapes), causal) * 5 // 2


# ----------------------------------------------------------------------------- public boundary


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_kernel_inputs(tensors: dict[str, Tensor]) -> None:
    q = tensors["q"]
    for name, t in tensors.items():
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(
                f"moda_attn: every tensor must share q's device and dtype ({q.device}, {q.dtype}); "
                f"{name} is on {t.device} with {t.dtype}. Move or cast it with .to(q)."
            )
    if q.device.type != "cuda" and not (_interpreting() and q.device.type == "cpu"):
        raise RuntimeError(
            f"moda_attn: the fused Triton kernel needs CUDA tensors; got device {q.device.type!r}. "
            "On CPU use moda_attn_reference (the same contract, in PyTorch)."
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"moda_attn: dtype {q.dtype} is not supported; use bfloat16 or float16 "
            "(float32 runs with tf32 matmuls on the GPU)."
        )
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"moda_attn: head dim d={d} is not supported by the Triton kernel; use 32, 64 or 128.")


def _check_slot_layout(depth_k: list[Tensor], depth_v: list[Tensor]) -> None:
    """The kernels read every slot with slot 0's strides: ask for contiguous slots (never copied here)."""
    for name, slots in (("depth_k", depth_k), ("depth_v", depth_v)):
        for s, t in enumerate(slots):
            if not t.is_contiguous():
                raise ValueError(
                    f"moda_attn: depth slot {name}[{s}] must be contiguous (strides {tuple(t.stride())}); "
                    "the slots are read in place, so pass contiguous slots (e.g. .contiguous() where they are made)."
                )


def moda_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: Tensor | Sequence[Tensor] | None = None,
    depth_v: Tensor | Sequence[Tensor] | None = None,
    *,
    num_depth: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    depth_grad_into: GradInto | None = None,
    q_depth: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Fused MoDA attention (CUDA; same contract as :func:`moda_attn_reference`).

    Args:
        q: ``[B, T, Hq, d]``, fp16/bf16 (fp32 runs with tf32 matmuls), d in {32, 64, 128}.
            Under CUDA autocast all inputs are cast to the autocast dtype, as SDPA does.
        k, v: ``[B, Tk, Hk, d]``, ``Hq % Hk == 0``; ``Tk = T`` in training. Decoding: ``Tk > T``, the
            queries are the last ``T`` positions (query ``t`` at key position ``Tk - T + t``).
        depth_k, depth_v: the depth stream ``[B, T, S, Hk, d]`` with any strides (read in place),
            or lists of ``S`` contiguous slots ``[B, T, Hk, d]`` (read whole and in place, wherever
            each slot lives; the form of a functional depth stream, which ``torch.compile`` can
            trace), or ``None``.
        num_depth: depth slots to read, ``0 <= num_depth <= S`` (default: all ``S``; a list is read
            whole, so only ``None`` or its length).
        causal: sequence keys ``j <= t`` only.
        scale: logit scale, default ``d ** -0.5``.
        return_lse: also return ``lse`` and ``lse_depth`` ``[B, T, Hq]`` (fp32, natural log; not
            differentiable).
        depth_grad_into: two tensors shaped like ``depth_k`` (``[B, T, S, Hk, d]`` for lists too),
            or a function returning them that is called in backward; the backward adds the depth
            gradients into them instead of returning them (see ``grad_into.py``).
        q_depth: ``[B, T, Hq, d]`` like ``q``, the query of the depth logits only (default: ``q``);
            the sequence logits keep ``q``. With depth slots to read, a ``"fused"`` path request
            runs ``"triton_split"`` (the fused kernels take one query).
        key_mask: bool ``[B, Tk]``, False for keys no query may attend (left padding); a query
            always sees its own position.

    With ``Tk > T`` or a ``key_mask`` the call runs the decode kernels (``decode.py``), forward
    only: inputs that require grad are refused, and ``depth_grad_into`` is unused.

    Returns:
        ``o [B, T, Hq, d]``, or ``(o, lse, lse_depth)``; gradients flow to q, k, v, depth_k, depth_v
        (each slot of a list, as views of one slot-major tensor) and q_depth (``q`` gets the sequence
        part of the query gradient, ``q_depth`` the depth part).
    """
    num_depth = check_moda_inputs(
        q, k, v, depth_k, depth_v, num_depth, q_depth, queries_may_be_fewer=True, key_mask=key_mask
    )
    decoding = key_mask is not None or k.shape[1] != q.shape[1]
    slot_lists = isinstance(depth_k, (list, tuple))
    if slot_lists and num_depth == 0:  # empty lists: no depth stream
        depth_k = depth_v = None
        slot_lists = False
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # like SDPA under autocast: run in the autocast dtype (a no-op for tensors already in it)
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if slot_lists:
            depth_k, depth_v = [t.to(dtype) for t in depth_k], [t.to(dtype) for t in depth_v]
        elif depth_k is not None and depth_v is not None:
            depth_k, depth_v = depth_k.to(dtype), depth_v.to(dtype)
        if q_depth is not None:
            q_depth = q_depth.to(dtype)
    tensors = {"q": q, "k": k, "v": v}
    if slot_lists:  # check_moda_inputs gave every slot slot 0's dtype and q's device
        tensors.update(depth_k=depth_k[0], depth_v=depth_v[0])
    elif depth_k is not None and depth_v is not None:
        tensors.update(depth_k=depth_k, depth_v=depth_v)
    if q_depth is not None:
        tensors.update(q_depth=q_depth)
    _check_kernel_inputs(tensors)
    B, T, Hq, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    if decoding:
        slots = [*depth_k, *depth_v] if slot_lists else []
        _check_decode_inputs(tensors, slots, key_mask)
        if slot_lists:
            _check_slot_layout(list(depth_k), list(depth_v))
        o, lse, lse_depth = _moda_attn_decode(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, key_mask)
        if not return_lse:
            return o
        return o, lse.transpose(1, 2), lse_depth.transpose(1, 2)
    if slot_lists:
        depth_k, depth_v = list(depth_k), list(depth_v)
        _check_slot_layout(depth_k, depth_v)
        o, lse, lse_depth = _moda_attn_slots(q, k, v, depth_k, depth_v, causal, scale, q_depth, depth_grad_into)
        if not return_lse:
            return o
        return o, lse.transpose(1, 2), lse_depth.transpose(1, 2)
    if depth_k is None or depth_v is None:
        depth_k = depth_v = q.new_empty(B, T, 0, k.shape[2], d)
        depth_grad_into = None
    if _through_custom_op():
        if depth_grad_into is not None:
            depth_k, depth_v = add_grad_into(depth_k, depth_v, depth_grad_into)
        o, lse, lse_depth = torch.ops.moda.attn_fwd(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth)
    else:
        if depth_grad_into is not None and not callable(depth_grad_into):
            check_grad_into(depth_grad_into, depth_k)  # fail now, not in backward
        o, lse, lse_depth = _EagerAttn.apply(
            q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, depth_grad_into
        )
    if not return_lse:
        return o
    return o, lse.transpose(1, 2), lse_depth.transpose(1, 2)


def _check_decode_inputs(tensors: dict[str, Tensor], slots: list[Tensor], key_mask: Tensor | None) -> None:
    """Decoding is forward only: refuse what would need a backward, and a mask on another device."""
    wanting = [name for name, t in tensors.items() if t.requires_grad]
    wanting += ["depth slots"] if any(t.requires_grad for t in slots) and "depth_k" not in wanting else []
    if torch.is_grad_enabled() and wanting:
        raise ValueError(
            f"moda_attn: with fewer queries than keys or a key_mask the op runs forward only, but {wanting} "
            "require grad; decode under torch.no_grad() or torch.inference_mode(), or differentiate "
            "moda_attn_reference (the same op in PyTorch)."
        )
    q = tensors["q"]
    if key_mask is not None and key_mask.device != q.device:
        raise ValueError(
            f"moda_attn: key_mask is on {key_mask.device} but q on {q.device}; move it with .to(q.device)."
        )


def _moda_attn_decode(
    q: Tensor, k: Tensor, v: Tensor, depth_k: Tensor | Sequence[Tensor] | None, depth_v: Tensor | Sequence[Tensor] | None,
    num_depth: int, causal: bool, scale: float, q_depth: Tensor | None, key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``moda_attn`` for checked decode inputs: ``o`` and ``lse, lse_depth [B, Hq, T]``."""
    if isinstance(depth_k, (list, tuple)):
        depth_k, depth_v = list(depth_k), list(depth_v)
        if _through_custom_op():
            return torch.ops.moda.attn_decode_slots(q, k, v, depth_k, depth_v, causal, scale, q_depth, key_mask)
        return decode_attn(q, k, v, slot_list(depth_k), slot_list(depth_v), num_depth, causal, scale, q_depth, key_mask)
    if _through_custom_op():
        if depth_k is None or depth_v is None:
            depth_k = depth_v = q.new_empty(q.shape[0], q.shape[1], 0, k.shape[2], q.shape[3])
        return torch.ops.moda.attn_decode(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, key_mask)
    return decode_attn(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, key_mask)


def _moda_attn_slots(
    q: Tensor, k: Tensor, v: Tensor, depth_k: list[Tensor], depth_v: list[Tensor], causal: bool, scale: float,
    q_depth: Tensor | None, depth_grad_into: GradInto | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``moda_attn`` for checked, non-empty slot lists: ``o`` and ``lse, lse_depth [B, Hq, T]``."""
    if isinstance(depth_grad_into, SlotGradSums):
        sums = _checked_slot_sums(depth_grad_into, depth_k)
        return torch.ops.moda.attn_fwd_slots_summed(q, k, v, depth_k, depth_v, causal, scale, q_depth, *sums)
    if _through_custom_op():
        if depth_grad_into is not None:
            depth_k, depth_v = add_grad_into(depth_k, depth_v, depth_grad_into)
        return torch.ops.moda.attn_fwd_slots(q, k, v, depth_k, depth_v, causal, scale, q_depth)
    if depth_grad_into is not None and not callable(depth_grad_into):
        check_grad_into(depth_grad_into, depth_k)  # fail now, not in backward
    return _EagerAttnSlots.apply(q, k, v, q_depth, causal, scale, depth_grad_into, len(depth_k), *depth_k, *depth_v)


def _checked_slot_sums(sums: SlotGradSums, depth_k: list[Tensor]) -> tuple[list[Tensor], list[Tensor], int]:
    """``sums`` as the summed op's arguments, after checking that they can hold ``depth_k``'s gradients."""
    S, like = len(depth_k), depth_k[0]
    if len(sums.keys) != S or len(sums.values) != S or not 0 <= sums.first_unread <= S:
        raise ValueError(
            f"moda_attn: SlotGradSums must hold one key and one value sum per slot ({S}) and 0 <= first_unread "
            f"<= {S}; got {len(sums.keys)} and {len(sums.values)} sums, first_unread={sums.first_unread}."
        )
    for t in (*sums.keys, *sums.values):
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
            raise ValueError(
                f"moda_attn: every SlotGradSums tensor must be contiguous and match the slots ({list(like.shape)}, "
                f"{like.dtype}, {like.device}); got {list(t.shape)}, {t.dtype}, {t.device}."
            )
    return list(sums.keys), list(sums.values), sums.first_unread


__all__ = ["moda_attn", "set_overlap", "set_seq_backend"]
