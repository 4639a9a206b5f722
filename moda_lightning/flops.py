"""Analytic FLOP and parameter counts of a MoDA LM: pure functions of a MoDAConfig and seq_len.

The cost model of MODA_SPEC.md section 3 (paper Table 1), counted exactly for this
implementation's shapes. ``python -m moda_lightning.flops`` prints the table in docs/flops.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from moda_lightning.config import MoDAConfig

# Sequence (query, key) pairs the count includes per sequence: "causal" counts the pairs a causal
# row sees, T (T + 1) / 2 (the useful work, as the fused kernel does it); "full" counts all T^2 (what
# a dense masked implementation such as the reference op or torch's SDPA FLOP formula executes).
PAIRS = ("causal", "full")


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward matmul FLOPs per token of one sequence, split by where they are spent.

    2 FLOPs per multiply-add. Attention counts ``q.k`` and ``p.v``: ``4 * Hq * d`` per
    (query, key) pair.

    Attributes:
        dense: per layer the ``q, k, v, o`` projections ``2*D*(2*Hq*d + 2*Hk*d)`` and the SwiGLU
            ``3 * 2*D*F``, summed over the L layers.
        lm_head: ``2 * D * V``.
        seq_attn: ``4 * Hq * d * pairs / T`` per layer: ``2*Hq*d*(T+1)`` causal, ``4*Hq*d*T`` full.
        depth_attn: ``4 * Hq * d * S_l`` per layer, where layer ``l`` reads ``S_l = l * slots_per_layer``
            slots; summed: ``2*Hq*d*slots_per_layer*L*(L-1)``.
        depth_proj: the extra depth K/V projections (FFN KV, and attention KV with ``attn_kv_proj``):
            ``2 * D * 2*Hk*d`` each, on the L-1 layers that write slots (the last writes none).
    """

    dense: int
    lm_head: int
    seq_attn: int
    depth_attn: int
    depth_proj: int

    @property
    def total(self) -> int:
        """The model's forward FLOPs per token."""
        return self.dense + self.lm_head + self.seq_attn + self.depth_attn + self.depth_proj

    @property
    def baseline(self) -> int:
        """The same model without depth reads and without the extra depth K/V projections."""
        return self.total - self.depth_attn - self.depth_proj

    @property
    def depth_attn_overhead(self) -> float:
        """Depth-attention FLOPs as a fraction of the baseline."""
        return self.depth_attn / self.baseline

    @property
    def proj_overhead(self) -> float:
        """Extra-projection FLOPs as a fraction of the baseline."""
        return self.depth_proj / self.baseline

    @property
    def overhead(self) -> float:
        """``total / baseline - 1``: depth attention plus extra projections."""
        return self.total / self.baseline - 1.0

    def scaled(self, factor: float) -> FlopsPerToken:
        """Every part times ``factor`` (e.g. 3 for forward + backward)."""
        return FlopsPerToken(*(round(getattr(self, f.name) * factor) for f in fields(self)))


def depth_slots_read(cfg: MoDAConfig) -> list[int]:
    """Depth slots each layer reads: layer ``l`` reads the ``l * slots_per_layer`` slots written above it."""
    return [layer * cfg.slots_per_layer for layer in range(cfg.n_layers)]


