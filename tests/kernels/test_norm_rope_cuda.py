"""The fused norm + RoPE kernels on a GPU against the float64 reference."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from _norm_rope_check import check_norm_rope, check_unit_rms, rotary_tables, strided_inputs  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,d", [(2, 17, 3, 64), (1, 1000, 8, 128), (2, 4096, 16, 64), (1, 5, 1, 32)], ids=str)
def test_matches_float64_reference(B, T, H, d, dtype):
    from moda_kernels.norm_rope import norm_rope

    x, weight, dout = strided_inputs(B, T, H, d, dtype, device="cuda", seed=T)
    cos, sin = rotary_tables(T + 3, d, device="cuda")
    check_norm_rope(norm_rope, x, weight, cos, sin, dout, floor=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,d", [(2, 17, 3, 64), (16, 2048, 2, 64), (1, 5, 1, 128)], ids=str)
def test_unit_rms_matches_float64_reference(B, T, H, d, dtype):
    from moda_kernels.norm_rope import unit_rms

    x, _, dout = strided_inputs(B, T, H, d, dtype, device="cuda", seed=T)
    check_unit_rms(unit_rms, x, dout, floor=1e-3)


def test_float32_weight_with_bf16_activations():
    """Under bf16-mixed the norm weight stays float32: its gradient comes back in float32."""
    from moda_kernels.norm_rope import norm_rope

    x, weight, dout = strided_inputs(2, 33, 4, 64, torch.bfloat16, device="cuda")
    cos, sin = rotary_tables(33, 64, device="cuda")
    check_norm_rope(norm_rope, x, weight.float(), cos, sin, dout, floor=1e-3)


@pytest.mark.parametrize("attention,depth_keys", [("sdpa", "writer"), ("moda_triton", "writer"), ("moda_triton", "reader")])
def test_model_with_fused_norm_rope_matches_the_plain_modules(monkeypatch, attention, depth_keys):
    """The model's q/k path (and the depth keys': rotated with the writer's norm, or unit-RMS for the
    reader) through the kernels, against the plain modules."""
    from moda_lightning.config import MoDAConfig
    from moda_lightning.model import MoDATransformer

    torch.manual_seed(0)
    config = MoDAConfig(vocab_size=97, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, attention=attention,
                        depth_keys=depth_keys)  # fmt: skip
    model = MoDATransformer(config).cuda()
    idx = torch.randint(0, 97, (2, 65), device="cuda")

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1).float(), idx[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    monkeypatch.setattr("moda_lightning.model._has_triton", lambda: False)
    plain_loss, plain = loss_and_grads()
    torch.testing.assert_close(loss, plain_loss, atol=2e-3, rtol=2e-3)
    # bf16 activations: the fused path rounds once, the modules twice; compare each gradient as a whole
    for name in grads:
        rel = (grads[name] - plain[name]).norm() / plain[name].norm().clamp_min(1e-12)
        assert rel < 2e-2, f"{name}: relative difference {rel:.2e}"
