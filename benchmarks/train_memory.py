"""Peak training memory and step time of MoDA models against the SDPA baseline, on one GPU.

    PYTHONPATH=kernels:. python benchmarks/train_memory.py            # the sweep written into docs/scaling.md
    PYTHONPATH=kernels:. python benchmarks/train_memory.py --quick    # a smaller sweep
    PYTHONPATH=kernels:. python benchmarks/train_memory.py --only-700m --backends sdpa moda_triton

One training step = forward, backward and a fused AdamW step in bf16 autocast on random
tokens; the step time is the median of the timed steps (CUDA events), the peak is
``torch.cuda.max_memory_allocated`` over those steps. Every batch holds the same number of
tokens, so rows of one sequence length compare like with like.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer

from benchmarks._step import median_step_ms, training_step, unfuse_norm_rope

WIDTHS = {384: dict(n_heads=6, n_kv_heads=2), 1024: dict(n_heads=16, n_kv_heads=8)}
VOCAB = 32768


def measure_step(
    cfg: MoDAConfig, batch: int, seq_len: int, steps: int = 5, compile: bool = False
) -> tuple[float, float] | str:
    """(median step ms, peak GiB) of training ``cfg`` on ``[batch, seq_len]`` tokens, or 'OOM'."""
    torch.cuda.empty_cache()
    model = step = None
    try:
        model = MoDATransformer(cfg).cuda()
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device="cuda")
        step = training_step(torch.compile(model) if compile else model, model, tokens)
        for _ in range(3 if compile else 2):  # warm-up: kernel compilation, autotuning, allocator
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return median_step_ms(step, steps), torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        del model, step
        gc.collect()  # an OOM's traceback keeps the failed step's tensors reachable until collected
        torch.cuda.empty_cache()


def config(width: int, layers: int, seq_len: int, attention: str, **extra) -> MoDAConfig:
    return MoDAConfig(
        vocab_size=VOCAB, d_model=width, n_layers=layers, max_seq_len=seq_len, attention=attention, **WIDTHS[width], **extra
    )


def fmt(result: tuple[float, float] | str) -> tuple[str, str]:
    return (result, result) if isinstance(result, str) else (f"{result[0]:.1f}", f"{result[1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch in the sweep")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "moda_torch", "moda_triton"])
    parser.add_argument("--skip-700m", action="store_true")
    parser.add_argument("--widths", nargs="+", type=int, choices=sorted(WIDTHS), help="only these widths")
    parser.add_argument("--seq-lens", nargs="+", type=int, help="only these sequence lengths")
    parser.add_argument("--only-700m", action="store_true", help="skip the width/depth/length sweep")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile at width 384")
    parser.add_argument(
        "--unfused-norm-rope", action="store_true", help="the q/k and depth-key norms (and RoPE) as separate torch ops (the before of their kernels)"
    )
    args = parser.parse_args()
    if args.unfused_norm_rope:
        unfuse_norm_rope()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
          + (" (norm + RoPE unfused)" if args.unfused_norm_rope else ""))  # fmt: skip

    layers_list = [12, 24] if args.quick else [12, 24, 48]
    seq_list = [] if args.only_700m else args.seq_lens or ([1024] if args.quick else [1024, 4096])
    if seq_list:
        print("\n| width | T | layers | backend | step ms | peak GiB | ms vs sdpa | GiB vs sdpa |")
        print("|---|---|---|---|---|---|---|---|")
    for width in (args.widths or WIDTHS) if seq_list else []:
        for seq_len in seq_list:
            for layers in layers_list:
                base = None
                for attention in args.backends:
                    if attention == "moda_torch" and seq_len > 1024:
                        # The reference keeps dense [T, T+S] probabilities per head: 16x T=1024's, past any GPU.
                        print(f"| {width} | {seq_len} | {layers} | {attention} | skipped (dense reference) | | | |")
                        continue
                    result = measure_step(config(width, layers, seq_len, attention), args.tokens // seq_len, seq_len)
                    if attention == "sdpa":
                        base = result
                    ratio = ("", "")
                    if not isinstance(result, str) and base and not isinstance(base, str):
                        ratio = (f"{result[0] / base[0]:.3f}", f"{result[1] / base[1]:.3f}")
                    print(f"| {width} | {seq_len} | {layers} | {attention} | {' | '.join(fmt(result))} | {' | '.join(ratio)} |")

    if not args.skip_700m:
        print("\n700M shape (D=1024, Hq=16, Hk=8, L=36, T=4096); targets: MoDA memory <= 1.15x, step time <= 1.08x")
        print("| micro-batch | variant | step ms | peak GiB | ms vs sdpa | GiB vs sdpa |")
        print("|---|---|---|---|---|---|")
        variants = [
            ("sdpa (row 1)", "sdpa", {}),
            ("moda_triton (row 4)", "moda_triton", {}),
            ("moda_triton (row 3)", "moda_triton", dict(ffn_kv=False)),
            ("sdpa + checkpointing", "sdpa", dict(activation_checkpointing=True)),
            ("moda_triton + checkpointing", "moda_triton", dict(activation_checkpointing=True)),
        ]
        for micro_batch in (2, 4):
            base = None
            for label, attention, extra in variants if micro_batch == 2 else variants[:2]:
                if attention not in args.backends:
                    continue
                result = measure_step(config(1024, 36, 4096, attention, **extra), micro_batch, 4096)
                if label.startswith("sdpa ("):
                    base = result
                ratio = ("", "")
                if not isinstance(result, str) and base and not isinstance(base, str):
                    ratio = (f"{result[0] / base[0]:.3f}", f"{result[1] / base[1]:.3f}")
                print(f"| {micro_batch} | {label} | {' | '.join(fmt(result))} | {' | '.join(ratio)} |")

    if args.compile:
        print("\ntorch.compile, width 384, 12 layers, T=1024")
        print("| backend | eager ms | compiled ms | speedup | compile s |")
        print("|---|---|---|---|---|")
        for attention in [b for b in args.backends if b != "moda_torch"]:
            cfg = config(384, 12, 1024, attention)
            eager = measure_step(cfg, args.tokens // 1024, 1024)
            start = time.perf_counter()
            compiled = measure_step(cfg, args.tokens // 1024, 1024, compile=True)
            wall = time.perf_counter() - start
            if isinstance(eager, str) or isinstance(compiled, str):
                print(f"| {attention} | {fmt(eager)[0]} | {fmt(compiled)[0]} | | |")
            else:
                print(f"| {attention} | {eager[0]:.1f} | {compiled[0]:.1f} | {eager[0] / compiled[0]:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
