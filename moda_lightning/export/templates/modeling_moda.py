"""``MoDAForCausalLM``: :class:`moda_lightning.model.MoDATransformer` behind transformers' model API.

A thin wrapper: the network is the package's own module (``self.model``, with the same parameter
names, so the weights load unchanged); this file only adapts the calling convention
(``input_ids``/``attention_mask``/``labels``/``cache`` in, ``CausalLMOutputWithPast`` out), picks
the attention backend for the device a call runs on, and plugs into ``generate()``.

Decoding keeps transformers' own cache (a ``DynamicCache``, filled through ``Cache.update``) for
the sequence keys and values only: a token's depth slots are written and read by its own forward
pass, so nothing of them outlives a call (docs/generation.md). :class:`TransformersKVCache` shows
such a cache to the network as the interface of the package's ``KVCache``.

``moda export`` copies this file into the folder as ``modeling_moda.py``, with the package's
modules it imports copied beside it (``moda_lightning/export/bundle.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from moda_lightning.attention import AttentionBackend, backend_class, build_backend
from moda_lightning.export.templates.configuration_moda import MoDAHFConfig
from moda_lightning.model import MoDATransformer, RotaryEmbedding
from moda_lightning.norms import RMSNorm

PORTABLE = "moda_torch"
"""The reference op: any device and dtype. Built with the model, since the device is not known yet."""
FUSED = "moda_triton"
"""The fused Triton kernel (from an installed ``moda_kernels``), the same math: CUDA only."""
CACHE_FIELD = next(f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name in ("cache", "past_key_values"))
"""The output's cache field: ``cache`` in recent transformers 5 releases, ``past_key_values`` before."""


