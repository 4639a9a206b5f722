"""Time MoDA attention against SDPA (flash, cuDNN), FlexAttention-MoDA and the reference.

    PYTHONPATH=kernels:. python benchmarks/kernel_attention.py            # the grid: the paper's Table 2 shapes + the training shape
    PYTHONPATH=kernels:. python benchmarks/kernel_attention.py --quick    # three small shapes
    PYTHONPATH=kernels:. python benchmarks/kernel_attention.py --impls moda,moda_fused,sdpa_cudnn --json out.json
    PYTHONPATH=kernels:. python benchmarks/kernel_attention.py --quick --breakdown   # cuDNN and depth kernels timed apart
    PYTHONPATH=kernels:. python benchmarks/kernel_attention.py --quick --depth-configs 16x64,32x64,16x128w2s4   # depth tiles
    PYTHONPATH=kernels:. python benchmarks/kernel_attention.py --shapes 10 --slots 2,12,24,46 --breakdown   # per layer

Prints, per shape and implementation, forward and forward+backward milliseconds (median of
``triton.testing.do_bench``), TFLOP/s (causal FLOPs actually needed, ``4*B*Hq*d*(T(T+1)/2+T*L)``
forward, 3.5x that forward+backward), and MoDA's time over the fastest SDPA backend of the same run.
The byte and FLOP floors per shape use the ceilings measured at start (a device copy and a matmul).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class Shape:
    B: int
    T: int
    Hq: int
    Hk: int
    L: int
    d: int = 64

    @property
    def name(self) -> str:
        return f"B{self.B} T{self.T // 1024}K G{self.Hq // self.Hk} Hq{self.Hq} L{self.L}"

    def flops_fwd(self) -> float:
        return 4.0 * self.B * self.Hq * self.d * (self.T * (self.T + 1) / 2 + self.T * self.L)

    def bytes_fwd(self, elt: int = 2) -> float:  # q, o; k, v; depth k, v (each read/written once)
        return elt * self.B * self.T * self.d * (2 * self.Hq + 2 * self.Hk + 2 * self.L * self.Hk)

    def bytes_fwd_bwd(self, elt: int = 2) -> float:
        # fwd, then bwd: read q k v o do + depth k v; write dq dk dv + depth grads
        bwd = elt * self.B * self.T * self.d * (4 * self.Hq + 4 * self.Hk + 4 * self.L * self.Hk)
        return self.bytes_fwd(elt) + bwd


# The paper's Table 2 shapes and neighbours varying G and L (B=1, d=64, Hk=8), the training shape
# of configs/moda_700m.yaml (B=8, T=4096, Hq=16, L=36 depth slots), a control without depth, and
# the deepest layer of configs/table6_24l.yaml (B=16, T=2048, 6/2 heads, 46 slots; G=3 pads to 4).
GRID = [
    Shape(1, 4096, 64, 8, 64),
    Shape(1, 16384, 64, 8, 64),
    Shape(1, 65536, 64, 8, 64),
    Shape(1, 16384, 16, 8, 64),
    Shape(1, 16384, 32, 8, 64),
    Shape(1, 16384, 128, 8, 64),
    Shape(1, 16384, 64, 8, 128),
    Shape(1, 16384, 64, 8, 256),
    Shape(8, 4096, 16, 8, 36),
    Shape(1, 16384, 64, 8, 0),  # num_depth = 0 must cost what SDPA costs
    Shape(16, 2048, 6, 2, 46),
]
QUICK = [Shape(1, 4096, 64, 8, 64), Shape(8, 4096, 16, 8, 36), Shape(1, 4096, 64, 8, 0)]


def make_inputs(s: Shape, dtype=torch.bfloat16):
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    q, k, v = rand(s.B, s.T, s.Hq, s.d), rand(s.B, s.T, s.Hk, s.d), rand(s.B, s.T, s.Hk, s.d)
    S = max(s.L, 1)
    depth_k, depth_v = rand(s.B, s.T, S, s.Hk, s.d), rand(s.B, s.T, S, s.Hk, s.d)
    return q, k, v, depth_k, depth_v


def moda_op(s: Shape, seq: str, overlap: bool = False, grad_into: tuple[torch.Tensor, torch.Tensor] | None = None):
    """f(q, k, v, depth_k, depth_v) -> o: ``moda_attn`` on the sequence path ``seq``; with ``grad_into``
    as a training step calls it, the depth gradients added into those sums (the depth stream's,
    read and written by the backward kernel) rather than returned."""
    from moda_kernels.moda_attn import moda_attn
    from moda_kernels.moda_attn.function import set_overlap, set_seq_backend

    def f(q, k, v, dk, dv):
        set_seq_backend(seq)
        set_overlap(overlap)
        return moda_attn(q, k, v, dk, dv, num_depth=s.L, depth_grad_into=grad_into)

    return f


def impl_fns(s: Shape):
    """name -> f(q, k, v, depth_k, depth_v) -> o [B, T, Hq, d]; None where it cannot run."""
    from moda_kernels.moda_attn import moda_attn_reference

    def sdpa(backend):
        def f(q, k, v, dk, dv):
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
                )
            return o.transpose(1, 2)

        return f

    fns = {
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "moda": moda_op(s, "auto"),
        "moda_overlap": moda_op(s, "cudnn", overlap=True),
        "moda_fused": moda_op(s, "fused"),
        "moda_split": moda_op(s, "triton_split"),
        "reference": None,
    }
    try:
        fns["flex_moda"] = flex_moda(s)
    except Exception as err:  # e.g. out of memory building the block mask
        fns["flex_moda"] = f"error: {type(err).__name__}: {str(err)[:100]}"
    # the reference materialises [B, Hq, T, T] fp32 logits several times over
    if s.B * s.Hq * s.T * s.T * 4 * 8 < 60e9:
        fns["reference"] = lambda q, k, v, dk, dv: moda_attn_reference(q, k, v, dk, dv, num_depth=s.L)
    return fns


def flex_moda(s: Shape):
    """MoDA through FlexAttention: keys ``[sequence | depth slots of every token]``, a block mask."""
    if s.L == 0 or s.B * s.Hk * s.T * (s.L + 1) * s.d >= 2**31:
        # FlexAttention indexes its keys with int32 offsets and crashes once the concatenated keys
        # [B, Hk, T(L+1), d] hold 2^31 elements or more: in the grid, T=64K at L=64 and T=16K at L=256.
        return None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, L = s.T, s.L

    def mask_mod(b, h, q_idx, kv_idx):
        seq = (kv_idx < T) & (kv_idx <= q_idx)
        depth = (kv_idx >= T) & ((kv_idx - T) // L == q_idx)
        return seq | depth

    block_mask = create_block_mask(mask_mod, None, None, T, T + T * L, device="cuda", _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)

    def f(q, k, v, dk, dv):
        B, Hk, d = q.shape[0], k.shape[2], q.shape[3]
        kk = torch.cat([k, dk[:, :, :L].reshape(B, T * L, Hk, d)], dim=1).transpose(1, 2)
        vv = torch.cat([v, dv[:, :, :L].reshape(B, T * L, Hk, d)], dim=1).transpose(1, 2)
        o = flex(q.transpose(1, 2), kk, vv, block_mask=block_mask, enable_gqa=True)
        return o.transpose(1, 2)

    return f


def bench_ms(fn, warmup=25, rep=100) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def time_impl(f, inputs, do):
    q, k, v, dk, dv = inputs
    fwd = bench_ms(lambda: f(q, k, v, dk, dv))
    xs = [x.detach().requires_grad_() for x in inputs]

    def fwd_bwd():
        o = f(*xs)
        torch.autograd.grad(o, [x for x in xs if x.requires_grad], do, allow_unused=True)

    return fwd, bench_ms(fwd_bwd)


def copy_bytes_per_s() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write: the byte ceiling, measured here."""
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3)


