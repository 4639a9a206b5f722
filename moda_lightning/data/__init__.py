"""Data for MoDA language models: corpus, byte-level BPE tokenizer, token cache, DataModule.

`TextDataModule` is the entry point; the other names are the building blocks it is made of, for
projects that want the same tokenizer or token cache without Lightning.
"""

from moda_lightning.data.corpus import BUILTIN_CORPUS, Corpus, builtin_documents
from moda_lightning.data.datamodule import PackedWindows, TextDataModule
from moda_lightning.data.tokenizer import EOT, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

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
