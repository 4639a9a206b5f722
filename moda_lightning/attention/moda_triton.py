"""Fused MoDA backend: the Triton kernel (CUDA only). Triton is imported on first use, not here."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from moda_kernels.moda_attn.grad_into import GradInto
from moda_lightning.attention import register_backend
from moda_lightning.attention.base import AttentionBackend
from moda_lightning.ops import moda_attention

_CPU_HINT = "Use --model.attention=moda_torch (the portable MoDA backend) or sdpa on this machine."


@register_backend("moda_triton")
class MoDATritonBackend(AttentionBackend):
    """MoDA through ``moda_attention(..., backend="moda_triton")``: the fused Triton kernel."""

    reads_slot_lists = True
    decodes = True  # decode steps and padded prompts run the op's decode kernels (below)
    takes_depth_grad_into = True  # the backward kernel adds slot gradients into the stream's buffer

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(f"attention backend 'moda_triton' needs a CUDA GPU, and none is visible. {_CPU_HINT}")
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError(f"attention backend 'moda_triton' needs the triton package, which is not installed. {_CPU_HINT}")
        # Register the op and its FLOP formula now, when the model is built: a FlopCounterMode
        # copies the formula registry when it is created, so an op first imported inside one
        # would not be counted.
        importlib.import_module("moda_kernels.moda_attn.function")

    def check_device(self, device_type: str) -> None:
        if device_type != "cuda":
            raise RuntimeError(
                f"attention backend 'moda_triton' runs on CUDA tensors only; the model is on {device_type!r}. {_CPU_HINT}"
            )

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        depth_k: Tensor | None = None,
        depth_v: Tensor | None = None,
        *,
        num_depth: int = 0,
        scale: float | None = None,
        depth_grad_into: GradInto | None = None,
        q_depth: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        if key_mask is not None or k.shape[1] != q.shape[1]:
            # Decode steps (fewer queries than keys) and padded prompts: the op's decode kernels,
            # forward only. A call that needs gradients, or CPU tensors outside Triton's
            # interpreter, runs the reference op: the same math, differentiable, on any device.
            slots = list(depth_k) + list(depth_v) if isinstance(depth_k, (list, tuple)) else [depth_k, depth_v]
            inputs = [q, k, v, q_depth, *slots]
            needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
            if not needs_grad and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
                from moda_kernels.moda_attn import moda_attn

                return moda_attn(
                    q, k, v, depth_k, depth_v, num_depth=num_depth, scale=scale, q_depth=q_depth, key_mask=key_mask
                )
            return moda_attention(
                q, k, v, depth_k, depth_v,
                num_depth=num_depth, scale=scale, backend="moda_torch", q_depth=q_depth, key_mask=key_mask,
            )  # fmt: skip
        return moda_attention(
            q, k, v, depth_k, depth_v,
            num_depth=num_depth, scale=scale, backend="moda_triton", depth_grad_into=depth_grad_into, q_depth=q_depth,
        )  # fmt: skip
