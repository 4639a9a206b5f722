"""The held-out split on hand-made streams: chunks at document ends, the target share, determinism."""

from __future__ import annotations

import itertools

import torch

from moda_lightning.data.splits import (
    chunk_bounds,
    count_windows,
    document_ends,
    held_out_split,
)

EOT = 9


def stream(doc_lengths: list[int]) -> torch.Tensor:
    parts = [
        torch.cat(
            [
                torch.ones(n - 1, dtype=torch.int32),
                torch.tensor([EOT], dtype=torch.int32),
            ]
        )
        for n in doc_lengths
    ]
    return torch.cat(parts).to(torch.uint16)


def test_document_ends_and_chunks():
    tokens = stream([5, 3, 40, 2, 2])
    ends = document_ends(tokens, EOT)
    assert ends.tolist() == [5, 8, 48, 50, 52]
    # Short documents are grouped until a chunk holds 10 tokens; a too-short remainder joins the last chunk.
    assert chunk_bounds(52, ends, 10) == [(0, 52)]
    assert chunk_bounds(52, ends, 8) == [(0, 8), (8, 52)]
    assert chunk_bounds(60, ends, 8) == [(0, 8), (8, 48), (48, 60)], "a long enough remainder is a chunk"


def test_split_reaches_the_target_and_tiles_the_stream():
    tokens = stream([37] * 200)  # 7400 tokens
    train, val = held_out_split(len(tokens), document_ends(tokens, EOT), 0.1, window=9, seed=0)
    spans = sorted(train + val)
    assert spans[0][0] == 0 and spans[-1][1] == len(tokens)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    held = sum(b - a for a, b in val)
    assert held == 740  # ceil(0.1 * 7400); the last chunk is cut to what is still needed
    assert all(a % 37 == 0 for a, _ in val), "held-out spans start at document ends"
    assert len(val) > 1 and val[0][0] < len(tokens) // 2, "drawn from the whole stream, not the tail"
    assert held_out_split(len(tokens), document_ends(tokens, EOT), 0.1, 9, seed=0) == (
        train,
        val,
    )
    assert held_out_split(len(tokens), document_ends(tokens, EOT), 0.1, 9, seed=1)[1] != val


def test_one_long_document_still_splits():
    tokens = stream([5000])
    train, val = held_out_split(5000, document_ends(tokens, EOT), 0.05, window=33, seed=0)
    assert sum(count_windows(val, 32)) >= 1 and sum(count_windows(train, 32)) >= 100
    assert val == [(0, 250)] and train == [(250, 5000)]


def test_count_windows():
    assert count_windows([(0, 33), (40, 72), (100, 100)], 32) == [1, 0, 0]
