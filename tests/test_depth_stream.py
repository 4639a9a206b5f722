"""Both forms of the depth stream (the buffer and the list of slots): same gradients as a naive
stack of slots, memory linear in depth."""

from __future__ import annotations

import pytest
import torch

from moda_lightning.config import MoDAConfig
from moda_lightning.depth_slots import DepthSlots
from moda_lightning.depth_stream import DepthStream
from moda_lightning.model import MoDATransformer

VOCAB = 40


class StackedDepthStream:
    """The obvious implementation: keep every slot, stack them for each read (O(L^2) memory)."""

    def __init__(self, max_slots: int) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, k, v) -> None:
        self.keys.append(k)
        self.values.append(v)

    def read(self):
        if not self.keys:
            return None, None, 0
        return torch.stack(self.keys, 2), torch.stack(self.values, 2), len(self.keys)


def use_stream(monkeypatch, stream_class) -> None:
    """Make every model build ``stream_class`` as its depth stream, whatever its backend would pick."""
    monkeypatch.setattr(MoDATransformer, "_new_depth_stream", lambda self, n_slots: stream_class(n_slots))


STREAMS = pytest.mark.parametrize("stream", [DepthStream, DepthSlots], ids=["buffer", "slots"])


def tiny_model(n_layers: int = 3, **overrides) -> MoDATransformer:
    torch.manual_seed(0)
    shape = dict(d_model=32, n_heads=4, n_kv_heads=2) | overrides
    cfg = MoDAConfig(vocab_size=VOCAB, n_layers=n_layers, max_seq_len=64, **shape)
    return MoDATransformer(cfg)


