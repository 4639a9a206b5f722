"""Autoregressive decoding of a batch of prompts with a KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moda_lightning.generation.kv_cache import KVCache
from moda_lightning.generation.sampling import check_sampling, sample_next

if TYPE_CHECKING:
    from moda_lightning.model import MoDATransformer


@torch.inference_mode()
def generate(
    model: MoDATransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The continuation of each prompt: up to ``max_new_tokens`` token ids, stopping after ``eos_id``
    (which is not returned).

    Prompts of different lengths are left-padded into one batch; padding is masked out of every
    attention and each row's rotary positions count its own tokens only, so a row's continuation
    is the one it would get alone. One forward pass fills the cache with the prompts, then each
    step feeds one token per row. Sampling: :func:`moda_lightning.generation.sampling.sample_next`.

    Raises:
        ValueError: for an empty prompt, a prompt plus ``max_new_tokens`` longer than the model's
            ``max_seq_len``, or bad sampling settings, before any work.
    """
    check_sampling(temperature, top_k, top_p)
    if not getattr(model.backend, "decodes", False):
        raise ValueError(
            f"attention backend {model.config.attention!r} cannot decode with a KV cache (its class does not set "
            "decodes=True: it must take fewer queries than keys and a key_mask); generate with sdpa, moda_torch "
            "or moda_triton, which compute the same attention."
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one new token.")
    longest, limit = max(len(p) for p in prompts), model.config.max_seq_len
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new ones is longer than the model's "
            f"max_seq_len={limit}; shorten the prompt to at most {limit - max_new_tokens} tokens or ask for fewer."
        )
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"generate: prompt token ids must lie in [0, {vocab}).")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    cfg = model.config
    cache = KVCache(cfg.n_layers, len(prompts), longest + max_new_tokens, cfg.n_kv_heads, cfg.head_dim,
                    device=device, dtype=dtype)  # fmt: skip
    idx = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    token_mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        idx[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        token_mask[row, longest - len(prompt) :] = True
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    try:
        with autocast:
            logits = model(idx, cache=cache, token_mask=token_mask, logits_to_keep=1)[:, -1]
            for step in range(max_new_tokens):
                next_tokens = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                for row, token in enumerate(next_tokens.tolist()):
                    if not finished[row] and token != eos_id:
                        outputs[row].append(token)
                if eos_id is not None:
                    finished |= next_tokens == eos_id
                    if bool(finished.all()):
                        break
                if step + 1 < max_new_tokens:
                    logits = model(next_tokens[:, None], cache=cache, logits_to_keep=1)[:, -1]
    finally:
        model.train(was_training)
    return outputs
