"""Data-parallel training: two processes give the gradients of one process on the whole batch.

On CPU with gloo and the portable backend (CI); on two GPUs with NCCL and the Triton backend
(``-m cuda``, on a machine with two GPUs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer

VOCAB = 40


def build_model(checkpointing: bool, attention: str = "moda_torch") -> MoDATransformer:
    torch.manual_seed(0)
    # head_dim 16: the smallest the Triton kernel takes
    cfg = MoDAConfig(vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
                     activation_checkpointing=checkpointing, attention=attention)
    return MoDATransformer(cfg)


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _worker(rank: int, world: int, port: int, out: str, checkpointing: bool, on_gpu: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share a 2-core CI machine
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    if on_gpu:
        torch.cuda.set_device(rank)
        model = torch.nn.parallel.DistributedDataParallel(build_model(checkpointing, "moda_triton").cuda(), device_ids=[rank])
    else:
        model = torch.nn.parallel.DistributedDataParallel(build_model(checkpointing))
    device = "cuda" if on_gpu else "cpu"
    loss_of(model, batch().chunk(world)[rank].to(device)).backward()  # DDP averages gradients over ranks
    if rank == 0:
        torch.save({n: p.grad.cpu() for n, p in model.module.named_parameters()}, out)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_two_process_ddp_matches_one_process(tmp_path, checkpointing):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, free_port(), out, checkpointing), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    model = build_model(checkpointing)
    loss_of(model, batch()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_two_gpu_ddp_with_the_triton_backend_matches_one_gpu(tmp_path, checkpointing):
    """The fused backend's depth gradients (summed in its kernel) survive DDP's bucketed all-reduce."""
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, free_port(), out, checkpointing, True), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    model = build_model(checkpointing, "moda_triton").cuda()
    loss_of(model, batch().cuda()).backward()
    # fp32 runs the kernels' matmuls in tf32; a missing or doubled depth gradient is far larger
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad.cpu(), atol=1e-4, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_moda_fit_with_lightning_ddp_on_cpu(tmp_path):
    """`moda fit --trainer.strategy=ddp --trainer.devices=2` trains through Lightning's own launcher."""
    moda = Path(sys.executable).with_name("moda")
    cmd = [
        str(moda), "fit", "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
        "--model.max_seq_len=32", "--data.tokenizer_vocab_size=300", "--data.seq_len=32", "--data.batch_size=4",
        f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    # Tokens are counted over both processes: 3 steps x 2 ranks x 4 sequences x 32 tokens.
    assert ckpt["global_step"] == 3 and ckpt["tokens_seen"] == 3 * 2 * 4 * 32


def test_fsdp_clips_gradients_with_fsdps_own_norm(monkeypatch):
    """Lightning's FSDP precision plugin refuses norm clipping; the module hands it to FSDP instead."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from moda_lightning.lightning_module import MoDALightningModule

    module = MoDALightningModule(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    clipped = []
    wrapped = SimpleNamespace(clip_grad_norm_=clipped.append)
    monkeypatch.setattr(MoDALightningModule, "trainer", SimpleNamespace(strategy=FSDPStrategy(), model=wrapped))
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert clipped == [1.0]

    elsewhere = []
    monkeypatch.setattr(MoDALightningModule, "clip_gradients", lambda self, *args: elsewhere.append(args))
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    assert clipped == [1.0] and elsewhere == [(None, 0.5, "value")]