def loss_and_grads(model: MoDATransformer, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@STREAMS
@pytest.mark.parametrize("options", [dict(), dict(ffn_kv=False), dict(attn_kv_proj=True), dict(norm="post")], ids=str)
def test_stream_gives_the_gradients_of_a_naive_stack(monkeypatch, stream, options):
    model = tiny_model(n_layers=4, **options)
    idx = torch.randint(0, VOCAB, (2, 13))
    use_stream(monkeypatch, stream)
    loss, grads = loss_and_grads(model, idx)
    use_stream(monkeypatch, StackedDepthStream)
    expected_loss, expected = loss_and_grads(model, idx)
    torch.testing.assert_close(loss, expected_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


class GradIntoBackend:
    """The reference backend, handed the stream's gradient buffer as the Triton backend is."""

    takes_depth_grad_into = True
    reads_slot_lists = True

    def __init__(self, backend) -> None:
        self.backend = backend
        self.calls_with_buffer = 0

    def check_device(self, device_type: str) -> None:
        self.backend.check_device(device_type)

    def __call__(self, q, k, v, depth_k=None, depth_v=None, *, num_depth=0, scale=None, depth_grad_into=None):
        from moda_lightning.ops import moda_attention

        self.calls_with_buffer += depth_grad_into is not None
        return moda_attention(q, k, v, depth_k, depth_v, num_depth=num_depth, scale=scale, depth_grad_into=depth_grad_into)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_an_op_adding_into_the_gradient_buffer_gives_the_same_gradients(checkpointing):
    """With ``depth_grad_into`` the op sums the slot gradients itself; the result must not change."""
    model = tiny_model(n_layers=4, activation_checkpointing=checkpointing)
    idx = torch.randint(0, VOCAB, (2, 13))
    expected_loss, expected = loss_and_grads(model, idx)
    backend = model.backend = GradIntoBackend(model.backend)  # the model picks the buffer stream for it
    for block in model.layers:
        block.attn.sublayer.backend = backend
    loss, grads = loss_and_grads(model, idx)
    assert backend.calls_with_buffer >= 3  # layers 1..3 read depth (and replay it when checkpointing)
    torch.testing.assert_close(loss, expected_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], msg=lambda m, name=name: f"{name}: {m}")


def saved_bytes(model: MoDATransformer, idx: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx).sum()
    return sum(storages.values())


def quadratic_coefficient(sizes: dict[int, int]) -> float:
    """c in bytes(L) = a + b L + c L^2 through three (layers, bytes) points."""
    (l1, b1), (l2, b2), (l3, b3) = sorted(sizes.items())
    return ((b3 - b2) / (l3 - l2) - (b2 - b1) / (l2 - l1)) / (l3 - l1)


@STREAMS
@pytest.mark.parametrize("depth_keys", ["writer", "reader"])
def test_saved_memory_keeps_no_copies_of_earlier_slots(monkeypatch, stream, depth_keys):
    """Bytes saved for backward at 4, 8 and 16 layers. A stream that copies earlier slots for every
    layer grows as L^2 through those copies; the buffer must not. What stays quadratic is the
    reference op's softmax over [sequence | depth], which keeps [B, Hq, T, S] probabilities per
    layer (G/d of a slot copy; the Triton kernel keeps none), so the quadratic term must be a small
    fraction of the naive stream's. Head dim 32 with G=1 makes that fraction about 5%."""
    idx = torch.randint(0, VOCAB, (2, 32))
    shape = dict(d_model=64, n_heads=2, n_kv_heads=2, depth_keys=depth_keys)  # reader: its own key norm per read
    use_stream(monkeypatch, stream)
    buffered = {n: saved_bytes(tiny_model(n_layers=n, **shape), idx) for n in (4, 8, 16)}
    use_stream(monkeypatch, StackedDepthStream)
    naive = {n: saved_bytes(tiny_model(n_layers=n, **shape), idx) for n in (4, 8, 16)}
    assert quadratic_coefficient(naive) > 0
    assert quadratic_coefficient(buffered) < 0.1 * quadratic_coefficient(naive), f"buffered {buffered}, naive {naive}"


def test_stream_reads_views_of_one_buffer():
    stream = DepthStream(max_slots=3)
    k = torch.randn(2, 5, 2, 4)
    stream.append(k, k + 1)
    stream.append(k + 2, k + 3)
    depth_k, depth_v, n = stream.read()
    assert n == 2 and depth_k.shape == (2, 5, 2, 2, 4)
    assert depth_k.untyped_storage().data_ptr() == stream.slots.keys.untyped_storage().data_ptr()
    torch.testing.assert_close(depth_v[:, :, 1], k + 3)


@STREAMS
@pytest.mark.parametrize("attention", ["moda_torch", "sdpa"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, stream, attention):
    """Checkpointed layers replay their depth writes in backward; results must not change."""
    use_stream(monkeypatch, stream)
    idx = torch.randint(0, VOCAB, (2, 13))
    loss, grads = loss_and_grads(tiny_model(n_layers=4, attention=attention), idx)
    model = tiny_model(n_layers=4, attention=attention, activation_checkpointing=True)
    loss_ckpt, grads_ckpt = loss_and_grads(model, idx)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=lambda m, name=name: f"{name}: {m}")


def test_slot_list_reads_the_slots_themselves():
    stream = DepthSlots(max_slots=3)
    k = torch.randn(2, 5, 2, 4)
    stream.append(k, k + 1)
    stream.append(k.transpose(0, 1).contiguous().transpose(0, 1), k + 3)  # strided: made contiguous
    keys, values, n = stream.read()
    assert n == 2 and [t.shape for t in keys] == [k.shape, k.shape]
    assert keys[0] is stream.keys[0] and keys[1].is_contiguous()
    torch.testing.assert_close(values[1], k + 3)
    stream.seek(1)
    assert len(stream) == 1 and stream.read()[2] == 1


def test_fused_backend_gets_the_buffer_eagerly_and_the_slot_list_under_compile():
    model = tiny_model(n_layers=2)
    assert isinstance(model._new_depth_stream(2), DepthSlots)  # moda_torch: the slot list
    model.backend = GradIntoBackend(model.backend)  # stands for the fused kernel
    assert isinstance(model._new_depth_stream(2), DepthStream)


def test_activation_checkpointing_saves_memory():
    idx = torch.randint(0, VOCAB, (2, 32))
    full = saved_bytes(tiny_model(n_layers=8), idx)
    checkpointed = saved_bytes(tiny_model(n_layers=8, activation_checkpointing=True), idx)
    assert checkpointed < 0.5 * full


def test_buffers_are_freed_after_backward_without_the_cycle_collector(monkeypatch):
    """Regression: the autograd nodes once held the stream, which held the nodes' tokens; that
    cycle kept every step's slot buffers alive until Python's cycle collector ran and ran a
    48-layer model out of GPU memory. With reference counting alone the buffers must go."""
    import gc
    import weakref

    buffers: list[weakref.ref] = []

    class WatchedStream(DepthStream):
        def __init__(self, max_slots: int) -> None:
            super().__init__(max_slots)
            buffers.append(weakref.ref(self.slots))

    use_stream(monkeypatch, WatchedStream)
    model = tiny_model(n_layers=4)
    gc.disable()
    try:
        loss = model(torch.randint(0, VOCAB, (2, 9))).sum()
        loss.backward()
        del loss
        assert buffers and buffers[0]() is None, "the depth stream's buffers outlived the step"
    finally:
        gc.enable()
