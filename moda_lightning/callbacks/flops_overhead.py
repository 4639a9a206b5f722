"""FlopsOverhead: what MoDA costs in FLOPs and parameters, checked against a FLOP counter.

At fit start it prints and logs the spec's section 3 cost model from the model's real
shapes (``moda_lightning.flops``); during training it is Lightning's ``ThroughputMonitor``
with the FLOPs per batch filled in, so tokens/s, FLOP/s and MFU are logged.
"""

from __future__ import annotations

import warnings

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from moda_lightning.callbacks.depth_stats import _config_of
from moda_lightning.callbacks.event_timed_throughput import EventTimedThroughput
from moda_lightning.callbacks.log_media import log_text
from moda_lightning.config import MoDAConfig
from moda_lightning.flops import (
    FlopsPerToken,
    executed_training_flops_per_token,
    flops_per_token,
    parameter_counts,
    training_flops_per_token,
)


def dense_peak_flops(device: torch.device, precision_plugin: Any) -> int | None:
    """The dense peak FLOP/s Lightning's table lacks for a device, or None to keep Lightning's figure.

    An H200 reports itself as "NVIDIA H200", which Lightning's table does not match (it lists
    "H200 SXM1" and "H200 NVL1", with the with-sparsity figures). The H200 is the H100 SXM's GH100
    chip at the same clocks with more and faster memory, so its dense peak is the H100 SXM's.
    """
    if device.type != "cuda" or "h200" not in torch.cuda.get_device_name(device).lower():
        return None
    from lightning.fabric.utilities.throughput import _CUDA_FLOPS
    from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

    dtype = _plugin_to_compute_dtype(precision_plugin)
    if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
        dtype = "tfloat32"
    peak = _CUDA_FLOPS["h100 sxm"].get(dtype)
    return None if peak is None else int(peak)


def _batch_size(batch: Tensor) -> int:
    return batch.shape[0]


def _batch_tokens(batch: Tensor) -> int:
    # A [B, T+1] batch trains on B*T tokens (the last column is only a target).
    return batch.shape[0] * (batch.shape[1] - 1)


