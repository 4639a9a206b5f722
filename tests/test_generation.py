"""Decoding with a KV cache: every step equals recomputing the whole sequence, for every backend that
runs here, norm placement and depth option; left-padded batches equal their rows alone; sampling
options and bad inputs."""

from __future__ import annotations

import pytest
import torch

from moda_lightning.attention import register_backend
from moda_lightning.attention.moda_torch import MoDATorchBackend
from moda_lightning.config import MoDAConfig
from moda_lightning.generation import KVCache, sample_next
from moda_lightning.model import MoDATransformer

VOCAB = 50
DEPTH_OPTIONS = [dict(), dict(ffn_kv=False), dict(attn_kv_proj=True), dict(depth_keys="reader", qk_norm_scope="full")]
CASES = [("moda_torch", norm, options) for norm in ("pre", "post", "olmo2") for options in DEPTH_OPTIONS]
CASES += [("sdpa", norm, {}) for norm in ("pre", "post", "olmo2")]


def tiny_model(attention: str = "moda_torch", norm: str = "pre", **options) -> MoDATransformer:
    torch.manual_seed(0)
    config = MoDAConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=40,
                        attention=attention, norm=norm, **options)  # fmt: skip
    return MoDATransformer(config).eval()


def cache_for(model: MoDATransformer, batch: int, max_len: int) -> KVCache:
    cfg = model.config
    return KVCache(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("attention,norm,options", CASES, ids=lambda x: str(x))
@torch.no_grad()
def test_cached_decoding_equals_recomputing_the_sequence(attention, norm, options):
    """Prefill 5 tokens, then feed 1, then 3 at a time: the logits of every new token equal those of
    one forward pass over the whole sequence, and greedy generation picks the same tokens."""
    model = tiny_model(attention, norm, **options)
    tokens = torch.randint(0, VOCAB, (2, 12))
    full = model(tokens)
    cache = cache_for(model, 2, 12)
    pieces = [model(tokens[:, :5], cache=cache), model(tokens[:, 5:6], cache=cache), model(tokens[:, 6:9], cache=cache),
              model(tokens[:, 9:], cache=cache)]  # fmt: skip
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)

    prompt = tokens[0, :6].tolist()
    generated = model.generate([prompt], 8, temperature=0)[0]
    sequence = list(prompt)
    for _ in range(8):  # greedy by recomputation
        sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert generated == sequence[len(prompt) :]


@pytest.mark.parametrize("attention", ["moda_torch", "sdpa"])
@torch.no_grad()
def test_logits_to_keep_gives_the_last_positions_logits_only(attention):
    """A prompt pass needs the last token's logits alone; cached or not, asking for the last N (or
    for given positions) gives those rows of the full table (up to the matmul's rounding on fewer rows)."""
    model = tiny_model(attention)
    tokens = torch.randint(0, VOCAB, (2, 9))
    full = model(tokens)
    assert model(tokens, logits_to_keep=1).shape == (2, 1, VOCAB)
    torch.testing.assert_close(model(tokens, logits_to_keep=3), full[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(tokens, logits_to_keep=torch.tensor([0, 4])), full[:, [0, 4]], rtol=0, atol=1e-6)
    cache = cache_for(model, 2, 9)
    prefix = model(tokens[:, :6], cache=cache, logits_to_keep=1)
    step = model(tokens[:, 6:], cache=cache, logits_to_keep=2)
    torch.testing.assert_close(prefix, full[:, 5:6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step, full[:, 7:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"^logits_to_keep=-1: pass 0 for every position or N > 0 for the last N$"):
        model(tokens, logits_to_keep=-1)


@pytest.mark.parametrize("attention", ["moda_torch", "sdpa"])
@torch.no_grad()
def test_a_left_padded_batch_continues_each_prompt_as_it_would_alone(attention):
    model = tiny_model(attention)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [3, 3, 3, 3]]
    together = model.generate(prompts, 10, temperature=0)
    assert together == [model.generate([p], 10, temperature=0)[0] for p in prompts]
    # and the padded prefill's logits for each row's real tokens are that row's own
    cache = cache_for(model, 3, 7)
    idx = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, 7 - len(p) :], mask[row, 7 - len(p) :] = torch.tensor(p), True
    logits = model(idx, cache=cache, token_mask=mask)
    for row, p in enumerate(prompts):
        torch.testing.assert_close(logits[row, 7 - len(p) :], model(torch.tensor([p]))[0], atol=1e-5, rtol=1e-4)


def test_generation_stops_at_end_of_text_and_leaves_it_out():
    model = tiny_model()
    free = model.generate([[1, 2, 3]], 6, temperature=0)[0]
    eos = free[2]
    stopped = model.generate([[1, 2, 3]], 6, temperature=0, eos_id=eos)[0]
    assert stopped == free[: free.index(eos)]


def test_sampling_options():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), greedy)  # the top token always stays
    top5 = logits.topk(5, -1).indices
    draws = torch.stack([sample_next(logits, top_k=5, generator=torch.Generator().manual_seed(s)) for s in range(200)])
    assert all(bool((draws[:, row, None] == top5[row]).any(-1).all()) for row in range(4))
    assert len(set(draws[:, 0].tolist())) > 1  # it samples, not argmax
    # nucleus: only the smallest set of tokens whose mass reaches top_p can come out
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < 0.5
    nucleus = [set(order[row][keep[row]].tolist()) for row in range(4)]
    draws = torch.stack([sample_next(logits, top_p=0.5, generator=torch.Generator().manual_seed(s)) for s in range(200)])
    assert all(set(draws[:, row].tolist()) <= nucleus[row] for row in range(4))
    model = tiny_model()
    seeded = [model.generate([[1, 2]], 8, top_k=10, generator=torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert seeded[0] == seeded[1]


@register_backend("_no_decode")
class NoDecodeBackend(MoDATorchBackend):
    decodes = False


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m.generate([[1] * 35], 10), r"prompt of 35 tokens plus 10 new ones is longer than the model's max_seq_len=40"),
        (lambda m: m.generate([[1], []], 3), "at least one token"),
        (lambda m: m.generate([[1]], 0), "at least one new token"),
        (lambda m: m.generate([[1]], 3, temperature=-1), "temperature=-1"),
        (lambda m: m.generate([[1]], 3, top_p=0), "top_p=0"),
        (lambda m: m.generate([[1]], 3, top_k=0), "top_k=0"),
        (lambda m: m.generate([[VOCAB]], 3), r"token ids must lie in \[0, 50\)"),
        (lambda m: m(torch.ones(1, 5, dtype=torch.long), cache=cache_for(m, 1, 4)), "KV cache holds 4 positions"),
    ],
    ids=["too-long", "empty", "no-new", "temperature", "top-p", "top-k", "bad-id", "cache-full"],
)
def test_bad_generation_requests_say_what_to_do(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model())


def test_a_backend_that_cannot_decode_is_named():
    with pytest.raises(ValueError, match="'_no_decode' cannot decode"):
        tiny_model("_no_decode").generate([[1, 2]], 3)
