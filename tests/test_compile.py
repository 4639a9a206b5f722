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


@pytest.mark.parametrize("attention,warns", [("moda_torch", True), ("sdpa", False)])
def test_compiling_a_depth_reading_model_warns_that_the_stream_splits_the_graph(attention, warns, recwarn):
    module = MoDALightningModule(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                 attention=attention, compile=True)
    module.configure_model()  # wraps the network with torch.compile; nothing is compiled until it runs
    messages = [str(w.message) for w in recwarn if "depth stream" in str(w.message)]
    assert bool(messages) == warns, messages
