"""MoDA attention backward: Triton kernels for dq (+ depth grads) and for sequence dk, dv.

FlashAttention-2 backward (probabilities recomputed from the saved row log-sum-exp), with the
G query heads of a KV head packed into tile rows as in ``fwd.py``. Two kernels, no atomics,
so the backward is deterministic:

- ``moda_bwd_dq_kernel``, one program per (query block, batch, KV head): ``delta = rowsum(o*do)``,
  ``dq`` over the sequence keys and the depth slots, and the depth gradients of the block's own
  tokens (a token's depth slots are read by this program only, so it owns their gradients;
  ``d(depth_k)[t, s]`` and ``d(depth_v)[t, s]`` are sums over the token's G query rows).
- ``moda_bwd_dkdv_kernel``, one program per (key block, batch, KV head): sequence ``dk, dv``
  summed over all G query heads in the tile rows.

For the split design (sequence part by cuDNN or by these kernels with ``num_depth=0``, run with
the *merged* output and log-sum-exp), ``moda_depth_bwd_kernel`` computes the depth gradients and
adds the depth part of ``dq`` to the ``dq`` already in its buffer; again no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moda_kernels.moda_attn.fwd import LOG2E, Depth, _next_pow2, depth_config, depth_early_sums, depth_grid
from moda_kernels.moda_attn.slot_table import depth_flags, depth_pointers
from moda_kernels.moda_attn.tiles import depth_columns, load_rows, packed_rows, slot_offsets


@triton.jit
def _seq_bwd_dq(
    dq,
    b_q,
    b_do,
    lse2,
    delta,
    ptr_k,
    ptr_v,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_t,
    offs_d,
    lo,
    hi,
    T,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Sequence part of ``dq`` (unscaled) over key blocks ``[lo, hi)``."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < T
        # [BLOCK_N, D]
        b_k = tl.load(ptr_k + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
        # [D, BLOCK_N]
        b_vT = tl.load(ptr_v + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd, mask=mask_n[None, :], other=0.0)
        qk = tl.dot(b_q, tl.trans(b_k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.exp2(qk - lse2[:, None])
        if MASK:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_t[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(b_do, b_vT)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(b_k.dtype), b_k)
    return dq


@triton.jit
def moda_bwd_dq_kernel(
    Q, K, V, DK, DV, DK_SLOTS, DV_SLOTS, O, DO, LSE, DELTA, DQ, DDK, DDV,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_gkb, stride_gkt, stride_gks, stride_gkh, stride_gkd,  # d(depth_k)
    stride_gvb, stride_gvt, stride_gvs, stride_gvh, stride_gvd,  # d(depth_v)
    stride_lb, stride_lh, stride_lt,  # LSE and DELTA: [B, Hq, T] fp32
    T, Hk, num_depth, sm_scale, qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DEPTH: tl.constexpr,
    SLOT_TABLE: tl.constexpr,  # depth read as one tensor per slot (DK, DV: slot 0; DK_SLOTS, DV_SLOTS: offsets)
    SLOTS_ALIGNED: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    b, hk, t0, offs_t, offs_h, mask_r = packed_rows(tl.program_id(0), tl.program_id(1), T, Hk, G, G_PAD, BLOCK_T)
    offs_d = tl.arange(0, D)
    offs_t64 = offs_t.to(tl.int64)

    # [BLOCK_M, D]
    b_q = load_rows(Q, b, offs_t, offs_h, mask_r, stride_qb, stride_qt, stride_qh, stride_qd, D)
    b_do = load_rows(DO, b, offs_t, offs_h, mask_r, stride_dob, stride_dot, stride_doh, stride_dod, D)
    b_o = load_rows(O, b, offs_t, offs_h, mask_r, stride_ob, stride_ot, stride_oh, stride_od, D)
    # [BLOCK_M]; delta = rowsum(o * do) = sum_j p_j dp_j over sequence and depth keys
    delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
    offs_lse = b * stride_lb + offs_h * stride_lh + offs_t64 * stride_lt
    tl.store(DELTA + offs_lse, delta, mask=mask_r)
    # padding rows get lse = +inf, so every probability they would produce is exactly 0
    lse2 = tl.load(LSE + offs_lse, mask=mask_r, other=float("inf")) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    ptr_k = K + b * stride_kb + hk * stride_kh
    ptr_v = V + b * stride_vb + hk * stride_vh
    if CAUSAL:
        hi_full = (t0 // BLOCK_N) * BLOCK_N
        hi = tl.minimum(t0 + BLOCK_T, T)
    else:
        hi_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    dq = _seq_bwd_dq(
        dq, b_q, b_do, lse2, delta, ptr_k, ptr_v, stride_kt, stride_kd, stride_vt, stride_vd, offs_t, offs_d,
        0, hi_full, T, qk_scale, BLOCK_N, False, CAUSAL,
    )  # fmt: skip
    dq = _seq_bwd_dq(
        dq, b_q, b_do, lse2, delta, ptr_k, ptr_v, stride_kt, stride_kd, stride_vt, stride_vd, offs_t, offs_d,
        hi_full, hi, T, qk_scale, BLOCK_N, True, CAUSAL,
    )  # fmt: skip

    if HAS_DEPTH:
        # --- depth slots of the block's own tokens, rows grouped by token: [BLOCK_T, G_PAD, ...] ---
        offs_tt = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_tt < T
        offs_tt64 = offs_tt.to(tl.int64)
        ptr_dk = DK + b * stride_dkb + offs_tt64 * stride_dkt + hk * stride_dkh
        ptr_dv = DV + b * stride_dvb + offs_tt64 * stride_dvt + hk * stride_dvh
        ptr_gk = DDK + b * stride_gkb + offs_tt64 * stride_gkt + hk * stride_gkh
        ptr_gv = DDV + b * stride_gvb + offs_tt64 * stride_gvt + hk * stride_gvh
        b_q3 = tl.reshape(b_q.to(tl.float32), (BLOCK_T, G_PAD, D))
        b_do3 = tl.reshape(b_do.to(tl.float32), (BLOCK_T, G_PAD, D))
        lse3 = tl.reshape(lse2, (BLOCK_T, G_PAD))
        delta3 = tl.reshape(delta, (BLOCK_T, G_PAD))
        dq3 = tl.zeros([BLOCK_T, G_PAD, D], tl.float32)
        for s in range(0, num_depth):
            at_k = slot_offsets(s, s < num_depth, stride_dks, DK_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
            at_v = slot_offsets(s, s < num_depth, stride_dvs, DV_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
            # [BLOCK_T, D]: slot s of each token, shared by its G query rows
            b_dk = tl.load(ptr_dk[:, None] + at_k + offs_d[None, :] * stride_dkd, mask=mask_t[:, None], other=0.0).to(tl.float32)
            b_dv = tl.load(ptr_dv[:, None] + at_v + offs_d[None, :] * stride_dvd, mask=mask_t[:, None], other=0.0).to(tl.float32)
            # [BLOCK_T, G_PAD]: recompute the probability of slot s from the row's log-sum-exp
            p = tl.exp2(tl.sum(b_q3 * b_dk[:, None, :], axis=2) * qk_scale - lse3)
            dp = tl.sum(b_do3 * b_dv[:, None, :], axis=2)
            ds = p * (dp - delta3)
            dq3 += ds[:, :, None] * b_dk[:, None, :]
            # [BLOCK_T, D]: gradients of slot s, summed over the token's G query rows
            g_dv = tl.sum(p[:, :, None] * b_do3, axis=1)
            g_dk = tl.sum(ds[:, :, None] * b_q3, axis=1) * sm_scale
            tl.store(ptr_gk[:, None] + s * stride_gks + offs_d[None, :] * stride_gkd, g_dk.to(DDK.dtype.element_ty), mask=mask_t[:, None])
            tl.store(ptr_gv[:, None] + s * stride_gvs + offs_d[None, :] * stride_gvd, g_dv.to(DDV.dtype.element_ty), mask=mask_t[:, None])
        dq += tl.reshape(dq3, (BLOCK_M, D))

    dq = dq * sm_scale
    ptr_dq = DQ + b * stride_dqb + offs_t64[:, None] * stride_dqt + offs_h[:, None] * stride_dqh + offs_d[None, :] * stride_dqd
    tl.store(ptr_dq, dq.to(DQ.dtype.element_ty), mask=mask_r[:, None])


@triton.jit
def _seq_bwd_dkdv(
    dk,
    dv,
    b_k,
    b_v,
    Q,
    DO,
    LSE,
    DELTA,
    q_base,
    do_base,
    l_base,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_lh,
    stride_lt,
    hk,
    offs_n,
    offs_d,
    lo,
    hi,
    T,
    qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    MASK: tl.constexpr,
):
    """Accumulate ``dk`` (unscaled) and ``dv`` of one key block over query tokens ``[lo, hi)``."""
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    offs_r = tl.arange(0, BLOCK_M)
    offs_g = offs_r % G_PAD
    offs_h = hk * G + offs_g
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + offs_r // G_PAD
        mask_r = (offs_t < T) & (offs_g < G)
        offs_t64 = offs_t.to(tl.int64)
        # [D, BLOCK_M]
        b_qT = tl.load(Q + q_base + offs_t64[None, :] * stride_qt + offs_h[None, :] * stride_qh + offs_d[:, None] * stride_qd, mask=mask_r[None, :], other=0.0)
        # [BLOCK_M, D]
        b_do = tl.load(DO + do_base + offs_t64[:, None] * stride_dot + offs_h[:, None] * stride_doh + offs_d[None, :] * stride_dod, mask=mask_r[:, None], other=0.0)
        offs_l = l_base + offs_h * stride_lh + offs_t64 * stride_lt
        lse2 = tl.load(LSE + offs_l, mask=mask_r, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + offs_l, mask=mask_r, other=0.0)
        qkT = tl.dot(b_k, b_qT) * qk_scale  # [BLOCK_N, BLOCK_M]
        pT = tl.exp2(qkT - lse2[None, :])
        if MASK:
            pT = tl.where(offs_n[:, None] <= offs_t[None, :], pT, 0.0)
        dv += tl.dot(pT.to(b_do.dtype), b_do)
        dpT = tl.dot(b_v, tl.trans(b_do))
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(b_qT.dtype), tl.trans(b_qT))
    return dk, dv


@triton.jit
def moda_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, GK, GV,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_gkb, stride_gkt, stride_gkh, stride_gkd,
    stride_gvb, stride_gvt, stride_gvh, stride_gvd,
    stride_lb, stride_lh, stride_lt,
    T, Hk, sm_scale, qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hk).to(tl.int64)
    hk = pid_bh % Hk
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < T
    offs_n64 = offs_n.to(tl.int64)

    # [BLOCK_N, D]
    b_k = tl.load(K + b * stride_kb + offs_n64[:, None] * stride_kt + hk * stride_kh + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
    b_v = tl.load(V + b * stride_vb + offs_n64[:, None] * stride_vt + hk * stride_vh + offs_d[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    if CAUSAL:
        # query blocks that overlap this key block need the causal mask; later ones see it all
        lo = (start_n // BLOCK_T) * BLOCK_T
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_T) * BLOCK_T, T)
    else:
        lo = 0
        mid = 0
    dk, dv = _seq_bwd_dkdv(
        dk, dv, b_k, b_v, Q, DO, LSE, DELTA, b * stride_qb, b * stride_dob, b * stride_lb,
        stride_qt, stride_qh, stride_qd, stride_dot, stride_doh, stride_dod, stride_lh, stride_lt,
        hk, offs_n, offs_d, lo, mid, T, qk_scale, G, G_PAD, BLOCK_T, True,
    )  # fmt: skip
    dk, dv = _seq_bwd_dkdv(
        dk, dv, b_k, b_v, Q, DO, LSE, DELTA, b * stride_qb, b * stride_dob, b * stride_lb,
        stride_qt, stride_qh, stride_qd, stride_dot, stride_doh, stride_dod, stride_lh, stride_lt,
        hk, offs_n, offs_d, mid, T, T, qk_scale, G, G_PAD, BLOCK_T, False,
    )  # fmt: skip

    dk = dk * sm_scale
    tl.store(GK + b * stride_gkb + offs_n64[:, None] * stride_gkt + hk * stride_gkh + offs_d[None, :] * stride_gkd, dk.to(GK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(GV + b * stride_gvb + offs_n64[:, None] * stride_gvt + hk * stride_gvh + offs_d[None, :] * stride_gvd, dv.to(GV.dtype.element_ty), mask=mask_n[:, None])


def bwd_configs(G: int, d: int, interpret: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Tile sizes of the dq kernel and of the dk/dv kernel."""
    G_PAD = _next_pow2(G)
    if interpret:
        rows, block_n, warps, stages = max(16, G_PAD * 2), 16, 4, 1
        dq = dict(BLOCK_T=rows // G_PAD, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        return dict(dq, G_PAD=G_PAD), dict(dq, G_PAD=G_PAD)
    rows = max(64, G_PAD)
    warps = 4 if d <= 64 else 8
    dq = dict(G_PAD=G_PAD, BLOCK_T=rows // G_PAD, BLOCK_N=64, num_warps=warps, num_stages=2)
    dkdv = dict(G_PAD=G_PAD, BLOCK_T=rows // G_PAD, BLOCK_N=64 if d <= 64 else 64, num_warps=warps, num_stages=2)
    return dq, dkdv


def moda_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    depth_k: Depth,
    depth_v: Depth,
    o: torch.Tensor,
    lse: torch.Tensor,
    num_depth: int,
    causal: bool,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    d_depth_k: torch.Tensor,
    d_depth_v: torch.Tensor,
    configs: tuple[dict[str, int], dict[str, int]] | None = None,
) -> None:
    """Launch the fused backward: ``dq, dk, dv`` and the first ``num_depth`` slots of the depth grads.

    The depth grads ``d_depth_k, d_depth_v`` are ``[B,T,S,Hk,d]`` tensors of any strides in both forms of
    the depth stream (slot-major memory for the list form).
    """
    B, T, Hq, d = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    cfg_dq, cfg_kv = configs or bwd_configs(G, d, q.device.type == "cpu")
    delta = torch.empty_like(lse)
    (dk_base, dk_slots), (dv_base, dv_slots) = depth_pointers(depth_k), depth_pointers(depth_v)
    moda_bwd_dq_kernel[(triton.cdiv(T, cfg_dq["BLOCK_T"]), B * Hk)](
        q, k, v, dk_base, dv_base, dk_slots, dv_slots, o, do, lse, delta, dq, d_depth_k, d_depth_v,
        *q.stride(), *k.stride(), *v.stride(), *depth_k.stride(), *depth_v.stride(), *o.stride(), *do.stride(),
        *dq.stride(), *d_depth_k.stride(), *d_depth_v.stride(), *lse.stride(),
        T, Hk, num_depth, scale, scale * LOG2E,
        G=G, D=d, CAUSAL=causal, HAS_DEPTH=num_depth > 0, **depth_flags(depth_k, depth_v), **cfg_dq,
    )  # fmt: skip
    moda_bwd_dkdv_kernel[(triton.cdiv(T, cfg_kv["BLOCK_N"]), B * Hk)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *lse.stride(),
        T, Hk, scale, scale * LOG2E,
        G=G, D=d, CAUSAL=causal, **cfg_kv,
    )  # fmt: skip


@triton.jit
def _grad_slot_pointers(ptr_gk, ptr_gv, slot, num_depth, offs_d, stride_gks, stride_gvs, stride_gkd, stride_gvd,
                        GK_SLOTS, GV_SLOTS, GRAD_SLOT_TABLE: tl.constexpr, GRAD_SLOTS_ALIGNED: tl.constexpr):  # fmt: skip
    """``[BLOCK_N, D]`` addresses of a step's (token, slot) rows in the key and value gradients."""
    slot_gk = slot_offsets(slot, slot < num_depth, stride_gks, GK_SLOTS, GRAD_SLOT_TABLE, GRAD_SLOTS_ALIGNED)
    slot_gv = slot_offsets(slot, slot < num_depth, stride_gvs, GV_SLOTS, GRAD_SLOT_TABLE, GRAD_SLOTS_ALIGNED)
    at_gk = ptr_gk[:, None] + slot_gk[:, None] + offs_d[None, :] * stride_gkd
    at_gv = ptr_gv[:, None] + slot_gv[:, None] + offs_d[None, :] * stride_gvd
    return at_gk, at_gv


@triton.jit
def moda_depth_bwd_kernel(
    Q, DK, DV, DK_SLOTS, DV_SLOTS, O, DO, LSE, DQ, GK, GV, GK_SLOTS, GV_SLOTS,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_gkb, stride_gkt, stride_gks, stride_gkh, stride_gkd,
    stride_gvb, stride_gvt, stride_gvs, stride_gvh, stride_gvd,
    stride_lb, stride_lh, stride_lt,
    T, Hk, num_depth, sm_scale, qk_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SC: tl.constexpr,
    ACCUM_DQ: tl.constexpr,  # add to the dq in DQ (False: overwrite, e.g. a separate buffer)
    ACCUM_DEPTH: tl.constexpr,  # add the depth gradients to GK, GV (False: overwrite)
    HK_FAST: tl.constexpr,  # grid axis 0 runs over (batch, KV head), axis 1 over token blocks
    SLOT_TABLE: tl.constexpr,  # depth read as one tensor per slot (DK, DV: slot 0; DK_SLOTS, DV_SLOTS: offsets)
    SLOTS_ALIGNED: tl.constexpr,
    GRAD_SLOT_TABLE: tl.constexpr,  # the same for the gradients (GK, GV: slot 0; GK_SLOTS, GV_SLOTS: offsets)
    GRAD_SLOTS_ALIGNED: tl.constexpr,
    EARLY_SUMS: tl.constexpr,  # with ACCUM_DEPTH: load the sums at the top of a step, beside the slots
):  # fmt: skip
    """Depth gradients and the depth part of dq (added to DQ), from the merged ``o`` and ``lse``.

    Same tiling as ``moda_depth_fwd_kernel``: a step's keys are ``BLOCK_T * SC`` (token, slot)
    pairs, masked to the row's own token, so ``p^T do`` and ``ds^T q`` sum exactly over the G
    query rows of each token. Each (token, slot) belongs to one program: plain stores, no atomics.
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
    offs_ct64 = offs_ct.to(tl.int64)
    ptr_dk = DK + b * stride_dkb + offs_ct64 * stride_dkt + hk * stride_dkh
    ptr_dv = DV + b * stride_dvb + offs_ct64 * stride_dvt + hk * stride_dvh
    ptr_gk = GK + b * stride_gkb + offs_ct64 * stride_gkt + hk * stride_gkh
    ptr_gv = GV + b * stride_gvb + offs_ct64 * stride_gvt + hk * stride_gvh
    same_token = offs_t[:, None] == offs_ct[None, :]

    # [BLOCK_M, D]
    b_q = load_rows(Q, b, offs_t, offs_h, mask_r, stride_qb, stride_qt, stride_qh, stride_qd, D)
    b_do = load_rows(DO, b, offs_t, offs_h, mask_r, stride_dob, stride_dot, stride_doh, stride_dod, D)
    b_o = load_rows(O, b, offs_t, offs_h, mask_r, stride_ob, stride_ot, stride_oh, stride_od, D)
    delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
    lse2 = tl.load(LSE + b * stride_lb + offs_h * stride_lh + offs_t64 * stride_lt, mask=mask_r, other=float("inf")) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for s0 in range(0, num_depth, SC):
        slot = s0 + offs_cs
        mask_c = mask_ct & (slot < num_depth)
        at_k = slot_offsets(slot, slot < num_depth, stride_dks, DK_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
        at_v = slot_offsets(slot, slot < num_depth, stride_dvs, DV_SLOTS, SLOT_TABLE, SLOTS_ALIGNED)
        # [BLOCK_N, D]
        b_dk = tl.load(ptr_dk[:, None] + at_k[:, None] + offs_d[None, :] * stride_dkd, mask=mask_c[:, None], other=0.0)
        b_dv = tl.load(ptr_dv[:, None] + at_v[:, None] + offs_d[None, :] * stride_dvd, mask=mask_c[:, None], other=0.0)
        if ACCUM_DEPTH and EARLY_SUMS:  # issued with the slots' loads, so both wait on memory once
            at_gk, at_gv = _grad_slot_pointers(ptr_gk, ptr_gv, slot, num_depth, offs_d, stride_gks, stride_gvs,
                                               stride_gkd, stride_gvd, GK_SLOTS, GV_SLOTS, GRAD_SLOT_TABLE,
                                               GRAD_SLOTS_ALIGNED)  # fmt: skip
            sum_gk = tl.load(at_gk, mask=mask_c[:, None], other=0.0)
            sum_gv = tl.load(at_gv, mask=mask_c[:, None], other=0.0)
        # [BLOCK_M, BLOCK_N]: probabilities of the depth keys, recomputed from the merged lse
        p = tl.exp2(tl.dot(b_q, tl.trans(b_dk)) * qk_scale - lse2[:, None])
        p = tl.where(same_token & (slot < num_depth)[None, :], p, 0.0)
        dp = tl.dot(b_do, tl.trans(b_dv))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(b_dk.dtype), b_dk)
        # [BLOCK_N, D]: each (token, slot) sums over its own token's G rows (others are masked)
        g_dv = tl.dot(tl.trans(p.to(b_do.dtype)), b_do)
        g_dk = tl.dot(tl.trans(ds.to(b_q.dtype)), b_q) * sm_scale
        if not (ACCUM_DEPTH and EARLY_SUMS):  # here, not above: the pointers are not kept alive across the products
            at_gk, at_gv = _grad_slot_pointers(ptr_gk, ptr_gv, slot, num_depth, offs_d, stride_gks, stride_gvs,
                                               stride_gkd, stride_gvd, GK_SLOTS, GV_SLOTS, GRAD_SLOT_TABLE,
                                               GRAD_SLOTS_ALIGNED)  # fmt: skip
        if ACCUM_DEPTH:  # the caller sums many layers' gradients of a slot: add here, not in another pass
            if not EARLY_SUMS:
                sum_gk = tl.load(at_gk, mask=mask_c[:, None], other=0.0)
                sum_gv = tl.load(at_gv, mask=mask_c[:, None], other=0.0)
            g_dk += sum_gk.to(tl.float32)
            g_dv += sum_gv.to(tl.float32)
        tl.store(at_gk, g_dk.to(GK.dtype.element_ty), mask=mask_c[:, None])
        tl.store(at_gv, g_dv.to(GV.dtype.element_ty), mask=mask_c[:, None])

    ptr_dq = DQ + b * stride_dqb + offs_t64[:, None] * stride_dqt + offs_h[:, None] * stride_dqh + offs_d[None, :] * stride_dqd
    dq = dq * sm_scale
    if ACCUM_DQ:
        dq += tl.load(ptr_dq, mask=mask_r[:, None], other=0.0).to(tl.float32)
    tl.store(ptr_dq, dq.to(DQ.dtype.element_ty), mask=mask_r[:, None])


def moda_depth_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    depth_k: Depth,
    depth_v: Depth,
    o: torch.Tensor,
    lse: torch.Tensor,
    num_depth: int,
    scale: float,
    dq: torch.Tensor,
    d_depth_k: Depth,
    d_depth_v: Depth,
    config: dict[str, int] | None = None,
    accum_dq: bool = True,
    accum_depth: bool = False,
) -> None:
    """Write the first ``num_depth > 0`` slots of the depth grads and add the depth part of dq to ``dq``.

    With ``accum_dq=False`` the depth part of dq overwrites ``dq`` instead; with
    ``accum_depth=True`` the depth grads are added to ``d_depth_k, d_depth_v``. The gradients,
    like the slots, may be one ``[B, T, S, Hk, d]`` tensor or a :class:`SlotList` of one per slot.
    """
    B, T, Hq, d = q.shape
    Hk = depth_k.shape[3]
    cfg = dict(config or depth_config(Hq // Hk, q.device.type == "cpu"))
    grid, hk_fast = depth_grid(cfg, T, B, Hk)
    (dk_base, dk_slots), (dv_base, dv_slots) = depth_pointers(depth_k), depth_pointers(depth_v)
    (gk_base, gk_slots), (gv_base, gv_slots) = depth_pointers(d_depth_k), depth_pointers(d_depth_v)
    grad_flags = depth_flags(d_depth_k, d_depth_v)
    moda_depth_bwd_kernel[grid](
        q, dk_base, dv_base, dk_slots, dv_slots, o, do, lse, dq, gk_base, gv_base, gk_slots, gv_slots,
        *q.stride(), *depth_k.stride(), *depth_v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        *d_depth_k.stride(), *d_depth_v.stride(), *lse.stride(),
        T, Hk, num_depth, scale, scale * LOG2E,
        G=Hq // Hk, D=d, ACCUM_DQ=accum_dq, ACCUM_DEPTH=accum_depth, HK_FAST=hk_fast,
        **depth_flags(depth_k, depth_v), GRAD_SLOT_TABLE=grad_flags["SLOT_TABLE"],
        GRAD_SLOTS_ALIGNED=grad_flags["SLOTS_ALIGNED"], EARLY_SUMS=depth_early_sums(), **cfg,
    )  # fmt: skip
