"""Analytic FLOP and parameter counts of a MoDA LM: pure functions of a MoDAConfig and seq_len.

The cost model of arXiv 2603.15619, Table 1 (restated in docs/method.md), counted exactly for this
implementation's shapes. ``benchmarks/flops_table.py`` prints the table of docs/flops.md from them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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

    The depth K/V projections hold ``2 * D * Hk * d`` weights (plus a key norm under
    ``depth_keys="writer"``, and biases with ``linear_bias``) each, on L-1 layers: the paper's
    ``2 * L * D * Hk * d`` with the last layer left out (all L with ``last_layer_depth_proj``).
    """
    D, L, F, V = cfg.d_model, cfg.n_layers, cfg.ffn_hidden, cfg.vocab_size
    Hq, Hk, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    full = cfg.qk_norm_scope == "full"
    q_norm = (Hq * d if full else d) if cfg.qk_norm else 0
    k_norm = (Hk * d if full else d) if cfg.qk_norm else 0
    bias = (Hq * d + 2 * Hk * d) + D + 2 * F + D if cfg.linear_bias else 0  # qkv, o, gate/up, down
    per_layer = D * (2 * Hq * d + 2 * Hk * d) + q_norm + k_norm + 3 * D * F + 2 * D + bias  # + the two placement norms
    embeddings = V * D * (1 if cfg.tie_embeddings else 2)
    projections = int(bool(cfg.ffn_kv)) + int(bool(cfg.depth_kv and cfg.attn_kv_proj))
    per_proj = 2 * D * Hk * d + (k_norm if cfg.depth_keys == "writer" else 0) + (2 * Hk * d if cfg.linear_bias else 0)
    layers_with_proj = L if cfg.last_layer_depth_proj else L - 1
    depth_proj = layers_with_proj * projections * per_proj
    return ParamCounts(total=L * per_layer + embeddings + D + depth_proj, depth_proj=depth_proj)
