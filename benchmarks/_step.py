"""The timed GPU training step shared by train_memory.py and profile_step.py."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def training_step(network: torch.nn.Module, model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """A closure running one training step: bf16 autocast forward of ``network`` (``model`` or
    its compiled form), cross-entropy on the next tokens, backward, fused AdamW on ``model``.

    Args:
        network: what the forward calls: ``model`` itself or ``torch.compile(model)``.
        model: the module whose parameters the optimizer steps.
        tokens: int64 token ids ``[B, T+1]`` on the GPU; inputs ``[:, :-1]``, targets ``[:, 1:]``.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = network(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def median_step_ms(step: Callable[[], None], steps: int) -> float:
    """Median over ``steps`` calls of ``step`` of its GPU time, CUDA events around each call."""
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def unfuse_norm_rope() -> None:
    """Run the q/k RMSNorm and RoPE, and the reader depth keys' norm, as separate torch ops: the before
    of ``moda_kernels.norm_rope``."""
    import moda_lightning.model

    moda_lightning.model._has_triton = lambda: False  # norm_then_rope then takes the module path