def flops_per_token(cfg: MoDAConfig, seq_len: int, *, pairs: str = "causal") -> FlopsPerToken:
    """Forward FLOPs per token of ``cfg`` on sequences of ``seq_len`` tokens.

    Counts every matmul of the forward: projections, SwiGLU, LM head, sequence and depth
    attention. Leaves out what is linear in the width with a small constant: softmax and
    log-sum-exp, RMSNorms, RoPE, SiLU and the gate product, residual adds, the embedding
    lookup and the loss. ``pairs="causal"`` counts the ``T (T + 1) / 2`` (query, key) pairs a
    causal sequence really has; ``pairs="full"`` counts ``T^2`` (what a dense masked kernel
    executes). Depth reads are the same either way: each row reads its own ``S_l`` slots.

    The paper's Table 1 term ``2*G*T*L^2*Hk*d + 2*G*T*L*Hk*d`` per sequence equals
    ``4*Hq*d * T * L(L+1)/2``, i.e. one slot per preceding layer counted one-indexed; here
    layer ``l`` reads ``l * slots_per_layer`` slots (two per layer with FFN KV), zero-indexed.
    """
    if pairs not in PAIRS:
        raise ValueError(f"flops_per_token: pairs={pairs!r}; expected one of {PAIRS}.")
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len={seq_len}; expected a positive number of tokens.")
    D, L, F, V = cfg.d_model, cfg.n_layers, cfg.ffn_hidden, cfg.vocab_size
    Hq, Hk, d, T = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, seq_len
    dense = L * (2 * D * (2 * Hq * d + 2 * Hk * d) + 3 * 2 * D * F)
    seq_attn = L * (2 * Hq * d * (T + 1) if pairs == "causal" else 4 * Hq * d * T)
    depth_attn = 4 * Hq * d * sum(depth_slots_read(cfg))
    projections = int(bool(cfg.ffn_kv)) + int(bool(cfg.depth_kv and cfg.attn_kv_proj))
    depth_proj = (L - 1) * projections * 2 * D * 2 * Hk * d
    return FlopsPerToken(dense, 2 * D * V, seq_attn, depth_attn, depth_proj)


def training_flops_per_token(cfg: MoDAConfig, seq_len: int, *, pairs: str = "causal") -> FlopsPerToken:
    """Forward + backward FLOPs per token: 3x the forward (the backward computes two matmuls per forward matmul).

    This is the "model FLOPs" convention of MFU: the optimizer step, recomputation and the
    items :func:`flops_per_token` leaves out are not counted.
    """
    return flops_per_token(cfg, seq_len, pairs=pairs).scaled(3)


def executed_training_flops_per_token(
    cfg: MoDAConfig, seq_len: int, *, pairs: str | None = "full", attn_backward: float = 2.0, depth: bool = True,
    recompute: bool = False,
) -> int:
    """Forward + backward FLOPs per token as a FLOP counter sees one training step run.

    What ``torch.utils.flop_counter.FlopCounterMode`` counts depends on how attention runs:
    the reference op's dense matmuls (``pairs="full"``, backward 2x like any matmul), torch's
    SDPA formula (full, backward 2.5x: it recomputes ``q.k``), the fused MoDA op's own formula
    (``pairs="causal"``, backward 2.5x), or nothing (``pairs=None``: an attention kernel with no
    registered formula, e.g. SDPA's CPU kernel). ``depth=False`` leaves out the depth reads
    (the reference op computes them as a multiply-and-sum, which the counter does not see).
    Every other matmul counts 3x its forward. ``recompute=True`` (activation checkpointing)
    adds the forward of the layers that the backward replays. Torch's non-reentrant checkpoint
    stops replaying once the saved tensors are back, so under the ``pre`` placement, where
    ``W_down``'s output only feeds a residual add, that last matmul is not replayed; the other
    placements normalise it, which needs it.
    """
    fwd = flops_per_token(cfg, seq_len, pairs=pairs or "full")
    attention = (0 if pairs is None else fwd.seq_attn) + (fwd.depth_attn if depth else 0)
    layers = fwd.dense + fwd.depth_proj + attention
    if cfg.norm == "pre":
        layers -= cfg.n_layers * 2 * cfg.ffn_hidden * cfg.d_model
    total = 3 * (fwd.dense + fwd.lm_head + fwd.depth_proj) + round((1 + attn_backward) * attention)
    return total + (layers if recompute else 0)


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of the model and of its baseline (no depth K/V projections)."""

    total: int
    depth_proj: int

    @property
    def baseline(self) -> int:
        return self.total - self.depth_proj

    @property
    def overhead(self) -> float:
        """Extra parameters as a fraction of the baseline's."""
        return self.depth_proj / self.baseline


