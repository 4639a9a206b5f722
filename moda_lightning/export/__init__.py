"""Hugging Face export: a trained checkpoint as a transformers model folder, and back.

``moda export --ckpt_path CKPT --out DIR`` (:mod:`moda_lightning.export.command`) writes the
folder; :func:`load_exported` reads one into this package's config and state dict. The folder's
modelling code is generated from this package's source (:mod:`moda_lightning.export.bundle`).
See docs/export.md.
"""

from moda_lightning.export.bundle import BundleError, build_bundle
from moda_lightning.export.hf import export_checkpoint, load_exported, write_folder

__all__ = ["BundleError", "build_bundle", "export_checkpoint", "load_exported", "write_folder"]
