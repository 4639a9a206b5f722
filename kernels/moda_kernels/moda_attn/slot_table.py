"""The depth stream as one tensor per slot: a device-side table of slot offsets for the kernels.

The tensor form of the depth stream (``[B, T, S, Hk, d]``) reaches slot ``s`` at
``depth + s * stride_s``. The list form (``S`` separate ``[B, T, Hk, d]`` tensors, what a
functional depth stream produces) has no slot stride: the kernels read slot ``s`` at
``slot_0 + offsets[s]``, with ``offsets`` an int64 table of element offsets from slot 0.

Only the host knows the slots' addresses, and a host-built table would need a host-to-device
copy: from pageable memory that blocks the host until the copy is done, and it is not allowed
while a CUDA graph is being captured. So :func:`slot_offsets` launches a tiny kernel that
takes the slots themselves as pointer arguments, up to ``SLOTS_PER_LAUNCH`` per launch, and
writes their offsets on the device. The addresses travel in the launch's arguments, which a
captured graph records with the kernel; graph replays reuse the same allocations, so the
recorded table stays right.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

SLOTS_PER_LAUNCH = 16  # pointer arguments of one table launch; more slots take more launches
OFFSET_ALIGNMENT = 16  # elements; the divisibility Triton assumes of a stride when it holds


@triton.jit
def _store_offset(TABLE, i: tl.constexpr, n, SLOT, BASE, ELEMENT_BYTES: tl.constexpr):
    # addresses of one dtype differ by whole elements, so the division is exact
    offset = (SLOT.to(tl.int64) - BASE.to(tl.int64)) // ELEMENT_BYTES
    tl.store(TABLE + i, offset, mask=i < n)


_SLOT_ARGS = [f"S{i}" for i in range(SLOTS_PER_LAUNCH)]
# The slots are only read as addresses: specialising on their alignment would compile a variant
# per alignment pattern for nothing. (Older Tritons lack the option; they compile the variants.)
_ANY_ALIGNMENT = (
    {"do_not_specialize_on_alignment": ["BASE", *_SLOT_ARGS]}
    if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
    else {}
)


@triton.jit(do_not_specialize=["n"], **_ANY_ALIGNMENT)
def slot_offsets_kernel(
    TABLE, n, BASE,
    S0, S1, S2, S3, S4, S5, S6, S7, S8, S9, S10, S11, S12, S13, S14, S15,
    ELEMENT_BYTES: tl.constexpr,
):  # fmt: skip
    """``TABLE[i] = (S_i - BASE) / element size`` for ``i < n`` (one program; the rest are padding)."""
    _store_offset(TABLE, 0, n, S0, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 1, n, S1, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 2, n, S2, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 3, n, S3, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 4, n, S4, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 5, n, S5, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 6, n, S6, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 7, n, S7, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 8, n, S8, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 9, n, S9, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 10, n, S10, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 11, n, S11, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 12, n, S12, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 13, n, S13, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 14, n, S14, BASE, ELEMENT_BYTES)
    _store_offset(TABLE, 15, n, S15, BASE, ELEMENT_BYTES)


def slot_offsets(slots: Sequence[Tensor]) -> Tensor:
    """int64 ``[S]`` on the slots' device: the element offset of each slot's data from ``slots[0]``'s.

    Built on the device by ``ceil(S / SLOTS_PER_LAUNCH)`` launches, without a host-to-device copy
    (safe under CUDA graph capture, no host synchronisation). The slots must share one dtype.

    A table is a function of the slots' addresses alone, so tables are kept by address
    (:data:`TABLES_KEPT`, least recently used dropped): the backward's reads, and every later step
    whose slots the allocator places where it placed them before, launch nothing. Only tables
    built on the device's default stream are kept, where training runs unless told otherwise:
    stream order then guarantees a kept table is written before it is read and read by no kernel
    when the allocator reuses its memory. Other streams are where CUDA graphs are made: a capture
    must own its tables (a kept one could be dropped and its memory reused while the graph still
    replays), and ``torch.compile``'s CUDA graphs warm up on their own stream with allocations
    going to the graphs' private pool, which must hold nothing the graphs do not know of.
    """
    first = slots[0]
    if first.is_cuda and torch.cuda.current_stream(first.device) != torch.cuda.default_stream(first.device):
        return _built_table(slots)
    key = (first.device, first.element_size(), *(t.data_ptr() for t in slots))
    if (kept := _kept_tables.get(key)) is not None:
        _kept_tables.move_to_end(key)
        return kept
    table = _kept_tables[key] = _built_table(slots)
    if len(_kept_tables) > TABLES_KEPT:
        _kept_tables.popitem(last=False)
    return table


TABLES_KEPT = 1024  # a step reads a few tables per layer; int64 [S] each, a few hundred bytes
_kept_tables: OrderedDict[tuple, Tensor] = OrderedDict()


def _built_table(slots: Sequence[Tensor]) -> Tensor:
    first = slots[0]
    table = torch.empty(len(slots), dtype=torch.int64, device=first.device)
    for start in range(0, len(slots), SLOTS_PER_LAUNCH):
        chunk = list(slots[start : start + SLOTS_PER_LAUNCH])
        n = len(chunk)
        chunk += [first] * (SLOTS_PER_LAUNCH - n)  # padding arguments; their entries are not stored
        slot_offsets_kernel[(1,)](table[start:], n, first, *chunk, ELEMENT_BYTES=first.element_size())
    return table


def slot_offsets_reference(slots: Sequence[Tensor]) -> Tensor:
    """What :func:`slot_offsets` computes, from the host's addresses (a host-to-device copy: tests only)."""
    base = slots[0].data_ptr()
    offsets = [(t.data_ptr() - base) // t.element_size() for t in slots]
    return torch.tensor(offsets, dtype=torch.int64, device=slots[0].device)


@dataclass(frozen=True)
class SlotList:
    """A depth stream held as ``S`` tensors ``[B, T, Hk, d]`` of one layout, as the kernels read it.

    Attributes:
        first: slot 0; the kernels address every slot from its pointer, with its strides.
        offsets: int64 ``[S]`` element offsets of the slots from ``first`` (:func:`slot_offsets`).
        aligned: every offset is a multiple of ``OFFSET_ALIGNMENT`` elements. The kernels then
            tell the compiler so, which keeps their loads as wide as the strided form's (Triton
            assumes the same of a stride divisible by 16); a table value it cannot see otherwise
            reads as unaligned.
    """

    first: Tensor
    offsets: Tensor
    aligned: bool

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``[B, T, S, Hk, d]``: the shape of the same stream in the tensor form."""
        B, T, Hk, d = self.first.shape
        return B, T, self.offsets.shape[0], Hk, d

    def stride(self) -> tuple[int, int, int, int, int]:
        """Strides as the kernels take them; the slot stride is unused (the table replaces it)."""
        sb, st, sh, sd = self.first.stride()
        return sb, st, 0, sh, sd


def slot_list(slots: Sequence[Tensor]) -> SlotList:
    """The kernels' view of ``slots`` (one dtype and one set of strides, checked: the kernels read every
    slot with slot 0's strides). Costs ``ceil(S / SLOTS_PER_LAUNCH)`` tiny launches the first time
    these slots are read on the default stream, and on every read on another (:func:`slot_offsets`)."""
    first = slots[0]
    layout = (first.shape, first.stride(), first.dtype)
    for s, t in enumerate(slots):
        if (t.shape, t.stride(), t.dtype) != layout:  # one tuple compare: this runs per slot on every read
            raise ValueError(
                f"moda_attn: every depth slot must have slot 0's shape, dtype and strides ({list(first.shape)}, "
                f"{first.dtype}, {first.stride()}); slot {s} has {list(t.shape)}, {t.dtype}, {t.stride()}."
            )
    base, step = first.data_ptr(), OFFSET_ALIGNMENT * first.element_size()
    aligned = all((t.data_ptr() - base) % step == 0 for t in slots)  # host addresses: no device work
    return SlotList(first, slot_offsets(slots), aligned)


def depth_pointers(depth: Tensor | SlotList) -> tuple[Tensor, Tensor | None]:
    """``(base, table)`` for a kernel's depth arguments: the tensor and ``None``, or slot 0 and its offsets."""
    if isinstance(depth, SlotList):
        return depth.first, depth.offsets
    return depth, None


def depth_flags(depth_k: Tensor | SlotList, depth_v: Tensor | SlotList) -> dict[str, bool]:
    """The kernels' constexprs for the depth form: ``SLOT_TABLE`` (list form) and ``SLOTS_ALIGNED``."""
    if isinstance(depth_k, SlotList) and isinstance(depth_v, SlotList):
        return dict(SLOT_TABLE=True, SLOTS_ALIGNED=depth_k.aligned and depth_v.aligned)
    assert not isinstance(depth_k, SlotList) and not isinstance(depth_v, SlotList), "one form for keys and values"
    return dict(SLOT_TABLE=False, SLOTS_ALIGNED=False)
