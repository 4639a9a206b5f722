"""Registers and spills of the depth kernels per tile, on any machine: no GPU needed.

Triton compiles a kernel for an NVIDIA architecture wherever it runs, and its wheel carries
``ptxas``, which reports the registers a thread uses and the bytes it spills. Registers bound
how many warps an SM keeps in flight, and the depth kernels wait on memory once or twice a slot
step, so fewer warps in flight means more of that wait shows (docs/scaling.md, "The depth kernels
layer by layer"). Each kernel is compiled as a launch at a training shape would specialise it:
unit strides of the head dim and of the log-sum-exp's token axis are constants, pointers and
other strides multiples of 16.

    PYTHONPATH=kernels:. python benchmarks/kernel_registers.py                       # the shipped tile and a few others, G=3
    PYTHONPATH=kernels:. python benchmarks/kernel_registers.py --tiles 16x32w2,16x32w4e --G 2 --buffer

Tiles are ``benchmarks/kernel_attention.py --depth-configs`` specs. Timing stays with that script on
a GPU; this one says only what the compiler gives each tile.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

REGISTERS_PER_SM = 65536  # sm_80 to sm_90
MAX_WARPS_PER_SM = 64
# bf16 tensors, fp32 log-sum-exps, int64 slot-offset tables
POINTER_TYPES = {"LSE": "*fp32", "LSE_D": "*fp32", "DK_SLOTS": "*i64", "DV_SLOTS": "*i64", "GK_SLOTS": "*i64", "GV_SLOTS": "*i64"}
SIZE_ARGS = {"T", "Hk", "Hq", "num_depth"}  # integers that start upper case, like the tensors
DEFAULT_TILES = "16x32w2,16x32w2e,16x32w4,16x32w4e,16x16w1,16x16w2,32x32w4,16x64w4"


def ptxas_path() -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):  # older Triton: the binary beside the backend
        return glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))[0]


def compile_for_gpu(kernel, constants: dict, num_warps: int, num_stages: int, arch: int = 90) -> str:
    """PTX of ``kernel`` for ``sm_{arch}`` with ``constants`` set, specialised as a launch would be."""
    constants = dict(constants)
    for p in kernel.params:
        if p.name.startswith("stride_") and (p.name.endswith("d") or p.name == "stride_lt"):
            constants[p.name] = 1
    signature, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        name = p.name
        if p.is_constexpr or name in constants:
            signature[name] = "constexpr"
        elif name[0].isupper() and name not in SIZE_ARGS:  # a tensor
            signature[name] = POINTER_TYPES.get(name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("sm_scale", "qk_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") or name == "T":
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = sorted(p.name for p in kernel.params if p.is_constexpr and p.name not in constants)
    if missing:
        raise ValueError(f"{kernel.fn.__name__}: no value for the constants {missing}")
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["ptx"]


def registers_and_spills(ptx: str, arch: int = 90) -> tuple[int, int]:
    """Registers per thread and spill-store bytes that ``ptxas -v`` reports for ``ptx``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        report = subprocess.run([ptxas_path(), "-v", f"-arch=sm_{arch}a", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr  # fmt: skip
    registers = int(report.split("Used ")[1].split(" registers")[0])
    spills = int(report.split(" bytes spill stores")[0].rsplit(" ", 1)[1]) if "spill stores" in report else 0
    return registers, spills


def warps_per_sm(registers: int, warps_per_program: int) -> int:
    """Warps an SM holds at once by its register file: whole programs, registers allocated per warp
    in units of 256 (8 a thread)."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(REGISTERS_PER_SM // per_warp, MAX_WARPS_PER_SM) // warps_per_program * warps_per_program


def depth_kernel_constants(G: int, slot_lists: bool) -> dict[str, dict]:
    """Per depth kernel, the constants of a training launch: the model's path (merged output; the
    backward adds into the stream's gradient sums), the stream as slot lists or one buffer."""
    from moda_kernels.moda_attn.fwd import depth_config, depth_early_sums

    cfg = depth_config(G, interpret=False)
    tile = {k: cfg[k] for k in ("G_PAD", "BLOCK_T", "SC")}
    stream = dict(HK_FAST=True, SLOT_TABLE=slot_lists, SLOTS_ALIGNED=slot_lists)
    return {
        "moda_depth_fwd_kernel": dict(G=G, D=64, MERGE=True, **tile, **stream),
        "moda_depth_bwd_kernel": dict(G=G, D=64, ACCUM_DQ=True, ACCUM_DEPTH=True, GRAD_SLOT_TABLE=slot_lists,
                                      GRAD_SLOTS_ALIGNED=slot_lists, EARLY_SUMS=depth_early_sums(), **tile, **stream),  # fmt: skip
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", default=DEFAULT_TILES, help="depth tiles as kernel_attention.py --depth-configs takes them")
    parser.add_argument("--G", type=int, default=3, help="query heads per KV head (table6_24l: 3, the 700M shape: 2)")
    parser.add_argument("--buffer", action="store_true", help="the eager stream (one strided buffer) instead of slot lists")
    args = parser.parse_args(argv)
    # compiled, not interpreted, even where the test suite sets the interpreter: Triton reads the
    # variable when the kernels are defined, on their first import, below
    os.environ["TRITON_INTERPRET"] = "0"
    from benchmarks.kernel_attention import depth_tile
    from moda_kernels.moda_attn import bwd, fwd
    from moda_kernels.moda_attn.fwd import depth_config, depth_tile_overrides

    try:
        tiles = {spec: depth_tile(spec) for spec in args.tiles.split(",") if spec}
    except ValueError as err:
        parser.error(f"--tiles: {err}")
    kernels = {"moda_depth_fwd_kernel": fwd.moda_depth_fwd_kernel, "moda_depth_bwd_kernel": bwd.moda_depth_bwd_kernel}
    print(f"Triton {triton.__version__}, sm_90a, G={args.G}, depth stream as {'one buffer' if args.buffer else 'slot lists'}")
    print("| tile | kernel | registers / thread | spill stores (bytes) | warps per SM |")
    print("|---|---|---|---|---|")
    for spec, env in tiles.items():
        with depth_tile_overrides(env):
            cfg = depth_config(args.G, interpret=False)
            for name, constants in depth_kernel_constants(args.G, not args.buffer).items():
                ptx = compile_for_gpu(kernels[name], constants, cfg["num_warps"], cfg["num_stages"])
                registers, spills = registers_and_spills(ptx)
                short = name.removeprefix("moda_depth_").removesuffix("_kernel")
                print(f"| {spec} | {short} | {registers} | {spills} | {warps_per_sm(registers, cfg['num_warps'])} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
