"""The train / validation split of a token stream: held-out documents chosen at random.

A validation set taken from the tail of the concatenated files is whatever the last files hold
(often one source, one topic, one date), so its loss measures something other than the training
distribution. Here the stream is cut at document ends into chunks of consecutive documents, and a
seeded random choice of chunks is held out until ``val_fraction`` of the tokens is reached: the
validation text is drawn from the whole corpus, and never overlaps the training text.

The split depends only on the token stream, ``val_fraction``, the window size and its own seed, so
runs that differ in model, training seed or data order are validated on the same windows.
"""

from __future__ import annotations

import math

import torch

Span = tuple[int, int]
"""A token range ``[start, stop)`` of the stream."""

CHUNK_WINDOWS = 16
"""Consecutive documents are grouped into chunks of at least this many windows, so that short
documents (a jsonl line of a hundred tokens) still form whole validation windows and little of
each held-out span is lost to its last partial window."""

_SCAN = 1 << 24  # tokens compared at a time when looking for document ends


def document_ends(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Positions one past each end-of-text token of the stream, ``[n_docs]`` int64, ascending."""
    ends = []
    for start in range(0, len(tokens), _SCAN):
        part = tokens[start : start + _SCAN].to(torch.int32)  # uint16/uint32 compare poorly in torch
        ends.append(torch.nonzero(part == eot_id).flatten().to(torch.int64) + start + 1)
    return torch.cat(ends) if ends else torch.zeros(0, dtype=torch.int64)


def chunk_bounds(n_tokens: int, doc_ends: torch.Tensor, min_tokens: int) -> list[Span]:
    """Cut ``[0, n_tokens)`` at document ends into chunks of at least ``min_tokens`` tokens (the last
    chunk takes the remainder; a document longer than ``min_tokens`` is a chunk of its own)."""
    chunks, start = [], 0
    for end in doc_ends.tolist():
        if end - start >= min_tokens:
            chunks.append((start, end))
            start = end
    if start < n_tokens:
        if chunks and n_tokens - start < min_tokens:
            chunks[-1] = (chunks[-1][0], n_tokens)  # too short for a chunk of its own
        else:
            chunks.append((start, n_tokens))
    return chunks


def held_out_split(
    n_tokens: int, doc_ends: torch.Tensor, val_fraction: float, window: int, seed: int
) -> tuple[list[Span], list[Span]]:
    """Split the stream into training spans and validation spans.

    Chunks are visited in a seeded random order and held out until ``ceil(val_fraction *
    n_tokens)`` tokens (at least one window) are; the last one is cut to what is still needed, at
    least one window, its rest staying in training.

    Returns:
        ``(train_spans, val_spans)``, each sorted by position, disjoint, together covering the stream.
    """
    target = max(math.ceil(val_fraction * n_tokens), window)
    chunks = chunk_bounds(n_tokens, doc_ends, CHUNK_WINDOWS * window)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    val: list[Span] = []
    held = 0
    for index in order:
        if held >= target:
            break
        start, stop = chunks[index]
        take = min(stop - start, max(target - held, window))
        val.append((start, start + take))
        held += take
    val.sort()
    train, cursor = [], 0
    for start, stop in val:
        if start > cursor:
            train.append((cursor, start))
        cursor = stop
    if cursor < n_tokens:
        train.append((cursor, n_tokens))
    return train, val


def count_windows(spans: list[Span], seq_len: int) -> list[int]:
    """Windows of ``seq_len + 1`` tokens (stride ``seq_len``) that each span holds."""
    return [max(0, (stop - start - 1) // seq_len) for start, stop in spans]
