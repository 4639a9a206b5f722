"""Which architectural choices reproduce the parameter counts of arXiv 2603.15619 (Tables 3 and 6).

    PYTHONPATH=kernels:. python benchmarks/param_search.py              # both tables
    PYTHONPATH=kernels:. python benchmarks/param_search.py --table 6    # Table 6 only
    PYTHONPATH=kernels:. python benchmarks/param_search.py --table 6 --near   # also rows-but-one fits

Arithmetic only: for every combination of the choices the paper leaves open (FFN width, embedding
tying, QK-norm form, linear biases, and the depth K/V projections: on how many layers, with or
without a key norm and a bias), every vocabulary size is tried that puts each row on the paper's
printed figure. Table 6 has two depths, so the vocabulary is searched freely there; Table 3 has one,
so its vocabulary is held at OLMo2's 100,278. Each fit our model can build is counted once more
through ``moda_lightning.flops.parameter_counts`` as a cross-check. docs/recipes.md discusses the
results.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

from moda_lightning.config import MoDAConfig
from moda_lightning.flops import parameter_counts

# Vocabularies a paper of this kind would use, named in the output: GPT-2 (and padded to a multiple
# of 64), GPT-NeoX, OLMo2 (cl100k-based, and padded to 128), Llama 2, Llama 3.
KNOWN_VOCABS = {50257: "GPT-2", 50304: "GPT-2 padded", 50277: "NeoX", 50280: "NeoX padded",
                100278: "OLMo2", 100352: "OLMo2 padded", 32000: "Llama 2", 128256: "Llama 3"}  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """What a table fixes: width D, query heads Hq, KV heads Hk, head size d."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Row:
    """One printed parameter count: ``printed`` millions at ``digits`` decimals, for ``n_layers``
    layers carrying ``projections`` depth K/V projections each (0 baseline, 1 FFN KV, 2 + attention KV)."""

    label: str
    n_layers: int
    projections: int
    printed: float
    digits: int

    def window(self) -> tuple[int, int]:
        """The half-open range ``[lo, hi)`` of counts that print as ``printed``."""
        unit = 10 ** (6 - self.digits)
        center = round(self.printed * 10**self.digits) * unit
        return center - unit // 2, center + unit // 2


@dataclass(frozen=True)
class Choice:
    """The open architectural choices (everything but the vocabulary)."""

    ffn_hidden: int
    tied: bool  # one vocab x D matrix, counted once
    qk_norm: str  # "none" | "head" (one d gain each for q and k) | "full" (Hq*d and Hk*d gains)
    bias: str  # "none" | "qkv" (q, k, v projections only, Qwen-style) | "all" (every linear but the LM head)
    proj_layers: str  # "L" (every layer, the last one's never read) | "L-1"
    proj_key_norm: bool  # the projection's key gets its own norm (our depth_keys="writer")
    proj_bias: bool  # the projection has a bias

    def model_flags(self) -> dict | None:
        """The MoDAConfig fields that build this choice, or None where our model cannot."""
        if self.bias == "qkv" or self.proj_bias != (self.bias == "all"):
            return None  # linear_bias puts a bias on every linear map, or on none
        if self.proj_key_norm and self.qk_norm == "none":
            return None
        flags = dict(ffn_hidden=self.ffn_hidden, tie_embeddings=self.tied, qk_norm=self.qk_norm != "none",
                     linear_bias=self.bias == "all", last_layer_depth_proj=self.proj_layers == "L",
                     depth_keys="writer" if self.proj_key_norm else "reader")  # fmt: skip
        if self.qk_norm != "none":
            flags["qk_norm_scope"] = self.qk_norm
        return flags


def count_without_embeddings(shape: Shape, choice: Choice, row: Row) -> int:
    """Every parameter of ``row``'s model but the token embedding (the final norm included)."""
    D, Hq, Hk, d, F = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim, choice.ffn_hidden
    q_gain, k_gain = {"none": (0, 0), "head": (d, d), "full": (Hq * d, Hk * d)}[choice.qk_norm]
    qkv_bias = Hq * d + 2 * Hk * d
    bias = {"none": 0, "qkv": qkv_bias, "all": qkv_bias + D + 2 * F + D}[choice.bias]
    # q, k, v and o; the SwiGLU's three maps; the two norms of the placement (pre, post or olmo2 alike)
    per_layer = D * (2 * Hq * d + 2 * Hk * d) + 3 * D * F + 2 * D + q_gain + k_gain + bias
    per_proj = 2 * D * Hk * d + (k_gain if choice.proj_key_norm else 0) + (2 * Hk * d if choice.proj_bias else 0)
    proj_layers = row.n_layers if choice.proj_layers == "L" else row.n_layers - 1
    return row.n_layers * per_layer + D + row.projections * proj_layers * per_proj


