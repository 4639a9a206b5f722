"""The kernel tests' tolerance rule: error vs float64 at most ~2x the same-dtype reference's, plus a floor."""

from __future__ import annotations

import torch
from torch import Tensor


def check_close(name: str, out: Tensor, ref64: Tensor, ref_lowp: Tensor, *, factor: float = 2.0, floor: float = 1e-5) -> None:
    """Assert ``max|out - ref64| <= factor * max|ref_lowp - ref64| + floor * max|ref64|``.

    ``-inf`` entries (the depth log-sum-exp of rows without depth slots) must match exactly.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    out, ref64, ref_lowp = out.double(), ref64.double(), ref_lowp.double()
    assert not out.isnan().any(), f"{name}: NaN in the kernel output"
    inf = ref64.isinf()
    if inf.any():
        assert torch.equal(out.isinf(), inf) and torch.equal(out[inf], ref64[inf]), f"{name}: -inf entries differ"
        out, ref64, ref_lowp = out[~inf], ref64[~inf], ref_lowp[~inf]
    if out.numel() == 0:
        return
    err = (out - ref64).abs().max().item()
    err_ref = (ref_lowp - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    rms = (out - ref64).pow(2).mean().sqrt().item()
    rms_ref = (ref_lowp - ref64).pow(2).mean().sqrt().item()
    tol = factor * err_ref + floor * max(scale, 1.0)
    assert err <= tol, (
        f"{name}: max abs diff {err:.3e} > tol {tol:.3e} (same-dtype reference: {err_ref:.3e}); "
        f"RMS ratio kernel/reference {rms / max(rms_ref, 1e-30):.2f}"
    )
