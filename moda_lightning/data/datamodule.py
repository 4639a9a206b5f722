"""`TextDataModule`: packed fixed-length token windows for language-model training.

Pipeline: corpus (`corpus.py`) -> byte-level BPE tokenizer (`tokenizer.py`) -> one cached token
file (`token_cache.py`) -> a contiguous train head and validation tail, cut into windows of
``seq_len + 1`` tokens with stride ``seq_len`` so that the targets of one window chain into the next.
"""

from __future__ import annotations

import bisect
import itertools
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from moda_lightning.data import token_cache as tc
from moda_lightning.data import tokenizer as tk
from moda_lightning.data.corpus import Corpus
from moda_lightning.data.sampler import ResumableLoader, ResumableShuffle
from moda_lightning.data.splits import count_windows, document_ends, held_out_split


class PackedWindows(Dataset[torch.Tensor]):
    """Windows of ``seq_len + 1`` tokens cut from token spans ``[start, stop)`` of a token file.

    Within a span, window ``i`` covers tokens ``[start + i*seq_len, start + i*seq_len + seq_len + 1)``:
    the last token of a window is the first of the next, so ``window[1:]`` (targets) continue the
    stream. No window crosses a span's end. The file is opened lazily in each process, so
    DataLoader workers map it instead of receiving a pickled copy.

    Args:
        path: The token file written by `token_cache.build_token_cache`.
        vocab_size: Vocabulary size; decides the stored dtype.
        spans: Token ranges ``(start, stop)`` to cut windows from, in order.
        seq_len: Training sequence length.
    """

    def __init__(self, path: Path, vocab_size: int, spans: list[tuple[int, int]], seq_len: int) -> None:
        self.path, self.vocab_size, self.seq_len = path, vocab_size, seq_len
        self.spans = list(spans)
        counts = count_windows(self.spans, seq_len)
        # first window index of each span, and the total at the end
        self._offsets = [0, *itertools.accumulate(counts)]
        self._tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int) -> torch.Tensor:
        """Return window `index` as int64 token ids, [seq_len + 1]."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} is out of range for {len(self)} windows")
        if self._tokens is None:
            self._tokens = tc.open_token_cache(self.path, self.vocab_size)
        span = bisect.bisect_right(self._offsets, index) - 1
        begin = self.spans[span][0] + (index - self._offsets[span]) * self.seq_len
        return self._tokens[begin : begin + self.seq_len + 1].to(torch.int64)

    def __getstate__(self) -> dict[str, Any]:
        # Send workers the path, not the mapped tensor.
        return {**self.__dict__, "_tokens": None}


class TextDataModule(L.LightningDataModule):
    """Language-model data: a corpus tokenized once, packed into windows of ``seq_len + 1`` tokens.

    Batches are int64 token ids, [batch_size, seq_len + 1]; use ``batch[:, :-1]`` as inputs and
    ``batch[:, 1:]`` as targets. The validation split is a held-out set of documents chosen at
    random from the whole corpus (``val_fraction`` of the tokens, at least one window, seeded by
    ``val_seed``; see `splits.py`), never overlapping the training text.

    Args:
        files: The training text: a path, a glob (``data/*.txt``), ``pkg:NAME`` (every ``.py`` file
            of the installed package NAME, e.g. ``pkg:torch``), or a list of them. ``.jsonl``
            files give one document per line (the ``text_field`` field); any other file is read
            whole as one UTF-8 document. Default ``None``: the built-in corpus, the Python
            documentation's help topics (``pydoc_data.topics``, ~465 KB), which every Python
            install has, so nothing is downloaded.
        tokenizer: Path of a ``tokenizer.json`` (Hugging Face `tokenizers` format, with an
            ``<|endoftext|>`` token) to use instead of training one. Pass the file a previous run
            trained to resume from its checkpoint or to compare runs. Default ``None``: train a
            byte-level BPE on the corpus and cache it in ``cache_dir``.
        tokenizer_vocab_size: Vocabulary size of the trained tokenizer, including the 256 byte
            symbols and ``<|endoftext|>`` (ignored when ``tokenizer`` is given). The model's
            vocabulary size follows the tokenizer's real one (see ``vocab_size``). Default 4096.
        seq_len: Training sequence length in tokens; each sample holds ``seq_len + 1`` tokens.
            Default 256.
        batch_size: Sequences per batch (per device under DDP). Default 16.
        val_fraction: Fraction of the corpus tokens held out for validation: whole documents (in
            chunks of consecutive ones) chosen at random; must be in (0, 1). Default 0.05.
        text_field: Field holding the text in each line of a ``.jsonl`` file. Default ``"text"``.
        cache_dir: Folder for the trained tokenizer and the token files; reused across runs.
            Default ``".cache/moda"``.
        num_workers: DataLoader worker processes; 0 loads in the main process, which is enough
            here since a batch is a slice of a memory-mapped file. Default 0.
        seed: Seed of the training-window shuffle (a new order every epoch). Default 0.
        val_seed: Seed of the choice of validation documents. Kept apart from ``seed`` so that
            runs with different training orders are validated on the same windows. Default 0.
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
    ) -> None:
        super().__init__()
        problems = []
        if not tk.MIN_VOCAB_SIZE <= tokenizer_vocab_size <= 2**32:
            problems.append(
                f"tokenizer_vocab_size={tokenizer_vocab_size}, expected {tk.MIN_VOCAB_SIZE} to 2**32 "
                "(256 byte symbols + <|endoftext|> at least)"
            )
        if seq_len < 1:
            problems.append(f"seq_len={seq_len}, expected >= 1")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size}, expected >= 1")
        if not 0.0 < val_fraction < 1.0:
            problems.append(f"val_fraction={val_fraction}, expected a fraction in (0, 1) such as 0.05")
        if num_workers < 0:
            problems.append(f"num_workers={num_workers}, expected >= 0")
        if problems:
            raise ValueError("TextDataModule: invalid arguments: " + "; ".join(problems) + ".")
        self.save_hyperparameters()

        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.cache_dir = Path(cache_dir)
        self.num_workers = num_workers
        self.seed = seed
        self.val_seed = val_seed
        # Resolve paths and globs now: a typo fails at instantiation, before any training work.
        self.corpus = Corpus(files, text_field=text_field)
        self.tokenizer_path: Path | None = Path(tokenizer) if tokenizer is not None else None
        if self.tokenizer_path is not None and not self.tokenizer_path.is_file():
            tk.load_tokenizer(self.tokenizer_path)  # fails here with the "does not exist" message
        self._tokenizer: Tokenizer | None = None
        self._fingerprint: str | None = None
        self._cache_path: Path | None = None
        self.train_dataset: PackedWindows | None = None
        self.val_dataset: PackedWindows | None = None

    # --- tokenizer ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, loaded or trained (and cached) on first access."""
        if self._tokenizer is None:
            if self.tokenizer_path is not None:
                self._tokenizer = tk.load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer, self.tokenizer_path, trained = tk.get_or_train_tokenizer(
                    self.corpus, self.tokenizer_vocab_size, self.cache_dir
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
        """The tokenizer's vocabulary size (largest id + 1); link the model's ``vocab_size`` to it."""
        return tk.vocab_size_of(self.tokenizer)

    @property
    def tokenizer_fingerprint(self) -> str:
        """SHA-256 of the tokenizer's canonical JSON; identical tokenizers share it."""
        _ = self.tokenizer  # loads the tokenizer, which sets the fingerprint
        assert self._fingerprint is not None
        return self._fingerprint

    # --- token cache and splits -----------------------------------------------------------------

    def _token_file(self) -> Path:
        """The token file for this corpus and tokenizer, checked against its record once per process.

        Built (atomically, with its record) if missing; rebuilt, with one info line saying why, if
        the check finds it damaged or not matching (see `token_cache` for what is checked and when
        every byte is). A rebuilt file is checked again, so a folder that cannot keep it fails here.

        Raises:
            ValueError: If the corpus gives no text.
            OSError: If the cache folder cannot be written.
            RuntimeError: If the file is still bad right after it was rebuilt.
        """
        if self._cache_path is not None and self._cache_path.is_file():
            return self._cache_path
        key = tc.CacheKey(self.corpus.fingerprint(), self.tokenizer_fingerprint, self.vocab_size)
        path = tc.token_cache_path(self.cache_dir, key.corpus_fingerprint, key.tokenizer_fingerprint, key.vocab_size)
        if not path.is_file():
            rank_zero_info(f"TextDataModule: tokenizing {self.corpus.describe()} into {path}")
        elif (problem := tc.cache_problem(path, key)) is None:
            rank_zero_info(f"TextDataModule: using cached tokens {path}")
            self._cache_path = path
            return path
        else:
            rank_zero_info(f"TextDataModule: token cache {path} {problem}; rebuilding")
        eot = tk.eot_id(self.tokenizer, source=str(self.tokenizer_path))
        record = tc.build_token_cache(self.corpus, self.tokenizer, eot, path, key)
        rank_zero_info(f"TextDataModule: wrote {record.n_tokens:,} tokens to {path}")
        if (problem := tc.cache_problem(path, key)) is not None:
            raise RuntimeError(
                f"data: token cache {path} {problem} right after it was written, so its folder does not keep "
                "what is written there (a full or failing disk, or another program changing it); move the "
                "cache with --data.cache_dir=<another folder>"
            )
        self._cache_path = path
        return path

    def _split(self, tokens: torch.Tensor) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Training and validation spans of the token stream; each split holds one window or more."""
        window, n_tokens = self.seq_len + 1, len(tokens)
        if n_tokens >= 2 * window:
            ends = document_ends(tokens, tk.eot_id(self.tokenizer, source=str(self.tokenizer_path)))
            train, val = held_out_split(n_tokens, ends, self.val_fraction, window, self.val_seed)
            if sum(count_windows(train, self.seq_len)) and sum(count_windows(val, self.seq_len)):
                return train, val
        # Two windows in half the stream leave room for the split to fall between documents.
        fitting = n_tokens // 4 - 1
        shorter = f"lower --data.seq_len (at most {fitting} here), " if fitting >= 1 else ""
        raise ValueError(
            f"data: the corpus is too small: {self.corpus.describe()} has {n_tokens:,} tokens, but one training "
            f"and one validation sequence of seq_len+1={window} tokens need {2 * window:,} or more, in spans "
            f"long enough for a whole window (val_fraction={self.val_fraction}); {shorter}raise "
            "--data.val_fraction, or pass more text in --data.files"
        )

    def prepare_data(self) -> None:
        """Train or load the tokenizer; tokenize the corpus into the cache, or check the cached file (once per node)."""
        self._token_file()

    def setup(self, stage: str | None = None) -> None:
        """Map the token file and cut it into training and held-out validation windows."""
        if self.train_dataset is not None:
            return
        path = self._token_file()
        vocab_size = self.vocab_size
        train, val = self._split(tc.open_token_cache(path, vocab_size))
        self.train_dataset = PackedWindows(path, vocab_size, train, self.seq_len)
        self.val_dataset = PackedWindows(path, vocab_size, val, self.seq_len)
        self._save_tokenizer_to_run_folder()

    def _save_tokenizer_to_run_folder(self) -> None:
        """Write ``tokenizer.json`` into the run folder: the run's token ids mean nothing without it,
        and the cache it came from may be on another machine, or cleaned."""
        trainer = self.trainer
        if trainer is None or trainer.logger is None:
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
        common = dict(
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
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
            "tokenizer_json": self.tokenizer.to_str(),
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
        saved_fp, saved_vocab = state.get("tokenizer_fingerprint"), state.get("vocab_size")
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
