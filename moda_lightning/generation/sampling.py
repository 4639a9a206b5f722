"""Choosing the next token from a row of logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError, before any work, for settings that would sample nonsense."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: give 0 (greedy) or a positive number such as 0.8.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: give a positive count of tokens to keep, or leave it unset.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: give a probability mass in (0, 1], such as 0.9, or leave it unset.")


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Token ids ``[B]`` drawn from ``logits [B, vocab]``.

    ``temperature=0`` is greedy (argmax). Otherwise the logits are divided by the temperature, cut
    to the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
    (the most likely token always stays), and one token is drawn with ``generator``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # tokens after the nucleus is full; the first never drops
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