def vocab_range(shape: Shape, choice: Choice, rows: list[Row]) -> range:
    """Every vocabulary size that puts all ``rows`` on their printed figures (often empty)."""
    lo, hi = -math.inf, math.inf
    for row in rows:
        row_lo, row_hi = row.window()
        rest = count_without_embeddings(shape, choice, row)
        lo, hi = max(lo, row_lo - rest), min(hi, row_hi - rest)
    per_token = shape.d_model * (1 if choice.tied else 2)
    if hi <= lo or hi <= 0:
        return range(0)
    return range(max(1, -(-lo // per_token)), -(-hi // per_token))  # V * per_token in [lo, hi)


def choices(shape: Shape) -> itertools.product:
    # FFN widths from D/2 to 8D cover every SwiGLU convention in use (2/3 * 4D rounded, 2D, 4D, ...).
    return itertools.product(range(shape.d_model // 2, 8 * shape.d_model + 1), (True, False),
                             ("none", "head", "full"), ("none", "qkv", "all"), ("L", "L-1"), (False, True),
                             (False, True))  # fmt: skip


def search(shape: Shape, rows: list[Row], vocabs: list[int] | None) -> list[tuple[Choice, range]]:
    """Every (choice, vocabulary sizes) that fits all ``rows``; ``vocabs=None`` searches every size."""
    fits = []
    for F, tied, qk, bias, layers, key_norm, proj_bias in choices(shape):
        if (proj_bias and bias == "none") or (key_norm and qk == "none"):
            continue  # a bias or a norm on the projection alone: no model of the paper's family does that
        choice = Choice(F, tied, qk, bias, layers, key_norm, proj_bias)
        found = vocab_range(shape, choice, rows)
        if vocabs is not None:
            found = [v for v in vocabs if v in found]
        if found:
            fits.append((choice, found))
    return fits


def cross_check(shape: Shape, choice: Choice, vocab: int, rows: list[Row]) -> None:
    """The count of :func:`count_without_embeddings` equals the model's own for every row."""
    flags = choice.model_flags()
    for row in rows if flags is not None else []:
        ffn_kv, attn_kv_proj = row.projections >= 1, row.projections == 2
        cfg = MoDAConfig(vocab_size=vocab, d_model=shape.d_model, n_layers=row.n_layers, n_heads=shape.n_heads,
                         n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim, ffn_kv=ffn_kv,
                         attn_kv_proj=attn_kv_proj, **flags)  # fmt: skip
        expected = count_without_embeddings(shape, choice, row) + vocab * shape.d_model * (1 if choice.tied else 2)
        assert parameter_counts(cfg).total == expected, (row, choice, parameter_counts(cfg).total, expected)


TABLE3 = (
    Shape(d_model=1024, n_heads=16, n_kv_heads=8, head_dim=64),
    [Row("row 1 / 3 (no projection)", 36, 0, 669.0, 1), Row("row 4 (FFN KV)", 36, 1, 705.7, 1),
     Row("row 5 (FFN + attention KV)", 36, 2, 742.4, 1)],
)  # fmt: skip
TABLE6 = (
    Shape(d_model=384, n_heads=6, n_kv_heads=2, head_dim=64),
    [Row("48 layers, no projection", 48, 0, 123.38, 2), Row("48 layers, FFN KV", 48, 1, 128.11, 2),
     Row("24 layers, no projection", 24, 0, 71.35, 2), Row("24 layers, FFN KV", 24, 1, 73.72, 2)],
)  # fmt: skip


def describe(choice: Choice, vocabs) -> str:
    vocab_text = ", ".join(f"{v} ({KNOWN_VOCABS[v]})" if v in KNOWN_VOCABS else str(v) for v in vocabs)
    if isinstance(vocabs, range) and len(vocabs) > 3:
        known = [f"{v} ({name})" for v, name in KNOWN_VOCABS.items() if v in vocabs]
        vocab_text = f"{vocabs.start}..{vocabs.stop - 1}" + (f", incl. {', '.join(known)}" if known else "")
    flags = choice.model_flags()
    ours = f"our flags: {flags}" if flags is not None else "not expressible in MoDAConfig"
    return (f"F={choice.ffn_hidden} tied={choice.tied} qk_norm={choice.qk_norm} bias={choice.bias} "
            f"proj on {choice.proj_layers} key_norm={choice.proj_key_norm} proj_bias={choice.proj_bias} "
            f"V={vocab_text}\n      {ours}")  # fmt: skip


def report(name: str, table: tuple[Shape, list[Row]], vocabs: list[int] | None, near: bool) -> None:
    shape, rows = table
    print(f"{name}: {shape}")
    fits = search(shape, rows, vocabs)
    print(f"  combinations that fit all {len(rows)} rows: {len(fits)}")
    for choice, found in fits:
        print("    " + describe(choice, found))
        cross_check(shape, choice, found[0], rows)
    if not near:
        return
    for skipped in rows:
        others = [row for row in rows if row is not skipped]
        near_fits = search(shape, others, sorted(KNOWN_VOCABS))
        print(f"  fit every row but {skipped.label!r} (paper {skipped.printed}M), known vocabularies: {len(near_fits)}")
        for choice, found in near_fits:
            n = count_without_embeddings(shape, choice, skipped) + found[0] * shape.d_model * (1 if choice.tied else 2)
            print(f"    {describe(choice, found)}\n      that row counts {n:,} = {round(n / 1e6, skipped.digits)}M")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=("3", "6"), help="search one table (default: both)")
    parser.add_argument("--near", action="store_true", help="also list the fits of every row but one")
    args = parser.parse_args(argv)
    if args.table in (None, "3"):
        report("Table 3 (700M)", TABLE3, [100278], args.near)
    if args.table in (None, "6"):
        report("Table 6 (small)", TABLE6, None, args.near)


if __name__ == "__main__":
    main()
