"""Where one GPU training step spends its time: MoDA against the SDPA baseline, kernel by kernel.

    PYTHONPATH=kernels:. python benchmarks/profile_step.py                         # width 1024, 12 layers, T=4096
    PYTHONPATH=kernels:. python benchmarks/profile_step.py --layers 36 --batch 2   # the 700M shape
    PYTHONPATH=kernels:. python benchmarks/profile_step.py --trace traces          # also a Chrome trace per backend

For each backend it prints the step time (CUDA events), the GPU busy time the profiler saw
(kernels only; a step much longer than its busy time is waiting on the CPU), the kernels
grouped by what they do, and the top kernels. ``--sync-check`` runs one step under
``torch.cuda.set_sync_debug_mode("error")`` so a hidden host-device sync fails loudly.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer

from benchmarks._step import median_step_ms, training_step, unfuse_norm_rope

DEPTH_GROUP = "moda depth kernels"
# Kernel-name patterns, first match wins; the order matters (a cuDNN attention kernel is not a matmul).
GROUPS = [
    (DEPTH_GROUP, r"_depth|moda"),
    ("cudnn attention", r"cudnn|fmha|flash|sdpa|attention"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|matmul|triton_tem_"),
    ("inductor fused", r"^triton_(poi|red|per)_"),  # torch.compile's own kernels, several ops each
    ("copy / cat / clone", r"copy|cat|Copy|clone|contiguous"),
    ("fill / zeros", r"fill|zero"),
    ("optimizer", r"adam|Adam|multi_tensor|foreach"),
    ("reduce / norm", r"reduce|norm|Norm|softmax|Softmax|loss|nll"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def build(width: int, layers: int, seq_len: int, attention: str, heads: int, kv_heads: int) -> MoDAConfig:
    return MoDAConfig(
        vocab_size=32768, d_model=width, n_layers=layers, max_seq_len=seq_len, attention=attention,
        n_heads=heads, n_kv_heads=kv_heads,
    )  # fmt: skip


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def profiled_times(
    step: Callable[[], None], steps: int, trace: str | None = None, launches: list[tuple[float, str, float]] | None = None
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run ``step`` ``steps`` times under torch.profiler. Returns the GPU kernels (name -> [ms per
    step, calls]) and the host time of MoDA-related ops (name -> ms per step, inclusive); writes a
    Chrome trace to ``trace`` if given, and appends every kernel launch to ``launches`` if given
    (start in µs, name, ms), for what the totals hide: which launch of a kernel took the time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    cpu_ops: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time_total / 1000 / steps
            kernels[event.name][1] += 1
            if launches is not None:
                launches.append((event.time_range.start, event.name, event.device_time_total / 1000))
        elif event.name.startswith(("moda::", "aten::_scaled_dot", "DepthStream", "_WriteSlot", "_ReadSlots", "autograd::")):
            cpu_ops[event.name] += event.cpu_time_total / 1000 / steps
    return dict(kernels), dict(cpu_ops)


def kernel_groups(kernels: dict[str, list[float]]) -> dict[str, float]:
    """Milliseconds per step of each kernel group (:data:`GROUPS`, else "other")."""
    groups: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        groups[group_of(name)] += ms
    return dict(groups)


def profile_backend(args, attention: str) -> dict[str, float]:
    cfg = build(args.width, args.layers, args.seq_len, attention, args.heads, args.kv_heads)
    model = MoDATransformer(cfg).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device="cuda")
    step = training_step(model, model, tokens)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.sync_check:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            print(f"{attention}: no host-device sync in a step")
        except RuntimeError as err:
            print(f"{attention}: SYNC in a step: {err}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    before = torch.cuda.memory_stats()
    step_ms = median_step_ms(step, 5)
    after = torch.cuda.memory_stats()
    # cudaMalloc/cudaFree in a step cost host time and synchronise: the caching allocator should reuse
    device_calls = {k: (after.get(k, 0) - before.get(k, 0)) / 5 for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}

    kernels, cpu_ops = profiled_times(step, args.profiled_steps, args.trace and f"{args.trace}/trace_{attention}.json")
    groups = kernel_groups(kernels)
    busy = sum(groups.values())
    print(f"\n## {attention}: step {step_ms:.1f} ms (CUDA events), GPU kernel time {busy:.1f} ms per step")
    print("allocator per step: " + ", ".join(f"{k} {v:.1f}" for k, v in device_calls.items()))
    print("| kernel group | ms per step |\n|---|---|")
    for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {ms:.2f} |")
    print(f"\ntop {args.top} kernels ({attention}):")
    print("| ms/step | calls/step | kernel |\n|---|---|---|")
    for name, (ms, calls) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {ms:.2f} | {calls // args.profiled_steps} | {name[:110]} |")
    if cpu_ops:
        print(f"\nCPU time of MoDA-related ops ({attention}), ms per step (inclusive):")
        for name, ms in sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {ms:8.2f}  {name[:100]}")
    groups["step"] = step_ms
    del model, step
    torch.cuda.empty_cache()
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "moda_triton"])
    parser.add_argument("--profiled-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--trace", default=None, help="folder for Chrome traces")
    parser.add_argument("--sync-check", action="store_true")
    parser.add_argument("--unfused-norm-rope", action="store_true", help="the q/k and depth-key norms (and RoPE) as separate torch ops")
    args = parser.parse_args()
    if args.unfused_norm_rope:
        unfuse_norm_rope()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
          + (" (norm + RoPE unfused)" if args.unfused_norm_rope else ""))  # fmt: skip
    print(f"shape: width {args.width}, {args.heads}/{args.kv_heads} heads, {args.layers} layers, "
          f"T={args.seq_len}, batch {args.batch}")  # fmt: skip
    results = {b: profile_backend(args, b) for b in args.backends}
    if len(results) > 1:
        names = list(results)
        all_groups = sorted({g for r in results.values() for g in r if g != "step"})
        print("\n| ms per step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for group in ["step", *all_groups]:
            print(f"| {group} | " + " | ".join(f"{results[n].get(group, 0.0):.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
