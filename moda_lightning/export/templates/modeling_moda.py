"""``MoDAForCausalLM``: :class:`moda_lightning.model.MoDATransformer` behind transformers' model API.

A thin wrapper: the network is the package's own module (``self.model``, with the same parameter
names, so the weights load unchanged); this file only adapts the calling convention
(``input_ids``/``attention_mask``/``labels`` in, ``CausalLMOutputWithPast`` out), picks the
attention backend for the device a call runs on, and plugs into ``generate()``.

``generate()`` runs without a cache: every step recomputes the whole sequence. A MoDA layer
attends over sequence keys and its token's depth slots under one softmax, which transformers'
attention and cache classes do not express; the package's own ``MoDATransformer.generate``
decodes with a KV cache and is the fast path.

``moda export`` copies this file into the folder as ``modeling_moda.py``, with the package's
modules it imports copied beside it (``moda_lightning/export/bundle.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from moda_lightning.attention import AttentionBackend, backend_class, build_backend
from moda_lightning.export.templates.configuration_moda import MoDAHFConfig
from moda_lightning.generation.kv_cache import KVCache
from moda_lightning.model import MoDATransformer, RotaryEmbedding
from moda_lightning.norms import RMSNorm

PORTABLE = "moda_torch"
"""The reference op: any device and dtype. Built with the model, since the device is not known yet."""
FUSED = "moda_triton"
"""The fused Triton kernel (from an installed ``moda_kernels``), the same math: CUDA only."""


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
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for ``input_ids [B, T]``; with ``labels``, also the mean next-token loss.

        ``attention_mask [B, T]`` marks padding with 0: padded positions are hidden from every
        query and each row's rotary positions count its own tokens only, as the package's
        decoding does for left-padded prompts. Cache arguments (``use_cache``, ``cache``) are
        accepted and ignored: this model keeps no cache. ``cache`` is named in the signature because
        ``generate()`` refuses a cache it is handed (``cache=DynamicCache()``, or the older
        ``past_key_values=``) unless the model's ``forward`` names that argument.
        """
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MoDAForCausalLM takes input_ids (token ids [B, T]); inputs_embeds are not supported.")
        self.use_backend(self.backend_for(input_ids.device))
        if attention_mask is None or bool(attention_mask.all()):
            logits = self.model(input_ids)
        else:
            logits = self._forward_padded(input_ids, attention_mask)
        loss = None
        if labels is not None:
            for unused in ("use_cache", "cache", "past_key_values", "output_attentions", "output_hidden_states"):
                kwargs.pop(unused, None)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()

    def _forward_padded(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # The package's padded path is its decoding one: a fresh KV cache filled by this one call,
        # whose token mask hides padding and whose positions skip it.
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)} "
                "(this model keeps no cache: pass the whole sequence and its mask)."
            )
        device, cfg = input_ids.device, self.model.config
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = self.model.embed.weight.dtype
        kv = KVCache(cfg.n_layers, input_ids.shape[0], input_ids.shape[1], cfg.n_kv_heads, cfg.head_dim,
                     device=device, dtype=dtype)  # fmt: skip
        return self.model(input_ids, cache=kv, token_mask=attention_mask.bool())

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no transformers cache: generate() recomputes the sequence each step

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Tensor | None]:
        """The whole sequence so far at every step (no cache), whatever ``use_cache`` says."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
