"""`--model.compile=true`: the whole network is one graph, and it gives the eager network's outputs
and gradients with memory linear in depth."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from moda_lightning.attention import register_backend
from moda_lightning.attention.moda_torch import MoDATorchBackend
from moda_lightning.attention.moda_triton import MoDATritonBackend
from moda_kernels.moda_attn.grad_into import SlotGradSums
from moda_lightning.config import MoDAConfig
from moda_lightning.lightning_module import MoDALightningModule
from moda_lightning.model import MoDATransformer

VOCAB = 40


def tiny_model(n_layers: int, **options) -> MoDATransformer:
    torch.manual_seed(0)
    shape = dict(d_model=32, n_heads=4, n_kv_heads=2) | options
    return MoDATransformer(MoDAConfig(vocab_size=VOCAB, n_layers=n_layers, max_seq_len=32, attention="moda_torch", **shape))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(norm="post", depth_keys="reader"), dict(attn_kv_proj=True, depth_keys="writer", qk_norm_scope="full"),
     dict(ffn_kv=False, norm="olmo2"), dict(activation_checkpointing=True)],
    ids=str,
)
def test_the_depth_stream_compiles_into_one_graph(options):
    """The slot-list stream is plain tensors passed from writer to readers: nothing for dynamo to break on.
    Checkpointed layers too, whose writes to the stream the compiler recomputes rather than replays."""
    explained = torch._dynamo.explain(tiny_model(3, **options))(torch.randint(0, VOCAB, (2, 9)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [str(r.reason) for r in explained.break_reasons]


def compiled_saved_bytes(model: MoDATransformer, idx: torch.Tensor) -> int:
    """Bytes of the tensors the compiled forward graph hands to backward (AOT autograd's saved
    activations, read from the partitioned forward graph's outputs), each storage counted once:
    a saved view (a slot seen per head, say) costs nothing beyond its base."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def base_of(node):
        while node.op == "call_function" and getattr(node.target, "is_view", False):
            node = node.args[0]
        return node

    seen = {}

    def forward_compiler(graph_module, _inputs):
        output = next(node for node in graph_module.graph.nodes if node.op == "output")
        bases = {base_of(arg) for arg in output.args[0] if isinstance(arg, torch.fx.Node)}
        values = [base.meta.get("val") for base in bases]
        seen["bytes"] = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(idx)
    return seen["bytes"]


def test_compiled_network_saves_memory_linear_in_depth(monkeypatch):
    """At 2, 4 and 8 layers the compiled network's saved activations grow linearly in depth up to
    the reference op's [B, Hq, T, S] softmax (see tests/test_depth_stream.py): their quadratic
    term is a small fraction of what an eager stream that stacks the earlier slots per layer saves."""
    from tests.test_depth_stream import StackedDepthStream, quadratic_coefficient, saved_bytes, use_stream

    idx = torch.randint(0, VOCAB, (2, 32))
    shape = dict(d_model=64, n_heads=2, n_kv_heads=2)
    compiled = {n: compiled_saved_bytes(tiny_model(n, **shape), idx) for n in (2, 4, 8)}
    use_stream(monkeypatch, StackedDepthStream)
    naive = {n: saved_bytes(tiny_model(n, **shape), idx) for n in (2, 4, 8)}
    assert quadratic_coefficient(naive) > 0
    assert quadratic_coefficient(compiled) < 0.1 * quadratic_coefficient(naive), f"compiled {compiled}, naive {naive}"


def test_compiled_activation_checkpointing_saves_less():
    """Compiled, a checkpointed network is one graph whose backward recomputes the layers, so it hands
    backward far fewer activations (measured: about a third at 4 and 8 layers), not silently the same."""
    idx = torch.randint(0, VOCAB, (2, 32))
    plain = compiled_saved_bytes(tiny_model(4, d_model=64), idx)
    checkpointed = compiled_saved_bytes(tiny_model(4, d_model=64, activation_checkpointing=True), idx)
    assert checkpointed < 0.5 * plain, f"checkpointed {checkpointed} bytes, plain {plain}"


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


@register_backend("_toy_buffer_reader")
class BufferReader(MoDATorchBackend):
    """A plugin backend that reads the [B, T, S, Hk, d] buffer, as backends written before the slot list do."""

    reads_slot_lists = False


@pytest.mark.parametrize("attention,warns", [("_toy_buffer_reader", True), ("moda_torch", False), ("sdpa", False)])
def test_compiling_warns_only_where_the_depth_stream_splits_the_graph(attention, warns, recwarn):
    module = MoDALightningModule(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                 attention=attention, compile=True)
    module.configure_model()  # wraps the network with torch.compile; nothing is compiled until it runs
    messages = [str(w.message) for w in recwarn if "depth stream" in str(w.message)]
    assert bool(messages) == warns, messages


def test_compile_mode_reaches_torch_compile(monkeypatch):
    seen = {}

    def recording_compile(model, mode=None):
        seen["mode"] = mode
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    module = MoDALightningModule(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                 compile=True, compile_mode="reduce-overhead")
    module.configure_model()
    assert seen["mode"] == "reduce-overhead" and module._replays_cuda_graphs()
    assert not MoDALightningModule(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                   compile_mode="reduce-overhead")._replays_cuda_graphs()  # compile=false: no graphs


def test_an_unknown_compile_mode_is_one_line(tmp_path):
    import subprocess

    from tests.test_cli import moda_command

    result = subprocess.run([*moda_command(), "fit", "--model.compile_mode=fast"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "compile_mode" in lines[0] and "reduce-overhead" in lines[0], result.stderr


@register_backend("_interpreted_triton")
class InterpretedTriton(MoDATritonBackend):
    """The fused backend on CPU tensors, its kernels run by Triton's interpreter (tests/conftest.py)."""

    calls_with_sums = 0

    def check_available(self) -> None:
        importlib.import_module("moda_kernels.moda_attn.function")

    def check_device(self, device_type: str) -> None:
        pass

    def __call__(self, *args, depth_grad_into=None, **kwargs):
        InterpretedTriton.calls_with_sums += isinstance(depth_grad_into, SlotGradSums)
        return super().__call__(*args, depth_grad_into=depth_grad_into, **kwargs)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
@pytest.mark.parametrize(
    "checkpointing,options",
    [(False, dict()), (True, dict()), (False, dict(norm="post", depth_keys="reader")), (False, dict(ffn_kv=False))],
    ids=["plain", "checkpointing", "post-norm reader keys", "attention slots only"],
)
def test_the_fused_backend_compiled_sums_slot_gradients_in_place_and_equals_eager(checkpointing, options):
    """Compiled, the fused backend's slot-list stream hands every read the per-slot gradient sums (the
    form whose backward memory stays linear in depth, tests/kernels/test_slot_lists_interpret.py);
    eager, it uses the gradient buffer. Both give the same gradients, with activation checkpointing too,
    with reader keys (a depth query of its own: the split path, which adds through the kernel's
    gradient table) and with attention slots only (one slot per layer)."""
    torch.manual_seed(0)
    InterpretedTriton.calls_with_sums = 0
    model = MoDATransformer(MoDAConfig(vocab_size=VOCAB, n_layers=3, max_seq_len=16, d_model=64, n_heads=2,
                                       n_kv_heads=2, attention="_interpreted_triton",
                                       activation_checkpointing=checkpointing, **options))  # fmt: skip
    idx = torch.randint(0, VOCAB, (2, 9))

    def loss_and_grads(network):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager = loss_and_grads(model)
    assert InterpretedTriton.calls_with_sums == 0
    torch._dynamo.reset()
    # one graph with activation checkpointing too: the compiler recomputes the layers (trace_checkpointed_writes)
    compiled_loss, compiled = loss_and_grads(torch.compile(model, fullgraph=True))
    assert InterpretedTriton.calls_with_sums >= 2  # layers 1 and 2 read depth
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled.keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiling_says_the_first_steps_are_slow(monkeypatch, caplog, mode):
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    module = MoDALightningModule(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                 compile=True, compile_mode=mode)  # fmt: skip
    with caplog.at_level("INFO"):
        module.configure_model()
    said = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(said) == 1 and "the first training step" in said[0], said
    assert ("CUDA graphs" in said[0]) == (mode == "reduce-overhead")


@pytest.mark.parametrize("mode, refused", [("reduce-overhead", True), ("max-autotune", True), ("default", False)])
def test_cuda_graphs_are_refused_in_a_run_of_several_processes(monkeypatch, mode, refused):
    """Graph replay is tested on one GPU only: with two processes the run stops before compiling,
    naming the flag that trains it eagerly; compiling without graphs goes on."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    module = MoDALightningModule(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                 compile=True, compile_mode=mode)  # fmt: skip
    module._trainer = SimpleNamespace(world_size=2)
    if refused:
        with pytest.raises(ValueError, match=r"tested on one GPU only; for 2 processes pass --model.compile=false"):
            module.configure_model()
    else:
        module.configure_model()
    module._trainer = SimpleNamespace(world_size=1)
    module.configure_model()  # one process: compiles whatever the mode


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
def test_a_network_compiled_after_a_checkpointed_one_trains_as_eager():
    """Regression: compiling a checkpointed network made dynamo give up on the model's forward for the
    rest of the process (it refused the stream writes inside the checkpoint), so the next network,
    without checkpointing, compiled layer by layer; its per-slot gradient sums then crossed graphs and
    its backward failed: "one of the variables needed for gradient computation has been modified by
    an inplace operation"."""
    shape = dict(vocab_size=VOCAB, n_layers=3, max_seq_len=16, d_model=64, n_heads=2, n_kv_heads=2,
                 attention="_interpreted_triton")  # fmt: skip
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing: bool, compiled: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = MoDATransformer(MoDAConfig(activation_checkpointing=checkpointing, **shape))
        network = torch.compile(model, backend="aot_eager") if compiled else model
        torch.nn.functional.cross_entropy(network(idx).flatten(0, 1), idx.flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    grads(checkpointing=True, compiled=True)
    compiled, eager = grads(checkpointing=False, compiled=True), grads(checkpointing=False, compiled=False)
    assert compiled.keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()
