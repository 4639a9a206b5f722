"""Backward-pass memory of a chain of MoDA reads: eager, compiled, compiled with per-slot gradient sums.

    PYTHONPATH=kernels:. python benchmarks/compiled_backward_memory.py                     # on a GPU
    PYTHONPATH=kernels:. python benchmarks/compiled_backward_memory.py --cpu --layers 3 6 9 --seq-len 256

Each of L layers projects its input to q, k, v, reads the k/v slots of every earlier layer
with the fused op (the depth stream as a list of slots, the form ``torch.compile`` traces) and
adds its output to the residual; the loss is the squared output, and the weights take no
gradient, so what the backward allocates is the depth stream's. The number reported is the
peak memory the backward pass allocates beyond what the forward left, in slots
(``B x T x Hk x d`` elements), in three forms:

- eager: autograd sums each slot's gradients as the readers' backward passes return them;
- compiled: the same graph under ``torch.compile``, where the compiler sums a slot's gradients
  where the slot's writer needs them, keeping every reader's slot gradients alive until then;
- compiled, slot sums: each read's backward adds into one zero-filled sum per slot
  (``SlotGradSums``, as the model's stream passes them), and the slot's first reader hands the
  finished sum on.

On a GPU the peak is ``torch.cuda.max_memory_allocated``. ``--cpu`` runs the Triton kernels in
the interpreter and counts the tensors the backward creates (each storage from creation until
it is freed; the compiled code's own buffers are routed through ``torch.empty_strided`` so that
they are counted too); it is slow, so keep ``--seq-len`` and ``--layers`` small there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def reading_chain(weights: list[torch.Tensor], x: torch.Tensor, sums: bool, kv_heads: int = 2) -> torch.Tensor:
    """``len(weights)`` layers: each projects the residual ``x [B, T, kv_heads * d]`` to q, k, v (one
    query head per KV head), reads the slots of every earlier layer and adds its output. With
    ``sums`` the reads take ``SlotGradSums`` as ``DepthSlots(sum_gradients=True)`` hands them out:
    a zero-filled sum per slot at its write, and the mark of the first slot not read before."""
    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.grad_into import SlotGradSums

    B, T, width = x.shape
    keys, values, key_sums, value_sums, first_unread = [], [], [], [], 0
    for w in weights:
        q, k, v = (x @ w).view(B, T, 3, kv_heads, width // kv_heads).unbind(2)
        if keys:
            into = SlotGradSums(list(key_sums), list(value_sums), first_unread) if sums else None
            first_unread = len(keys)
            o = moda_attn(q, k, v, list(keys), list(values), depth_grad_into=into)
        else:
            o = moda_attn(q, k, v)
        keys.append(k.contiguous())
        values.append(v.contiguous())
        if sums:
            key_sums.append(torch.zeros_like(keys[-1]))
            value_sums.append(torch.zeros_like(values[-1]))
        x = x + o.reshape(B, T, width)
    return x


class CreatedBytes(TorchDispatchMode):
    """Peak bytes of the storages created under it, each counted until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                base = t._base if t._base is not None else t  # a view keeps its base, and so the storage
                key = base.untyped_storage().data_ptr()
                if key and key not in self.live:
                    self.live[key] = base.untyped_storage().nbytes()
                    self.current += self.live[key]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(base, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@contextlib.contextmanager
def _compiled_cpu_buffers_dispatched():
    """Make the CPU code ``torch.compile`` generates in here allocate its buffers through
    ``torch.empty_strided``, which :class:`CreatedBytes` sees; its own allocator bypasses the
    dispatcher, so a compiled graph's buffers would not be counted."""
    guards = torch._C._dynamo.guards
    direct = guards._empty_strided_cpu
    guards._empty_strided_cpu = lambda size, stride, dtype: torch.empty_strided(size, stride, dtype=dtype)
    try:
        yield
    finally:
        guards._empty_strided_cpu = direct


def backward_peak_bytes(layers: int, sums: bool, compiled: bool, *, B: int, T: int, kv_heads: int, d: int,
                        device: str, dtype: torch.dtype) -> int:  # fmt: skip
    """Peak bytes the chain's backward allocates beyond what its forward left."""
    g = torch.Generator(device=device).manual_seed(0)
    width = kv_heads * d
    weights = [0.1 * torch.randn(width, 3 * width, device=device, dtype=dtype, generator=g) for _ in range(layers)]
    x = torch.randn(B, T, width, device=device, dtype=dtype, generator=g).requires_grad_()
    torch._dynamo.reset()
    chain = torch.compile(reading_chain, fullgraph=True) if compiled else reading_chain
    with _compiled_cpu_buffers_dispatched() if device == "cpu" else contextlib.nullcontext():
        chain(weights, x, sums, kv_heads).float().square().sum().backward()  # compilation, autotuning, the allocator
        loss = chain(weights, x, sums, kv_heads).float().square().sum()
        if device == "cpu":
            counter = CreatedBytes()
            with counter:
                loss.backward()
            return counter.peak
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU with Triton's interpreter")
    parser.add_argument("--layers", nargs="+", type=int, default=[4, 8, 16, 24, 36], help="depths to measure")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined (on first use)
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16  # the interpreter has no bf16 arithmetic
    shape = dict(B=args.batch, T=args.seq_len, kv_heads=args.kv_heads, d=args.head_dim, device=device, dtype=dtype)
    slot = args.batch * args.seq_len * args.kv_heads * args.head_dim * dtype.itemsize
    name = "CPU (Triton interpreter)" if args.cpu else torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}; B={args.batch} T={args.seq_len} Hk={args.kv_heads} "
          f"d={args.head_dim} {dtype}; one slot = {slot:,} bytes")  # fmt: skip
    print("\nBackward peak, in slots:\n")
    print("| layers | eager | compiled | compiled, slot sums |")
    print("|---|---|---|---|")
    for layers in args.layers:
        eager = backward_peak_bytes(layers, sums=False, compiled=False, **shape) / slot
        compiled = backward_peak_bytes(layers, sums=False, compiled=True, **shape) / slot
        summed = backward_peak_bytes(layers, sums=True, compiled=True, **shape) / slot
        print(f"| {layers} | {eager:.0f} | {compiled:.0f} | {summed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
