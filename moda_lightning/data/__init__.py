"""Data for MoDA language models: corpus, byte-level BPE tokenizer, token cache, DataModule.

`TextDataModule` is the entry point; the other names are the building blocks it is made of, for
projects that want the same tokenizer or token cache without Lightning. `TextDataModule` loads on
first use, so the building blocks import without Lightning (and a worker process that tokenizes
starts quickly).
"""

from __future__ import annotations

from typing import Any

from moda_lightning.data.corpus import BUILTIN_CORPUS, Corpus, builtin_documents
from moda_lightning.data.tokenizer import (
    EOT,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from moda_lightning.data.windows import PackedWindows

_LAZY = {
    "TextDataModule": "moda_lightning.data.datamodule",
}

__all__ = [
    "BUILTIN_CORPUS",
    "EOT",
    "Corpus",
    "PackedWindows",
    "TextDataModule",
    "builtin_documents",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
