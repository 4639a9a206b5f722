"""``MoDAHFConfig``: an exported model's ``config.json`` as a transformers configuration.

Its fields are :class:`moda_lightning.config.MoDAConfig`'s, under their own names, read from that
dataclass rather than listed here, so a field added to the model is exported without an edit
here; ``attribute_map`` adds the names transformers and its users look for (``hidden_size``,
``max_position_embeddings``, ``tie_word_embeddings``...). ``moda export`` copies this file into
the folder as ``configuration_moda.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig

from moda_lightning.config import MoDAConfig


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None  # vocab_size: required by the model, checked when it is built


MODA_FIELDS = tuple(field.name for field in dataclasses.fields(MoDAConfig))
"""The MoDAConfig fields config.json holds."""


class MoDAHFConfig(PreTrainedConfig):
    """A MoDA language model's architecture for transformers (``model_type`` ``"moda"``).

    ``fused_attention`` (default true) lets the model run the fused Triton attention kernel on
    CUDA when ``moda_kernels`` is installed; false keeps the reference op everywhere.
    """

    model_type = "moda"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "ffn_hidden",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "tie_word_embeddings": "tie_embeddings",
    }

    fused_attention: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # MoDAConfig's fields are not dataclass fields here (they are read from MoDAConfig): they
        # arrive as extra keyword arguments, which the base class stores as attributes.
        for field in dataclasses.fields(MoDAConfig):
            kwargs.setdefault(field.name, _default(field))
        super().__post_init__(**kwargs)
        if self.vocab_size is not None:
            self.moda_config()  # the model's own checks, with its own messages, when the file is read

    def moda_config(self, **overrides: Any) -> MoDAConfig:
        """The :class:`MoDAConfig` these fields describe, with ``overrides`` (e.g. another ``attention``)."""
        values = {name: getattr(self, name) for name in MODA_FIELDS}
        return MoDAConfig(**{**values, **overrides})

    @classmethod
    def from_moda(cls, config: MoDAConfig, **kwargs: Any) -> MoDAHFConfig:
        """The transformers configuration of ``config``; ``kwargs`` are further fields (``eos_token_id``...)."""
        return cls(**{**dataclasses.asdict(config), **kwargs})
