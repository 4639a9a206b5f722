"""Decoding a trained model: the KV cache, next-token sampling and the generation loop."""

from moda_lightning.generation.generate import generate
from moda_lightning.generation.kv_cache import KVCache, LayerCache
from moda_lightning.generation.sampling import check_sampling, sample_next

__all__ = ["KVCache", "LayerCache", "check_sampling", "generate", "sample_next"]
