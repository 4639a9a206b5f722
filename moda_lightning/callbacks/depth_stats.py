"""DepthAttentionStats: how much each layer and head reads the depth stream, logged to every logger.

Every ``every_n_steps`` optimizer steps, and at the run's last step, the callback runs one forward pass on a fixed probe
batch from the validation data, without gradients, with each layer's attention backend
wrapped by a probe that records the statistics of the softmax rows; then it restores the
backends. The model files need no hooks for this. Figures come from ``figures.py`` and reach
each logger through ``log_media.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn

from moda_lightning.callbacks.figures import heatmap_figure, histogram_figure
from moda_lightning.callbacks.log_media import log_figure, log_histogram, log_text
from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDAAttention

@dataclass
class LayerStats:
    """One layer's attention rows on the probe batch (float32, on the model's device).

    Attributes:
        mass: ``[B, T, Hq]`` depth mass of each row, ``exp(lse_depth - lse)``.
        slot_mass: ``[S]`` probability on each depth slot, averaged over rows (sums to the mean mass).
        sink: ``[B, T, Hq]`` probability on sequence token 0.
        entropy: ``[B, T, Hq]`` entropy (nats) of the whole ``[sequence | depth]`` row.
    """

    mass: Tensor
    slot_mass: Tensor
    sink: Tensor
    entropy: Tensor

    @property
    def num_depth(self) -> int:
        return self.slot_mass.numel()


@torch.no_grad()
def attention_row_stats(
    q: Tensor,
    k: Tensor,
    depth_k: Tensor | None = None,
    *,
    num_depth: int = 0,
    scale: float | None = None,
    max_chunk_elems: int = 2**24,
    q_depth: Tensor | None = None,
) -> LayerStats:
    """Statistics of the causal MoDA softmax rows, recomputed from ``q``, ``k`` and the depth keys.

    With ``s_j``, ``r_s`` the sequence and depth logits of a row and ``p`` its softmax over
    ``[s_0 .. s_t | r_0 .. r_{S-1}]`` (the definition of ``moda_attention``; ``r_s`` uses
    ``q_depth`` when given, as the op does)::

        depth mass    = sum_s p_s  (= exp(lse_depth - lse) of the op)
        slot mass[s]  = mean over rows of p_s
        sink          = p_0        (token 0 is visible to every causal row)
        entropy       = -sum p log p over the whole row

    Computed in float32 (autocast off), in query chunks of at most ``max_chunk_elems`` logits so
    the probe fits in memory at long T. Values are not needed, so any backend's ``o`` can be kept.

    Args:
        q: ``[B, T, Hq, d]``.
        k: ``[B, T, Hk, d]``.
        depth_k: ``[B, T, S, Hk, d]`` or ``None``; the first ``num_depth`` slots are read.
        num_depth: valid depth slots.
        scale: logit scale, default ``d ** -0.5``.
        max_chunk_elems: logits held at once.
        q_depth: ``[B, T, Hq, d]``, the query of the depth logits (default: ``q``).
    """
    B, T, Hq, d = q.shape
    Hk = k.shape[2]
    G = Hq // Hk
    S = num_depth if depth_k is not None else 0
    scale = d**-0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        q_g = q.float().view(B, T, Hk, G, d)
        qd_g = q_g if q_depth is None else q_depth.float().reshape(B, T, Hk, G, d)
        kf = k.float()
        mass, sink, entropy = (q.new_zeros(B, T, Hk, G, dtype=torch.float32) for _ in range(3))
        slot_sum = q.new_zeros(S, dtype=torch.float32)
        chunk = max(1, max_chunk_elems // (B * Hq * (T + S)))
        positions = torch.arange(T, device=q.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            # Sequence logits of the chunk's queries [B, C, Hk, G, T], future keys masked out.
            logits = torch.einsum("bckgd,bjkd->bckgj", q_g[:, t0:t1], kf) * scale
            future = positions[None, :] > positions[t0:t1, None]  # [C, T]
            logits = logits.masked_fill(future[None, :, None, None, :], float("-inf"))
            if S > 0:
                # Each token's own depth slots [B, C, Hk, G, S], after the sequence keys.
                depth = torch.einsum("bckgd,bcskd->bckgs", qd_g[:, t0:t1], depth_k[:, t0:t1, :S].float()) * scale
                logits = torch.cat([logits, depth], dim=-1)
            p = torch.softmax(logits, dim=-1)
            sink[:, t0:t1] = p[..., 0]
            entropy[:, t0:t1] = torch.special.entr(p).sum(-1)
            if S > 0:
                mass[:, t0:t1] = p[..., T:].sum(-1)
                slot_sum += p[..., T:].sum(dim=(0, 1, 2, 3))
    rows = lambda x: x.reshape(B, T, Hq)  # noqa: E731
    return LayerStats(mass=rows(mass), slot_mass=slot_sum / (B * T * Hq), sink=rows(sink), entropy=rows(entropy))


class _ProbeBackend:
    """Stands in for one layer's attention backend during the probe pass: the backend computes
    the output as in training, and the rows' statistics are recorded on the side."""

    def __init__(self, backend: Any, records: list[LayerStats]) -> None:
        self.backend, self.records = backend, records
        self.reads_depth = getattr(backend, "reads_depth", True)
        self.takes_depth_grad_into = False  # the probe runs without gradients

    def check_device(self, device_type: str) -> None:
        self.backend.check_device(device_type)

    def __call__(
        self, q, k, v, depth_k=None, depth_v=None, *, num_depth: int = 0, scale: float | None = None, q_depth=None
    ) -> Tensor:
        # the slot-list stream, stacked once for the statistics (a probe under no_grad: nothing is saved)
        stacked_k = torch.stack(depth_k, 2) if isinstance(depth_k, (list, tuple)) else depth_k
        self.records.append(attention_row_stats(q, k, stacked_k, num_depth=num_depth, scale=scale, q_depth=q_depth))
        # q_depth only where the model gave one: a backend that reads no depth need not take it
        extra = {} if q_depth is None else {"q_depth": q_depth}
        return self.backend(q, k, v, depth_k, depth_v, num_depth=num_depth, scale=scale, **extra)


