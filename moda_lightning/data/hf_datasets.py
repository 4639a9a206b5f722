"""Documents from a Hugging Face dataset on local disk, through the optional ``datasets`` package.

Two kinds of folder: one written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
(Arrow files, memory-mapped by ``datasets``), or a folder of data files (parquet, JSON lines, CSV,
text) that ``datasets.load_dataset`` reads, streamed. Nothing is downloaded. A saved
``DatasetDict`` gives its ``train`` split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moda_lightning.data.readers import INSTALL_DATA_EXTRA, Piece, ReadMeter

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files ``save_to_disk`` writes at the top of its folder; a folder with none of them is read as data files."""

TRAIN_SPLIT = "train"
_ROWS_PER_READ = 1000


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            "data: --data.dataset needs the `datasets` package, which is not installed; install the data extra "
            f"({INSTALL_DATA_EXTRA}) or pass the files themselves in --data.files."
        ) from err
    return datasets


def _is_saved(folder: Path) -> bool:
    return any((folder / name).is_file() for name in SAVED_MARKERS)


def dataset_files(path: str | os.PathLike[str]) -> list[Path]:
    """Every file under the dataset folder, sorted: what its fingerprint is made of.

    Raises:
        ValueError: If the folder does not exist, or holds no files.
    """
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise ValueError(
            f"data: --data.dataset={str(path)!r} is not a folder (searched from {os.getcwd()}); pass the folder "
            "written by save_to_disk, or a folder of data files."
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"data: --data.dataset={str(path)!r} is an empty folder; pass a folder that holds a dataset.")
    return files


def open_dataset(path: str | os.PathLike[str], text_field: str) -> Any:
    """Open the dataset at `path` and check that it has the text column.

    Returns:
        A ``datasets.Dataset`` (a saved dataset) or ``datasets.IterableDataset`` (data files, streamed).

    Raises:
        ValueError: If ``datasets`` is missing, the folder cannot be read as a dataset, or it has no
            `text_field` column.
    """
    datasets = _datasets()
    folder = Path(os.path.expanduser(str(path)))
    dataset_files(folder)
    try:
        if _is_saved(folder):
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                if TRAIN_SPLIT not in dataset:
                    raise ValueError(f"it holds the splits {sorted(dataset)} but no {TRAIN_SPLIT!r}")
                dataset = dataset[TRAIN_SPLIT]
        else:
            dataset = datasets.load_dataset(str(folder), split=TRAIN_SPLIT, streaming=True)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise ValueError(
            f"data: cannot read --data.dataset={str(path)!r} as a dataset ({err}); pass a folder written by "
            "save_to_disk, or a folder of .parquet / .jsonl / .csv / .txt files."
        ) from err
    columns = dataset.column_names
    if columns is None:  # a streamed dataset whose files do not declare their columns: look at a row
        columns = list(next(iter(dataset), {}).keys())
    if text_field not in columns:
        raise ValueError(
            f"data: --data.dataset={str(path)!r} has no {text_field!r} column (found: {sorted(columns)}); set "
            "--data.text_field to the column that holds the text."
        )
    return dataset


def read_dataset(path: str | os.PathLike[str], text_field: str, meter: ReadMeter | None = None) -> Iterator[Piece]:
    """One document per row of the dataset at `path`: its `text_field`, a batch of rows at a time.

    Null values are skipped, as empty texts are.
    """
    dataset = open_dataset(path, text_field)
    rows = getattr(dataset, "num_rows", None)
    total = sum(p.stat().st_size for p in dataset_files(path))
    done = reported = 0
    for batch in dataset.select_columns([text_field]).iter(batch_size=_ROWS_PER_READ):
        for text in batch[text_field]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise TypeError(
                    f"data: --data.dataset={str(path)!r} column {text_field!r} holds {type(text).__name__} values, "
                    "expected strings of text; set --data.text_field to the column that holds the text."
                )
            yield Piece(text)
        done += len(batch[text_field])
        if meter is not None and rows:  # the folder's bytes, shared evenly among its rows
            meter.bytes += total * done // rows - reported
            reported = total * done // rows
