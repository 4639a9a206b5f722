"""Decode throughput with the KV cache: MoDA against the baseline at the Table 6 and 700M shapes, one GPU.

    PYTHONPATH=kernels:. python benchmarks/decode_speed.py               # the table in docs/generation.md
    PYTHONPATH=kernels:. python benchmarks/decode_speed.py --batch 1 8   # other batch sizes

Each row: a batch of random prompts of ``--prompt`` tokens, then ``--new`` greedy tokens per row
with ``MoDATransformer.generate`` (bf16 autocast, random weights: speed does not depend on them).
Reported: the prompt pass (prefill) time, and new tokens per second of the decode steps. Before
timing, each backend's cache is checked against recomputing: the logits of a few given tokens
decoded with the cache must match one full pass within ``CACHE_CHECK_TOLERANCE`` of their sd
(the table shows the measured ratio), so a fast wrong cache cannot pass. ``moda_triton`` decodes
on the op's decode kernels (``kernels/moda_kernels/moda_attn/decode.py``).

A second table times one decode step of the deepest layer's attention alone (``Tq = 1``, bf16)
against caches of ``--cache`` keys: the decode kernels, the reference op (``moda_torch``, what
``moda_triton`` ran before it had decode kernels) and SDPA without depth slots (the baseline's
attention), in microseconds from ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moda_lightning.config import MoDAConfig
from moda_lightning.generation import KVCache
from moda_lightning.model import MoDATransformer

SHAPES = {
    "table6_24l": dict(vocab_size=50303, d_model=384, n_layers=24, n_heads=6, n_kv_heads=2, ffn_hidden=1536,
                       linear_bias=True, tie_embeddings=True, depth_keys="reader", max_seq_len=2048),
    "700M": dict(vocab_size=32768, d_model=1024, n_layers=36, n_heads=16, n_kv_heads=8, max_seq_len=4096),
}  # fmt: skip


CACHE_CHECK_TOLERANCE = 1e-2
"""Largest |cached - recomputed logit| allowed, over the logits' sd. fp32 on the GPU runs the Triton
kernels' matmuls in tf32, and the prompt pass and the decode steps sum in different orders: at
the 700M shape that left about 5e-3 on an H200, against 2e-5 for the reference op in full fp32
(docs/generation.md). A wrong cache (a missing key, a shifted position) moves logits by a large
part of their sd."""


@torch.inference_mode()
def check_against_recompute(model: MoDATransformer, tokens: list[int], prompt_len: int) -> float:
    """Max |logit difference| / sd between decoding ``tokens`` with the cache (a prompt pass of
    ``prompt_len`` tokens, then one given token per step) and one full pass over them, in fp32.

    The tokens are given, not picked greedily: with random weights the top two logits are often
    closer than tf32's rounding, and a flipped near-tie would send the two sequences apart.
    """
    cfg, device = model.config, model.lm_head.weight.device
    ids = torch.tensor([tokens], device=device)
    full = model(ids).float()
    cache = KVCache(cfg.n_layers, 1, len(tokens), cfg.n_kv_heads, cfg.head_dim, device=device, dtype=torch.float32)
    pieces = [model(ids[:, :prompt_len], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(prompt_len, len(tokens))]
    cached = torch.cat(pieces, dim=1).float()
    return float((cached - full).abs().max() / full.std())


@torch.inference_mode()
def time_decode(model: MoDATransformer, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s over the batch)."""
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for attempt in range(2):  # the first pass compiles and tunes kernels
            cache = KVCache(cfg.n_layers, batch, prompt_len + new, cfg.n_kv_heads, cfg.head_dim, device="cuda",
                            dtype=torch.bfloat16)  # fmt: skip
            torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(idx, cache=cache, logits_to_keep=1)[:, -1]
            torch.cuda.synchronize()
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(new - 1):
                logits = model(logits.argmax(-1)[:, None], cache=cache, logits_to_keep=1)[:, -1]
            torch.cuda.synchronize()
            decode = time.perf_counter() - start
    return prefill * 1e3, batch * (new - 1) / decode


@torch.inference_mode()
def time_attention_step(shape: dict, batch: int, cache_len: int) -> tuple[float, float, float]:
    """Microseconds of one decode step of the last layer's attention: decode kernels, reference op, SDPA."""
    from triton.testing import do_bench

    from moda_kernels.moda_attn import moda_attn, moda_attn_reference

    Hq, Hk = shape["n_heads"], shape["n_kv_heads"]
    d, S = shape["d_model"] // Hq, 2 * (shape["n_layers"] - 1)  # the last layer reads every earlier slot

    def rand(*size):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16)

    q, k, v = rand(batch, 1, Hq, d), rand(batch, cache_len, Hk, d), rand(batch, cache_len, Hk, d)
    depth_k, depth_v = rand(batch, 1, S, Hk, d), rand(batch, 1, S, Hk, d)
    q_BHTd, k_BHTd, v_BHTd = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA's layout
    kernel = do_bench(lambda: moda_attn(q, k, v, depth_k, depth_v))
    reference = do_bench(lambda: moda_attn_reference(q, k, v, depth_k, depth_v))
    sdpa = do_bench(lambda: F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd, enable_gqa=True))
    return kernel * 1e3, reference * 1e3, sdpa * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--cache", nargs="+", type=int, default=[512, 4096], help="cached keys in the attention table")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n| shape | batch | backend | prefill ms | decode tokens/s | MoDA / baseline | cache check |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for batch in args.batch:
            baseline = None
            for attention in ("sdpa", "moda_triton"):
                torch.manual_seed(0)
                model = MoDATransformer(MoDAConfig(attention=attention, **SHAPES[shape])).cuda().eval()
                drift = check_against_recompute(model, torch.randint(0, 100, (20,)).tolist(), prompt_len=16)
                prefill, rate = time_decode(model, batch, args.prompt, args.new)
                ratio = "" if baseline is None else f"{rate / baseline:.3f}"
                baseline = rate if attention == "sdpa" else baseline
                print(f"| {shape} | {batch} | {attention} | {prefill:.1f} | {rate:,.0f} | {ratio} | {'ok' if drift <= CACHE_CHECK_TOLERANCE else 'FAILED'} ({drift:.1e}) |")
                del model
                torch.cuda.empty_cache()
    print("\n| shape | batch | cached keys | decode kernels us | reference op us | SDPA (no depth) us |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        for batch in args.batch:
            for cache_len in args.cache:
                kernel, reference, sdpa = time_attention_step(SHAPES[shape], batch, cache_len)
                print(f"| {shape} | {batch} | {cache_len} | {kernel:.1f} | {reference:.1f} | {sdpa:.1f} |")


if __name__ == "__main__":
    main()