def measure_ceilings() -> tuple[float, float]:
    """(bytes/s of a device copy counting read + write, bf16 matmul FLOP/s), measured here."""
    bw = copy_bytes_per_s()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return bw, 2 * 8192**3 / (ms * 1e-3)


def breakdown(shapes: list[Shape]) -> None:
    """Time the parts of the cuDNN + depth-kernel path one by one, with the depth kernels' byte rates."""
    from moda_kernels.moda_attn.bwd import moda_depth_bwd
    from moda_kernels.moda_attn.function import _cudnn_bwd, _cudnn_fwd
    from moda_kernels.moda_attn.fwd import moda_depth_fwd

    for s in shapes:
        q, k, v, dk, dv = make_inputs(s)
        do = torch.randn_like(q)
        scale = s.d**-0.5
        o, lse = _cudnn_fwd(q, k, v, True, scale)
        lse_d = torch.empty_like(lse)
        o2, lse2 = o.clone(), lse.clone()
        dq = torch.empty_like(q)
        gk, gv = torch.empty_like(dk), torch.empty_like(dv)
        t = dict(
            cudnn_fwd=bench_ms(lambda: _cudnn_fwd(q, k, v, True, scale)),
            depth_fwd=bench_ms(lambda: moda_depth_fwd(q, dk, dv, s.L, scale, o2, lse2, lse_d)),
            cudnn_bwd=bench_ms(lambda: _cudnn_bwd(do, q, k, v, o, lse, True, scale)),
            depth_bwd=bench_ms(lambda: moda_depth_bwd(do, q, dk, dv, o, lse, s.L, scale, dq, gk, gv)),
        )
        depth_bytes = 2 * s.B * s.T * s.d * (2 * s.L * s.Hk)  # depth k+v, bf16, read once
        # the forward reads the slots; the backward reads them and writes their gradients
        rates = f"depth_fwd {depth_bytes / t['depth_fwd'] / 1e9:.2f} TB/s, depth_bwd {2 * depth_bytes / t['depth_bwd'] / 1e9:.2f} TB/s"
        print(f"{s.name:<28} " + "  ".join(f"{k} {v:7.3f}" for k, v in t.items())
              + f"  (depth k+v read once: {depth_bytes / 1e9:.2f} GB; {rates})", flush=True)  # fmt: skip
        del q, k, v, dk, dv, do, o, o2, dq, gk, gv
        torch.cuda.empty_cache()


