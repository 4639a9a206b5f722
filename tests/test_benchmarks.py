"""Every benchmark's usage lines run from a checkout as written: ``--help`` appended, no GPU needed.

The usage lines are the indented ``PYTHONPATH=kernels:. python benchmarks/NAME.py ...`` lines of
each script's docstring. Each script runs once, as its first usage line says, with ``--help``;
argparse answers before any CUDA or Triton work, so this runs on CPU. Every option that any of
its usage lines passes must appear in that help, so a renamed or misspelled flag fails here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
USAGE = re.compile(r"^\s+(PYTHONPATH=kernels:\. python (benchmarks/\w+\.py)\b[^#\n]*)", re.M)


def usage_lines(script: Path) -> list[str]:
    """The script's usage commands, comments stripped; each must name the script itself."""
    docstring = ast.get_docstring(ast.parse(script.read_text()), clean=False) or ""
    lines = []
    for match in USAGE.finditer(docstring):
        assert match.group(2) == f"benchmarks/{script.name}", f"{script.name}: a usage line runs {match.group(2)}"
        lines.append(match.group(1).strip())
    return lines


def test_every_benchmark_has_usage_lines():
    assert {p.name for p in SCRIPTS} >= {"kernel_attention.py", "profile_step.py", "train_memory.py", "flops_table.py"}
    assert [p.name for p in SCRIPTS if not usage_lines(p)] == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_usage_lines_run_from_a_checkout(script: Path):
    lines = usage_lines(script)
    # Only the checkout is on the path: a stale PYTHONPATH of the caller must not help.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this interpreter
    result = subprocess.run(
        ["bash", "-c", f"{lines[0]} --help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"`{lines[0]} --help` failed:\n{result.stderr[-3000:]}"
    assert result.stdout.startswith("usage:")
    options = {token.split("=")[0] for line in lines for token in line.split() if token.startswith("--")}
    unknown = sorted(option for option in options if not re.search(rf"{re.escape(option)}(?![\w-])", result.stdout))
    assert unknown == [], f"{script.name}: its usage lines pass options its --help does not list: {unknown}"


def test_step_speed_shapes_are_valid_configs_for_both_arms():
    """Each shape step_speed.py times builds as MoDA and, with the baseline overlay's switches, as the baseline."""
    from benchmarks.step_speed import BASELINE, SHAPES
    from moda_lightning.config import MoDAConfig

    for fields, _ in SHAPES.values():
        baseline = MoDAConfig(attention="sdpa", **{**fields, **BASELINE})
        moda = MoDAConfig(attention="moda_triton", **fields)
        assert not baseline.reads_depth and moda.reads_depth


def test_step_speed_depth_floor_counts_every_read_of_every_slot():
    """The depth bytes the step table's floor is held against: table6_24l (24 layers, 2 slots per
    layer) has 0 + 2 + ... + 46 = 552 (reader, slot) pairs, each moving 8 bf16 slots of
    16 x 2048 tokens x 2 KV heads x 64 channels, less the read of each of the 46 slots' first
    gradient sum; without FFN slots, 276 pairs and 23 slots. The depth kernels move more: they
    also read each reading layer's query rows."""
    from benchmarks.step_speed import SHAPES, depth_kernel_traffic_gb, depth_traffic_gb

    fields, _ = SHAPES["table6_24l"]
    slot_bytes = 16 * 2048 * 2 * 64 * 2
    assert depth_traffic_gb(fields, 16) == pytest.approx((552 * 8 - 46 * 2) * slot_bytes / 1e9)
    assert depth_traffic_gb({**fields, "ffn_kv": False}, 16) == pytest.approx((276 * 8 - 23 * 2) * slot_bytes / 1e9)
    assert depth_traffic_gb(fields, 8) == pytest.approx(depth_traffic_gb(fields, 16) / 2)
    # the depth kernels also read each of the 23 reading layers' query rows (6 heads) 8 times
    row_bytes = 16 * 2048 * 6 * 64 * 2
    assert depth_kernel_traffic_gb(fields, 16) == pytest.approx(depth_traffic_gb(fields, 16) + 23 * 8 * row_bytes / 1e9)


def test_decode_speed_cache_check_passes_a_right_cache_and_fails_a_wrong_one(monkeypatch: pytest.MonkeyPatch):
    """The benchmark's guard against a fast wrong cache: a right cache (fp32 reference op) is far
    inside its tolerance; a cache that loses the last cached key of every step is far outside it."""
    import torch

    from benchmarks.decode_speed import CACHE_CHECK_TOLERANCE, check_against_recompute
    from moda_lightning.config import MoDAConfig
    from moda_lightning.generation import kv_cache
    from moda_lightning.model import MoDATransformer

    torch.manual_seed(0)
    model = MoDATransformer(MoDAConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32))
    tokens = torch.randint(0, 64, (12,)).tolist()
    assert check_against_recompute(model.eval(), tokens, prompt_len=8) < CACHE_CHECK_TOLERANCE / 100

    real_commit = kv_cache.KVCache.commit

    def forget_the_newest(self, n_new):
        real_commit(self, n_new)
        if self.length > 1:  # the last cached key is dropped from what later steps see
            self.length -= 1

    monkeypatch.setattr(kv_cache.KVCache, "commit", forget_the_newest)
    assert check_against_recompute(model, tokens, prompt_len=8) > CACHE_CHECK_TOLERANCE


@pytest.mark.parametrize("mode", ["eager", "compiled", "graphed"])
def test_step_speed_fit_runs_parse_as_moda_fit_commands(mode, tmp_path):
    """The end-to-end rows start `moda fit` on the GPU; their flags must parse here, so a typo
    cannot cost a GPU run."""
    from benchmarks.step_speed import MODES, fit_flags
    from moda_lightning.cli import resolved_fit_config

    for overlays in ([], ["configs/variants/baseline.yaml"]):
        model = resolved_fit_config(fit_flags(overlays, mode, 7, tmp_path))["model"]
        assert model["compile"] is (MODES[mode] is not None)
        assert mode == "eager" or model["compile_mode"] == MODES[mode]
        assert model["attention"] == ("sdpa" if overlays else "moda_triton")
    files = "[pkg:torch,pkg:sympy]"  # the study's kind of corpus, for the config's full vocabulary
    assert resolved_fit_config(fit_flags([], mode, 7, tmp_path, files))["data"]["files"] == ["pkg:torch", "pkg:sympy"]


def test_step_table_holds_each_row_against_its_floor_and_rates_the_depth_kernels(monkeypatch, capsys):
    """The step table on fake measurements: the ratio, the floor (baseline plus the depth bytes at the
    measured copy rate) and, with the profile, the depth kernels' byte rate against the copy rate."""
    import benchmarks.step_speed as step_speed

    def fake_measure(fields, attention, mode, batch, steps, profile=False):
        moda = attention != "sdpa"
        kernels = {"gemm": [56.0, 460] if moda else [50.0, 400]}
        kernels |= {"moda_depth_fwd_kernel": [5.0, 46], "moda_depth_bwd_kernel": [15.0, 46]} if moda else {}
        return (130.0 if moda else 104.0, 19.5 if moda else 19.0, 1e-3, kernels, [])

    monkeypatch.setattr(step_speed, "copy_bytes_per_s", lambda: 3.0e12)
    monkeypatch.setattr(step_speed, "measure", fake_measure)
    step_speed.step_table(["table6_24l"], ["graphed"], steps=5, profile_top=2)
    out = capsys.readouterr().out
    fields, _ = step_speed.SHAPES["table6_24l"]
    floor = (104.0 + step_speed.depth_traffic_gb(fields, 16) / 3.0) / 104.0
    assert f"| table6_24l | 16 | graphed | 104.0 | 130.0 | 1.250 | {floor:.3f} | 19.00 | 19.50 | 1.026 | ok |" in out
    kernel_gb = step_speed.depth_kernel_traffic_gb(fields, 16)
    assert f"depth kernels: {kernel_gb:.1f} GB in 20.00 ms, {kernel_gb / 20:.2f} TB/s ({kernel_gb / 20 / 3:.0%} of the copy rate)" in out
    # the two largest additions: the backward depth kernel, then the baseline's kernel run more often
    additions = out.split("largest additions over the baseline")[1].splitlines()[1:3]
    assert [line.split() for line in additions] == [["+15.00", "+23", "moda_depth_bwd_kernel"], ["+6.00", "+30", "gemm"]]
    assert "depth kernels layer by layer: 0 moda_depth_fwd launches in 2 steps of 23 reading layers" in out


def test_step_speed_depth_kernels_layer_by_layer_pairs_each_launch_with_its_layer():
    """Fake launches of two steps of a 3-layer model with FFN slots (layers 1 and 2 read 2 and 4 slots):
    forward launches run in layer order, backward ones in reverse, other kernels between them; each
    layer gets the mean of its two launches, and its rate is its bytes over that time."""
    from benchmarks.step_speed import depth_kernel_layers

    fields = dict(vocab_size=64, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=256)
    launches = []
    for step, t0 in enumerate((0.0, 1e6)):
        forward = [(t0 + 10, "moda_depth_fwd_kernel", 0.010 + step * 0.002), (t0 + 30, "moda_depth_fwd_kernel", 0.020)]
        backward = [(t0 + 50, "moda_depth_bwd_kernel", 0.060), (t0 + 70, "moda_depth_bwd_kernel", 0.030)]
        launches += forward + backward + [(t0 + 20, "gemm", 1.0), (t0 + 60, "moda_merge_kernel", 0.5)]
    rows = depth_kernel_layers(launches[::-1], fields, batch=2, steps=2)  # any order: sorted by start
    slot_bytes, row_bytes = 2 * 256 * 2 * 32 * 2, 2 * 256 * 4 * 32 * 2
    assert [(row["layer"], row["slots"]) for row in rows] == [(1, 2), (2, 4)]
    assert [row["forward"][0] for row in rows] == pytest.approx([0.011, 0.020])
    assert [row["backward"][0] for row in rows] == pytest.approx([0.030, 0.060])  # the last layer's backward runs first
    assert rows[1]["forward"][1] == pytest.approx((2 * 4 * slot_bytes + 3 * row_bytes) / 1e9 / 0.020)
    assert rows[0]["backward"][1] == pytest.approx((6 * 2 * slot_bytes + 5 * row_bytes) / 1e9 / 0.030)
    message = depth_kernel_layers(launches[1:], fields, batch=2, steps=2)  # one forward launch missing
    assert isinstance(message, str) and "not one a layer" in message


def test_kernel_attention_depth_tiles_parse_and_a_mistyped_one_fails_before_any_gpu_work():
    from benchmarks.kernel_attention import depth_tile

    from moda_kernels.moda_attn.fwd import DEPTH_TILE_DEFAULTS

    assert depth_tile("16x64") == {  # warps and stages left out: the kernels' own
        "MODA_DEPTH_ROWS": "16", "MODA_DEPTH_COLS": "64", "MODA_DEPTH_WARPS": str(DEPTH_TILE_DEFAULTS["warps"]),
        "MODA_DEPTH_STAGES": str(DEPTH_TILE_DEFAULTS["stages"]), "MODA_DEPTH_HK_FAST": "1",
        "MODA_DEPTH_EARLY_SUMS": "0",
    }  # fmt: skip
    assert depth_tile("32x128w8s4t") == {
        "MODA_DEPTH_ROWS": "32", "MODA_DEPTH_COLS": "128", "MODA_DEPTH_WARPS": "8",
        "MODA_DEPTH_STAGES": "4", "MODA_DEPTH_HK_FAST": "0", "MODA_DEPTH_EARLY_SUMS": "0",
    }  # fmt: skip
    assert depth_tile("16x32w2e")["MODA_DEPTH_EARLY_SUMS"] == "1" and depth_tile("16x32te")["MODA_DEPTH_HK_FAST"] == "0"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "benchmarks/kernel_attention.py", "--depth-configs", "16x64,16by128"],
        cwd=ROOT, env={**env, "PYTHONPATH": f"kernels{os.pathsep}."}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--depth-configs: depth tile '16by128' is not ROWSxCOLS[wWARPS][sSTAGES][t][e]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("spec", ["8x32w1", "16x8", "24x64"])