@cache
def fused_kernels_available() -> bool:
    """Whether the fused kernels can run here: Triton and ``moda_kernels`` are both installed."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("triton", "moda_kernels"))
    except (ImportError, ValueError):  # a finder that refuses the name, or a module without a spec
        return False


_model_module = sys.modules[MoDATransformer.__module__]
if not fused_kernels_available():
    # The model takes its fused norm+rope kernel on CUDA whenever Triton is installed, which is right
    # where moda_kernels always comes with it; here it may not, and the plain modules are the same math.
    _model_module._has_triton = fused_kernels_available


class MoDAPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the MoDA model classes."""

    config_class = MoDAHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoDABlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers builds the model on the meta device and loads the file into it; what the file
        # does not hold is initialised here: the rotary tables (buffers recomputed from the config,
        # never saved) always, parameters only when missing from the file (a plain normal init, not
        # the package's paired initialisation: train with `moda fit`).
        if isinstance(module, RotaryEmbedding):
            with torch.device("cpu"):
                tables = RotaryEmbedding(module.cos.shape[-1], module.cos.shape[0], self.config.rope_theta)
            init.copy_(module.cos, tables.cos)
            init.copy_(module.sin, tables.sin)
            module._tables_in = {}  # casts of the old tables
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class MoDAForCausalLM(MoDAPreTrainedModel, GenerationMixin):
    """A MoDA language model: token ids ``[B, T]`` to next-token logits ``[B, T, vocab]``."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MoDAHFConfig) -> None:
        super().__init__(config)
        reads_depth = backend_class(config.attention).reads_depth
        self.model = MoDATransformer(config.moda_config(attention=PORTABLE if reads_depth else config.attention))
        self._backends: dict[str, AttentionBackend] = {self.model.config.attention: self.model.backend}
        self._backend_key = self.model.config.attention
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def backend_for(self, device: torch.device) -> str:
        """The attention backend a call on ``device`` runs: the fused kernel on CUDA where it is
        installed and ``config.fused_attention`` allows it, else the reference op (or ``sdpa`` for
        a baseline, which reads no depth)."""
        if not self.model.config.reads_depth:
            return self.model.config.attention
        if device.type == "cuda" and self.config.fused_attention and fused_kernels_available():
            return FUSED
        return PORTABLE

    def use_backend(self, key: str, backend: AttentionBackend | None = None) -> None:
        """Run every attention layer on backend ``key`` (``backend``: an instance to use for it).

        The network holds its backend in the model and in each attention sublayer; all of them
        are swapped, so a call never mixes two.
        """
        if backend is None:
            if key == self._backend_key:
                return
            backend = self._backends.get(key) or build_backend(key)
        self._backends[key] = backend
        for module in self.model.modules():
            if isinstance(getattr(module, "backend", None), AttentionBackend):
                module.backend = backend
        self._backend_key = key

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for ``input_ids [B, T]``; with ``labels``, also the mean next-token loss.

        Args:
            input_ids: ``[B, T]`` token ids; with a filled ``cache``, the tokens that follow it.
            attention_mask: ``[B, past + T]``, 0 for padding (the whole sequence's, cached tokens
                included, as ``generate()`` passes it): padded keys are hidden from every query, and
                each row's rotary positions count its own tokens only.
            labels: ``[B, T]`` next-token targets (shifted inside; ``-100`` ignored).
            position_ids: ``[B, T]`` or ``[1, T]`` rotary positions (default: from the mask and the
                number of cached tokens).
            cache: a transformers dynamic cache (``DynamicCache``) holding the sequence keys and
                values of earlier calls; this call's are added to it with ``update``. Also accepted
                under its older name ``past_key_values``.
            use_cache: start a ``DynamicCache`` when none is given and return it (default: only
                when one is given).
            logits_to_keep: N > 0 for the logits of the last N positions only (``generate()`` asks
                for 1), or a 1-D tensor of the positions to keep; 0 for all.

        Returns:
            ``CausalLMOutputWithPast`` with ``logits [B, T, vocab]``, ``loss`` for ``labels``, and the
            cache (``cache``, read also as ``past_key_values``) when one was given or asked for.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MoDAForCausalLM takes input_ids (token ids [B, T]); inputs_embeds are not supported.")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError(
                "MoDAForCausalLM got both cache= and past_key_values= (two names for one argument); pass one."
            )
        keeps_some = bool(logits_to_keep) if isinstance(logits_to_keep, int) else True
        if labels is not None and keeps_some:
            raise ValueError("MoDAForCausalLM: labels need the logits of every position; leave logits_to_keep at 0.")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        self.use_backend(self.backend_for(input_ids.device))
        cache_position = kwargs.pop("cache_position", None)  # older generate() passes it; positions come from the cache
        unpadded = attention_mask is None or (attention_mask.shape == input_ids.shape and bool(attention_mask.all()))
        if cache is None and position_ids is None and unpadded:
            logits = self.model(input_ids, logits_to_keep=logits_to_keep)  # the training path, fused kernels included
        else:
            # Padding or given positions with no cache to keep: the cached path on a cache of this call alone.
            kv = TransformersKVCache(
                cache if cache is not None else DynamicCache(), input_ids, attention_mask, position_ids,
                cache_position, max_positions=self.model.config.max_seq_len,
            )  # fmt: skip
            logits = self.model(input_ids, cache=kv, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            for unused in ("output_attentions", "output_hidden_states"):
                kwargs.pop(unused, None)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """transformers' own preparation (only the new tokens once the cache holds the rest), after
        refusing a cache this model cannot decode with: before a static one becomes a 4-D mask."""
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                check_dynamic(kwargs[name])
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)


class TransformersKVCache:
    """A transformers ``Cache`` as the package's ``KVCache`` for one forward call of the network.

    ``MoDATransformer``'s cached forward asks its cache for the new tokens' rotary positions
    (``begin``), then per layer hands over the new keys and values and attends to everything the
    cache returns (``layer(i).extend``), then ``commit``s. Here each layer's ``extend`` is the
    cache's ``update(key, value, layer_idx)``, in transformers' ``[B, Hk, T, d]`` layout, so any
    dynamic cache serves. What is cached is the keys the *sequence* attention reads (after the key
    norm and rotary embedding), whatever the depth slots hold (``depth_keys="reader"`` slots are
    unrotated): a depth slot is read by its own token's pass only and never cached.

    Args:
        cache: the transformers cache (filled by earlier calls, or empty).
        input_ids: ``[B, T]``, this call's tokens.
        attention_mask: ``[B, past + T]`` with padding (0), or None for none.
        position_ids: ``[B, T]`` or ``[1, T]``, or None: counted from the mask and the cache.
        cache_position: ``[T]`` or None; if given it must start at the cache's length.
        max_positions: the model's ``max_seq_len``, the length of its rotary tables.

    Raises:
        ValueError: for a cache that does not return every cached position (static or sliding
            window), or a mask, positions or length that do not fit the cache and the model.
    """

    def __init__(
        self, cache: Cache, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
        cache_position: Tensor | None = None, *, max_positions: int,
    ) -> None:  # fmt: skip
        check_dynamic(cache)
        B, T = input_ids.shape
        self.cache, self.past = cache, cache.get_seq_length()
        total = self.past + T
        self.key_mask = None
        if cache_position is not None and (cache_position.numel() != T or int(cache_position[0]) != self.past):
            raise ValueError(
                f"cache_position {cache_position.tolist()} does not continue the cache, which holds {self.past} "
                f"tokens; pass positions {self.past}..{total - 1} or leave cache_position out"
            )
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, total):
                raise ValueError(
                    f"attention_mask is {list(attention_mask.shape)}, but with {self.past} cached tokens and {T} new "
                    f"ones it must be [{B}, {total}]: the mask of the whole sequence, as generate() passes it"
                )
            if not bool(attention_mask.all()):  # no padding: no mask, and the op's unmasked kernels
                self.key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != T:
                raise ValueError(f"position_ids is {list(position_ids.shape)}; expected [{B}, {T}] or [1, {T}]")
            low, high = position_ids.aminmax()
            if int(low) < 0 or int(high) >= max_positions:
                raise ValueError(
                    f"position_ids range over [{int(low)}, {int(high)}], outside the model's rotary table "
                    f"[0, {max_positions}) (max_seq_len); pass positions in it or a shorter sequence"
                )
            self.positions = position_ids.to(input_ids.device).expand(B, T)
        elif self.key_mask is not None:
            # real tokens up to each one, minus one: its 0-based position among its row's real tokens
            self.positions = (self.key_mask.long().cumsum(1) - 1).clamp(min=0)[:, self.past :]
        else:
            self.positions = torch.arange(self.past, total, device=input_ids.device).expand(B, T)
        if position_ids is None and total > max_positions and int(self.positions.max()) >= max_positions:
            raise ValueError(
                f"{self.past} cached tokens and {T} new ones reach past the model's max_seq_len={max_positions} "
                "(its rotary table); generate fewer tokens or start from a shorter prompt"
            )

    def begin(self, new_tokens: int, token_mask: Tensor | None = None) -> Tensor:
        """The rotary positions ``[B, T]`` of this call's tokens (padding is in the mask given above)."""
        assert token_mask is None and new_tokens == self.positions.shape[1]
        return self.positions

    def layer(self, index: int) -> _TransformersLayerCache:
        return _TransformersLayerCache(self, index)

    def commit(self, new_tokens: int) -> None:
        """Nothing to do: the transformers cache counts its positions itself."""


