"""MoDA's training step against the baseline's, both sides with the same options, on one GPU.

    PYTHONPATH=kernels:. python benchmarks/step_speed.py                 # every number of docs/scaling.md's step table
    PYTHONPATH=kernels:. python benchmarks/step_speed.py --quick         # the Table 6 shape only
    PYTHONPATH=kernels:. python benchmarks/step_speed.py --shapes 700M --modes eager graphed   # a part of the table
    PYTHONPATH=kernels:. python benchmarks/step_speed.py --fit-steps 300 # also `moda fit` table6_24l end to end
    PYTHONPATH=kernels:. python benchmarks/step_speed.py --fit-steps 300 --fit-only --modes eager graphed
    PYTHONPATH=kernels:. python benchmarks/step_speed.py --quick --modes graphed --profile 15   # where the time goes, layer by layer too

Options compared: ``eager``; ``compiled`` (``torch.compile`` of the whole network);
``graphed`` (``torch.compile(mode="reduce-overhead")``: the compiled forward and backward
replayed as CUDA graphs, so no host gap). A step is forward, backward and a fused AdamW step in
bf16 autocast on random tokens (``benchmarks/_step.py``); its time is the median over the timed
steps (CUDA events), its memory the peak allocated. Before timing, each option's first-step loss
is checked against eager's on the same weights and tokens, so a fast wrong graph cannot pass.
The ``floor`` column is the ratio MoDA would reach if all it added were the depth stream's
least bytes (every slot read forward and backward, its gradient read and written) at the copy
rate measured at the start of the same run.

``--fit-steps N`` trains ``configs/table6_24l.yaml`` (MoDA) and its baseline overlay with the
shipped GPU config for N steps each on the built-in corpus (``--fit-files``: on those files, e.g. the
study's corpus, whose tokenizer reaches the config's 50,303 tokens) and reports the median tokens/s that
``moda fit`` logged (``train/device/items_per_sec``), in each of ``--modes`` (eager: no compile;
compiled: ``--model.compile=true``; graphed: also ``--model.compile_mode=reduce-overhead``);
``--fit-event-timing`` adds each option with ``FlopsOverhead(sync_every_batch=false)``, whose
throughput is timed by CUDA events rather than a synchronization after every batch.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks._step import median_step_ms, training_step, unfuse_norm_rope
from benchmarks.kernel_attention import copy_bytes_per_s
from benchmarks.profile_step import DEPTH_GROUP, kernel_groups, profiled_times
from moda_lightning.config import MoDAConfig
from moda_lightning.flops import depth_slots_read
from moda_lightning.model import MoDATransformer

BASELINE = dict(depth_kv=False, ffn_kv=False, attn_kv_proj=False, last_layer_depth_proj=False)  # configs/variants/baseline.yaml
MODES = {"eager": None, "compiled": "default", "graphed": "reduce-overhead"}
SHAPES = {
    # name: (config fields, micro-batches); 700M is Table 3 row 4 (row 1 with attention="sdpa")
    "700M": (dict(vocab_size=32768, d_model=1024, n_layers=36, n_heads=16, n_kv_heads=8, max_seq_len=4096), (2, 4)),
    "table6_24l": (
        dict(vocab_size=50303, d_model=384, n_layers=24, n_heads=6, n_kv_heads=2, ffn_hidden=1536, linear_bias=True,
             tie_embeddings=True, depth_keys="reader", last_layer_depth_proj=True, max_seq_len=2048),
        (16,),
    ),
}  # fmt: skip


def slot_and_row_bytes(cfg: MoDAConfig, batch: int) -> tuple[int, int]:
    """Bytes of one depth slot's keys (or values), ``batch * T * Hk * d``, and of one layer's query
    rows, ``batch * T * Hq * d``, in bf16."""
    per_head = batch * cfg.max_seq_len * cfg.head_dim * 2
    return per_head * cfg.n_kv_heads, per_head * cfg.n_heads


def depth_traffic_gb(fields: dict, batch: int) -> float:
    """Bytes (GB) the depth stream moves in one MoDA training step at the least: every (reader, slot)
    pair reads the slot's key and value in the forward and again in the backward, and adds to their
    gradients (a read and a write each; a slot's first gradient is only written): 8 transfers per
    pair, 2 fewer per slot, of ``batch * T * Hk * d`` bf16 values each."""
    cfg = MoDAConfig(attention="moda_triton", **fields)
    pairs = sum(depth_slots_read(cfg))
    slots = (cfg.n_layers - 1) * cfg.slots_per_layer
    return (pairs * 8 - slots * 2) * slot_and_row_bytes(cfg, batch)[0] / 1e9


def depth_kernel_traffic_gb(fields: dict, batch: int) -> float:
    """Bytes (GB) the depth kernels move in one step: the depth stream's (:func:`depth_traffic_gb`)
    and, since they run apart from the sequence attention, each reading layer's query rows again:
    the forward reads ``q`` and reads and writes ``o`` (the merge), the backward reads ``q``, ``o``
    and ``do`` and reads and writes ``dq``: 8 transfers of ``batch * T * Hq * d`` bf16 values per
    reading layer (the fp32 log-sum-exps, 1/d of that, left out)."""
    cfg = MoDAConfig(attention="moda_triton", **fields)
    readers = sum(1 for slots in depth_slots_read(cfg) if slots > 0)
    return depth_traffic_gb(fields, batch) + readers * 8 * slot_and_row_bytes(cfg, batch)[1] / 1e9


def first_loss(network, tokens: torch.Tensor) -> float:
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = network(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).item()


def measure(
    fields: dict, attention: str, mode: str, batch: int, steps: int, profile: bool = False
) -> tuple[float, float, float, dict, list] | str:
    """(median step ms, peak GiB, |loss - eager loss|, GPU kernels, kernel launches) of one option,
    or 'OOM'. The kernels (name -> [ms per step, calls]) and the launches (start µs, name, ms) come
    from :data:`PROFILED_STEPS` more, profiled steps with ``profile``, else are empty."""
    torch.cuda.empty_cache()
    model = network = step = None
    try:
        torch.manual_seed(0)
        if attention == "sdpa":  # the baseline overlay's switches: no depth stream at all
            fields = {**fields, **BASELINE}
        model = MoDATransformer(MoDAConfig(attention=attention, **fields)).cuda()
        generator = torch.Generator(device="cuda").manual_seed(0)
        tokens = torch.randint(0, fields["vocab_size"], (batch, fields["max_seq_len"] + 1), device="cuda", generator=generator)
        eager_loss = first_loss(model, tokens)
        network = model if MODES[mode] is None else torch.compile(model, mode=MODES[mode])
        if mode == "graphed":
            torch.compiler.cudagraph_mark_step_begin()
        loss_error = abs(first_loss(network, tokens) - eager_loss)
        plain_step = training_step(network, model, tokens)

        def step() -> None:
            if mode == "graphed":
                torch.compiler.cudagraph_mark_step_begin()
            plain_step()

        for _ in range(3):  # compilation, autotuning, graph recording, the allocator
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step_ms = median_step_ms(step, steps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        launches: list[tuple[float, str, float]] = []
        kernels = profiled_times(step, PROFILED_STEPS, launches=launches)[0] if profile else {}
        return step_ms, peak, loss_error, kernels, launches
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        del model, network, step
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()


PROFILED_STEPS = 2
DEPTH_KERNEL_NAMES = {"forward": "moda_depth_fwd", "backward": "moda_depth_bwd"}


def depth_kernel_layers(launches: list[tuple[float, str, float]], fields: dict, batch: int, steps: int) -> list[dict] | str:
    """The depth kernels layer by layer: for each layer that reads depth, its slots, the milliseconds
    per step of its forward and backward depth kernels, and the byte rate (TB/s) of each. A forward
    moves the slots' keys and values once and the layer's query rows 3 times (``q``; ``o`` read and
    written by the merge); a backward reads the slots and reads and writes their gradient sums, and
    moves the query rows 5 times (``q``, ``o``, ``do``; ``dq`` read and written). Forward launches
    run in layer order, backward ones in reverse; a message instead where the launch count does not
    match ``steps`` steps of the model (another kernel path)."""
    cfg = MoDAConfig(attention="moda_triton", **fields)
    readers = [(layer, slots) for layer, slots in enumerate(depth_slots_read(cfg)) if slots > 0]
    slot_bytes, row_bytes = slot_and_row_bytes(cfg, batch)
    in_order = sorted(launches)
    ms_per_layer = {}
    for part, name in DEPTH_KERNEL_NAMES.items():
        times = [ms for _, kernel, ms in in_order if name in kernel]
        if len(times) != steps * len(readers):
            return f"{len(times)} {name} launches in {steps} steps of {len(readers)} reading layers: not one a layer"
        mean = [sum(times[step * len(readers) + i] for step in range(steps)) / steps for i in range(len(readers))]
        ms_per_layer[part] = mean if part == "forward" else mean[::-1]
    rows = []
    for i, (layer, slots) in enumerate(readers):
        gb = {"forward": (2 * slots * slot_bytes + 3 * row_bytes) / 1e9, "backward": (6 * slots * slot_bytes + 5 * row_bytes) / 1e9}
        row = dict(layer=layer, slots=slots)
        for part in DEPTH_KERNEL_NAMES:
            ms = ms_per_layer[part][i]
            row[part] = (ms, gb[part] / ms if ms > 0 else float("nan"))  # GB per ms is TB/s
        rows.append(row)
    return rows


def print_depth_kernel_layers(rows: list[dict] | str, copy_rate: float) -> None:
    if isinstance(rows, str):
        print(f"depth kernels layer by layer: {rows}\n")
        return
    print("depth kernels layer by layer (profiled steps' mean; rate: bytes moved / kernel time)")
    print("| layer | slots | forward µs | forward TB/s | backward µs | backward TB/s |\n|---|---|---|---|---|---|")
    for row in rows:
        (fwd_ms, fwd_rate), (bwd_ms, bwd_rate) = row["forward"], row["backward"]
        print(f"| {row['layer']} | {row['slots']} | {fwd_ms * 1e3:.0f} | {fwd_rate:.2f} | {bwd_ms * 1e3:.0f} | {bwd_rate:.2f} |")
    total = {part: sum(row[part][0] for row in rows) for part in DEPTH_KERNEL_NAMES}
    print(f"sum: forward {total['forward']:.2f} ms, backward {total['backward']:.2f} ms (copy rate {copy_rate:.2f} TB/s)\n")


def step_table(shapes: list[str], modes: list[str], steps: int, profile_top: int = 0) -> None:
    """The step table. Its ``floor`` is the ratio MoDA would reach if everything it adds but the depth
    stream's bytes (:func:`depth_traffic_gb`, at the copy rate measured here) were free."""
    rate = copy_bytes_per_s() / 1e12  # TB/s
    traffic = {(shape, batch): depth_traffic_gb(SHAPES[shape][0], batch) for shape in shapes for batch in SHAPES[shape][1]}
    print(f"copy rate {rate:.2f} TB/s; depth traffic per MoDA step: " + ", ".join(
        f"{shape} micro-batch {batch} {gb:.1f} GB ({gb / rate:.1f} ms)" for (shape, batch), gb in traffic.items()))  # fmt: skip
    print("\n| shape | micro-batch | option | baseline ms | MoDA ms | ratio | floor | baseline GiB | MoDA GiB | memory ratio | loss check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        fields, batches = SHAPES[shape]
        for batch in batches:
            depth_ms = traffic[shape, batch] / rate
            kernel_gb = depth_kernel_traffic_gb(fields, batch)

            def floor(base_ms: float) -> float:
                return (base_ms + depth_ms) / base_ms

            best = {}
            for mode in modes:
                base = measure(fields, "sdpa", mode, batch, steps, profile_top > 0)
                moda = measure(fields, "moda_triton", mode, batch, steps, profile_top > 0)
                if isinstance(base, str) or isinstance(moda, str):
                    print(f"| {shape} | {batch} | {mode} | {base if isinstance(base, str) else f'{base[0]:.1f}'} | "
                          f"{moda if isinstance(moda, str) else f'{moda[0]:.1f}'} | | | | | | |")  # fmt: skip
                    continue
                worst_error = max(base[2], moda[2])
                check = "ok" if worst_error < 2e-2 else f"FAILED ({worst_error:.3g})"
                print(f"| {shape} | {batch} | {mode} | {base[0]:.1f} | {moda[0]:.1f} | {moda[0] / base[0]:.3f} | {floor(base[0]):.3f} | "
                      f"{base[1]:.2f} | {moda[1]:.2f} | {moda[1] / base[1]:.3f} | {check} |")  # fmt: skip
                if profile_top:  # right away: a run cut short by a time limit keeps what it measured
                    moda_groups = print_profile(f"{shape}, micro-batch {batch}, {mode}", base[3], moda[3], profile_top)
                    kernel_ms = moda_groups.get(DEPTH_GROUP, 0.0)
                    if kernel_ms:
                        print(f"depth kernels: {kernel_gb:.1f} GB in {kernel_ms:.2f} ms, {kernel_gb / kernel_ms:.2f} TB/s "
                              f"({kernel_gb / kernel_ms / rate:.0%} of the copy rate)\n")  # fmt: skip
                        print_depth_kernel_layers(depth_kernel_layers(moda[4], fields, batch, PROFILED_STEPS), rate)
                for arm, result in (("sdpa", base), ("moda", moda)):
                    if arm not in best or result[0] < best[arm][1][0]:
                        best[arm] = (mode, result)
            if len(best) == 2:
                (base_mode, base), (moda_mode, moda) = best["sdpa"], best["moda"]
                print(f"| {shape} | {batch} | best each ({base_mode} / {moda_mode}) | {base[0]:.1f} | {moda[0]:.1f} | "
                      f"{moda[0] / base[0]:.3f} | {floor(base[0]):.3f} | {base[1]:.2f} | {moda[1]:.2f} | "
                      f"{moda[1] / base[1]:.3f} | |")  # fmt: skip


def print_profile(option: str, base_kernels: dict, moda_kernels: dict, top: int) -> dict[str, float]:
    """GPU milliseconds per step by kernel group, baseline beside MoDA, then MoDA's ``top`` kernels.
    Returns MoDA's milliseconds per group."""
    base, moda = kernel_groups(base_kernels), kernel_groups(moda_kernels)
    print(f"\nGPU kernel time per step, {option} (torch.profiler, 2 steps)")
    print("| kernel group | baseline ms | MoDA ms | extra ms |\n|---|---|---|---|")
    for group in sorted(set(base) | set(moda), key=lambda g: -moda.get(g, 0.0)):
        print(f"| {group} | {base.get(group, 0.0):.2f} | {moda.get(group, 0.0):.2f} | {moda.get(group, 0.0) - base.get(group, 0.0):+.2f} |")
    total_base, total_moda = sum(base.values()), sum(moda.values())
    print(f"| all kernels | {total_base:.2f} | {total_moda:.2f} | {total_moda - total_base:+.2f} |")
    print(f"MoDA's top {top} kernels: ms per step, calls per step, name")
    for name, (ms, calls) in sorted(moda_kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:7.2f} {calls // PROFILED_STEPS:5d}  {name[:110]}")
    # What MoDA adds, kernel by kernel: the same kernel in both networks counts only its extra time.
    extra = {}
    for name, (ms, calls) in moda_kernels.items():
        base_ms, base_calls = base_kernels.get(name, (0.0, 0))
        extra[name] = (ms - base_ms, calls - base_calls)
    print(f"MoDA's {top} largest additions over the baseline: extra ms per step, extra calls per step, name")
    for name, (ms, calls) in sorted(extra.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:+7.2f} {calls // PROFILED_STEPS:+5d}  {name[:110]}")
    print()
    return moda


def fit_flags(overlays: list[str], mode: str, steps: int, save_dir: Path, files: str = "") -> list[str]:
    """The ``moda fit`` flags of one end-to-end run: table6_24l plus ``overlays``, ``mode`` one of
    :data:`MODES` as ``--model.compile`` / ``--model.compile_mode``, ``steps`` steps, no validation;
    trained on ``files`` (``--data.files``) or, empty, the built-in corpus."""
    configs = [arg for config in ["configs/table6_24l.yaml", *overlays] for arg in ("--config", config)]
    # eager says so too: the configs may ship compile=true
    compiled = ["--model.compile=false"]
    if MODES[mode] is not None:
        compiled = ["--model.compile=true", f"--model.compile_mode={MODES[mode]}"]
    return [
        *configs, *compiled,
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.logger.init_args.name=",
        "--trainer.logger.init_args.version=run", "--trainer.enable_checkpointing=false",
        *([f"--data.files={files}"] if files else []),
    ]  # fmt: skip


def event_timing_overlay(workdir: Path) -> str:
    """A config file: the GPU config's callbacks, with ``FlopsOverhead`` timing training batches by
    CUDA events instead of synchronizing after each (``moda_lightning/callbacks/event_timed_throughput.py``)."""
    import yaml

    callbacks = yaml.safe_load(Path("configs/trainer/gpu.yaml").read_text())["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith(".FlopsOverhead"):
            callback.setdefault("init_args", {})["sync_every_batch"] = False
    path = workdir / "event_timed.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
    return str(path)


def fit_tokens_per_sec(overlays: list[str], mode: str, steps: int, workdir: Path, files: str = "") -> float:
    """Median tokens/s that ``moda fit`` logged training table6_24l (plus ``overlays``) for ``steps``
    steps in ``mode``."""
    from moda_lightning.study.results import read_scalars

    save_dir = workdir / f"{'_'.join(Path(o).stem for o in overlays) or 'moda'}_{mode}"
    command = [sys.executable, "-m", "moda_lightning.cli", "fit", *fit_flags(overlays, mode, steps, save_dir, files)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rates = sorted(value for _, value in read_scalars(save_dir / "run").get("train/device/items_per_sec", []))
    if not rates:
        raise RuntimeError(f"moda fit logged no train/device/items_per_sec in {save_dir}")
    return rates[len(rates) // 2]


def fit_table(steps: int, modes: list[str], event_timing: bool = False, files: str = "") -> None:
    corpus = f"--data.files={files}" if files else "built-in corpus"
    print(f"\n`moda fit` table6_24l, {steps} steps, shipped GPU config (bf16-mixed, clipping 1.0), {corpus}")
    print("| option | baseline tokens/s | MoDA tokens/s | MoDA / baseline |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        timings = [("", [])] + ([(", event-timed", [event_timing_overlay(Path(workdir))])] if event_timing else [])
        for mode in modes:
            for label, extra in timings:
                base = fit_tokens_per_sec(["configs/variants/baseline.yaml", *extra], mode, steps, Path(workdir), files)
                moda = fit_tokens_per_sec(extra, mode, steps, Path(workdir), files)
                print(f"| {mode}{label} | {base:,.0f} | {moda:,.0f} | {moda / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the Table 6 shape only (same as --shapes table6_24l)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="the shapes to time")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per option")
    parser.add_argument("--fit-steps", type=int, default=0, help="also time `moda fit` end to end for this many steps")
    parser.add_argument("--fit-only", action="store_true", help="with --fit-steps: only the `moda fit` table")
    parser.add_argument("--fit-files", default="", metavar="FILES",
                        help="with --fit-steps: train on these (moda fit's --data.files, e.g. [pkg:torch,pkg:transformers,pkg:sympy], "
                        "the study's corpus, whose tokenizer has the config's 50,303 tokens) instead of the built-in corpus")
    parser.add_argument("--fit-event-timing", action="store_true",
                        help="with --fit-steps: each option also with throughput timed by CUDA events, no sync per batch")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also profile each option: GPU time per kernel group, MoDA's TOP kernels and additions, its depth kernels layer by layer")
    parser.add_argument("--unfused-norm-rope", action="store_true",
                        help="the q/k and depth-key norms (and RoPE) as separate torch ops, eager (the before of their kernels)")
    args = parser.parse_args()
    if args.unfused_norm_rope:
        unfuse_norm_rope()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
          + (" (norms and RoPE unfused)" if args.unfused_norm_rope else ""))  # fmt: skip
    if not args.fit_only:
        step_table(["table6_24l"] if args.quick else args.shapes, args.modes, args.steps, args.profile)
    if args.fit_steps:
        fit_table(args.fit_steps, args.modes, args.fit_event_timing, args.fit_files)


if __name__ == "__main__":
    main()
