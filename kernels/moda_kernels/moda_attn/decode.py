"""MoDA attention forward for decoding: fewer queries than keys, a key mask, the key axis split.

The queries ``q [B, Tq, Hq, d]`` are the last ``Tq`` of the ``Tk`` key positions (query ``t`` sits
at ``Tk - Tq + t``), causal among themselves; the depth slots are those of the ``Tq`` query
tokens. ``key_mask [B, Tk]`` (False: left padding) hides keys from every query but its own.
Forward only: decoding is inference. The training kernels (``fwd.py``) are not touched.
Custom ops ``moda::attn_decode`` and ``moda::attn_decode_slots`` (no autograd) carry the call
under compile and dispatch modes, as ``moda::attn_fwd`` does for training.

Rows are packed as in ``fwd.py`` (``BLOCK_T`` tokens x ``G_PAD`` query heads of one KV head).
A decode step has one token per row block, so ``B * Hk`` programs would leave most of the GPU
idle on a long cache: the key axis is cut into ``n_splits`` chunks, one program each, that write
a normalised partial output and its log-sum-exp; ``moda_decode_combine_kernel`` then adds the
depth slots and merges every part by log-sum-exp (the merge rule of ``README.md``). With one
split a single kernel does depth and sequence in one online softmax, like ``moda_fwd_kernel``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from moda_kernels.moda_attn.fwd import LN2_C, LOG2E, Depth, _next_pow2, depth_rows
from moda_kernels.moda_attn.slot_table import depth_flags, depth_pointers, slot_list
from moda_kernels.moda_attn.tiles import load_rows, packed_rows

LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)


@triton.jit
def _seq_decode(
    acc,
    l_i,
    m_i,
    b_q,  # [BLOCK_M, D] in the input dtype
    ptr_k,  # base of k[b, :, hk, :]
    ptr_v,
    ptr_m,  # base of key_mask[b, :] (uint8; unused without KEY_MASK)
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    stride_mt,
    pos,  # [BLOCK_M] key position of each row's query
    offs_d,
    lo,
    hi,
    TK,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,  # apply the bound, causal and key masks (else every key of the block is visible)
    CAUSAL: tl.constexpr,
    KEY_MASK: tl.constexpr,
):
    """Online softmax over sequence key blocks ``[lo, hi)``.

    Unlike training, a row may see no key of a block (left padding, or a split past its query),
    so the running maximum can stay ``-inf``: the exponents then use 0 as offset, giving 0, not NaN.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < TK
        # [D, BLOCK_N]; keys past TK read as zeros (their values too: 0 * garbage could be NaN)
        at_kT = ptr_k + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
        b_kT = tl.load(at_kT, mask=mask_n[None, :], other=0.0)
        # [BLOCK_N, D]
        at_v = ptr_v + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        b_v = tl.load(at_v, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(b_q, b_kT) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASK:
            keep = mask_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= pos[:, None])
            if KEY_MASK:
                # [BLOCK_N]: a query sees a padding key only when it is its own position
                b_m = tl.load(ptr_m + offs_n * stride_mt, mask=mask_n, other=0)
                keep = keep & ((b_m != 0)[None, :] | (offs_n[None, :] == pos[:, None]))
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_off = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_off)
        p = tl.exp2(qk - m_off[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(b_v.dtype), b_v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def moda_decode_fwd_kernel(
    Q, QD, K, V, DK, DV, DK_SLOTS, DV_SLOTS, KM, O, LSE, LSE_D,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_qdb, stride_qdt, stride_qdh, stride_qdd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    stride_mb, stride_mt,
    stride_os, stride_ob, stride_ot, stride_oh, stride_od,  # O: [n_splits, B, T, Hq, d] (stride_os = 0: one split)
    stride_ls, stride_lb, stride_lh, stride_lt,  # LSE: [n_splits, B, Hq, T] fp32
    T, TK, Hk, num_depth, qk_scale, CHUNK,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DEPTH: tl.constexpr,  # read the depth slots here (one split only; else the combine kernel does)
    OWN_DEPTH_QUERY: tl.constexpr,  # the depth logits use QD, not Q
    KEY_MASK: tl.constexpr,
    SPLIT: tl.constexpr,  # write a partial (o, lse) per key chunk for moda_decode_combine_kernel
    SLOT_TABLE: tl.constexpr,
    SLOTS_ALIGNED: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    pid_s = tl.program_id(2)
    b, hk, t0, offs_t, offs_h, mask_r = packed_rows(tl.program_id(0), tl.program_id(1), T, Hk, G, G_PAD, BLOCK_T)
    offs_d = tl.arange(0, D)
    offs_t64 = offs_t.to(tl.int64)
    q_start = TK - T  # key position of query 0
    pos = q_start + offs_t
    b_q = load_rows(Q, b, offs_t, offs_h, mask_r, stride_qb, stride_qt, stride_qh, stride_qd, D)  # [BLOCK_M, D]

    # --- depth slots of the block's own tokens (as in moda_fwd_kernel) ---
    if HAS_DEPTH and OWN_DEPTH_QUERY:
        b_qd = load_rows(QD, b, offs_t, offs_h, mask_r, stride_qdb, stride_qdt, stride_qdh, stride_qdd, D)
    else:
        b_qd = b_q
    m_i, l_i, acc, lse_depth = depth_rows(
        b_qd, DK, DV, b, hk, t0, T, offs_d, num_depth,
        stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
        stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
        DK_SLOTS, DV_SLOTS, qk_scale, BLOCK_T, G_PAD, D, HAS_DEPTH, SLOT_TABLE, SLOTS_ALIGNED,
    )  # fmt: skip

    # --- this program's chunk of the sequence keys ---
    if CAUSAL:
        hi = tl.minimum(q_start + t0 + BLOCK_T, TK)
        hi_full = ((q_start + t0) // BLOCK_N) * BLOCK_N  # keys every row of the block sees
    else:
        hi = TK
        hi_full = (TK // BLOCK_N) * BLOCK_N
    lo = pid_s * CHUNK
    hi = tl.minimum(hi, lo + CHUNK)
    ptr_k = K + b * stride_kb + hk * stride_kh
    ptr_v = V + b * stride_vb + hk * stride_vh
    ptr_m = KM + b * stride_mb
    if KEY_MASK:  # padding can sit anywhere left of the queries: mask every block
        acc, l_i, m_i = _seq_decode(
            acc, l_i, m_i, b_q, ptr_k, ptr_v, ptr_m, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
            pos, offs_d, lo, hi, TK, qk_scale, BLOCK_N, True, CAUSAL, True,
        )  # fmt: skip
    else:
        mid = tl.maximum(lo, tl.minimum(hi_full, hi))
        acc, l_i, m_i = _seq_decode(
            acc, l_i, m_i, b_q, ptr_k, ptr_v, ptr_m, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
            pos, offs_d, lo, mid, TK, qk_scale, BLOCK_N, False, CAUSAL, False,
        )  # fmt: skip
        acc, l_i, m_i = _seq_decode(
            acc, l_i, m_i, b_q, ptr_k, ptr_v, ptr_m, stride_kt, stride_kd, stride_vt, stride_vd, stride_mt,
            pos, offs_d, mid, hi, TK, qk_scale, BLOCK_N, True, CAUSAL, False,
        )  # fmt: skip
    # a split may hold no key a row sees: its part is (0, -inf), which the merge weighs by 0
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2_C, float("-inf"))
    b_o = acc / l_safe[:, None]

    offs_lse = pid_s * stride_ls + b * stride_lb + offs_h * stride_lh + offs_t64 * stride_lt
    ptr_o = (O + pid_s * stride_os + b * stride_ob + offs_t64[:, None] * stride_ot + offs_h[:, None] * stride_oh
             + offs_d[None, :] * stride_od)  # fmt: skip
    tl.store(ptr_o, b_o.to(O.dtype.element_ty), mask=mask_r[:, None])
    tl.store(LSE + offs_lse, lse, mask=mask_r)
    if not SPLIT:
        tl.store(LSE_D + offs_lse, lse_depth, mask=mask_r)


@triton.jit
def moda_decode_combine_kernel(
    QD, DK, DV, DK_SLOTS, DV_SLOTS, O_PART, LSE_PART, O, LSE, LSE_D,
    stride_qdb, stride_qdt, stride_qdh, stride_qdd,
    stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lt,
    stride_ps, stride_pls,  # one split's elements in O_PART and LSE_PART
    T, Hk, num_depth, qk_scale, n_splits,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HAS_DEPTH: tl.constexpr,
    SLOT_TABLE: tl.constexpr,
    SLOTS_ALIGNED: tl.constexpr,
):  # fmt: skip
    """Depth slots, then the ``n_splits`` partial sequence results, merged into one ``(o, lse)``.

    ``O_PART [n_splits, B, T, Hq, d]`` fp32 and ``LSE_PART [n_splits, B, Hq, T]`` are contiguous.
    """
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    b, hk, t0, offs_t, offs_h, mask_r = packed_rows(tl.program_id(0), tl.program_id(1), T, Hk, G, G_PAD, BLOCK_T)
    offs_d = tl.arange(0, D)
    offs_t64 = offs_t.to(tl.int64)
    if HAS_DEPTH:
        b_qd = load_rows(QD, b, offs_t, offs_h, mask_r, stride_qdb, stride_qdt, stride_qdh, stride_qdd, D)
    else:  # no depth query to load: depth_rows returns the empty state
        b_qd = tl.zeros([BLOCK_M, D], tl.float32)
    m_i, l_i, acc, lse_depth = depth_rows(
        b_qd, DK, DV, b, hk, t0, T, offs_d, num_depth,
        stride_dkb, stride_dkt, stride_dks, stride_dkh, stride_dkd,
        stride_dvb, stride_dvt, stride_dvs, stride_dvh, stride_dvd,
        DK_SLOTS, DV_SLOTS, qk_scale, BLOCK_T, G_PAD, D, HAS_DEPTH, SLOT_TABLE, SLOTS_ALIGNED,
    )  # fmt: skip

    # --- merge: each part is a normalised output with weight 2^lse2 (base 2) ---
    Hq = Hk * G
    offs_part = b * Hq * T + offs_h * T + offs_t64  # [B, Hq, T] of one split
    offs_o_part = ((b * T + offs_t64) * Hq + offs_h)[:, None] * D + offs_d[None, :]  # [B, T, Hq, d] of one split
    for s in range(0, n_splits):
        lse2 = tl.load(LSE_PART + s * stride_pls + offs_part, mask=mask_r, other=0.0) * LOG2E_C
        # [BLOCK_M, D]
        b_o = tl.load(O_PART + s * stride_ps + offs_o_part, mask=mask_r[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse2)
        m_off = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_off)
        beta = tl.exp2(lse2 - m_off)
        l_i = l_i * alpha + beta
        acc = acc * alpha[:, None] + beta[:, None] * b_o
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) * LN2_C
    offs_lse = b * stride_lb + offs_h * stride_lh + offs_t64 * stride_lt
    ptr_o = O + b * stride_ob + offs_t64[:, None] * stride_ot + offs_h[:, None] * stride_oh
    tl.store(ptr_o + offs_d[None, :] * stride_od, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask_r[:, None])
    tl.store(LSE + offs_lse, lse, mask=mask_r)
    tl.store(LSE_D + offs_lse, lse_depth, mask=mask_r)


def decode_config(G: int, d: int, T: int, element_size: int, interpret: bool) -> dict[str, int]:
    """Tiles: as few token rows as a tensor-core product takes (16) for a decode step, up to 128;
    long key blocks, since a step streams the cache (fp32 keeps to two stages of shared memory)."""
    G_PAD = _next_pow2(G)
    rows = min(max(_next_pow2(T) * G_PAD, 16), max(16, 2 * G_PAD) if interpret else 128)
    rows = max(rows, G_PAD)
    if interpret:
        block_n, warps, stages = 16, 4, 1
    else:
        block_n, warps, stages = (128 if d <= 64 else 64), 4, (3 if element_size <= 2 else 2)
    return dict(G_PAD=G_PAD, BLOCK_T=rows // G_PAD, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


_SM_COUNT: dict[int, int] = {}


def decode_splits(programs: int, TK: int, block_n: int, device: torch.device) -> int:
    """How many chunks the key axis is cut into: enough programs for about two per SM, each chunk
    at least 2 key blocks (the merge reads a partial output per chunk)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    if programs >= _SM_COUNT[index]:
        return 1
    return max(1, min(triton.cdiv(2 * _SM_COUNT[index], programs), TK // (2 * block_n)))


def moda_decode_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    depth_k: Depth | None,
    depth_v: Depth | None,
    num_depth: int,
    causal: bool,
    scale: float,
    q_depth: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    lse_depth: torch.Tensor,
    config: dict[str, int] | None = None,
    splits: int | None = None,
) -> None:
    """Write ``o [B,Tq,Hq,d]``, ``lse, lse_depth [B,Hq,Tq]`` for queries at the last ``Tq`` of ``Tk`` keys.

    ``key_mask``: bool ``[B, Tk]`` or None. ``splits`` (default: by occupancy) cuts the key axis.
    """
    B, T, Hq, d = q.shape
    TK, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    cfg = dict(config or decode_config(G, d, T, q.element_size(), q.device.type == "cpu"))
    n_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    if splits is None:
        splits = decode_splits(n_blocks * B * Hk, TK, cfg["BLOCK_N"], q.device)
    chunk = triton.cdiv(triton.cdiv(TK, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = triton.cdiv(TK, chunk)  # no empty trailing chunk
    has_depth = num_depth > 0 and depth_k is not None
    if not has_depth:
        depth_k = depth_v = q.new_empty(B, T, 0, Hk, d)
    (dk, dk_slots), (dv, dv_slots) = depth_pointers(depth_k), depth_pointers(depth_v)
    qd = q if q_depth is None else q_depth
    # the mask as bytes (a view): Triton loads bool tensors as 1-bit values
    km = q.new_empty(0, 0, dtype=torch.uint8) if key_mask is None else key_mask.view(torch.uint8)
    if splits == 1:
        o_part, lse_part = o.unsqueeze(0), lse.unsqueeze(0)
    else:
        o_part = torch.empty(splits, B, T, Hq, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(splits, B, Hq, T, device=q.device, dtype=torch.float32)
    moda_decode_fwd_kernel[(n_blocks, B * Hk, splits)](
        q, qd, k, v, dk, dv, dk_slots, dv_slots, km, o_part, lse_part, lse_depth,
        *q.stride(), *qd.stride(), *k.stride(), *v.stride(), *depth_k.stride(), *depth_v.stride(),
        *(km.stride() if key_mask is not None else (0, 0)), *o_part.stride(), *lse_part.stride(),
        T, TK, Hk, num_depth, scale * LOG2E, chunk,
        G=G, D=d, CAUSAL=causal, HAS_DEPTH=has_depth and splits == 1, OWN_DEPTH_QUERY=q_depth is not None,
        KEY_MASK=key_mask is not None, SPLIT=splits > 1, **depth_flags(depth_k, depth_v), **cfg,
    )  # fmt: skip
    if splits == 1:
        return
    moda_decode_combine_kernel[(n_blocks, B * Hk)](
        qd, dk, dv, dk_slots, dv_slots, o_part, lse_part, o, lse, lse_depth,
        *qd.stride(), *depth_k.stride(), *depth_v.stride(), *o.stride(), *lse.stride(),
        o_part.stride(0), lse_part.stride(0),
        T, Hk, num_depth, scale * LOG2E, splits,
        G=G, D=d, HAS_DEPTH=has_depth, **depth_flags(depth_k, depth_v),
        G_PAD=cfg["G_PAD"], BLOCK_T=cfg["BLOCK_T"], num_warps=4, num_stages=1,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the op


def decode_attn(
    q: Tensor, k: Tensor, v: Tensor, depth_k: Depth | None, depth_v: Depth | None, num_depth: int, causal: bool,
    scale: float, q_depth: Tensor | None, key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``o [B,Tq,Hq,d]`` (contiguous, q's dtype), ``lse, lse_depth [B,Hq,Tq]`` (fp32, natural log)."""
    B, T, Hq, d = q.shape
    o = torch.empty(B, T, Hq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    lse_depth = torch.empty_like(lse)
    moda_decode_fwd(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, key_mask, o, lse, lse_depth)
    return o, lse, lse_depth


def _decode_impl(
    q: Tensor, k: Tensor, v: Tensor, depth_k: Tensor, depth_v: Tensor, num_depth: int, causal: bool, scale: float,
    q_depth: Tensor | None, key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`decode_attn` with the depth stream as one ``[B, Tq, S, Hk, d]`` tensor (``S`` may be 0)."""
    return decode_attn(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, key_mask)


def _decode_slots_impl(
    q: Tensor, k: Tensor, v: Tensor, depth_k: list[Tensor], depth_v: list[Tensor], causal: bool, scale: float,
    q_depth: Tensor | None, key_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`decode_attn` with the depth stream as ``S >= 1`` slots ``[B, Tq, Hk, d]``, all read in place."""
    return decode_attn(q, k, v, slot_list(depth_k), slot_list(depth_v), len(depth_k), causal, scale, q_depth, key_mask)


moda_attn_decode = torch.library.custom_op("moda::attn_decode", _decode_impl, mutates_args=())
moda_attn_decode_slots = torch.library.custom_op("moda::attn_decode_slots", _decode_slots_impl, mutates_args=())


def _fake_outputs(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, Hq, d = q.shape
    lse = q.new_empty(B, Hq, T, dtype=torch.float32)
    return q.new_empty(B, T, Hq, d), lse, torch.empty_like(lse)


@moda_attn_decode.register_fake
def _(q, k, v, depth_k, depth_v, num_depth, causal, scale, q_depth, key_mask):
    return _fake_outputs(q)


@moda_attn_decode_slots.register_fake
def _(q, k, v, depth_k, depth_v, causal, scale, q_depth, key_mask):
    return _fake_outputs(q)


def decode_flops(q_shape, k_shape, num_depth: int, causal: bool) -> int:
    """Matmul FLOPs: ``4 * B * Hq * d * (visible sequence pairs + Tq * num_depth)``; query ``t`` of ``Tq``
    sees ``Tk - Tq + t + 1`` keys when causal (padding counted: the kernel computes it), ``Tk`` otherwise."""
    B, T, Hq, d = q_shape
    TK = k_shape[1]
    pairs = T * (TK - T) + T * (T + 1) // 2 if causal else T * TK
    return 4 * B * Hq * d * (pairs + T * num_depth)


@register_flop_formula(torch.ops.moda.attn_decode)
def _decode_flop(q_shape, k_shape, v_shape, dk_shape, dv_shape, num_depth, causal, *args, out_shape=None,
                 **kwargs) -> int:  # fmt: skip
    return decode_flops(q_shape, k_shape, num_depth, causal)


@register_flop_formula(torch.ops.moda.attn_decode_slots)
def _decode_slots_flop(q_shape, k_shape, v_shape, dk_shapes, dv_shapes, causal, *args, out_shape=None, **kwargs) -> int:
    return decode_flops(q_shape, k_shape, len(dk_shapes), causal)
