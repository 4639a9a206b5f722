"""The data module's flags, checked and resolved when it is built, before any tokenizer or cache work.

Each check raises one ``ValueError`` line that names the flag, what was wrong and what to pass
instead; a typo in a path or glob fails here, not after minutes of tokenizer training.
"""

from __future__ import annotations

import os
from pathlib import Path

from moda_lightning.data import tokenizer as tk
from moda_lightning.data.corpus import TOKEN_SUFFIXES, resolve_files
from moda_lightning.data.readers import suffix_of


def check_numbers(
    *,
    tokenizer_vocab_size: int,
    seq_len: int,
    batch_size: int,
    val_fraction: float,
    num_workers: int,
    num_proc: int | None,
    token_vocab_size: int | None,
) -> None:
    """Every numeric flag in its range; all problems in one error."""
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
    if num_proc is not None and num_proc < 1:
        problems.append(f"num_proc={num_proc}, expected >= 1 (or leave it unset: this process, every core)")
    if token_vocab_size is not None and not 1 <= token_vocab_size <= 2**32:
        problems.append(f"token_vocab_size={token_vocab_size}, expected 1 to 2**32")
    if problems:
        raise ValueError("TextDataModule: invalid arguments: " + "; ".join(problems) + ".")


def _entries(files: str | list[str] | None) -> list[str]:
    return [] if files is None else [files] if isinstance(files, (str, os.PathLike)) else list(files)


def token_paths(files: str | list[str] | None, flag: str) -> list[Path] | None:
    """The files, resolved, if they are pre-tokenized (all of them); None if they are text."""
    if files is None or any(str(e).startswith("pkg:") for e in _entries(files)):
        return None
    paths = resolve_files(files)
    kinds = {suffix_of(p) in TOKEN_SUFFIXES for p in paths}
    if kinds == {True}:
        return paths
    if len(kinds) > 1:
        token = next(p for p in paths if suffix_of(p) in TOKEN_SUFFIXES)
        raise ValueError(
            f"data: {flag} mixes pre-tokenized files ({token}) with text files; pass either text files or "
            ".bin / .npy token files, not both."
        )
    return None


def check_same_kind(
    val_files: str | list[str] | None, train_paths: list[Path] | None, val_paths: list[Path] | None
) -> None:
    """``--data.val_files`` are text when ``--data.files`` are, token files when they are."""
    if val_files is not None and (train_paths is None) != (val_paths is None):
        raise ValueError(
            "data: --data.val_files must be of the kind --data.files is (both text, or both pre-tokenized .bin / "
            ".npy files); the model needs one vocabulary for both."
        )


def check_token_flags(
    train_paths: list[Path] | None,
    tokenizer_path: Path | None,
    dataset: str | None,
    token_vocab_size: int | None,
    eot_id: int | None,
) -> None:
    """The flags of pre-tokenized files: needed with them, refused without them (they would do nothing)."""
    if train_paths is None:
        if token_vocab_size is not None or eot_id is not None:
            raise ValueError(
                "data: --data.token_vocab_size and --data.eot_id describe pre-tokenized .bin / .npy files, but "
                "--data.files is text; drop them (the tokenizer decides both) or pass token files."
            )
        return
    if dataset is not None:
        raise ValueError("data: both --data.files and --data.dataset are set; pass one of them.")
    if tokenizer_path is None and (token_vocab_size is None or eot_id is None):
        raise ValueError(
            f"data: the pre-tokenized files ({train_paths[0]}, ...) need their vocabulary size and "
            "end-of-text id: pass --data.tokenizer=<the tokenizer they were made with> or both "
            "--data.token_vocab_size and --data.eot_id (GPT-2 ids: 50257 and 50256)."
        )
    if token_vocab_size is not None and eot_id is not None and not 0 <= eot_id < token_vocab_size:
        raise ValueError(
            f"data: --data.eot_id={eot_id} is outside the vocabulary of --data.token_vocab_size={token_vocab_size}; "
            "pass the end-of-text id of the tokenizer the files were made with."
        )