def parameter_counts(cfg: MoDAConfig) -> ParamCounts:
    """Trainable parameters as ``MoDATransformer`` builds them (tied embeddings counted once).

    The depth K/V projections hold ``2 * D * Hk * d`` weights (plus a per-head key norm of ``d``)
    each, on L-1 layers: the spec's ``2 * L * D * Hk * d`` with the last layer left out.
    """
    D, L, F, V = cfg.d_model, cfg.n_layers, cfg.ffn_hidden, cfg.vocab_size
    Hq, Hk, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qk_norm = 2 * d if cfg.qk_norm else 0
    per_layer = D * (2 * Hq * d + 2 * Hk * d) + qk_norm + 3 * D * F + 2 * D  # + the two placement norms
    embeddings = V * D * (1 if cfg.tie_embeddings else 2)
    projections = int(bool(cfg.ffn_kv)) + int(bool(cfg.depth_kv and cfg.attn_kv_proj))
    depth_proj = (L - 1) * projections * (2 * D * Hk * d + (d if cfg.qk_norm else 0))
    return ParamCounts(total=L * per_layer + embeddings + D + depth_proj, depth_proj=depth_proj)


# --------------------------------------------------------------------------- the docs table

# Shapes of docs/flops.md beside the shipped configs: name -> (MoDAConfig fields, seq_len).
# The paper does not give its 1.5B shape; this one is assumed: the 700M config's head size
# (d=64), 8 KV heads and vocabulary, widened to D=2048 (32 query heads, G=4) and 28 layers,
# which gives 1.45B parameters without MoDA and 1.50B with it.
PAPER_SHAPES: dict[str, tuple[dict, int]] = {
    "1.5B-like (assumed)": (dict(vocab_size=50304, d_model=2048, n_layers=28, n_heads=32, n_kv_heads=8), 4096),
    "1.5B-like, OLMo2 vocabulary": (dict(vocab_size=100352, d_model=2048, n_layers=28, n_heads=32, n_kv_heads=8), 4096),
}
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_from_yaml(path: str | Path) -> tuple[MoDAConfig, int]:
    """The model of a ``moda fit`` config file and its ``data.seq_len`` (vocab from ``data.tokenizer_vocab_size``)."""
    import yaml  # jsonargparse's dependency; only the table needs it

    raw = yaml.safe_load(Path(path).read_text()) or {}
    model, data = raw.get("model") or {}, raw.get("data") or {}
    data = data.get("init_args", data)
    names = {f.name for f in fields(MoDAConfig)}
    kwargs = {k: v for k, v in model.items() if k in names}
    kwargs.setdefault("vocab_size", data.get("tokenizer_vocab_size", 4096))
    return MoDAConfig(**kwargs), int(data.get("seq_len", 256))


def _baseline_of(cfg: MoDAConfig) -> MoDAConfig:
    kwargs = {f.name: getattr(cfg, f.name) for f in fields(MoDAConfig)}
    kwargs.update(attention="sdpa", depth_kv=False, ffn_kv=False, attn_kv_proj=False)
    return MoDAConfig(**kwargs)


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
        ])
    return rows


TABLE_HEADER = [
    "shape", "dims", "T", "baseline GFLOP/token", "MoDA GFLOP/token", "depth attn", "extra proj.",
    "FLOPs overhead", "baseline params", "MoDA params", "param overhead",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> None:
    """Print the FLOPs table of the paper's shapes and of the given ``moda fit`` config files."""
    parser = argparse.ArgumentParser(prog="python -m moda_lightning.flops", description=main.__doc__)
    parser.add_argument(
        "configs", nargs="*", help="config files; default: the shipped configs/*.yaml of a source checkout"
    )
    args = parser.parse_args(argv)
    print(markdown_table(TABLE_HEADER, table_rows(docs_shapes(args.configs or None))))


def docs_shapes(configs: list[str | Path] | None = None) -> dict[str, tuple[MoDAConfig, int]]:
    """The rows of docs/flops.md: each config file (default: the shipped ones), then :data:`PAPER_SHAPES`."""
    paths = configs if configs is not None else sorted(SHIPPED_CONFIGS.glob("*.yaml"))
    shapes = {f"configs/{Path(path).name}": config_from_yaml(path) for path in paths}
    shapes.update({name: (MoDAConfig(**kw), T) for name, (kw, T) in PAPER_SHAPES.items()})
    return shapes


if __name__ == "__main__":
    main()
