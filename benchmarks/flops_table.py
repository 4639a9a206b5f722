"""The FLOPs and parameter table of docs/flops.md: MoDA against its baseline, per config file.

    PYTHONPATH=kernels:. python benchmarks/flops_table.py     # the shipped configs/*.yaml and the 1.5B-like shapes
    PYTHONPATH=kernels:. python benchmarks/flops_table.py configs/moda_700m.yaml,configs/variants/table3_row5.yaml

Each row reads its config files through the ``moda fit`` parser (``--print_config``), so
``trainer:`` includes, stacked overlays and the defaults of the model and data module count
as they do in a run; nothing is instantiated, so no tokenizer is trained and no corpus read.
The counts are the pure functions of ``moda_lightning.flops``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from moda_lightning.config import MoDAConfig
from moda_lightning.flops import parameter_counts, training_flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = ROOT / "configs"

# Shapes of docs/flops.md beside the shipped configs: name -> (MoDAConfig fields, seq_len).
# The paper does not give its 1.5B shape; this one is assumed: the 700M config's head size
# (d=64), 8 KV heads and vocabulary, widened to D=2048 (32 query heads, G=4) and 28 layers,
# which gives 1.45B parameters without MoDA and 1.50B with it.
PAPER_SHAPES: dict[str, tuple[dict, int]] = {
    "1.5B-like (assumed)": (dict(vocab_size=50304, d_model=2048, n_layers=28, n_heads=32, n_kv_heads=8), 4096),
    "1.5B-like, OLMo2 vocabulary": (dict(vocab_size=100352, d_model=2048, n_layers=28, n_heads=32, n_kv_heads=8), 4096),
}

TABLE_HEADER = [
    "shape", "dims", "T", "baseline GFLOP/token", "MoDA GFLOP/token", "depth attn", "extra proj.",
    "FLOPs overhead", "baseline params", "MoDA params", "param overhead",
]  # fmt: skip


def fit_config(config_files: list[str | Path]) -> dict:
    """The full ``moda fit`` config of ``--config`` files stacked in order, as ``--print_config`` prints it."""
    from moda_lightning.cli import resolved_fit_config  # imports Lightning; only parsing needs it, not --help

    try:
        return resolved_fit_config([arg for path in config_files for arg in ("--config", str(path))])
    except ValueError as err:
        raise ValueError(
            f"flops_table: {err}; fix the config file or pass one that `moda fit --config FILE --print_config` accepts."
        ) from None


def model_of(config: dict) -> tuple[MoDAConfig, int]:
    """The MoDAConfig a run of ``config`` trains and its ``data.seq_len``.

    The vocabulary is the tokenizer's: the file's ``data.tokenizer`` when one is given, else
    ``data.tokenizer_vocab_size``, the size a tokenizer trained on the corpus gets.
    """
    data = config["data"]
    if data.get("tokenizer"):
        from moda_lightning.data.tokenizer import load_tokenizer, vocab_size_of

        vocab_size = vocab_size_of(load_tokenizer(data["tokenizer"]))
    else:
        vocab_size = data["tokenizer_vocab_size"]
    return MoDAConfig.from_mapping(config["model"], vocab_size=vocab_size), data["seq_len"]


def docs_shapes(rows: list[list[str | Path]] | None = None) -> dict[str, tuple[MoDAConfig, int]]:
    """The rows of the table: each stack of config files (default: every shipped configs/*.yaml), then
    :data:`PAPER_SHAPES`. A row is named by its files, relative to the checkout when inside it."""
    if rows is None:
        rows = [[path] for path in sorted(SHIPPED_CONFIGS.glob("*.yaml"))]
    shapes = {" + ".join(map(_display, files)): model_of(fit_config(files)) for files in rows}
    shapes.update({name: (MoDAConfig(**kw), T) for name, (kw, T) in PAPER_SHAPES.items()})
    return shapes


def _display(path: str | Path) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _baseline_of(cfg: MoDAConfig) -> MoDAConfig:
    return dataclasses.replace(
        cfg, attention="sdpa", depth_kv=False, ffn_kv=False, attn_kv_proj=False, last_layer_depth_proj=False
    )


def table_rows(shapes: dict[str, tuple[MoDAConfig, int]]) -> list[list[str]]:
    """One row per shape: training FLOPs/token of baseline and MoDA, overhead split, parameters."""
    rows = []
    for name, (cfg, T) in shapes.items():
        moda = training_flops_per_token(cfg, T)
        params, base_params = parameter_counts(cfg), parameter_counts(_baseline_of(cfg))
        rows.append([
            name,
            f"D={cfg.d_model} L={cfg.n_layers} Hq={cfg.n_heads} Hk={cfg.n_kv_heads} d={cfg.head_dim} "
            f"F={cfg.ffn_hidden} V={cfg.vocab_size}",
            str(T),
            f"{moda.baseline / 1e9:.4g}",
            f"{moda.total / 1e9:.4g}",
            f"{100 * moda.depth_attn_overhead:.2f}%",
            f"{100 * moda.proj_overhead:.2f}%",
            f"{100 * moda.overhead:.2f}%",
            f"{base_params.total / 1e6:.4g}M",
            f"{params.total / 1e6:.4g}M",
            f"{100 * params.overhead:.2f}%",
        ])  # fmt: skip
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def docs_table(rows: list[list[str | Path]] | None = None) -> str:
    """The markdown table of docs/flops.md (``rows=None``) or of the given stacks of config files."""
    return markdown_table(TABLE_HEADER, table_rows(docs_shapes(rows)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "rows", nargs="*", metavar="CONFIG[,OVERLAY...]",
        help="one row per argument: config files stacked like repeated `moda fit --config`, joined by commas; "
        "default: the shipped configs/*.yaml",
    )  # fmt: skip
    args = parser.parse_args(argv)
    print(docs_table([row.split(",") for row in args.rows] if args.rows else None))


if __name__ == "__main__":
    main()