class _TransformersLayerCache:
    """Layer ``index``'s side of a :class:`TransformersKVCache`."""

    def __init__(self, parent: TransformersKVCache, index: int) -> None:
        self.parent, self.index = parent, index

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Add this call's ``k, v [B, T, Hk, d]`` to the cache; return every position's keys and
        values ``[B, past + T, Hk, d]`` (views of the cache's own layout) and the key mask."""
        parent = self.parent
        keys, values = parent.cache.update(k.transpose(1, 2), v.transpose(1, 2), self.index)
        expected = parent.past + k.shape[1]
        if keys.shape[-2] != expected:
            raise ValueError(
                f"the cache returned {keys.shape[-2]} key positions at layer {self.index} for {parent.past} cached "
                f"tokens and {k.shape[1]} new ones; MoDAForCausalLM needs a dynamic cache that returns every "
                "position (DynamicCache), in the order they were added"
            )
        return keys.transpose(1, 2), values.transpose(1, 2), parent.key_mask


def check_dynamic(cache: Any) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``cache`` is a transformers cache that grows with every
    token: the queries of a call are taken to be the last positions of what it returns."""
    if not isinstance(cache, Cache):
        raise TypeError(
            f"MoDAForCausalLM takes a transformers Cache (e.g. DynamicCache()) as its cache, not {type(cache).__name__}"
        )
    if getattr(cache, "is_compileable", False) or any(getattr(cache, "is_sliding", ())):
        raise ValueError(
            f"MoDAForCausalLM decodes with a dynamic cache only; {type(cache).__name__} is a static or "
            "sliding-window cache. Pass DynamicCache(), or leave cache_implementation unset in generate()"
        )
