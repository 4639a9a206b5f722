"""Host (CPU) time per call of the MoDA op and its parts, and per training step, at tiny shapes.

    PYTHONPATH=kernels:. python benchmarks/host_overhead.py
    PYTHONPATH=kernels:. python benchmarks/host_overhead.py --cprofile 25   # also the costliest Python functions

At tiny shapes the GPU finishes each kernel long before the CPU has launched the next one,
so the wall time per call is the time the host spends issuing it. A model step whose host
time exceeds its GPU time is launch-bound; this script says which part of the op costs what.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer


def host_us(fn, calls: int = 300, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean host microseconds per call of ``fn``."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(results)


def op_rows() -> list[tuple[str, float]]:
    from moda_kernels.moda_attn import function as fn
    from moda_kernels.moda_attn.fwd import moda_depth_fwd

    B, T, Hq, Hk, d, S = 1, 32, 16, 8, 64, 8
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, Hq, d, device=dev, dtype=dt)
    k = torch.randn(B, T, Hk, d, device=dev, dtype=dt)
    v = torch.randn(B, T, Hk, d, device=dev, dtype=dt)
    dk = torch.randn(B, T, S, Hk, d, device=dev, dtype=dt)
    dv = torch.randn(B, T, S, Hk, d, device=dev, dtype=dt)
    o = torch.empty_like(q)
    lse = torch.zeros(B, Hq, T, device=dev)
    lse_d = torch.zeros(B, Hq, T, device=dev)
    scale = d**-0.5
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dkg, dvg = dk.clone().requires_grad_(), dv.clone().requires_grad_()
    rows = []

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)

    def sdpa_fb():
        F.scaled_dot_product_attention(qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2), is_causal=True, enable_gqa=True).sum().backward()

    def moda_fb(nd):
        def run():
            fn.moda_attn(qg, kg, vg, dkg, dvg, num_depth=nd).sum().backward()
        return run

    with torch.no_grad():
        rows.append(("F.scaled_dot_product_attention fwd", host_us(sdpa)))
        rows.append(("aten._scaled_dot_product_cudnn_attention fwd", host_us(lambda: fn._cudnn_fwd(q, k, v, True, scale))))
        rows.append(("moda_depth_fwd (one Triton launch)", host_us(lambda: moda_depth_fwd(q, dk, dv, S, scale, o, lse, lse_d))))
        rows.append(("op body, called directly (nd=8)", host_us(lambda: fn.moda_attn_fwd._init_fn(q, k, v, dk, dv, S, True, scale))))
        rows.append(("torch.ops.moda.attn_fwd (nd=8)", host_us(lambda: torch.ops.moda.attn_fwd(q, k, v, dk, dv, S, True, scale))))
        rows.append(("moda_attn fwd, no grad (nd=0)", host_us(lambda: fn.moda_attn(q, k, v, dk, dv, num_depth=0))))
        rows.append(("moda_attn fwd, no grad (nd=8)", host_us(lambda: fn.moda_attn(q, k, v, dk, dv, num_depth=S))))
        o8, lse8, _ = fn._attn_fwd_impl(q, k, v, dk, dv, S, True, scale)
        rows.append(("aten cuDNN attention backward", host_us(lambda: fn._cudnn_bwd(q, q, k, v, o8, lse8, True, scale))))
        rows.append(("moda_depth_bwd (one Triton launch)", host_us(
            lambda: fn.moda_depth_bwd(q, q, dk, dv, o8, lse8, S, scale, o, torch.empty_like(dk), torch.empty_like(dv))
        )))  # fmt: skip
        rows.append(("op backward body, called directly (nd=8)", host_us(lambda: fn._attn_bwd_impl(q, q, k, v, dk, dv, o8, lse8, S, True, scale))))
    rows.append(("sdpa fwd+bwd (.sum().backward())", host_us(sdpa_fb, calls=100)))
    rows.append(("moda_attn fwd+bwd (nd=0)", host_us(moda_fb(0), calls=100)))
    rows.append(("moda_attn fwd+bwd (nd=8)", host_us(moda_fb(S), calls=100)))
    return rows


def step_rows() -> list[tuple[str, float]]:
    rows = []
    for attention in ("sdpa", "moda_triton"):
        cfg = MoDAConfig(vocab_size=1024, d_model=256, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=64, attention=attention)
        model = MoDATransformer(cfg).cuda()
        tokens = torch.randint(0, 1024, (1, 65), device="cuda")

        def fwd():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(tokens[:, :-1])

        def fwd_bwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

        rows.append((f"model fwd, 12 layers ({attention})", host_us(fwd, calls=30)))
        rows.append((f"model fwd+bwd, 12 layers ({attention})", host_us(fwd_bwd, calls=20)))
    return rows


def python_profile(attention: str, top: int) -> None:
    """cProfile of tiny training steps: which Python functions the host time goes to."""
    import cProfile
    import pstats

    cfg = MoDAConfig(vocab_size=1024, d_model=256, n_layers=12, n_heads=4, n_kv_heads=2, max_seq_len=64, attention=attention)
    model = MoDATransformer(cfg).cuda()
    tokens = torch.randint(0, 1024, (1, 65), device="cuda")

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

    for _ in range(5):
        fwd_bwd()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        fwd_bwd()
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\ncProfile, 10 tiny steps, {attention}, by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="also print the N costliest Python functions")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    import triton

    print(f"triton {triton.__version__}")
    print("| what | host µs per call |\n|---|---|")
    for name, us in op_rows() + step_rows():
        print(f"| {name} | {us:.1f} |")
    if args.cprofile:
        for attention in ("sdpa", "moda_triton"):
            python_profile(attention, args.cprofile)


if __name__ == "__main__":
    main()
