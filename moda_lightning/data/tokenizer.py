"""Byte-level BPE tokenizers: train one on a corpus (cached), or load a ``tokenizer.json`` or a named one.

Uses the Hugging Face `tokenizers` library. A named tokenizer (``gpt2``, ``org/name``) is read from
the local Hugging Face cache only (where ``transformers`` and ``huggingface_hub`` downloads go);
nothing is downloaded. The fingerprint defined here identifies a tokenizer in
token-cache keys and checkpoints, so a run never mixes token ids from two vocabularies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moda_lightning.data.corpus import Corpus
from moda_lightning.data.token_cache import require_writable_cache_dir

EOT = "<|endoftext|>"
"""End-of-text special token, appended after every document when documents are packed."""

MIN_VOCAB_SIZE = 257
"""256 byte symbols plus the end-of-text token: the smallest vocabulary a byte-level BPE can have."""


def train_bpe_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    *,
    length: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        documents: The training texts, one string per document.
        vocab_size: Target vocabulary size, including the 256 byte symbols and `EOT`. A corpus too
            small to learn that many merges gives a smaller vocabulary.
        length: Number of documents, only used to size the progress bar.
        show_progress: Show the `tokenizers` progress bar.

    Returns:
        The trained tokenizer: ByteLevel pre-tokenizer and decoder, so any text round-trips.
    """
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 byte symbols, even those the corpus lacks, so no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(documents, trainer, length=length)
    return tokenizer