def slot_labels(cfg: MoDAConfig) -> list[str]:
    """Which sublayer wrote each depth slot, in stream order (``L00.attn``, ``L00.ffn``, ``L01.attn``, ...)."""
    kinds = [kind for kind, on in (("attn", cfg.depth_kv), ("ffn", cfg.ffn_kv)) if on]
    return [f"L{layer:02d}.{kind}" for layer in range(cfg.n_layers - 1) for kind in kinds]


class DepthAttentionStats(L.Callback):
    """Logs where attention mass goes, per layer and head: depth stream, slots, sink token, entropy.

    Statistics (means over the probe batch's rows, i.e. tokens and heads, per layer):

    - ``depth_attn/layer_LL/mass`` and ``mass_std``: softmax mass on the depth slots,
      ``exp(lse_depth - lse)``; ``mass_attn_slots`` / ``mass_ffn_slots`` split it by the kind of
      sublayer that wrote the slot (when both kinds are on).
    - ``depth_attn/layer_LL/sink``: probability on sequence token 0 (the attention sink).
    - ``depth_attn/layer_LL/entropy``: entropy in nats of the whole ``[sequence | depth]`` row.
    - ``depth_attn/mean_mass``, ``mean_sink``, ``mean_entropy``: over layers (mass over the layers
      that read depth, i.e. not layer 0); ``depth_attn/probe_seconds``: the time of the probe and
      of logging its results (figures included).
    - figures ``depth_attn/mass_layer_x_head`` and ``depth_attn/mass_layer_x_slot`` (the paper's
      Figure 5; rows are layers, columns query heads or depth slots named by the sublayer that
      wrote them, e.g. ``L03.ffn``; colours from 0 to the map's maximum, on the colour bar; grey =
      nothing read), ``depth_attn/mass_hist`` (one histogram of per-row mass per reading layer),
      and the text legend ``depth_attn/slot_legend`` of the slots, once.
    - TensorBoard also gets native histograms ``depth_attn/layer_LL/mass_hist``.

    Scalars go to every logger through ``log_metrics``; figures and text through
    :mod:`moda_lightning.callbacks.log_media` (TensorBoard, CSV files under ``log_dir/media/``,
    W&B, MLflow; other loggers get the scalars and one warning).

    Rows include every token and query head; token 0's row always puts ``1 - mass`` on the sink.
    With a backend that reads no depth (``sdpa``) only sink and entropy are logged. Each layer's
    backend still computes its output (so any backend works), and the statistics come from the
    same ``q``, ``k``, depth keys and depth query (``q_depth``, when the model passes one) through
    a float32 recomputation of the softmax rows, the definition of the MoDA op
    (:func:`attention_row_stats`). The probe runs on every rank (sharded
    models need all ranks in a forward); only rank zero logs. A failing probe (e.g. out of
    memory) warns and turns the callback off instead of ending the run.

    Args:
        every_n_steps: optimizer steps between probes; the last step of a run with ``max_steps``
            is probed as well. The probe's forward pass costs 0.25% of
            training time on the CPU default config and 1.5% at the Table 6 shape on an H100
            (docs/flops.md). Drawing and logging the three figures adds about 0.35 s per probe at
            the default config and 0.85 s at 24 layers x 16 heads (one thread of a shared 2-core
            Xeon, 2026-12-01), which can outweigh the probe: hence ``figures_every_n_steps``.
        probe_batch_size: rows of the first validation batch kept as the probe batch.
        figures_every_n_steps: optimizer steps between the figures and histograms (a multiple of
            ``every_n_steps``; default ten probes). The last probe of a run always gets them.
    """

    def __init__(self, every_n_steps: int = 50, probe_batch_size: int = 4, figures_every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps < 1 or probe_batch_size < 1:
            raise ValueError(
                f"DepthAttentionStats: every_n_steps={every_n_steps} and probe_batch_size={probe_batch_size} "
                "must both be positive integers, e.g. every_n_steps=50, probe_batch_size=4."
            )
        figures_every_n_steps = 10 * every_n_steps if figures_every_n_steps is None else figures_every_n_steps
        if figures_every_n_steps < 1 or figures_every_n_steps % every_n_steps:
            raise ValueError(
                f"DepthAttentionStats: figures_every_n_steps={figures_every_n_steps} must be a positive multiple of "
                f"every_n_steps={every_n_steps} (figures are drawn from a probe), e.g. {10 * every_n_steps}."
            )
        self.figures_every_n_steps = figures_every_n_steps
        self._unfigured: tuple[list[LayerStats], MoDAConfig, int] | None = None  # the last probe, if not drawn
        self.every_n_steps = every_n_steps
        self.probe_batch_size = probe_batch_size
        self._probe: Tensor | None = None
        self._last_step = -1
        self._legend_written = False
        self.last_duration_s = 0.0
        self.total_duration_s = 0.0

    # --- probing ------------------------------------------------------------------------------

    def collect(self, model: nn.Module, cfg: MoDAConfig, inputs: Tensor) -> list[LayerStats]:
        """Run ``model(inputs)`` without gradients and return one :class:`LayerStats` per attention layer."""
        model = getattr(model, "_orig_mod", model)  # probe the eager module under torch.compile
        layers = [m for m in model.modules() if isinstance(m, MoDAAttention)]
        records: list[list[LayerStats]] = [[] for _ in layers]
        saved = [layer.backend for layer in layers]
        try:
            for layer, rec in zip(layers, records):
                layer.backend = _ProbeBackend(layer.backend, rec)
            with torch.no_grad():
                model(inputs)
        finally:
            for layer, backend in zip(layers, saved):
                layer.backend = backend
        return [rec[0] for rec in records if rec]

    def scalars(self, stats: list[LayerStats], cfg: MoDAConfig) -> dict[str, float]:
        """The scalar statistics by TensorBoard tag (see the class docstring)."""
        out: dict[str, Tensor] = {}
        both_kinds = bool(cfg.depth_kv and cfg.ffn_kv)
        for idx, st in enumerate(stats):
            tag = f"depth_attn/layer_{idx:02d}"
            if cfg.reads_depth and st.num_depth > 0:
                out[f"{tag}/mass"] = st.mass.mean()
                out[f"{tag}/mass_std"] = st.mass.std() if st.mass.numel() > 1 else st.mass.new_zeros(())
                if both_kinds:
                    out[f"{tag}/mass_attn_slots"] = st.slot_mass[0::2].sum()
                    out[f"{tag}/mass_ffn_slots"] = st.slot_mass[1::2].sum()
            out[f"{tag}/sink"] = st.sink.mean()
            out[f"{tag}/entropy"] = st.entropy.mean()
        reading = [st.mass.mean() for st in stats if st.num_depth > 0]
        if cfg.reads_depth and reading:
            out["depth_attn/mean_mass"] = torch.stack(reading).mean()
        out["depth_attn/mean_sink"] = torch.stack([st.sink.mean() for st in stats]).mean()
        out["depth_attn/mean_entropy"] = torch.stack([st.entropy.mean() for st in stats]).mean()
        # One device-to-host copy for all of them.
        values = torch.stack(list(out.values())).float().cpu().tolist()
        return dict(zip(out, values))

    def heatmaps(self, stats: list[LayerStats], cfg: MoDAConfig) -> tuple[Tensor, Tensor]:
        """``[L, Hq]`` mean depth mass per head and ``[L, S]`` mean mass per slot (NaN where nothing is read)."""
        n_slots = (cfg.n_layers - 1) * cfg.slots_per_layer
        per_head = torch.stack([st.mass.mean(dim=(0, 1)) for st in stats]).float().cpu()
        per_head[[st.num_depth == 0 for st in stats]] = float("nan")  # layer 0 reads no depth
        per_slot = torch.full((len(stats), max(1, n_slots)), float("nan"))
        for idx, st in enumerate(stats):
            per_slot[idx, : st.num_depth] = st.slot_mass.float().cpu()
        return per_head, per_slot

    def figures(self, stats: list[LayerStats], cfg: MoDAConfig, step: int) -> dict[str, Figure]:
        """The heatmaps and the histogram figure by tag; none when no layer reads depth (e.g. ``sdpa``)."""
        if not (cfg.reads_depth and any(st.num_depth > 0 for st in stats)):
            return {}
        per_head, per_slot = self.heatmaps(stats, cfg)
        masses = [(idx, st.mass) for idx, st in enumerate(stats) if st.num_depth > 0]
        return {
            "depth_attn/mass_layer_x_head": heatmap_figure(
                per_head, step=step, title="Depth mass per layer and query head", xlabel="query head"
            ),
            "depth_attn/mass_layer_x_slot": heatmap_figure(
                per_slot, step=step, title="Depth mass per layer and depth slot", xlabel="depth slot (written by)",
                xticklabels=slot_labels(cfg),
            ),
            "depth_attn/mass_hist": histogram_figure(masses, step=step),
        }

    def log_stats(
        self, loggers: list[Logger], stats: list[LayerStats], cfg: MoDAConfig, step: int, figures: bool = True
    ) -> dict[str, float]:
        """Log the scalars, (with ``figures``) the figures and histograms, and once the slot legend, to
        every logger; returns the scalars."""
        scalars = self.scalars(stats, cfg)
        for logger in loggers:
            logger.log_metrics(scalars, step)
        if figures:
            self.log_figures(loggers, stats, cfg, step)
        return scalars

    def log_figures(self, loggers: list[Logger], stats: list[LayerStats], cfg: MoDAConfig, step: int) -> None:
        for tag, fig in self.figures(stats, cfg, step).items():
            log_figure(loggers, tag, fig, step)
        if cfg.reads_depth:
            for idx, st in enumerate(stats):
                if st.num_depth > 0:
                    log_histogram(loggers, f"depth_attn/layer_{idx:02d}/mass_hist", st.mass, step)
            if not self._legend_written:
                labels = slot_labels(cfg)
                legend = "slot | written by\n---|---\n" + "\n".join(f"{s} | {name}" for s, name in enumerate(labels))
                log_text(loggers, "depth_attn/slot_legend", legend, step)
                self._legend_written = True

    # --- Lightning hooks ----------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cfg = _config_of(pl_module)
        if not cfg.reads_depth:
            rank_zero_info(
                f"DepthAttentionStats: attention backend {cfg.attention!r} reads no depth stream, so the depth "
                "statistics do not apply; logging the attention-sink and entropy statistics only."
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self._unfigured is not None:  # the run's last picture of depth use
            self.log_figures(trainer.loggers, *self._unfigured)
            self._unfigured = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # The last step is probed too, so a run ends with its final picture of depth use
        # (what `moda study` reports), whatever every_n_steps is.
        final = 0 < trainer.max_steps <= step
        if (step % self.every_n_steps and not final) or step == self._last_step:
            return
        self._last_step = step
        start = time.perf_counter()
        cfg = _config_of(pl_module)
        inputs = self._probe_inputs(trainer, batch).to(pl_module.device)
        try:
            with trainer.precision_plugin.val_step_context():
                stats = self.collect(pl_module.model, cfg, inputs)
        except Exception as err:  # an instrument must not end a long run (e.g. out of memory at long T)
            self.every_n_steps = 2**62
            rank_zero_warn(
                f"DepthAttentionStats: the probe failed at step {step} ({type(err).__name__}: {err}); "
                "no more depth statistics in this run. Lower probe_batch_size if it ran out of memory."
            )
            return
        if trainer.is_global_zero:
            figures = step % self.figures_every_n_steps == 0
            self.log_stats(trainer.loggers, stats, cfg, step, figures=figures)
            self._unfigured = None if figures else (stats, cfg, step)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.last_duration_s = time.perf_counter() - start
        self.total_duration_s += self.last_duration_s
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"depth_attn/probe_seconds": self.last_duration_s}, step)

    def _probe_inputs(self, trainer: L.Trainer, batch: Any) -> Tensor:
        """The fixed probe inputs ``[b, T]``: the first validation batch, else the first logged training batch."""
        if self._probe is None:
            probe = None
            loaders = trainer.val_dataloaders
            if loaders is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
                try:
                    loaders = trainer.datamodule.val_dataloader()
                except Exception:  # a datamodule without validation data: fall back below
                    loaders = None
            if isinstance(loaders, (list, tuple)):
                loaders = loaders[0] if loaders else None
            if loaders is not None:
                probe = next(iter(loaders), None)
            if probe is None:
                rank_zero_info(
                    "DepthAttentionStats: no validation data; probing the first logged training batch instead."
                )
                probe = batch
            if not (isinstance(probe, Tensor) and probe.dim() == 2 and not probe.is_floating_point()):
                raise TypeError(
                    "DepthAttentionStats expects batches of token ids, an integer tensor [B, T+1] as TextDataModule "
                    f"yields; got {type(probe).__name__}"
                    + (f" of shape {list(probe.shape)} and dtype {probe.dtype}" if isinstance(probe, Tensor) else "")
                    + ". Wrap your data so that each batch is such a tensor."
                )
            self._probe = probe[: self.probe_batch_size, :-1].clone()
        return self._probe


def _config_of(pl_module: L.LightningModule) -> MoDAConfig:
    cfg = getattr(pl_module, "config", None)
    if not isinstance(cfg, MoDAConfig):
        raise TypeError(
            f"{type(pl_module).__name__} has no `config` MoDAConfig; the MoDA callbacks need a MoDALightningModule "
            "(or a LightningModule with `.config` and a MoDATransformer in `.model`)."
        )
    return cfg
