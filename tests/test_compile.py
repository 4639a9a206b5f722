"""`--model.compile=true`: the compiled network gives the eager network's outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from moda_lightning.lightning_module import MoDALightningModule


@pytest.mark.slow
def test_compiled_network_matches_eager():
    torch.manual_seed(0)
    module = MoDALightningModule(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                 attention="moda_torch", compile=True)
    eager = module.model
    idx = torch.randint(0, 64, (2, 16))
    expected = eager(idx)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in eager.named_parameters()}
    eager.zero_grad()

    module.configure_model()  # Lightning calls this hook before training
    assert isinstance(module.model, torch._dynamo.eval_frame.OptimizedModule)
    out = module(idx)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for name, p in eager.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-4)