def depth_tile(spec: str) -> dict[str, str]:
    """``ROWSxCOLS[wWARPS][sSTAGES][t][e]`` (``t``: the token-block-fast grid; ``e``: the backward loads
    the gradient sums early) as the depth kernels' environment variables; warps and stages left out
    keep the kernels' defaults."""
    import re

    from moda_kernels.moda_attn.fwd import DEPTH_TILE_DEFAULTS, DEPTH_TILE_VARS

    match = re.fullmatch(r"(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?(t?)(e?)", spec)
    if match is None:
        raise ValueError(f"depth tile {spec!r} is not ROWSxCOLS[wWARPS][sSTAGES][t][e], e.g. 16x64, 16x128w8s4 or 32x64te")
    rows, cols, warps, stages, token_fast, early_sums = match.groups()
    for name, value in (("rows", rows), ("columns", cols)):
        n = int(value)
        if n < 16 or n & (n - 1):  # the tensor-core products need 16 or more along each side
            raise ValueError(f"depth tile {spec!r}: {name} must be a power of two of 16 or more, not {n}")
    tile = dict(
        rows=rows, cols=cols, warps=warps or DEPTH_TILE_DEFAULTS["warps"], stages=stages or DEPTH_TILE_DEFAULTS["stages"],
        hk_fast="0" if token_fast else "1", early_sums="1" if early_sums else "0",
    )  # fmt: skip
    return {DEPTH_TILE_VARS[key]: str(value) for key, value in tile.items()}