def test_kernel_attention_rejects_a_depth_tile_the_kernels_cannot_build(spec):
    from benchmarks.kernel_attention import depth_tile

    with pytest.raises(ValueError, match="must be a power of two of 16 or more"):
        depth_tile(spec)


def test_kernel_attention_tile_check_tells_rounding_from_a_wrong_tile():
    from benchmarks.kernel_attention import TILE_TOLERANCE, relative_error

    torch.manual_seed(0)
    want = [torch.randn(4, 33, 6, 64), torch.randn(4, 33, 2, 64)]
    rounded = [w.bfloat16().float() for w in want]  # one bf16 rounding of every entry
    assert relative_error(rounded, want) < TILE_TOLERANCE
    wrong = [want[0], want[1].roll(1, dims=1)]  # one tensor's rows shifted by a token
    assert relative_error(wrong, want) > 10 * TILE_TOLERANCE


def test_step_speed_event_timed_fit_runs_keep_the_gpu_callbacks_with_event_timing(tmp_path):
    from benchmarks.step_speed import event_timing_overlay, fit_flags
    from moda_lightning.cli import resolved_fit_config

    overlay = event_timing_overlay(tmp_path)
    callbacks = resolved_fit_config(fit_flags([overlay], "eager", 7, tmp_path))["trainer"]["callbacks"]
    shipped = resolved_fit_config(fit_flags([], "eager", 7, tmp_path))["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in shipped]
    flops = [c for c in callbacks if c["class_path"].endswith(".FlopsOverhead")]
    assert len(flops) == 1 and flops[0]["init_args"]["sync_every_batch"] is False
    assert all(c["init_args"].get("sync_every_batch", True) for c in shipped if c["class_path"].endswith(".FlopsOverhead"))


def test_kernel_attention_times_a_shape_at_each_slot_count_asked():
    from benchmarks.kernel_attention import GRID, chosen_shapes

    swept = chosen_shapes(False, "10", "2,24,46")
    assert [s.L for s in swept] == [2, 24, 46]
    assert all((s.B, s.T, s.Hq, s.Hk, s.d) == (GRID[10].B, GRID[10].T, GRID[10].Hq, GRID[10].Hk, GRID[10].d) for s in swept)
    assert chosen_shapes(False, "10,8", "") == [GRID[10], GRID[8]] and chosen_shapes(False, "", "") == GRID


def test_kernel_registers_compiles_the_depth_kernels_for_a_gpu_here():
    """benchmarks/kernel_registers.py needs no GPU: Triton compiles for sm_90a and its ptxas counts
    registers and spills. One tile, both kernels; a mistyped tile is one error line."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": f"kernels{os.pathsep}."}
    script = [sys.executable, "benchmarks/kernel_registers.py"]
    result = subprocess.run([*script, "--tiles", "16x32w2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 16x32w2 |")]
    assert [row[1].strip() for row in rows] == ["fwd", "bwd"]
    for _, _, registers, spills, warps in rows:
        assert 32 <= int(registers) <= 255 and int(spills) >= 0 and 2 <= int(warps) <= 64
    bad = subprocess.run([*script, "--tiles", "16by32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tiles: depth tile '16by32'" in bad.stderr and "Traceback" not in bad.stderr


def test_warps_per_sm_counts_whole_programs_by_registers():
    from benchmarks.kernel_registers import warps_per_sm

    assert warps_per_sm(208, 2) == 8  # 208 x 32 registers a warp: 9 warps fit, 4 programs of 2
    assert warps_per_sm(128, 4) == 16
    assert warps_per_sm(32, 4) == 64  # capped by the SM's 64 warps
    assert warps_per_sm(255, 1) == 8  # 255 rounds up to 256 a thread
