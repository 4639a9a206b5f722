"""The definition of MoDA attention in plain, vectorized PyTorch.

This is the spec every kernel is tested against and the portable backend that trains on
CPU. Math: arXiv 2603.15619, Section 2; shapes: ``kernels/moda_attn/README.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def moda_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    depth_k: Tensor | None = None,
    depth_v: Tensor | None = None,
    *,
    num_depth: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    q_depth: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Attention over ``[sequence | depth]`` keys under one softmax.

    For query head ``h`` of token ``t`` (KV head ``g = h // G``, ``G = Hq // Hk``), with
    ``q_depth = q`` unless given::

        s_j = scale * q[t, h] . k[j, g]                  for j <= t (all j if not causal)
                                                         and key_mask[j] (or j = t)
        r_s = scale * q_depth[t, h] . depth_k[t, s, g]   for s < num_depth
        o[t, h] = sum_j softmax(s, r)_j v[j, g] + sum_s softmax(s, r)_s depth_v[t, s, g]

    A separate ``q_depth`` lets a reader apply a per-channel factor to every slot it reads
    without copying the slots: ``(q * g) . k_s = q . (k_s * g)``.

    The matmuls run in the inputs' dtype and the softmax in float32 (float64 for float64
    inputs), like a low-precision attention kernel, so the reference run in bf16 measures
    how much error bf16 alone costs.

    Decoding: ``k, v`` may hold ``Tk >= T`` positions; the queries are then the last ``T`` of them
    (query ``t`` sits at key position ``Tk - T + t``) and the depth slots are those of the ``T``
    query tokens, which is all a decode step needs: a token's slots are its own.

    Args:
        q: ``[B, T, Hq, d]``.
        k, v: ``[B, Tk, Hk, d]``, ``Tk >= T`` (``Tk = T`` in training).
        depth_k, depth_v: ``[B, T, S, Hk, d]`` or ``None``; only the first ``num_depth``
            slots are read. Or lists of ``S`` slots ``[B, T, Hk, d]``, read whole: the form of a
            functional depth stream, computed slot by slot so that backward keeps references to
            the slots rather than a stacked copy.
        num_depth: number of depth slots to read (default: all ``S``; ``0`` with no stream).
        causal: sequence keys ``j <= t`` only.
        scale: logit scale, default ``d ** -0.5``.
        return_lse: also return the row log-sum-exp and the depth part's log-sum-exp.
        q_depth: ``[B, T, Hq, d]``, the query of the depth logits only (default: ``q``); it
            gets the depth part's share of the query gradient, ``q`` the sequence part's.
        key_mask: bool ``[B, Tk]``, False for keys no query may attend (left padding of a batch
            of prompts); a query always sees its own position, so no row is left empty.

    Returns:
        ``o [B, T, Hq, d]`` in ``q.dtype``; with ``return_lse`` also ``lse, lse_depth
        [B, T, Hq]`` (natural log, float32 or float64; ``lse_depth = -inf`` without depth).
    """
    B, T, Hq, d = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    scale = d**-0.5 if scale is None else scale
    slot_lists = isinstance(depth_k, (list, tuple))
    if depth_k is None or depth_v is None:
        num_depth = 0
    elif num_depth is None or slot_lists:
        num_depth = len(depth_k) if slot_lists else depth_k.shape[2]
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    # Group the query heads by the KV head they read: [B, Hk, G, T, d]; no K/V copies.
    q_g = q.view(B, T, Hk, G, d).permute(0, 2, 3, 1, 4)
    k_h = k.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Hk, 1, T, d]
    v_h = v.permute(0, 2, 1, 3).unsqueeze(2)

    logits_seq = torch.matmul(q_g, k_h.transpose(-1, -2)).to(softmax_dtype) * scale  # [B, Hk, G, T, Tk]
    if causal:  # query t sits at key position Tk - T + t
        future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(Tk - T + 1)
        logits_seq = logits_seq.masked_fill(future, float("-inf"))
    if key_mask is not None:
        positions = torch.arange(Tk, device=q.device)
        own = positions[None, :] == positions[Tk - T :, None]  # [T, Tk]: each query's own key
        hidden = ~key_mask[:, None, None, None, :] & ~own  # [B, 1, 1, T, Tk]
        logits_seq = logits_seq.masked_fill(hidden, float("-inf"))

    def per_head(slot: Tensor) -> Tensor:  # [B, T, Hk, d] -> [B, Hk, 1, T, d], a view
        return slot.permute(0, 2, 1, 3).unsqueeze(2)

    if num_depth > 0:
        qd_g = q_g if q_depth is None else q_depth.reshape(B, T, Hk, G, d).permute(0, 2, 3, 1, 4)
        # Each token attends only to its own depth slots. Multiply-and-sum rather than a
        # broadcast matmul: matmul would save a G-fold copy of the slots for backward, and the
        # model's depth stream relies on reads being views, not copies.
        if slot_lists:  # one logit per slot, stacked: only the [.., T, S] logits are new memory
            logits_depth = torch.stack([(qd_g * per_head(slot)).sum(-1) for slot in depth_k], dim=-1)
        else:
            dk = depth_k[:, :, :num_depth].permute(0, 3, 1, 2, 4).unsqueeze(2)  # [B, Hk, 1, T, S, d]
            dv = depth_v[:, :, :num_depth].permute(0, 3, 1, 2, 4).unsqueeze(2)
            logits_depth = (qd_g.unsqueeze(-2) * dk).sum(-1)  # [B, Hk, G, T, S]
        logits_depth = logits_depth.to(softmax_dtype) * scale
    else:
        logits_depth = logits_seq.new_empty(B, Hk, G, T, 0)

    # One softmax over the concatenated [sequence | depth] logits.
    logits = torch.cat([logits_seq, logits_depth], dim=-1)
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hk, G, T]
    probs = torch.exp(logits - lse.unsqueeze(-1)).to(q.dtype)
    p_seq, p_depth = probs[..., :Tk], probs[..., Tk:]

    o = torch.matmul(p_seq, v_h)  # [B, Hk, G, T, d]
    if num_depth > 0 and slot_lists:
        for s, slot in enumerate(depth_v):
            o = o + p_depth[..., s, None] * per_head(slot)
    elif num_depth > 0:
        o = o + (p_depth.unsqueeze(-1) * dv).sum(-2)
    o = o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, d)
    if not return_lse:
        return o

    def to_BTH(x: Tensor) -> Tensor:  # [B, Hk, G, T] -> [B, T, Hq]
        return x.permute(0, 3, 1, 2).reshape(B, T, Hq)

    lse_depth = torch.logsumexp(logits_depth, dim=-1)  # -inf where there are no depth slots
    return o, to_BTH(lse), to_BTH(lse_depth)