def measure_training_step(model: nn.Module, batch: Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs that ``FlopCounterMode`` counts for one forward + backward of ``model`` on ``batch [B, T+1]``.

    Leaves the parameters' ``.grad`` as they were. Returns ``(total, {op name: FLOPs})``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        # The counter's notes on ops it counts approximately (e.g. grouped-query SDPA on some torch
        # versions) are not actionable here: the count is compared with the analytic one below.
        with warnings.catch_warnings(), FlopCounterMode(display=False) as counter:
            warnings.simplefilter("ignore")
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def executed_convention(cfg: MoDAConfig, op_names: list[str]) -> tuple[str | None, float, bool, str]:
    """How the FLOP counter saw attention in one step: ``(pairs, backward ratio, depth counted, description)``.

    Keyed on the ops it counted, so that what is compared is what ran.
    """
    if any(name.startswith("moda.") for name in op_names):
        return "causal", 2.5, True, "the fused MoDA op's formula: causal pairs + depth, backward 2.5x"
    if any("scaled_dot_product" in name or "_attention_forward" in name for name in op_names):
        return "full", 2.5, False, "torch's SDPA formula: all T^2 pairs, backward 2.5x"
    if not cfg.reads_depth:
        return None, 0.0, False, "attention not counted: torch has no FLOP formula for the SDPA kernel it ran"
    return "full", 2.0, False, (
        "the reference op: dense matmuls over all T^2 pairs incl. masked ones, backward 2x; "
        "its depth part is a multiply-and-sum the counter does not see"
    )


class FlopsOverhead(EventTimedThroughput):
    """FLOPs and parameters of MoDA vs. the same model without it, and throughput during training.

    Per token, forward + backward (3x the forward), 2 FLOPs per multiply-add, causal attention
    counted as the ``T (T + 1) / 2`` pairs it really has (see :func:`moda_lightning.flops.flops_per_token`)::

        model    = L * [2D(2Hq d + 2Hk d) + 6DF]  +  2DV  +  L * 2Hq d (T+1)
                 + 4Hq d * sum_l S_l  +  (L-1) * n_proj * 4D Hk d          (all x3)
        baseline = model without the last two terms (depth attention, extra depth K/V projections)

    with ``S_l = l * slots_per_layer`` and ``n_proj`` = FFN KV + attention KV projections.
    Left out: softmax, norms, RoPE, SiLU, residual adds, embedding lookup, loss, optimizer.

    At fit start it also counts one training step of the real module (batch of 1 at the data's
    ``seq_len``) with ``FlopCounterMode`` and warns when that differs by more than ``tolerance``
    from the analytic count *as executed* (:func:`moda_lightning.flops.executed_training_flops_per_token`:
    the dense reference op computes all ``T^2`` pairs and its depth reads are elementwise, which
    the counter skips; torch's SDPA formula counts ``T^2``; the fused op counts causal pairs and
    depth; see :func:`executed_convention`). Logged once: ``flops/train_per_token``,
    ``flops/train_per_token_baseline``, ``flops/overhead_ratio``, ``flops/depth_overhead_ratio``,
    ``flops/proj_overhead_ratio``, ``flops/params``, ``flops/params_baseline``,
    ``flops/param_overhead_ratio``, ``flops/measured_per_token``, ``flops/executed_per_token``,
    ``flops/measured_over_executed`` and the text ``flops/table`` (to every logger that takes text,
    see :mod:`moda_lightning.callbacks.log_media`).

    During training it sets ``pl_module.flops_per_batch`` from the model count (causal pairs,
    the MFU convention) before each batch, and Lightning's ThroughputMonitor logs
    ``train/device/items_per_sec`` (tokens/s), ``train/device/flops_per_sec`` and, where the
    device's dense peak is known, ``train/device/mfu``.

    Args:
        window_size: batches in the rolling throughput window (ThroughputMonitor).
        measure: run the ``FlopCounterMode`` cross-check at fit start.
        tolerance: relative disagreement above which the cross-check warns.
        sync_every_batch: time training batches as ThroughputMonitor does, synchronizing the GPU at
            every batch end; ``false`` times them with CUDA events read at logging steps
            (``event_timed_throughput.py``), so the host may run ahead into the next step.
    """

    def __init__(
        self, window_size: int = 50, measure: bool = True, tolerance: float = 0.05, sync_every_batch: bool = True
    ) -> None:
        super().__init__(
            batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size, sync_every_batch=sync_every_batch
        )
        self.measure = measure
        self.tolerance = tolerance
        self.report: dict[str, float] = {}
        self._train_per_token: dict[int, int] = {}
        self._cfg: MoDAConfig | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # Lightning warns when it cannot name the chip; dense_peak_flops fills in the H200 below.
            warnings.filterwarnings("ignore", message="FLOPs not found for")
            super().setup(trainer, pl_module, stage)
        peak = dense_peak_flops(trainer.strategy.root_device, trainer.precision_plugin)
        if peak is not None:
            self.available_flops = peak
            for throughput in self._throughputs.values():
                throughput.available_flops = peak
        # A CPU has no peak to quote, and nobody reads MFU there; on an accelerator it is worth a line.
        if self.available_flops is None and trainer.is_global_zero and trainer.strategy.root_device.type != "cpu":
            rank_zero_info(
                f"FlopsOverhead: no known dense peak FLOP/s for device {trainer.strategy.root_device.type!r}; "
                "logging tokens/s and FLOP/s but not MFU."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = self._cfg = _config_of(pl_module)
        seq_len = getattr(trainer.datamodule, "seq_len", None) or cfg.max_seq_len
        train = training_flops_per_token(cfg, seq_len)
        params = parameter_counts(cfg)
        real_params = sum(p.numel() for p in pl_module.model.parameters())
        report = {
            "flops/train_per_token": train.total,
            "flops/train_per_token_baseline": train.baseline,
            "flops/overhead_ratio": train.overhead,
            "flops/depth_overhead_ratio": train.depth_attn_overhead,
            "flops/proj_overhead_ratio": train.proj_overhead,
            "flops/params": real_params,
            "flops/params_baseline": real_params - params.depth_proj,
            "flops/param_overhead_ratio": params.depth_proj / (real_params - params.depth_proj),
        }
        if real_params != params.total:
            rank_zero_warn(
                f"FlopsOverhead: the model has {real_params:,} parameters but the analytic count gives "
                f"{params.total:,}; moda_lightning.flops.parameter_counts no longer matches model.py."
            )
        convention = ""
        if self.measure:
            measured, convention = self._cross_check(trainer, pl_module, cfg, seq_len)
            report.update(measured)
        self.report = report
        table = format_table(cfg, seq_len, train, report, convention)
        rank_zero_info(table)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(report, step=trainer.global_step)
            # A markdown code block (4-space indent) keeps the columns aligned wherever it is rendered.
            text = "\n".join("    " + line for line in table.splitlines())
            log_text(trainer.loggers, "flops/table", text, trainer.global_step)

    def _cross_check(
        self, trainer: L.Trainer, pl_module: L.LightningModule, cfg: MoDAConfig, seq_len: int
    ) -> tuple[dict[str, float], str]:
        """Count one training step with FlopCounterMode and compare it with the analytic count as executed."""
        # Own generator: the check must not shift the run's random stream.
        batch = torch.randint(cfg.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)  # count the eager module
        try:
            with trainer.precision_plugin.train_step_context():
                measured, by_op = measure_training_step(model, batch.to(pl_module.device))
        except Exception as err:  # a FLOP formula that rejects the shapes must not stop training
            rank_zero_warn(
                f"FlopsOverhead: FlopCounterMode could not count a training step ({type(err).__name__}: {err}); "
                "skipping the cross-check. Torch's SDPA FLOP formula, for one, rejects grouped-query shapes "
                "(n_kv_heads < n_heads). The analytic figures are unaffected; pass measure=false to silence this."
            )
            return {}, ""
        pairs, attn_backward, depth, convention = executed_convention(cfg, list(by_op))
        executed = executed_training_flops_per_token(
            cfg, seq_len, pairs=pairs, attn_backward=attn_backward, depth=depth,
            recompute=bool(getattr(cfg, "activation_checkpointing", False)),
        )
        ratio = measured / seq_len / executed
        if abs(ratio - 1) > self.tolerance:
            rank_zero_warn(
                f"FlopsOverhead: FlopCounterMode counted {measured / seq_len:,.0f} FLOPs per token in one training "
                f"step, but the analytic count as executed ({convention}) is {executed:,}, off by "
                f"{100 * (ratio - 1):+.1f}% (tolerance {100 * self.tolerance:.0f}%). "
                "The model or its attention backend changed without moda_lightning/flops.py following."
            )
        report = {
            "flops/measured_per_token": measured / seq_len,
            "flops/executed_per_token": executed,
            "flops/measured_over_executed": ratio,
        }
        return report, convention

    def _per_token(self, seq_len: int, train: bool) -> int:
        key = seq_len if train else -seq_len
        if key not in self._train_per_token:
            assert self._cfg is not None
            fwd = flops_per_token(self._cfg, seq_len)
            self._train_per_token[key] = 3 * fwd.total if train else fwd.total
        return self._train_per_token[key]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.flops_per_batch = self._per_token(batch.shape[1] - 1, train=True) * _batch_tokens(batch)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._cfg is not None:
            pl_module.flops_per_batch = self._per_token(batch.shape[1] - 1, train=False) * _batch_tokens(batch)


def format_table(cfg: MoDAConfig, seq_len: int, train: FlopsPerToken, report: dict[str, float], convention: str) -> str:
    """The fit-start table: FLOPs per token of baseline and MoDA, the overhead split, parameters, the cross-check."""
    rows = [
        ("training FLOPs / token", f"{train.baseline:,}", f"{train.total:,}", f"{100 * train.overhead:+.2f}%"),
        ("  depth attention", "", f"{train.depth_attn:,}", f"{100 * train.depth_attn_overhead:+.2f}%"),
        ("  extra depth K/V projections", "", f"{train.depth_proj:,}", f"{100 * train.proj_overhead:+.2f}%"),
        (
            "parameters",
            f"{report['flops/params_baseline']:,}",
            f"{report['flops/params']:,}",
            f"{100 * report['flops/param_overhead_ratio']:+.2f}%",
        ),
    ]
    header = ("", "baseline", "MoDA", "overhead")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = [
        f"MoDA cost (attention={cfg.attention}, L={cfg.n_layers}, D={cfg.d_model}, Hq={cfg.n_heads}, Hk={cfg.n_kv_heads}, "
        f"d={cfg.head_dim}, T={seq_len}; forward+backward, causal pairs)",
    ]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    if "flops/measured_per_token" in report:
        lines.append(
            f"measured (FlopCounterMode, one step): {report['flops/measured_per_token']:,.0f} / token vs. analytic as executed "
            f"{report['flops/executed_per_token']:,} ({convention}): ratio {report['flops/measured_over_executed']:.4f}"
        )
    return "\n".join(lines)
