"""What the norm + RoPE kernel tests compare: output and both gradients against the float64 reference."""

from __future__ import annotations

import torch
from _tolerance import check_close

from moda_kernels.norm_rope import norm_rope_reference, unit_rms_reference


def rotary_tables(t_max: int, d: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The model's tables: ``cos, sin [t_max, d]`` float32, ``sin`` negated on the first half."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.outer(torch.arange(t_max, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([-angles.sin(), angles.sin()], -1)


def strided_inputs(B, T, H, d, dtype, device="cpu", seed=0):
    """``x`` as a column slice of a wider projection (as q and k come out of the fused qkv matmul)."""
    g = torch.Generator(device=device).manual_seed(seed)
    wide = torch.randn(B, T, H + 1, d, generator=g, device=device).mul(3).to(dtype)
    weight = (1 + 0.5 * torch.randn(d, generator=g, device=device)).to(dtype)
    dout = torch.randn(B, T, H, d, generator=g, device=device).to(dtype)
    return wide[:, :, 1:], weight, dout


def outputs_and_grads(fn, leaves, rest, dout, eps=1e-6):
    """``fn(*leaves, *rest, eps)``'s output and the gradients of ``leaves`` for ``dout``."""
    xs = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*xs, *rest, eps)
    out.backward(dout.to(out.dtype))
    return [out, *(t.grad for t in xs)]


def _check_against_reference(fn, reference, leaves, rest, dout, names, floor: float) -> None:
    """``fn`` against ``reference`` in float64 and in the inputs' own dtype (``check_close``)."""
    got = outputs_and_grads(fn, leaves, rest, dout)
    ref64 = outputs_and_grads(reference, [t.double() for t in leaves], [t.double() for t in rest], dout.double())
    ref_lowp = outputs_and_grads(reference, leaves, rest, dout)
    for name, a, r64, rl in zip(names, got, ref64, ref_lowp):
        check_close(name, a, r64, rl, floor=floor)


def check_norm_rope(fn, x, weight, cos, sin, dout, floor: float) -> None:
    _check_against_reference(fn, norm_rope_reference, [x, weight], [cos, sin], dout, ["out", "dx", "dweight"], floor)


def check_unit_rms(fn, x, dout, floor: float) -> None:
    """``fn(x, eps)``'s output and input gradient against the float64 reference."""
    _check_against_reference(fn, unit_rms_reference, [x], [], dout, ["out", "dx"], floor)
