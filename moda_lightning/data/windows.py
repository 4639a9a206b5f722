"""`PackedWindows`: the training examples, windows of ``seq_len + 1`` tokens cut from spans of a token stream."""

from __future__ import annotations

import bisect
import itertools

import torch
from torch.utils.data import Dataset

from moda_lightning.data.splits import Span, count_windows
from moda_lightning.data.token_files import TokenStream


class PackedWindows(Dataset[torch.Tensor]):
    """Windows of ``seq_len + 1`` tokens cut from token spans ``[start, stop)`` of a token stream.

    Within a span, window ``i`` covers tokens ``[start + i*seq_len, start + i*seq_len + seq_len + 1)``:
    the last token of a window is the first of the next, so ``window[1:]`` (targets) continue the
    stream. No window crosses a span's end; one may cross from one shard into the next. The stream
    maps its shards lazily in each process, so DataLoader workers map them instead of receiving a
    pickled copy.

    Args:
        tokens: The token stream (`token_cache.open_token_cache` or pre-tokenized files).
        spans: Token ranges ``(start, stop)`` to cut windows from, in order.
        seq_len: Training sequence length.
    """

    def __init__(self, tokens: TokenStream, spans: list[Span], seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.spans = list(spans)
        counts = count_windows(self.spans, seq_len)
        # first window index of each span, and the total at the end
        self._offsets = [0, *itertools.accumulate(counts)]

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Return window `index` as int64 token ids, [seq_len + 1]."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} is out of range for {len(self)} windows")
        span = bisect.bisect_right(self._offsets, index) - 1
        begin = self.spans[span][0] + (index - self._offsets[span]) * self.seq_len
        return self.tokens[begin : begin + self.seq_len + 1].to(torch.int64)
