"""MoDA attention forward: one Triton kernel, one online softmax over ``[depth | sequence]`` keys.

Algorithm 1 of arXiv 2603.15619 (Section 3), with the query heads of one KV head packed into
the rows of a tile (GQA). Math and layout: ``kernels/moda_attn/README.md``.

Row packing: a program owns ``BLOCK_T`` tokens of one ``(batch, KV head)``; its
``BLOCK_M = BLOCK_T * G_PAD`` rows are ``row = t_local * G_PAD + g`` (query head
``hk * G + g``; rows with ``g >= G`` are padding when ``G`` is not a power of two). Sequence
keys are loaded once for all ``G`` heads; a token's depth slots are loaded once as
``[BLOCK_T, D]`` and broadcast to its ``G`` rows (the paper's "group-aware" load).

Two kernels:
- ``moda_fwd_kernel`` (fused): depth slots first, then the sequence key blocks, all in one
  ``(m, l, acc)`` state (depth on CUDA cores, one slot at a time, ``[BLOCK_T, G_PAD, D]``).
- ``moda_depth_fwd_kernel`` (merge): the sequence part was computed elsewhere (cuDNN or the fused
  kernel without depth) and left its output and log-sum-exp; this kernel runs the depth slots on
  tensor cores and merges both parts by log-sum-exp, in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from moda_kernels.moda_attn.slot_table import SlotList, depth_flags, depth_pointers
from moda_kernels.moda_attn.tiles import depth_columns, load_rows, packed_rows, slot_offsets

Depth = torch.Tensor | SlotList  # the depth stream: one [B, T, S, Hk, d] tensor, or one tensor per slot

LOG2E = 1.4426950408889634  # 1 / ln 2: logits are kept in base 2 (exp2 is one instruction)
LN2 = 0.6931471805599453
LN2_C: tl.constexpr = tl.constexpr(LN2)


@triton.jit
def _depth_fwd(
    b_q3,  # [BLOCK_T, G_PAD, D] fp32 queries of the block, grouped by token
    ptr_dk,  # [BLOCK_T] pointers to depth_k[b, t, 0, hk, 0]
    ptr_dv,
    offs_d,
    mask_t,
    num_depth,
    stride_dks,
    stride_dkd,
    stride_dvs,
    stride_dvd,
    DK_SLOTS,  # slot offset tables of the list form (unused by the tensor form)
    DV_SLOTS,
    qk_scale,
    BLOCK_T: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    SLOT_TABLE: tl.constexpr,
    SLOTS_ALIGNED: tl.constexpr,
):
    """Online softmax over a token's own depth slots; returns the base-2 state ``(m, l, acc)``."""
    m3 = tl.full([BLOCK_T, G_PAD], float("-inf"), tl.float32)
    l3 = tl.zeros([BLOCK_T, G_PAD], tl.float32)
    acc3 = tl.zeros([BLOCK_T, G_PAD, D], tl.float32)
    for s in range(0, num_depth):
        at_k = slot_offsets(s, s < num_depth, stride_dks, DK_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
        at_v = slot_offsets(s, s < num_depth, stride_dvs, DV_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
        # [BLOCK_T, D]: slot s of each token, loaded once for its G query rows
        b_dk = tl.load(ptr_dk[:, None] + at_k + offs_d[None, :] * stride_dkd, mask=mask_t[:, None], other=0.0)
        b_dv = tl.load(ptr_dv[:, None] + at_v + offs_d[None, :] * stride_dvd, mask=mask_t[:, None], other=0.0)
        # [BLOCK_T, G_PAD]: one depth logit per query row
        x = tl.sum(b_q3 * b_dk.to(tl.float32)[:, None, :], axis=2) * qk_scale
        # online-softmax update with one new key per row
        m_new = tl.maximum(m3, x)
        alpha = tl.exp2(m3 - m_new)
        p = tl.exp2(x - m_new)
        l3 = l3 * alpha + p
        acc3 = acc3 * alpha[:, :, None] + p[:, :, None] * b_dv.to(tl.float32)[:, None, :]
        m3 = m_new
    return m3, l3, acc3


@triton.jit
def depth_rows(
    b_q,  # [BLOCK_M, D] the block's query rows (those of the depth logits), any float dtype
    DK, DV, b, hk, t0, T, offs_d, num_depth,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    DK_SLOTS, DV_SLOTS, qk_scale,
    BLOCK_T: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    HAS_DEPTH: tl.constexpr,
    SLOT_TABLE: tl.constexpr,
    SLOTS_ALIGNED: tl.constexpr,
):  # fmt: skip
    """The online-softmax state ``(m, l, acc)`` of a row block after its tokens' own depth slots
    (the empty state without depth), and the depth part's natural-log log-sum-exp (-inf without)."""
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    if HAS_DEPTH:
        offs_tt = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_tt < T
        ptr_dk = DK + b * stride_dkb + offs_tt.to(tl.int64) * stride_dkt + hk * stride_dkh
        ptr_dv = DV + b * stride_dvb + offs_tt.to(tl.int64) * stride_dvt + hk * stride_dvh
        b_q3 = tl.reshape(b_q.to(tl.float32), (BLOCK_T, G_PAD, D))
        m3, l3, acc3 = _depth_fwd(
            b_q3, ptr_dk, ptr_dv, offs_d, mask_t, num_depth, stride_dks, stride_dkd, stride_dvs, stride_dvd,
            DK_SLOTS, DV_SLOTS, qk_scale, BLOCK_T, G_PAD, D, SLOT_TABLE, SLOTS_ALIGNED,
        )  # fmt: skip
        m_i = tl.reshape(m3, (BLOCK_M,))
        l_i = tl.reshape(l3, (BLOCK_M,))
        acc = tl.reshape(acc3, (BLOCK_M, D))
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
    lse_depth = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * LN2_C, float("-inf"))
    return m_i, l_i, acc, lse_depth


@triton.jit
def _seq_fwd(
    acc,
    l_i,
    m_i,
    b_q,  # [BLOCK_M, D] in the input dtype
    ptr_k,  # base of k[b, :, hk, :]
    ptr_v,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_t,  # [BLOCK_M] token of each row
    offs_d,
    lo,
    hi,
    T,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    MASK: tl.constexpr,  # apply the causal and key-bound masks (boundary blocks only)
    CAUSAL: tl.constexpr,
):
    """FlashAttention-2 inner loop over sequence key blocks ``[lo, hi)``."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < T
        # [D, BLOCK_N]
        b_kT = tl.load(ptr_k + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=mask_n[None, :], other=0.0)
        # [BLOCK_N, D]
        b_v = tl.load(ptr_v + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(b_q, b_kT) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASK:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_t[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def moda_fwd_kernel(
    Q, K, V, DK, DV, DK_SLOTS, DV_SLOTS, O, LSE, LSE_D,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,  # LSE (and LSE_D): [B, Hq, T] fp32
    T, Hk, num_depth, qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DEPTH: tl.constexpr,
    SLOT_TABLE: tl.constexpr,  # depth given as one tensor per slot: DK, DV are slot 0, DK_SLOTS, DV_SLOTS the offsets
    SLOTS_ALIGNED: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    b, hk, t0, offs_t, offs_h, mask_r = packed_rows(tl.program_id(0), tl.program_id(1), T, Hk, G, G_PAD, BLOCK_T)
    offs_d = tl.arange(0, D)
    offs_t64 = offs_t.to(tl.int64)
    b_q = load_rows(Q, b, offs_t, offs_h, mask_r, stride_qb, stride_qt, stride_qh, stride_qd, D)  # [BLOCK_M, D]

    # --- stage 1: depth slots of the block's own tokens (group-aware) ---
    # log-sum-exp of the depth part alone (natural log; -inf without depth slots)
    m_i, l_i, acc, lse_depth = depth_rows(
        b_q, DK, DV, b, hk, t0, T, offs_d, num_depth,
        stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
        stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
        DK_SLOTS, DV_SLOTS, qk_scale, BLOCK_T, G_PAD, D, HAS_DEPTH, SLOT_TABLE, SLOTS_ALIGNED,
    )  # fmt: skip

    # --- stage 2: sequence keys, continuing the same online softmax ---
    ptr_k = K + b * stride_kb + hk * stride_kh
    ptr_v = V + b * stride_vb + hk * stride_vh
    if CAUSAL:
        # key blocks entirely below the block's first token need no mask
        hi_full = (t0 // BLOCK_N) * BLOCK_N
        hi = tl.minimum(t0 + BLOCK_T, T)
    else:
        hi_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, l_i, m_i = _seq_fwd(
        acc, l_i, m_i, b_q, ptr_k, ptr_v, stride_kt, stride_kd, stride_vt, stride_vd, offs_t, offs_d,
        0, hi_full, T, qk_scale, BLOCK_M, BLOCK_N, D, False, CAUSAL,
    )  # fmt: skip
    acc, l_i, m_i = _seq_fwd(
        acc, l_i, m_i, b_q, ptr_k, ptr_v, stride_kt, stride_kd, stride_vt, stride_vd, offs_t, offs_d,
        hi_full, hi, T, qk_scale, BLOCK_M, BLOCK_N, D, True, CAUSAL,
    )  # fmt: skip
    lse = (m_i + tl.log2(l_i)) * LN2_C
    b_o = acc / l_i[:, None]

    offs_lse = b * stride_lb + offs_h * stride_lh + offs_t64 * stride_lt
    ptr_o = O + b * stride_ob + offs_t64[:, None] * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(ptr_o, b_o.to(O.dtype.element_ty), mask=mask_r[:, None])
    tl.store(LSE + offs_lse, lse, mask=mask_r)
    tl.store(LSE_D + offs_lse, lse_depth, mask=mask_r)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def fwd_config(G: int, d: int, interpret: bool) -> dict[str, int]:
    """Tile sizes: ``BLOCK_M = BLOCK_T * G_PAD`` packed query rows, ``BLOCK_N`` keys."""
    G_PAD = _next_pow2(G)
    if interpret:
        rows, block_n, warps, stages = max(16, G_PAD * 2), 16, 4, 1
    elif d <= 64:
        rows, block_n, warps, stages = 128, 64, 4, 3
    else:
        rows, block_n, warps, stages = 128, 64, 8, 2
    rows = max(rows, G_PAD)
    return dict(G_PAD=G_PAD, BLOCK_T=rows // G_PAD, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def moda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    depth_k: Depth,
    depth_v: Depth,
    num_depth: int,
    causal: bool,
    scale: float,
    o: torch.Tensor,
    lse: torch.Tensor,
    lse_depth: torch.Tensor,
    config: dict[str, int] | None = None,
) -> None:
    """Launch the fused forward kernel, writing ``o [B,T,Hq,d]`` (any strides), ``lse, lse_depth [B,Hq,T]``."""
    B, T, Hq, d = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    cfg = dict(config or fwd_config(G, d, q.device.type == "cpu"))
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), B * Hk)
    (dk, dk_slots), (dv, dv_slots) = depth_pointers(depth_k), depth_pointers(depth_v)
    moda_fwd_kernel[grid](
        q, k, v, dk, dv, dk_slots, dv_slots, o, lse, lse_depth,
        *q.stride(), *k.stride(), *v.stride(), *depth_k.stride(), *depth_v.stride(), *o.stride(),
        *lse.stride(),
        T, Hk, num_depth, scale * LOG2E,
        G=G, D=d, CAUSAL=causal, HAS_DEPTH=num_depth > 0, **depth_flags(depth_k, depth_v),
        **cfg,
    )  # fmt: skip


@triton.jit
def moda_depth_fwd_kernel(
    Q, DK, DV, DK_SLOTS, DV_SLOTS, O, LSE, LSE_D,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    T, Hk, num_depth, qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SC: tl.constexpr,  # depth slots per token per step
    MERGE: tl.constexpr,  # True: merge into (O, LSE) in place; False: write the depth-only output to O (fp32)
    HK_FAST: tl.constexpr,  # grid axis 0 runs over (batch, KV head), axis 1 over token blocks
    SLOT_TABLE: tl.constexpr,  # depth given as one tensor per slot: DK, DV are slot 0, DK_SLOTS, DV_SLOTS the offsets
    SLOTS_ALIGNED: tl.constexpr,
):  # fmt: skip
    """Depth part of MoDA merged into a sequence-only ``(o, lse)`` by log-sum-exp, in place.

    With ``MERGE=False`` it writes the normalised depth-only output and ``lse_depth`` instead, so it
    can run beside the sequence part (another stream); ``moda_merge_kernel`` combines them after.

    Depth keys of a step are the ``BLOCK_N = BLOCK_T * SC`` pairs (token, slot) of the block's
    tokens, one tensor-core product ``[BLOCK_M, D] x [D, BLOCK_N]``; entries whose key belongs to
    another token are masked. The waste (a factor ``BLOCK_T``) is kept small by small row tiles.
    """
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    if HK_FAST:  # programs of one token block and all KV heads run together: nearby depth bytes
        pid_m, pid_bh = tl.program_id(1), tl.program_id(0)
    else:
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk, t0, offs_t, offs_h, mask_r = packed_rows(pid_m, pid_bh, T, Hk, G, G_PAD, BLOCK_T)
    offs_d = tl.arange(0, D)
    offs_t64 = offs_t.to(tl.int64)
    offs_ct, offs_cs, mask_ct = depth_columns(t0, T, BLOCK_T, SC)  # (token, slot-in-step) key columns
    ptr_dk = DK + b * stride_dkb + offs_ct.to(tl.int64) * stride_dkt + hk * stride_dkh
    ptr_dv = DV + b * stride_dvb + offs_ct.to(tl.int64) * stride_dvt + hk * stride_dvh
    same_token = offs_t[:, None] == offs_ct[None, :]  # [BLOCK_M, BLOCK_T * SC]
    b_q = load_rows(Q, b, offs_t, offs_h, mask_r, stride_qb, stride_qt, stride_qh, stride_qd, D)  # [BLOCK_M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for s0 in range(0, num_depth, SC):
        slot = s0 + offs_cs
        mask_c = mask_ct & (slot < num_depth)
        at_k = slot_offsets(slot, slot < num_depth, stride_dks, DK_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
        at_v = slot_offsets(slot, slot < num_depth, stride_dvs, DV_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
        # [D, BLOCK_N]
        b_dkT = tl.load(ptr_dk[None, :] + at_k[None, :] + offs_d[:, None] * stride_dkd, mask=mask_c[None, :], other=0.0)
        # [BLOCK_N, D]
        b_dv = tl.load(ptr_dv[:, None] + at_v[:, None] + offs_d[None, :] * stride_dvd, mask=mask_c[:, None], other=0.0)
        x = tl.dot(b_q, b_dkT) * qk_scale
        x = tl.where(same_token & (slot < num_depth)[None, :], x, float("-inf"))
        # online-softmax update (every row has at least one valid slot in each step)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(b_dv.dtype), b_dv)
        m_i = m_new

    # --- merge: o = o_seq * exp(lse_seq - lse) + o_depth * exp(lse_depth - lse) ---
    lse_depth = (m_i + tl.log2(l_i)) * LN2_C
    offs_lse = b * stride_lb + offs_h * stride_lh + offs_t64 * stride_lt
    ptr_o = O + b * stride_ob + offs_t64[:, None] * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(LSE_D + offs_lse, lse_depth, mask=mask_r)
    if MERGE:
        lse_seq = tl.load(LSE + offs_lse, mask=mask_r, other=0.0)
        b_o_seq = tl.load(ptr_o, mask=mask_r[:, None], other=0.0).to(tl.float32)
        lse = tl.maximum(lse_seq, lse_depth)
        lse = lse + tl.log(tl.exp(lse_seq - lse) + tl.exp(lse_depth - lse))
        b_o = b_o_seq * tl.exp(lse_seq - lse)[:, None] + acc * (tl.exp(lse_depth - lse) / l_i)[:, None]
        tl.store(ptr_o, b_o.to(O.dtype.element_ty), mask=mask_r[:, None])
        tl.store(LSE + offs_lse, lse, mask=mask_r)
    else:
        tl.store(ptr_o, acc / l_i[:, None], mask=mask_r[:, None])


@triton.jit
def moda_merge_kernel(O, LSE, OD, LSE_D, T, Hq, n_rows, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """``(o, lse) <- merge((o, lse), (o_depth, lse_depth))`` by log-sum-exp; contiguous tensors.

    ``O, OD``: ``[B*T*Hq, D]`` rows ``(b, t, h)``; ``LSE, LSE_D``: ``[B, Hq, T]``.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    mask_r = offs_r < n_rows
    offs_r64 = offs_r.to(tl.int64)
    h = offs_r64 % Hq
    bt = offs_r64 // Hq
    offs_lse = (bt // T) * Hq * T + h * T + bt % T
    lse_seq = tl.load(LSE + offs_lse, mask=mask_r, other=0.0)
    lse_depth = tl.load(LSE_D + offs_lse, mask=mask_r, other=0.0)
    lse = tl.maximum(lse_seq, lse_depth)
    lse = lse + tl.log(tl.exp(lse_seq - lse) + tl.exp(lse_depth - lse))
    # [BLOCK_R, D]
    ptr_o = O + offs_r64[:, None] * D + offs_d[None, :]
    b_o = tl.load(ptr_o, mask=mask_r[:, None], other=0.0).to(tl.float32) * tl.exp(lse_seq - lse)[:, None]
    b_o += tl.load(OD + offs_r64[:, None] * D + offs_d[None, :], mask=mask_r[:, None], other=0.0) * tl.exp(lse_depth - lse)[:, None]
    tl.store(ptr_o, b_o.to(O.dtype.element_ty), mask=mask_r[:, None])
    tl.store(LSE + offs_lse, lse, mask=mask_r)


def moda_merge(o: torch.Tensor, lse: torch.Tensor, o_depth: torch.Tensor, lse_depth: torch.Tensor) -> None:
    """Merge the depth-only ``(o_depth, lse_depth)`` into contiguous ``o [B,T,Hq,d]``, ``lse [B,Hq,T]`` in place."""
    B, T, Hq, d = o.shape
    assert o.is_contiguous() and o_depth.is_contiguous() and lse.is_contiguous() and lse_depth.is_contiguous()
    n_rows = B * T * Hq
    BLOCK_R = 64
    moda_merge_kernel[(triton.cdiv(n_rows, BLOCK_R),)](o, lse, o_depth, lse_depth, T, Hq, n_rows, D=d, BLOCK_R=BLOCK_R)


# 16 packed query rows x 32 (token, slot) key columns a step, 2 warps, 3 pipeline stages, KV heads on
# the fast grid axis. Of the tiles timed on an H200 (docs/benchmarks.md), the fastest at the 700M
# training shape (2 query heads per KV head) and within 1.2% of the fastest at table6_24l's (3, padded to 4).
# early_sums=1: the backward loads the slot gradient sums it adds to at the top of each step, beside
# the slots, rather than after its products (one memory round trip a step instead of two; not timed yet).
DEPTH_TILE_DEFAULTS = dict(rows=16, cols=32, warps=2, stages=3, hk_fast=1, early_sums=0)
# tuning overrides, read at import and by depth_tile_overrides (benchmarks/kernel_attention.py --depth-configs)
DEPTH_TILE_VARS = dict(
    rows="MODA_DEPTH_ROWS", cols="MODA_DEPTH_COLS", warps="MODA_DEPTH_WARPS",
    stages="MODA_DEPTH_STAGES", hk_fast="MODA_DEPTH_HK_FAST", early_sums="MODA_DEPTH_EARLY_SUMS",
)  # fmt: skip


def _read_depth_tile() -> dict[str, int]:
    """The depth tile: :data:`DEPTH_TILE_DEFAULTS` with the overrides of :data:`DEPTH_TILE_VARS` set."""
    return {key: int(os.environ.get(var, DEPTH_TILE_DEFAULTS[key])) for key, var in DEPTH_TILE_VARS.items()}


_depth_tile = _read_depth_tile()  # read once: depth_config and depth_grid run at every depth-kernel launch


@contextlib.contextmanager
def depth_tile_overrides(variables: dict[str, str]) -> Iterator[None]:
    """Inside the block the depth kernels use exactly these ``MODA_DEPTH_*`` overrides (the others
    unset; ``{}``: the shipped tile); after it, the environment and the tile are as they were. For
    tile tuning and tests, since the kernels read the variables once, at import."""
    global _depth_tile
    saved = {var: os.environ.pop(var, None) for var in DEPTH_TILE_VARS.values()}
    os.environ.update(variables)
    _depth_tile = _read_depth_tile()
    try:
        yield
    finally:
        for var, value in saved.items():
            os.environ.pop(var, None)
            if value is not None:
                os.environ[var] = value
        _depth_tile = _read_depth_tile()


def depth_config(G: int, interpret: bool) -> dict[str, int]:
    """Row tile of the depth kernels: small, since the masked product wastes a factor ``BLOCK_T``."""
    G_PAD = _next_pow2(G)
    rows = max(_depth_tile["rows"], G_PAD)
    block_t = rows // G_PAD
    sc = max(_depth_tile["cols"] // block_t, 1) if not interpret else 2
    stages = 1 if interpret else _depth_tile["stages"]
    return dict(G_PAD=G_PAD, BLOCK_T=block_t, SC=sc, num_warps=_depth_tile["warps"], num_stages=stages)


def depth_early_sums() -> bool:
    """Whether the depth backward loads the gradient sums it adds to at the top of a step (``early_sums``)."""
    return _depth_tile["early_sums"] == 1


def depth_grid(cfg: dict[str, int], T: int, B: int, Hk: int) -> tuple[tuple[int, int], bool]:
    """Grid of the depth kernels; KV heads on the fast axis unless the token blocks overflow axis 1."""
    n_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    hk_fast = _depth_tile["hk_fast"] == 1 and n_blocks <= 65535
    return ((B * Hk, n_blocks) if hk_fast else (n_blocks, B * Hk)), hk_fast


def moda_depth_fwd(
    q: torch.Tensor,
    depth_k: Depth,
    depth_v: Depth,
    num_depth: int,
    scale: float,
    o: torch.Tensor,
    lse: torch.Tensor,
    lse_depth: torch.Tensor,
    config: dict[str, int] | None = None,
    merge: bool = True,
) -> None:
    """Merge the first ``num_depth > 0`` depth slots into the sequence-only ``o [B,T,Hq,d]``, ``lse [B,Hq,T]``, in place.

    With ``merge=False``, write the depth-only output to ``o`` (fp32) and leave ``lse`` alone.
    """
    B, T, Hq, d = q.shape
    Hk = depth_k.shape[3]
    cfg = dict(config or depth_config(Hq // Hk, q.device.type == "cpu"))
    grid, hk_fast = depth_grid(cfg, T, B, Hk)
    (dk, dk_slots), (dv, dv_slots) = depth_pointers(depth_k), depth_pointers(depth_v)
    moda_depth_fwd_kernel[grid](
        q, dk, dv, dk_slots, dv_slots, o, lse, lse_depth,
        *q.stride(), *depth_k.stride(), *depth_v.stride(), *o.stride(), *lse.stride(),
        T, Hk, num_depth, scale * LOG2E,
        G=Hq // Hk, D=d, MERGE=merge, HK_FAST=hk_fast, **depth_flags(depth_k, depth_v), **cfg,
    )  # fmt: skip