def _hub_cache() -> str:
    """The Hugging Face cache folder, read when asked (so ``HF_HUB_CACHE`` / ``HF_HOME`` set after import count)."""
    if "HF_HUB_CACHE" in os.environ:
        return os.environ["HF_HUB_CACHE"]
    if "HF_HOME" in os.environ:
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve_tokenizer(spec: str | os.PathLike[str]) -> Path:
    """The ``tokenizer.json`` that `spec` names: a file, a folder holding one (a model folder), or the
    name of a tokenizer in the local Hugging Face cache (``gpt2``, ``EleutherAI/gpt-neox-20b``).

    Raises:
        ValueError: If a ``.json`` path does not exist, or a name is not in the local cache.
    """
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        return path
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    name = str(spec)
    if path.suffix == ".json" or path.is_dir() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return path  # a path, not a name: load_tokenizer says it is missing
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as err:
        raise ValueError(
            f"data: --data.tokenizer={name!r} is not a file, and reading named tokenizers needs huggingface_hub; "
            "install it (pip install huggingface_hub) or pass the path of a tokenizer.json."
        ) from err
    found = try_to_load_from_cache(name, "tokenizer.json", cache_dir=_hub_cache())
    if isinstance(found, str):
        return Path(found)
    raise ValueError(
        f"data: --data.tokenizer={name!r} is neither a file nor a tokenizer in the local Hugging Face cache "
        f"({_hub_cache()}), and nothing is downloaded; fetch it once where there is network "
        f"(huggingface-cli download {name} tokenizer.json) or pass the path of a tokenizer.json."
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file (or a name, see `resolve_tokenizer`) and check
    it has the `EOT` token.

    Raises:
        ValueError: If the file is missing, is not a `tokenizers` JSON file, or lacks `EOT`.
    """
    path = resolve_tokenizer(path)
    if not path.is_file():
        raise ValueError(
            f"data: tokenizer file {str(path)!r} does not exist; pass the tokenizer.json saved by "
            "a previous run (its path is printed after training) or leave --data.tokenizer unset "
            "to train one on the corpus."
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(
            f"data: {str(path)!r} is not a valid tokenizer.json for the `tokenizers` library ({err}); "
            "pass a file written by Tokenizer.save() or leave --data.tokenizer unset to train one."
        ) from err
    eot_id(tokenizer, source=str(path))
    return tokenizer


def eot_id(tokenizer: Tokenizer, source: str = "the tokenizer") -> int:
    """Return the id of `EOT`, which separates packed documents.

    Raises:
        ValueError: If the tokenizer has no such token.
    """
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        special = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)[:8]
        raise ValueError(
            f"data: {source} has no {EOT!r} token, which separates documents in the packed token "
            f"stream (its special tokens: {special}); add it as a special token "
            f"(tokenizer.add_special_tokens([{EOT!r}])) or leave --data.tokenizer unset to train a tokenizer that has it."
        )
    return token_id


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """The size an embedding table needs: the largest token id plus one (special tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hex digest of everything that decides the token ids a tokenizer produces.

    Hashes the canonical JSON (sorted keys) without the padding and truncation settings, which
    change at run time without changing the vocabulary, so a tokenizer and its saved file agree.
    """
    spec = json.loads(tokenizer.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    canonical = json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _publish_once(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final` unless another process published `final` first.

    A hard link fails if `final` exists, so concurrent ranks all end up loading one file (the
    first one written) instead of each keeping its own in-memory copy.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass
    except OSError:
        # Filesystems without hard links: os.replace is still atomic, the last writer wins.
        os.replace(tmp, final)
        return
    tmp.unlink(missing_ok=True)


def cached_tokenizer_path(cache_dir: str | os.PathLike[str], corpus_fingerprint: str, vocab_size: int) -> Path:
    """Where the tokenizer trained on a corpus with a given vocabulary size is cached."""
    return Path(cache_dir) / f"tokenizer-{corpus_fingerprint[:16]}-v{vocab_size}.json"


def get_or_train_tokenizer(
    corpus: Corpus,
    vocab_size: int,
    cache_dir: str | os.PathLike[str],
    *,
    show_progress: bool = True,
    info: Callable[[str], object] = lambda message: None,
) -> tuple[Tokenizer, Path, bool]:
    """Load the tokenizer cached for (corpus, vocab_size), or train and cache it.

    A cached file that does not load, or lacks `EOT`, is damaged (every trained tokenizer has it):
    it is trained again, as deterministically as the first time, and `info` says why.

    Args:
        corpus: The corpus to train on.
        vocab_size: Target vocabulary size.
        cache_dir: Folder of the cache; the file is ``tokenizer-<corpus hash>-v<vocab>.json``.
        show_progress: Show the training progress bar.
        info: Where the one-line message about a damaged cached file goes.

    Returns:
        The tokenizer, the path of its ``tokenizer.json``, and whether it was trained just now.

    Raises:
        ValueError: If the corpus gives no text.
        OSError: If the tokenizer must be trained but `cache_dir` cannot be written (checked before
            training, which takes minutes on a large corpus).
    """
    path = cached_tokenizer_path(cache_dir, corpus.fingerprint(), vocab_size)
    if path.is_file():
        try:
            cached = Tokenizer.from_file(str(path))
            eot_id(cached, source=str(path))
            return cached, path, False
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            info(f"TextDataModule: cached tokenizer {path} is damaged ({_first_line(err)}); training it again")
            # Removed first: publishing never replaces a file that is already there. A folder that
            # cannot be written is named by the check below.
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    require_writable_cache_dir(cache_dir)

    n_docs = 0

    def counted(docs: Iterator[str]) -> Iterator[str]:
        nonlocal n_docs
        for doc in docs:
            n_docs += 1
            yield doc

    # The progress bar needs a document count; only the built-in corpus knows it without a read.
    length = sum(1 for _ in corpus.documents()) if corpus.is_builtin else None
    # Trained on the streamed pieces: they are cut where pre-tokens end, so the counts are the same.
    tokenizer = train_bpe_tokenizer(
        counted(piece.text for piece in corpus.pieces()),
        vocab_size,
        length=length,
        show_progress=show_progress,
    )
    if n_docs == 0:
        raise corpus.empty_error()

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tokenizer.save(str(tmp))
        _publish_once(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # Reload the published file: under a race, every process then uses the same tokenizer.
    return Tokenizer.from_file(str(path)), path, True
