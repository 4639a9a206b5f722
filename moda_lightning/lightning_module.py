"""MoDALightningModule: next-token training of a MoDA language model in Lightning.

Architecture flags are init arguments (``--model.attention=sdpa``, ``--model.norm=post``)
collected into a :class:`MoDAConfig`; the optimizer is AdamW with linear warmup and cosine
decay to a fraction of the peak (the paper's recipe).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from moda_lightning.checkpoint import add_checksum
from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer


# Fields that do not change the weights: how attention is computed (for the same math), how the
# network is initialised, recomputation, the longest sequence (rotary tables are not weights).
_NOT_ARCHITECTURE = {"attention", "plugins", "init_std", "init_scheme", "max_seq_len"}
_SAME_MATH = [{"moda_torch", "moda_triton"}]

GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that replay CUDA graphs


def check_same_architecture(config: MoDAConfig, exported: MoDAConfig, folder: str) -> None:
    """Raise ValueError, listing the ``--model.*`` flags that would match, if the exported folder's
    network is not the one ``config`` builds."""
    differ = {
        f.name: getattr(exported, f.name)
        for f in dataclasses.fields(MoDAConfig)
        if f.name not in _NOT_ARCHITECTURE and getattr(exported, f.name) != getattr(config, f.name)
    }
    backends = {exported.attention, config.attention}
    if len(backends) > 1 and not any(backends <= same for same in _SAME_MATH):
        differ["attention"] = exported.attention
    if differ:
        flags = " ".join(f"--model.{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in differ.items())
        raise ValueError(
            f"--model.init_from={folder} holds another architecture than this run's model; pass {flags} "
            "(or leave out --model.init_from)."
        )


def exported_weights_for(config: MoDAConfig, folder: str) -> dict[str, Tensor]:
    """The weights of an exported folder (``moda export``) for a network built from ``config``.

    Raises:
        ValueError: if the folder is not an export, or describes another architecture.
    """
    from moda_lightning.export.hf import load_exported

    exported, state = load_exported(folder)
    check_same_architecture(config, exported, folder)
    return state


class MoDALightningModule(L.LightningModule):
    """A MoDA (or baseline) decoder-only LM trained on ``[B, T+1]`` token batches.

    Args:
        vocab_size: token vocabulary; the CLI links it from the data module's tokenizer.
        d_model: model width D.
        n_layers: number of layers L.
        n_heads: query heads Hq.
        n_kv_heads: key/value heads Hk (Hq must be a multiple of Hk).
        head_dim: head size d (default D / Hq).
        ffn_hidden: SwiGLU hidden width (default 8/3 D rounded up to a multiple of 64).
        max_seq_len: longest sequence the model accepts.
        plugins: Python modules imported before the model is built, so that the attention backends
            and norm placements they register are selectable by key
            (``--model.plugins='[my_pkg.backends]'``). Saved with the hyperparameters, so loading a
            checkpoint imports them again.
        attention: attention backend: 'sdpa' (baseline, no depth), 'moda_torch' (portable MoDA),
            'moda_triton' (fused MoDA kernel, CUDA), or a key one of ``plugins`` registers.
        norm: norm placement: 'pre' x+f(norm(x)), 'post' norm(x+f(x)), 'olmo2' x+norm(f(x)),
            or a key one of ``plugins`` registers.
        depth_kv: write each attention's K/V into the depth stream (default: on for MoDA backends).
        ffn_kv: add a depth slot projected from each FFN input (default: on for MoDA backends).
        attn_kv_proj: the attention's depth slot gets its own K/V projection (Table 3, row 5).
        depth_keys: 'writer' (a slot's key as its sublayer used it, normed and rotated) or 'reader'
            (the raw key; the reading layer applies its own key norm and no rotation).
        qk_norm: RMSNorm of queries and keys.
        qk_norm_scope: 'head' (per head, one d-wide gain) or 'full' (over the whole projection).
        linear_bias: biases on every linear map but the LM head.
        last_layer_depth_proj: the last layer gets depth projections too (never read; for parameter counts).
        tie_embeddings: share input embedding and output projection.
        rope_theta: RoPE base.
        init_std: std of the normal weight init.
        init_scheme: 'gpt2' (residual output projections scaled by 1/sqrt(2L)) or 'olmo2' (truncated
            normal, unscaled); either way each weight is seeded by its name (paired initialisation).
        activation_checkpointing: recompute each layer in the backward pass to save memory.
        z_loss: weight of the auxiliary loss ``mean(logsumexp(logits)^2)`` that keeps the output
            logits from drifting (OLMo2 trains with 1e-5); 0 turns it off.
        lr: peak learning rate.
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio``.
        warmup_steps: linear warmup steps (an int) or fraction of all steps (a float < 1).
        weight_decay: AdamW weight decay on matrices (not on norms or embeddings).
        betas: AdamW betas.
        compile: compile the network (not this module) with ``torch.compile``.
        init_from: a folder written by ``moda export`` (a Hugging Face model folder) whose weights
            this run starts from; the model flags must describe the same architecture (a mismatch
            is refused, with the flags to pass). Optimizer state and step count start fresh.
        compile_mode: ``torch.compile``'s mode: 'default'; 'reduce-overhead' replays the compiled
            forward and backward as CUDA graphs, so the GPU no longer waits for Python to issue each
            kernel (the host gap of a launch-bound step); 'max-autotune' also tunes matmuls;
            'max-autotune-no-cudagraphs' tunes without graphs.
    """

    def __init__(
        self,
        vocab_size: int = 0,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        head_dim: int | None = None,
        ffn_hidden: int | None = None,
        max_seq_len: int = 1024,
        plugins: list[str] | None = None,
        attention: str = "moda_torch",
        norm: str = "pre",
        depth_kv: bool | None = None,
        ffn_kv: bool | None = None,
        attn_kv_proj: bool = False,
        depth_keys: str = "writer",
        qk_norm: bool = True,
        qk_norm_scope: str = "head",
        linear_bias: bool = False,
        last_layer_depth_proj: bool = False,
        tie_embeddings: bool = False,
        rope_theta: float = 10000.0,
        init_std: float = 0.02,
        init_scheme: str = "gpt2",
        activation_checkpointing: bool = False,
        z_loss: float = 0.0,
        lr: float = 3e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int | float = 0.05,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if vocab_size < 1:
            raise ValueError(
                "vocab_size is not set: run through `moda fit`, which links it from the data module's tokenizer, "
                "or pass vocab_size=len(tokenizer) when building the module yourself."
            )
        check_training_args(lr, min_lr_ratio, warmup_steps, weight_decay, betas, z_loss)
        # Every init argument that is a MoDAConfig field goes to the config (None: its default).
        self.config = MoDAConfig.from_mapping(self.hparams)
        self.model = MoDATransformer(self.config)
        if init_from:
            self.model.load_state_dict(exported_weights_for(self.config, init_from))
        self.val_loss = MeanMetric()
        self.tokens_seen = 0

    def configure_model(self) -> None:
        # Compile the network, not the LightningModule: a compiled training_step that calls
        # self.log breaks on recent torch.
        if self.hparams.compile and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            if self.config.reads_depth and not self.model.backend.reads_slot_lists:
                rank_zero_warn(
                    f"compile=true with the depth stream ({self.config.attention!r}): this backend reads the "
                    "[B, T, S, Hk, d] buffer, whose writes and reads run eagerly, so each layer compiles into several "
                    "graphs; a backend that sets reads_slot_lists=True compiles into one. Compare a few hundred "
                    "steps both ways."
                )
            mode = self.hparams.get("compile_mode", "default")
            check_graphs_on_one_process(mode, self._trainer.world_size if self._trainer is not None else 1)
            self.model = torch.compile(self.model, mode=None if mode == "default" else mode)
            # Otherwise the first steps look stuck: compiling is done in them, not here.
            rank_zero_info(
                f"moda: torch.compile (mode {mode!r}): the first training step, and the first validation step, "
                "compile the network (a minute or more); the steps after them run the compiled code"
                + (" as replayed CUDA graphs." if mode in GRAPH_MODES else ".")
            )

    def _replays_cuda_graphs(self) -> bool:
        return bool(self.hparams.compile) and self.hparams.get("compile_mode") in GRAPH_MODES

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._replays_cuda_graphs():
            # A new iteration: the previous replay's outputs (its logits) may be overwritten now.
            torch.compiler.cudagraph_mark_step_begin()

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.on_train_batch_start(batch, batch_idx)

    def on_train_start(self) -> None:
        if self._replays_cuda_graphs():
            # A replayed backward returns its gradients in the graph's own memory, which the next
            # replay overwrites. Autograd would make such a tensor a parameter's .grad when .grad is
            # None, so gradient accumulation would add to memory the next micro-batch overwrites.
            # With .grad allocated here and only zeroed (optimizer_zero_grad), autograd adds into it.
            for p in self.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self._replays_cuda_graphs())

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``."""
        return self.model(idx)

    def _loss(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """Mean next-token cross-entropy and, with ``z_loss``, the mean squared log-partition."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self.model(inputs).float().flatten(0, 1)
        ce = F.cross_entropy(logits, targets.flatten())
        z = torch.logsumexp(logits, dim=-1).square().mean() if self.hparams.z_loss else None
        return ce, z

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, z = self._loss(batch)
        self.tokens_seen += batch[:, 1:].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)  # the cross-entropy alone, comparable across runs
        self.log("train/ppl", torch.exp(loss.detach()))
        self.log("train/tokens_seen", float(self.tokens_seen))
        if z is not None:
            self.log("train/z_loss", z)
            return loss + self.hparams.z_loss * z
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        # Every batch holds the same number of tokens, so the batch mean is the token mean.
        self.val_loss.update(loss)

    def on_validation_epoch_end(self) -> None:
        mean_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", mean_loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(mean_loss))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                # Named so the LR monitor logs `lr-AdamW/matrices` rather than `pg1`.
                {"params": decay, "weight_decay": self.hparams.weight_decay, "name": "matrices"},
                {"params": no_decay, "weight_decay": 0.0, "name": "norms_and_embeddings"},
            ],
            lr=self.hparams.lr,
            betas=self.hparams.betas,
        )  # not fused: Lightning clips gradients before the step, which a fused AdamW forbids
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = self.hparams.warmup_steps
        warmup = int(warm * total) if isinstance(warm, float) and warm < 1 else int(warm)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP's own method takes the
            # norm over every rank's shards, as clipping the unsharded model would.
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        # Lightning calls this hook last, so the checksum covers the tensors as they are written;
        # only the rank that writes the file pays for it. `moda fit --ckpt_path` verifies it.
        if self._trainer is None or self._trainer.is_global_zero:
            add_checksum(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved_vocab = checkpoint.get("hyper_parameters", {}).get("vocab_size")
        if saved_vocab is not None and saved_vocab != self.config.vocab_size:
            raise ValueError(
                f"the checkpoint was trained with a vocabulary of {saved_vocab} tokens, but the current tokenizer has "
                f"{self.config.vocab_size}. Resume with the tokenizer the run was trained with "
                "(--data.tokenizer=<run folder>/tokenizer.json, or the same corpus and --data.tokenizer_vocab_size)."
            )
        self.tokens_seen = checkpoint.get("tokens_seen", 0)


def check_graphs_on_one_process(compile_mode: str, world_size: int) -> None:
    """Refuse CUDA-graph replay in a run of several processes: it is tested on one GPU only (a
    replayed backward hands its gradients back in the graph's memory, and DDP's and FSDP's gradient
    hooks and buckets have not been checked against that)."""
    if compile_mode in GRAPH_MODES and world_size > 1:
        raise ValueError(
            f"compile_mode={compile_mode!r} replays CUDA graphs, tested on one GPU only; for {world_size} processes "
            "pass --model.compile=false (eager, as docs/scaling.md measures several GPUs) or --model.compile_mode=default"
        )


def check_training_args(
    lr: float, min_lr_ratio: float, warmup_steps: int | float, weight_decay: float, betas: tuple[float, float], z_loss: float
) -> None:
    """Refuse optimiser settings that would train on silently (a flat loss at lr=0, a schedule bent
    by a negative warmup); every problem in one error."""
    problems = []
    if not lr > 0:
        problems.append(f"lr={lr}: the peak learning rate must be > 0 (e.g. --model.lr=3e-4)")
    if not 0 <= min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio={min_lr_ratio}: the cosine floor is a fraction of lr in [0, 1]")
    if warmup_steps < 0:
        problems.append(f"warmup_steps={warmup_steps}: give a step count >= 0 or a fraction in [0, 1)")
    if weight_decay < 0:
        problems.append(f"weight_decay={weight_decay}: must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        problems.append(f"betas={tuple(betas)}: AdamW needs two values in [0, 1), e.g. [0.9, 0.95]")
    if z_loss < 0:
        problems.append(f"z_loss={z_loss}: the weight of the z-loss must be >= 0 (0 turns it off)")
    if problems:
        raise ValueError("invalid training arguments: " + "; ".join(problems) + ".")


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear from 0 to 1 over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
