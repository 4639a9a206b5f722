"""Input validation shared by every implementation of the MoDA attention op.

The op's public entry points (``moda_lightning.ops.moda_attention`` and the fused
``moda_attn``, both taking fewer queries than keys for decoding) call :func:`check_moda_inputs`
once; kernels and the reference then trust their inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def check_moda_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: Tensor | None,
    depth_v: Tensor | None,
    num_depth: int | None,
    q_depth: Tensor | None = None,
    *,
    queries_may_be_fewer: bool = False,
    key_mask: Tensor | None = None,
) -> int:
    """Validate the shapes of one MoDA attention call and return the number of depth slots read.

    Args:
        q: queries ``[B, T, Hq, d]``.
        k, v: sequence keys and values ``[B, T, Hk, d]`` with ``Hq % Hk == 0``.
        depth_k, depth_v: depth stream ``[B, T, S, Hk, d]``, or lists of ``S`` slots ``[B, T, Hk, d]``
            (read whole), or both ``None``.
        num_depth: how many of the ``S`` slots to read (default: all of them).
        q_depth: the query of the depth logits, ``None`` or shaped like ``q`` (same device, dtype).
        queries_may_be_fewer: accept ``k, v [B, Tk, Hk, d]`` with ``Tk >= T`` (decoding: the queries
            are the last ``T`` positions); otherwise ``Tk`` must equal ``T``.
        key_mask: ``None`` or a bool ``[B, Tk]`` of the keys that may be attended (padding is False).

    Returns:
        The number of depth slots the call reads (``0`` when there is no depth stream).

    Raises:
        ValueError: with the offending shapes and what was expected.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "moda_attention: q, k and v must be 4-d [B, T, H, d]; got q "
            f"{_shape(q)}, k {_shape(k)}, v {_shape(v)}. Reshape [B, T, H*d] projections with .view(B, T, H, d)."
        )
    B, T, Hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"moda_attention: k and v must have the same shape; got k {_shape(k)}, v {_shape(v)}.")
    if queries_may_be_fewer and k.dim() == 4 and k.shape[0] == B and k.shape[3] == d and k.shape[1] < T:
        raise ValueError(
            f"moda_attention: q has {T} positions but k/v only {k.shape[1]}; the queries are the last T of the "
            f"keys' positions, so k/v need at least T={T}. Got q {_shape(q)}, k {_shape(k)}."
        )
    if k.shape[0] != B or (k.shape[1] != T and not queries_may_be_fewer) or k.shape[3] != d:
        raise ValueError(
            f"moda_attention: k/v must be [B={B}, T={T}, Hk, d={d}] to match q {_shape(q)}; got {_shape(k)}."
            + ("" if queries_may_be_fewer else " (Fewer queries than keys: queries_may_be_fewer=True.)")
        )
    Hk = k.shape[2]
    if key_mask is not None and (key_mask.dtype != torch.bool or list(key_mask.shape) != [B, k.shape[1]]):
        raise ValueError(
            f"moda_attention: key_mask must be a bool [B={B}, Tk={k.shape[1]}] tensor (True = may be attended); "
            f"got {key_mask.dtype} {_shape(key_mask)}."
        )
    if Hq % Hk != 0:
        raise ValueError(
            f"moda_attention: the {Hq} query heads must be a multiple of the {Hk} key/value heads "
            f"(query head h reads KV head h // (Hq // Hk)); got q {_shape(q)}, k {_shape(k)}."
        )
    if q_depth is not None and (q_depth.shape != q.shape or q_depth.device != q.device or q_depth.dtype != q.dtype):
        raise ValueError(
            f"moda_attention: q_depth (the query of the depth logits) must match q ({_shape(q)}, {q.dtype}, "
            f"{q.device}); got {_shape(q_depth)}, {q_depth.dtype}, {q_depth.device}. Build it from q, e.g. q * gain."
        )
    if (depth_k is None) != (depth_v is None):
        raise ValueError("moda_attention: pass both depth_k and depth_v, or neither.")
    if depth_k is None:
        if num_depth:
            raise ValueError(
                f"moda_attention: num_depth={num_depth} but no depth_k/depth_v were given; "
                "pass the depth stream [B, T, S, Hk, d] or num_depth=0."
            )
        return 0
    assert depth_v is not None
    if isinstance(depth_k, (list, tuple)) or isinstance(depth_v, (list, tuple)):
        return _check_slot_lists(depth_k, depth_v, num_depth, q, B, T, Hk, d)
    expected = f"[B={B}, T={T}, S, Hk={Hk}, d={d}]"
    for name, t in (("depth_k", depth_k), ("depth_v", depth_v)):
        if t.dim() != 5 or t.shape[0] != B or t.shape[1] != T or t.shape[3] != Hk or t.shape[4] != d:
            raise ValueError(f"moda_attention: {name} must be {expected}; got {_shape(t)}.")
    if depth_k.shape != depth_v.shape:
        raise ValueError(
            f"moda_attention: depth_k and depth_v must have the same shape; got {_shape(depth_k)} and {_shape(depth_v)}."
        )
    S = depth_k.shape[2]
    if num_depth is None:
        return S
    if not 0 <= num_depth <= S:
        raise ValueError(
            f"moda_attention: num_depth={num_depth} but the depth stream holds S={S} slots "
            f"(shape {_shape(depth_k)}); pass 0 <= num_depth <= S."
        )
    return num_depth


def _check_slot_lists(depth_k, depth_v, num_depth: int | None, q: Tensor, B: int, T: int, Hk: int, d: int) -> int:
    """The depth stream given as one tensor per slot: ``depth_k[s], depth_v[s]`` are ``[B, T, Hk, d]``."""
    if not isinstance(depth_k, (list, tuple)) or not isinstance(depth_v, (list, tuple)):
        raise ValueError(
            "moda_attention: depth_k and depth_v must both be [B, T, S, Hk, d] tensors or both be lists of "
            f"[B, T, Hk, d] slots; got {type(depth_k).__name__} and {type(depth_v).__name__}."
        )
    if len(depth_k) != len(depth_v):
        raise ValueError(
            f"moda_attention: depth_k and depth_v must hold the same number of slots; got {len(depth_k)} and {len(depth_v)}."
        )
    expected = f"[B={B}, T={T}, Hk={Hk}, d={d}]"
    for name, slots in (("depth_k", depth_k), ("depth_v", depth_v)):
        for s, t in enumerate(slots):
            if not isinstance(t, Tensor) or t.dim() != 4 or list(t.shape) != [B, T, Hk, d]:
                got = _shape(t) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"moda_attention: {name}[{s}] must be {expected} (one depth slot); got {got}.")
            if t.device != q.device or t.dtype != depth_k[0].dtype:
                raise ValueError(
                    f"moda_attention: every depth slot must be on {q.device} with one dtype; {name}[{s}] is "
                    f"{t.dtype} on {t.device}, depth_k[0] is {depth_k[0].dtype}."
                )
    if num_depth is not None and num_depth != len(depth_k):
        raise ValueError(
            f"moda_attention: num_depth={num_depth} but {len(depth_k)} depth slots were passed as a list; "
            "a list is read whole: pass num_depth=None or the list's length."
        )
    return len(depth_k)
