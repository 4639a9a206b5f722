"""Index helpers shared by the forward and backward kernels (inlined by Triton; no runtime cost).

Row packing (``fwd.py``): a program owns ``BLOCK_T`` tokens of one ``(batch, KV head)``; its
``BLOCK_T * G_PAD`` rows are ``row = t_local * G_PAD + g`` for query head ``hk * G + g``, and rows
with ``g >= G`` are padding. The depth kernels pair those rows with ``BLOCK_T * SC`` key columns,
``(token, slot)`` pairs of the same tokens. Slots are addressed by :func:`slot_offsets`, through
the slot stride or, for a depth stream given as one tensor per slot, an offset table.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def packed_rows(pid_m, pid_bh, T, Hk, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """``b`` (int64), ``hk``, ``t0``, and per row: token ``offs_t``, query head ``offs_h``, validity ``mask_r``."""
    b = (pid_bh // Hk).to(tl.int64)
    hk = pid_bh % Hk
    t0 = pid_m * BLOCK_T
    offs_r = tl.arange(0, BLOCK_T * G_PAD)
    offs_t = t0 + offs_r // G_PAD
    offs_g = offs_r % G_PAD
    offs_h = hk * G + offs_g
    mask_r = (offs_t < T) & (offs_g < G)
    return b, hk, t0, offs_t, offs_h, mask_r


@triton.jit
def load_rows(base, b, offs_t, offs_h, mask_r, stride_b, stride_t, stride_h, stride_d, D: tl.constexpr):
    """``[rows, D]`` of a ``[B, T, H, D]`` tensor at the packed rows (zeros on padding rows)."""
    offs_d = tl.arange(0, D)
    ptr = base + b * stride_b + offs_t.to(tl.int64)[:, None] * stride_t + offs_h[:, None] * stride_h + offs_d[None, :] * stride_d
    return tl.load(ptr, mask=mask_r[:, None], other=0.0)


@triton.jit
def depth_columns(t0, T, BLOCK_T: tl.constexpr, SC: tl.constexpr):
    """Key columns of a depth step: token ``offs_ct``, slot-in-step ``offs_cs``, token validity ``mask_ct``."""
    offs_c = tl.arange(0, BLOCK_T * SC)
    offs_ct = t0 + offs_c // SC
    offs_cs = offs_c % SC
    return offs_ct, offs_cs, offs_ct < T


@triton.jit
def slot_offsets(slot, valid, stride_s, SLOTS, SLOT_TABLE: tl.constexpr, SLOTS_ALIGNED: tl.constexpr):
    """Element offsets of depth slots ``slot`` (scalar or vector) from slot 0.

    Tensor form: ``slot * stride_s``. List form (``SLOT_TABLE``): the entries of the int64 table
    ``SLOTS`` (``slot_table.py``), read where ``valid``; ``SLOTS_ALIGNED`` passes on that every entry
    is a multiple of 16 elements, which the compiler cannot see in a loaded value and which keeps the
    slot loads vectorised like the strided form's.
    """
    if SLOT_TABLE:
        offsets = tl.load(SLOTS + slot, mask=valid, other=0)
        if SLOTS_ALIGNED:
            offsets = tl.multiple_of(offsets, 16)
    else:
        # int64: in a slot-major stream the slot stride is B*T*Hk*d, and slot * stride passes 2**31
        # at large batches (B=16, T=4096, Hk=8, d=128 from slot 32 on)
        offsets = (slot + tl.zeros([], tl.int64)) * stride_s  # slot may be a loop counter, not a tensor
    return offsets