def outputs_and_grads(f, inputs, do) -> list[torch.Tensor]:
    """``f``'s output and the gradients of every input, for ``do``."""
    xs = [x.detach().requires_grad_() for x in inputs]
    o = f(*xs)
    return [o, *(g for g in torch.autograd.grad(o, xs, do, allow_unused=True) if g is not None)]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest ``max|got - want| / max|want|`` over paired tensors."""
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want))


# Two correct tiles sum the same products in another order, so their bf16 outputs and gradients differ
# by rounding (2**-8 of an entry per rounding); a wrong tile is off by the size of the entries.
TILE_TOLERANCE = 3e-2


def tune_depth(shapes: list[Shape], tiles: dict[str, dict[str, str]], grad_into: bool = False) -> None:
    """Time the cuDNN + depth-kernel path with several depth tiles (name -> :func:`depth_tile` variables),
    each checked first against the shipped tile's output and gradients; ``grad_into``: the training
    path (:func:`moda_op` adding into the sums), whose sums are checked too."""
    from moda_kernels.moda_attn.fwd import depth_tile_overrides

    for s in shapes:
        inputs = make_inputs(s)
        do = torch.randn(s.B, s.T, s.Hq, s.d, device="cuda", dtype=torch.bfloat16)
        sums = (torch.zeros_like(inputs[3]), torch.zeros_like(inputs[4])) if grad_into else ()
        f = moda_op(s, "auto", grad_into=sums or None)

        def checked() -> list[torch.Tensor]:
            for t in sums:
                t.zero_()
            return outputs_and_grads(f, inputs, do) + [t.clone() for t in sums]

        with depth_tile_overrides({}):
            shipped = checked()
        for name, env in tiles.items():
            with depth_tile_overrides(env):
                try:
                    err = relative_error(checked(), shipped)
                    fwd, fb = time_impl(f, inputs, do)
                except Exception as exc:  # a tile the compiler rejects: report it and go on
                    last_line = (str(exc).splitlines() or [""])[-1]
                    print(f"{s.name:<28} depth tile {name:>10}: fails: {type(exc).__name__}: {last_line[:100]}")
                    continue
            verdict = "" if err < TILE_TOLERANCE else "  DIFFERS from the shipped tile: not a valid timing"
            print(f"{s.name:<28} depth tile {name:>10}: fwd {fwd:8.3f} ms  fwd+bwd {fb:8.3f} ms  "
                  f"max rel. diff to shipped {err:.1e}{verdict}", flush=True)  # fmt: skip
        del inputs, do, shipped, sums
        torch.cuda.empty_cache()


def chosen_shapes(quick: bool, indices: str, slots: str) -> list[Shape]:
    """The shapes to time: the grid (or the quick one), those at ``indices`` ("0,3,8") if given, each
    at every depth-slot count in ``slots`` ("2,24,46") if given."""
    shapes = QUICK if quick else GRID
    if indices:
        shapes = [shapes[int(i)] for i in indices.split(",")]
    if slots:
        shapes = [replace(s, L=int(n)) for s in shapes for n in slots.split(",")]
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="three small shapes instead of the full grid")
    p.add_argument("--impls", default="sdpa_flash,sdpa_cudnn,moda,moda_split,moda_fused,flex_moda,reference")
    p.add_argument("--shapes", default="", help="indices into the grid, e.g. 0,3,8")
    p.add_argument("--json", default="", help="write all numbers to this file")
    p.add_argument("--breakdown", action="store_true", help="time cuDNN and the depth kernels separately")
    p.add_argument("--depth-configs", default="", help="tune the depth kernels: ROWSxCOLS[wWARPS][sSTAGES][t][e],... (times 'moda' only)")
    p.add_argument("--grad-into", action="store_true", help="with --depth-configs: time the training path, whose "
                   "backward adds the depth gradients into the stream's sums (what the 'e' tiles change)")
    p.add_argument("--slots", default="", help="time each chosen shape at these depth-slot counts instead of its own, "
                   "e.g. 2,8,24,46 with --shapes 10 --breakdown: the depth kernels' rate layer by layer of a model")
    args = p.parse_args()
    try:  # a mistyped tile fails here, before any GPU work
        tiles = {spec: depth_tile(spec) for spec in args.depth_configs.split(",") if spec}
    except ValueError as err:
        p.error(f"--depth-configs: {err}")
    torch.manual_seed(0)
    shapes = chosen_shapes(args.quick, args.shapes, args.slots)
    wanted = args.impls.split(",")
    dev = torch.cuda.get_device_name()
    bw, peak = measure_ceilings()
    print(f"device: {dev}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}; "
          f"measured copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)  # fmt: skip
    if args.breakdown:
        breakdown(shapes)
        return
    if tiles:
        tune_depth(shapes, tiles, args.grad_into)
        return
    rows = []
    for s in shapes:
        inputs = make_inputs(s)
        do = torch.randn(s.B, s.T, s.Hq, s.d, device="cuda", dtype=torch.bfloat16)
        fns = impl_fns(s)
        res: dict[str, tuple[float, float] | str] = {}
        for name in wanted:
            f = fns.get(name)
            if f is None or isinstance(f, str):
                res[name] = f or "skip"
                continue
            try:
                res[name] = time_impl(f, inputs, do)
            except Exception as err:  # report and go on: one failing baseline must not end the run
                res[name] = f"error: {type(err).__name__}: {str(err)[:120]}"
                torch.cuda.synchronize()
            torch.cuda.empty_cache()
        floor_fwd = max(s.flops_fwd() / peak, s.bytes_fwd() / bw) * 1e3
        floor_fb = max(3.5 * s.flops_fwd() / peak, s.bytes_fwd_bwd() / bw) * 1e3
        row = dict(shape=asdict(s), name=s.name, results=res,
                   floor_ms=dict(fwd=floor_fwd, fwd_bwd=floor_fb,
                                 flop_fwd_bwd=3.5 * s.flops_fwd() / peak * 1e3,
                                 byte_fwd_bwd=s.bytes_fwd_bwd() / bw * 1e3))  # fmt: skip
        rows.append(row)
        sdpa = [r for k, r in res.items() if k.startswith("sdpa") and isinstance(r, tuple)]
        best = (min(r[0] for r in sdpa), min(r[1] for r in sdpa)) if sdpa else (math.nan, math.nan)
        print(f"\n{s.name}: floors fwd {floor_fwd:.2f} ms, fwd+bwd {floor_fb:.2f} ms "
              f"(FLOP {3.5 * s.flops_fwd() / peak * 1e3:.2f}, bytes {s.bytes_fwd_bwd() / bw * 1e3:.2f})")  # fmt: skip
        print(f"  {'impl':<11} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>9} {'f+b TF/s':>9} {'fwd/SDPA':>9} {'f+b/SDPA':>9}")
        for name, r in res.items():
            if not isinstance(r, tuple):
                print(f"  {name:<11} {r}")
                continue
            tf = s.flops_fwd() / (r[0] * 1e-3) / 1e12, 3.5 * s.flops_fwd() / (r[1] * 1e-3) / 1e12
            print(f"  {name:<11} {r[0]:9.3f} {r[1]:9.3f} {tf[0]:9.1f} {tf[1]:9.1f} {r[0] / best[0]:9.2f} {r[1] / best[1]:9.2f}")
        del inputs, do
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=dev, torch=torch.__version__, copy_bytes_per_s=bw, matmul_flops=peak, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
