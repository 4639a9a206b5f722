"""The sequence keys and values of earlier tokens, kept per layer while a model decodes.

Only the sequence half of attention needs a cache: a token's depth slots are written and read
by its own forward pass, going down the stack, so a decode step holds O(L) depth slots for the
new token and keeps none across tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Preallocated keys and values ``[B, max_len, Hk, d]`` for every layer, filled left to right.

    A forward call with the cache runs ``begin`` (positions of the new tokens), each layer's
    ``layer(i).extend`` (write the new keys, read all of them), then ``commit``.

    Args:
        n_layers, batch, max_len, n_kv_heads, head_dim: the shape to hold.
        device, dtype: where and in what the keys are kept (the dtype the layers compute in).
    """

    def __init__(
        self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, *,
        device: torch.device | str, dtype: torch.dtype,
    ) -> None:  # fmt: skip
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False: padding
        self.max_len = max_len
        self.length = 0  # positions filled, the same for every row
        self.has_padding = False  # whether any filled position is padding (read once per call)

    def begin(self, new_tokens: int, token_mask: Tensor | None = None) -> Tensor:
        """Start a call of ``new_tokens`` tokens (``token_mask [B, T]``: False for padding); returns
        their rotary positions ``[B, T]``: a row's position counts its real tokens only, so a
        left-padded prompt is rotated as if it had no padding."""
        end = self.length + new_tokens
        if end > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions; {self.length} are filled and {new_tokens} more were "
                "given. Build the cache for prompt plus new tokens."
            )
        if token_mask is not None:
            self.key_mask[:, self.length : end] = token_mask
            # Read back to the host once per masked call; an unmasked decode step adds no padding.
            self.has_padding = self.has_padding or bool((~self.key_mask[:, self.length : end]).any())
        if not self.has_padding:
            return torch.arange(self.length, end, device=self.keys.device).expand(self.keys.shape[1], -1)
        # real tokens before each new one, minus one: its 0-based position among the real tokens
        real_before = self.key_mask[:, :end].long().cumsum(1)[:, self.length : end] - 1
        return real_before.clamp(min=0)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def commit(self, new_tokens: int) -> None:
        self.length += new_tokens


class LayerCache:
    """One layer's view of a :class:`KVCache` during a forward call."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write this call's ``k, v [B, T, Hk, d]`` after the cached positions; return every position's
        keys and values ``[B, length + T, Hk, d]`` and the key mask (None when nothing is padding)."""
        cache = self.cache
        start, end = cache.length, cache.length + k.shape[1]
        cache.keys[self.index, :, start:end] = k
        cache.values[self.index, :, start:end] = v
        key_mask = cache.key_mask[:, :end] if cache.has_padding else None
        return cache.keys[self.index, :, :end], cache.values[self.index, :, :end], key_mask
