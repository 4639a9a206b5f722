"""`TextDataModule`: packed fixed-length token windows for language-model training.

Pipeline: corpus (`corpus.py`: the built-in corpus, text files, a dataset folder) -> byte-level BPE
tokenizer (`tokenizer.py`, trained or given) -> a cached folder of token shards (`token_cache.py`,
tokenized on every core, checked by `cache_integrity.py`) -> training and held-out validation spans
(`splits.py`), cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` (`windows.py`) so
that the targets of one window chain into the next. Pre-tokenized files (`pretokenized.py`) skip the
first three steps. The flags are checked in `flags.py`, the streams made ready in `token_sources.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from moda_lightning.data import flags
from moda_lightning.data import tokenizer as tk
from moda_lightning.data.cache_manifest import CacheKey
from moda_lightning.data.corpus import Corpus
from moda_lightning.data.sampler import ResumableLoader, ResumableShuffle
from moda_lightning.data.splits import Span, count_windows, held_out_split
from moda_lightning.data.token_files import TokenStream
from moda_lightning.data.token_sources import SourceStream, TokenSources, describe
from moda_lightning.data.windows import PackedWindows

__all__ = ["PackedWindows", "TextDataModule"]

Spans = list[Span]


class TextDataModule(L.LightningDataModule):
    """Language-model data: a corpus tokenized once, packed into windows of ``seq_len + 1`` tokens.

    Batches are int64 token ids, [batch_size, seq_len + 1]; use ``batch[:, :-1]`` as inputs and
    ``batch[:, 1:]`` as targets. The validation split is a held-out set of documents chosen at
    random from the whole corpus (``val_fraction`` of the tokens, at least one window, seeded by
    ``val_seed``; see `splits.py`), never overlapping the training text, unless ``val_files`` are
    given. The formats, flags and examples are in docs/data.md.

    Args:
        files: The training text: a path, a glob (``data/*.txt``), ``pkg:NAME`` (every ``.py`` file
            of the installed package NAME, e.g. ``pkg:torch``), or a list of them. ``.jsonl``,
            ``.jsonl.gz`` and ``.jsonl.zst`` files give one document per line (the ``text_field``
            field), ``.parquet`` files one per row (the ``text_field`` column); any other file is
            one UTF-8 document. All are streamed. Pre-tokenized files instead: nanoGPT ``.bin``
            shards or ``.npy`` token arrays, used as they are (see ``token_vocab_size``). Default
            ``None``: the built-in corpus, the Python documentation's help topics
            (``pydoc_data.topics``, ~465 KB), which every Python install has, so nothing is downloaded.
        tokenizer: A ``tokenizer.json`` (Hugging Face `tokenizers` format, with an ``<|endoftext|>``
            token), a folder holding one, or the name of a tokenizer in the local Hugging Face cache
            (``gpt2``; nothing is downloaded), to use instead of training one. Pass the file a
            previous run trained to resume from its checkpoint or to compare runs. Default ``None``:
            train a byte-level BPE on the corpus and cache it in ``cache_dir``.
        tokenizer_vocab_size: Vocabulary size of the trained tokenizer, including the 256 byte
            symbols and ``<|endoftext|>`` (ignored when ``tokenizer`` is given). The model's
            vocabulary size follows the tokenizer's real one (see ``vocab_size``). Default 4096.
        seq_len: Training sequence length in tokens; each sample holds ``seq_len + 1`` tokens.
            Default 256.
        batch_size: Sequences per batch (per device under DDP). Default 16.
        val_fraction: Fraction of the corpus tokens held out for validation: whole documents (in
            chunks of consecutive ones) chosen at random; must be in (0, 1); unused with
            ``val_files``. Default 0.05.
        text_field: Field (or column) holding the text in JSON lines, parquet files and datasets.
            Default ``"text"``.
        cache_dir: Folder for the trained tokenizer and the token shards; reused across runs, and
            shareable by every node of a multi-node run. Default ``".cache/moda"``.
        num_workers: DataLoader worker processes; 0 loads in the main process, which is enough
            here since a batch is a slice of memory-mapped files. Default 0.
        seed: Seed of the training-window shuffle (a new order every epoch). Default 0.
        val_seed: Seed of the choice of validation documents. Kept apart from ``seed`` so that
            runs with different training orders are validated on the same windows. Default 0.
        dataset: A folder read through the ``datasets`` package instead of ``files``: one written by
            ``save_to_disk`` (its ``train`` split), or a folder of data files. Needs the ``data``
            extra. Default ``None``.
        val_files: Validation text (or token files) kept apart from the training files, in the same
            forms as ``files``; the whole of it is the validation set and all of ``files`` is
            trained on. Default ``None``: hold out documents of ``files``.
        num_proc: Processes that tokenize the corpus; the shards are the same for any number.
            Default ``None``: this process, where the tokenizer spreads each batch over every core
            with its own threads; that beat worker processes on the 2- and 16-core machines
            measured (docs/data.md). ``N > 1``: N worker processes of one thread each (corpora
            under 16 MB still use this process).
        token_vocab_size: Vocabulary size of pre-tokenized files (e.g. 50257 for GPT-2 ids); with
            ``tokenizer`` given it defaults to that tokenizer's. Default ``None``.
        eot_id: End-of-text id of pre-tokenized files, where documents end (50256 for GPT-2); with
            ``tokenizer`` given it defaults to that tokenizer's ``<|endoftext|>``. Default ``None``.
    """

    def __init__(
        self,
        files: str | list[str] | None = None,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        text_field: str = "text",
        cache_dir: str = ".cache/moda",
        num_workers: int = 0,
        seed: int = 0,
        val_seed: int = 0,
        dataset: str | None = None,
        val_files: str | list[str] | None = None,
        num_proc: int | None = None,
        token_vocab_size: int | None = None,
        eot_id: int | None = None,
    ) -> None:
        super().__init__()
        flags.check_numbers(
            tokenizer_vocab_size=tokenizer_vocab_size,
            seq_len=seq_len,
            batch_size=batch_size,
            val_fraction=val_fraction,
            num_workers=num_workers,
            num_proc=num_proc,
            token_vocab_size=token_vocab_size,
        )
        self.save_hyperparameters()

        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.cache_dir = Path(cache_dir)
        self.num_workers = num_workers
        self.seed = seed
        self.val_seed = val_seed
        self.num_proc = num_proc if num_proc is not None else 1
        # Resolve paths and globs now: a typo fails at instantiation, before any training work.
        self.token_paths = flags.token_paths(files, "--data.files")
        self.val_token_paths = flags.token_paths(val_files, "--data.val_files")
        flags.check_same_kind(val_files, self.token_paths, self.val_token_paths)
        self.corpus: Corpus | None = None
        self.val_corpus: Corpus | None = None
        if self.token_paths is None:
            self.corpus = Corpus(files, text_field=text_field, dataset=dataset)
            if val_files is not None:
                self.val_corpus = Corpus(val_files, text_field=text_field)
        self.tokenizer_path: Path | None = tk.resolve_tokenizer(tokenizer) if tokenizer is not None else None
        if self.tokenizer_path is not None and not self.tokenizer_path.is_file():
            tk.load_tokenizer(self.tokenizer_path)  # fails here with the "does not exist" message
        flags.check_token_flags(self.token_paths, self.tokenizer_path, dataset, token_vocab_size, eot_id)
        self.token_vocab_size, self.eot_id = token_vocab_size, eot_id
        self._tokenizer: Tokenizer | None = None
        self._fingerprint: str | None = None
        self._sources = TokenSources(self.cache_dir, self.num_proc, info=rank_zero_info)
        self.train_dataset: PackedWindows | None = None
        self.val_dataset: PackedWindows | None = None

    # --- tokenizer ------------------------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        """Whether there is a tokenizer: given, or trained from a text corpus (not for bare token files)."""
        return self.tokenizer_path is not None or self.corpus is not None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, loaded or trained (and cached) on first access."""
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = tk.load_tokenizer(self.tokenizer_path)
            elif self.corpus is None:
                raise ValueError(
                    "data: the pre-tokenized files came without a tokenizer, so their ids cannot be decoded; pass "
                    "--data.tokenizer=<the tokenizer they were made with>."
                )
            else:
                self._tokenizer, self.tokenizer_path, trained = tk.get_or_train_tokenizer(
                    self.corpus, self.tokenizer_vocab_size, self.cache_dir, info=rank_zero_info
                )
                verb = "trained and saved" if trained else "loaded cached"
                rank_zero_info(
                    f"TextDataModule: {verb} tokenizer ({tk.vocab_size_of(self._tokenizer)} tokens) "
                    f"for {self.corpus.describe()} at {self.tokenizer_path}; reuse it with "
                    f"--data.tokenizer={self.tokenizer_path}"
                )
            self._fingerprint = tk.tokenizer_fingerprint(self._tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The vocabulary size (the tokenizer's largest id + 1, or ``token_vocab_size``); link the
        model's ``vocab_size`` to it."""
        if self.token_paths is not None and self.token_vocab_size is not None:
            return self.token_vocab_size
        return tk.vocab_size_of(self.tokenizer)

    @property
    def eot(self) -> int:
        """The end-of-text id that ends each document of the stream."""
        if self.token_paths is not None and self.eot_id is not None:
            return self.eot_id
        return tk.eot_id(self.tokenizer, source=str(self.tokenizer_path))

    @property
    def tokenizer_fingerprint(self) -> str:
        """SHA-256 of the tokenizer's canonical JSON; identical tokenizers share it. Token files without
        a tokenizer get one of their vocabulary size and end-of-text id."""
        if not self.has_tokenizer:
            return hashlib.sha256(f"token ids;vocab_size={self.vocab_size};eot_id={self.eot}".encode()).hexdigest()
        _ = self.tokenizer  # loads the tokenizer, which sets the fingerprint
        assert self._fingerprint is not None
        return self._fingerprint

    # --- token streams and splits ---------------------------------------------------------------

    @property
    def has_val_files(self) -> bool:
        return self.val_corpus is not None or self.val_token_paths is not None

    def _stream(self, corpus: Corpus | None, token_paths: list[Path] | None) -> SourceStream:
        """The token stream of a text corpus (its cache) or of pre-tokenized files (their ids checked once)."""
        if corpus is not None:
            key = CacheKey(corpus.fingerprint(), self.tokenizer_fingerprint, self.vocab_size)
            return self._sources.corpus_stream(corpus, self.tokenizer, self.eot, key)
        assert token_paths is not None
        return self._sources.file_stream(token_paths, self.vocab_size, self.eot)

    def _split(self, source: SourceStream) -> tuple[Spans, Spans]:
        """Training and validation spans of the token stream; each split holds one window or more."""
        window, n_tokens = self.seq_len + 1, len(source.tokens)
        if n_tokens >= 2 * window:
            ends = self._sources.document_ends(source, self.eot)
            train, val = held_out_split(n_tokens, ends, self.val_fraction, window, self.val_seed)
            if sum(count_windows(train, self.seq_len)) and sum(count_windows(val, self.seq_len)):
                return train, val
        # Two windows in half the stream leave room for the split to fall between documents.
        fitting = n_tokens // 4 - 1
        shorter = f"lower --data.seq_len (at most {fitting} here), " if fitting >= 1 else ""
        raise ValueError(
            f"data: the corpus is too small: {describe(self.corpus, self.token_paths)} has {n_tokens:,} tokens, "
            f"but one training and one validation sequence of seq_len+1={window} tokens need {2 * window:,} or more, "
            f"in spans long enough for a whole window (val_fraction={self.val_fraction}); {shorter}raise "
            "--data.val_fraction, or pass more text in --data.files"
        )

    def _whole(
        self,
        tokens: TokenStream,
        flag: str,
        corpus: Corpus | None,
        token_paths: list[Path] | None,
    ) -> Spans:
        """All of a stream as one span, which must hold a window."""
        if len(tokens) < self.seq_len + 1:
            raise ValueError(
                f"data: {flag} is too small: {describe(corpus, token_paths)} has {len(tokens):,} tokens, fewer "
                f"than one sequence of seq_len+1={self.seq_len + 1}; lower --data.seq_len or pass more text in {flag}"
            )
        return [(0, len(tokens))]

    def prepare_data(self) -> None:
        """Train or load the tokenizer; tokenize the corpus into the cache, or check the cached shards
        (once per node). Pre-tokenized files get their ids checked (once, remembered in the cache).
        Without validation files, the document ends the split needs are stored if they are not yet,
        so the ranks that set up next read them instead of each scanning the stream."""
        source = self._stream(self.corpus, self.token_paths)
        if self.has_val_files:
            self._stream(self.val_corpus, self.val_token_paths)
        else:
            self._sources.document_ends(source, self.eot)

    def setup(self, stage: str | None = None) -> None:
        """Map the token shards and cut them into training and validation windows."""
        if self.train_dataset is not None:
            return
        source = self._stream(self.corpus, self.token_paths)
        tokens = source.tokens
        if not self.has_val_files:
            train, val = self._split(source)
            val_tokens = tokens
        else:
            val_tokens = self._stream(self.val_corpus, self.val_token_paths).tokens
            train = self._whole(tokens, "--data.files", self.corpus, self.token_paths)
            val = self._whole(val_tokens, "--data.val_files", self.val_corpus, self.val_token_paths)
        self.train_dataset = PackedWindows(tokens, train, self.seq_len)
        self.val_dataset = PackedWindows(val_tokens, val, self.seq_len)
        self._save_tokenizer_to_run_folder()

    def _save_tokenizer_to_run_folder(self) -> None:
        """Write ``tokenizer.json`` into the run folder: the run's token ids mean nothing without it,
        and the cache it came from may be on another machine, or cleaned."""
        trainer = self.trainer
        if trainer is None or trainer.logger is None or not self.has_tokenizer:
            return
        log_dir = trainer.log_dir  # a broadcast from rank zero under DDP: every rank asks
        if log_dir is None or not trainer.is_global_zero:
            return
        target = Path(log_dir) / "tokenizer.json"
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tokenizer.json.tmp-{os.getpid()}")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, target)

    def _loader(self, dataset: PackedWindows | None, train: bool) -> DataLoader[torch.Tensor]:
        if dataset is None:
            raise RuntimeError("TextDataModule: call setup() before asking for a dataloader.")
        if self.num_workers > 0:
            # Workers only slice tensors; tokenizers would otherwise warn after each fork.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        common = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
        if not train:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **common)
        trainer = self.trainer
        sampler = ResumableShuffle(
            dataset,
            seed=self.seed,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        loader = ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # Equal batch shapes avoid recompiling a torch.compile'd model on a short last batch.
            drop_last=len(sampler) >= self.batch_size,
            # The loader draws its worker seed from this generator, not from the global one.
            generator=torch.Generator().manual_seed(self.seed),
            **common,
        )
        if trainer is not None:
            # Batches of the current epoch that training has consumed: what a checkpoint must skip.
            loader.batches_done = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return loader

    def train_dataloader(self) -> DataLoader[torch.Tensor]:
        """Shuffled training windows, [batch_size, seq_len + 1] int64."""
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader[torch.Tensor]:
        """Validation windows in stream order, [batch_size, seq_len + 1] int64."""
        return self._loader(self.val_dataset, train=False)

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records about the data: the tokenizer itself and its identity, and the
        seq_len. A checkpoint carries its tokenizer, so it can be used where the run folder is not."""
        return {
            "tokenizer_json": self.tokenizer.to_str() if self.has_tokenizer else None,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "tokenizer_path": str(self.tokenizer_path),
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that a checkpoint was trained with the current tokenizer.

        Raises:
            ValueError: If the checkpoint's tokenizer fingerprint or vocabulary size differs: its
                token ids would mean different text to the model.
        """
        saved_fp, saved_vocab = (
            state.get("tokenizer_fingerprint"),
            state.get("vocab_size"),
        )
        if saved_fp is None:
            return  # not written by this class; nothing to compare
        if saved_fp != self.tokenizer_fingerprint or saved_vocab != self.vocab_size:
            raise ValueError(
                "data: the checkpoint was trained with a different tokenizer: checkpoint "
                f"fingerprint {saved_fp[:16]} (vocab_size={saved_vocab}, file "
                f"{state.get('tokenizer_path')}), current fingerprint {self.tokenizer_fingerprint[:16]} "
                f"(vocab_size={self.vocab_size}, file {self.tokenizer_path}). Pass the tokenizer.json "
                "the run was trained with via --data.tokenizer=<path> (and the same --data.files)."
            )
