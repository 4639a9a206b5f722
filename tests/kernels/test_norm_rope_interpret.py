"""The fused norm + RoPE kernels under ``TRITON_INTERPRET=1`` on CPU, against the PyTorch reference."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
    reason="interpreter tests run on CPU-only machines (tests/kernels/conftest.py sets TRITON_INTERPRET=1)",
)

triton = pytest.importorskip("triton")

from _norm_rope_check import check_norm_rope, check_unit_rms, rotary_tables, strided_inputs  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,T,H,d", [(1, 1, 1, 16), (2, 37, 3, 16), (1, 19, 2, 32)], ids=str)
def test_matches_reference(B, T, H, d, dtype):
    from moda_kernels.norm_rope import norm_rope

    x, weight, dout = strided_inputs(B, T, H, d, dtype, seed=T)
    cos, sin = rotary_tables(T + 5, d)  # the table is longer than the sequence
    check_norm_rope(norm_rope, x, weight, cos, sin, dout, floor=1e-5 if dtype == torch.float32 else 1e-3)


def test_bad_inputs_say_what_is_wrong():
    from moda_kernels.norm_rope import norm_rope

    cos, sin = rotary_tables(8, 16)
    with pytest.raises(ValueError, match="d a power of two"):
        norm_rope(torch.randn(1, 4, 2, 12), torch.ones(12), cos, sin, 1e-6)
    with pytest.raises(ValueError, match=r"T_max >= 9"):
        norm_rope(torch.randn(1, 9, 2, 16), torch.ones(16), cos, sin, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,T,H,d", [(1, 1, 1, 16), (2, 37, 3, 16), (1, 19, 2, 64)], ids=str)
def test_unit_rms_matches_reference(B, T, H, d, dtype):
    from moda_kernels.norm_rope import unit_rms

    x, _, dout = strided_inputs(B, T, H, d, dtype, seed=T)
    check_unit_rms(unit_rms, x, dout, floor=1e-5 if dtype == torch.float32 else 1e-3)


def test_unit_rms_refuses_a_head_dim_that_is_not_a_power_of_two():
    from moda_kernels.norm_rope import unit_rms

    with pytest.raises(ValueError, match="d a power of two"):
        unit_rms(torch.randn(1, 4, 2, 12), 1e-6)
