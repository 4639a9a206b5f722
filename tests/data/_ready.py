"""A data module built, prepared and set up for fitting, as the data tests use it."""

from __future__ import annotations

from moda_lightning.data import TextDataModule


def ready(**kwargs: object) -> TextDataModule:
    dm = TextDataModule(**kwargs)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup("fit")
    return dm
