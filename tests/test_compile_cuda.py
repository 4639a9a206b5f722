"""On a GPU: the fused backend compiles into one graph, and a compiled or CUDA-graphed training step
inside Lightning (bf16-mixed, gradient clipping, gradient accumulation) trains as the eager one does."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moda_lightning.config import MoDAConfig
from moda_lightning.lightning_module import MoDALightningModule
from moda_lightning.model import MoDATransformer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128)


@pytest.mark.parametrize("options", [dict(), dict(norm="post", depth_keys="reader"), dict(attn_kv_proj=True)], ids=str)
def test_the_fused_backend_compiles_into_one_graph_that_equals_eager(options):
    torch.manual_seed(0)
    model = MoDATransformer(MoDAConfig(attention="moda_triton", **SHAPE, **options)).cuda()
    idx = torch.randint(0, 256, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()

    def loss_and_grads(network):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = network(idx).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager = loss_and_grads(model)
    compiled_loss, compiled = loss_and_grads(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled_loss, eager_loss, atol=2e-2, rtol=2e-2)
    for name, grad in eager.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (compiled[name] - grad).abs().max() / scale < 0.05, name


def tiny_module(compile_mode: str | None, **options) -> MoDALightningModule:
    """The tiny fused-backend module these runs train, seeded; ``compile_mode`` None: eager."""
    L.seed_everything(0)
    return MoDALightningModule(**SHAPE, attention="moda_triton", lr=1e-3, warmup_steps=2, **options,
                               compile=compile_mode is not None, compile_mode=compile_mode or "default")  # fmt: skip


def token_windows(n: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (129,), generator=generator) for _ in range(n)]


def gpu_trainer(**kwargs) -> L.Trainer:
    """bf16-mixed on one GPU with clipping 1.0, and nothing saved or shown unless ``kwargs`` say so."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", gradient_clip_val=1.0, **(defaults | kwargs))


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_losses(compile_mode: str | None, steps: int = 6, **options) -> list[float]:
    """Per-step training losses of a tiny run: bf16-mixed, clipping 1.0, 2 micro-batches per step."""
    module = tiny_module(compile_mode, **options)
    data = token_windows(4 * 2 * steps, torch.Generator().manual_seed(0))
    record = RecordLosses()
    trainer = gpu_trainer(max_steps=steps, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, DataLoader(data, batch_size=4))
    return record.losses


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "activation checkpointing"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_or_graphed_training_step_trains_as_the_eager_one(mode, checkpointing):
    """With activation checkpointing too: the network is still one graph, whose backward recomputes
    the layers (``trace_checkpointed_writes``). The run after it checks that compiling a checkpointed
    network leaves the next one whole (the cause of a failure these tests once showed in this order)."""
    eager = train_losses(None, activation_checkpointing=checkpointing)
    other = train_losses(mode, activation_checkpointing=checkpointing)
    assert len(other) == len(eager) == 12
    for step, (a, b) in enumerate(zip(eager, other)):
        assert abs(a - b) < 0.02 * abs(a), f"micro-batch {step}: eager {a:.4f}, {mode} {b:.4f}"


def fit_with_validation(compile_mode: str | None, save_dir) -> tuple[list[float], list[float]]:
    """Validation losses and the depth probe's last mean mass of a tiny run with the GPU config's
    callbacks: validation and the probe every 2 steps, both between replayed training steps."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from moda_lightning.callbacks import DepthAttentionStats, FlopsOverhead
    from moda_lightning.study.results import read_scalars

    module = tiny_module(compile_mode)
    generator = torch.Generator().manual_seed(0)
    train, val = token_windows(4 * 6, generator), token_windows(4 * 2, generator)
    logger = TensorBoardLogger(save_dir, name="", version=str(compile_mode))
    callbacks = [DepthAttentionStats(every_n_steps=2, probe_batch_size=2), FlopsOverhead(window_size=2)]
    trainer = gpu_trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                          logger=logger, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, DataLoader(train, batch_size=4), DataLoader(val, batch_size=4))
    scalars = read_scalars(logger.log_dir)
    return [v for _, v in scalars["val/loss"]], [v for _, v in scalars["depth_attn/mean_mass"]]


def test_a_graphed_run_validates_and_probes_depth_as_the_eager_one(tmp_path):
    eager_val, eager_mass = fit_with_validation(None, tmp_path)
    graphed_val, graphed_mass = fit_with_validation("reduce-overhead", tmp_path)
    assert len(graphed_val) == len(eager_val) == 3 and len(graphed_mass) == len(eager_mass) == 3
    for step, (a, b) in enumerate(zip(eager_val, graphed_val)):
        assert abs(a - b) < 0.02 * abs(a), f"validation {step}: eager {a:.4f}, graphed {b:.4f}"
    for step, (a, b) in enumerate(zip(eager_mass, graphed_mass)):
        assert abs(a - b) < 0.05, f"depth mass at probe {step}: eager {a:.4f}, graphed {b:.4f}"


def graphed_losses(max_steps: int, save_to=None, resume_from=None) -> list[float]:
    """Per-step losses of a tiny CUDA-graphed run over 4 batches an epoch (unshuffled), saving a
    checkpoint at its end to ``save_to`` or resuming from ``resume_from``."""
    module = tiny_module("reduce-overhead")
    data = token_windows(4 * 4, torch.Generator().manual_seed(0))
    record = RecordLosses()
    trainer = gpu_trainer(max_steps=max_steps, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, DataLoader(data, batch_size=4), ckpt_path=resume_from)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return record.losses


def test_a_graphed_run_resumed_from_its_checkpoint_trains_on_as_the_uninterrupted_one(tmp_path):
    whole = graphed_losses(8)
    first = graphed_losses(4, save_to=tmp_path / "epoch1.ckpt")
    rest = graphed_losses(8, resume_from=tmp_path / "epoch1.ckpt")
    assert len(whole) == 8 and len(first) == 4 and len(rest) == 4
    for step, (a, b) in enumerate(zip(whole, first + rest)):
        assert abs(a - b) < 0.02 * abs(a), f"step {step}: uninterrupted {a:.4f}, resumed {b:.4f}"
