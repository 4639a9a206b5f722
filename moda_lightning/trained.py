"""A trained model and its tokenizer, from a ``moda fit`` checkpoint, ready to use on any machine.

The checkpoint carries everything: the model's configuration (its hyperparameters), the weights
and the tokenizer (the data module's state), so nothing from the run folder or ``.cache/`` is
needed. ``moda generate`` and ``moda eval`` start here: :func:`open_checkpoint` reads and checks
the file, :func:`check_weights` its bytes, :func:`build_model` the network; :func:`load_trained`
does all three.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moda_lightning.attention import backend_class
from moda_lightning.checkpoint import (
    CHECKSUM_KEY,
    all_finite,
    checkpoint_checksum,
    read_checkpoint,
    short_list,
    state_dict_mismatches,
)
from moda_lightning.config import MoDAConfig
from moda_lightning.data import tokenizer as tk
from moda_lightning.model import MoDATransformer

PORTABLE_TWIN = {"moda_triton": "moda_torch"}
"""Backends that need a GPU or a package, and the portable backend that computes the same math
(the weights are the same parameters), used when the first cannot run on the chosen device."""


@dataclass
class ScoringCheckpoint:
    """The parts of a checkpoint that using a trained model needs, read and checked but not yet a model."""

    path: Path
    config: MoDAConfig
    """The model's configuration, with the attention backend that will run here."""
    tokenizer: Tokenizer
    weights: dict[str, Tensor]
    """The network's state dict (``MoDATransformer`` keys), memory-mapped from the file."""
    trained_seq_len: int | None
    trained_batch_size: int | None
    notes: list[str]
    """Things worth one line to the user (a switched backend, a missing checksum)."""
    contents: Mapping[str, Any]
    """The whole loaded file (memory-mapped tensors), for the checksum."""


# --- checking the inputs ---------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (a GPU when torch sees one) as a device.

    Raises:
        ValueError: If ``cuda`` is asked for and torch sees no GPU, or the name is none of these.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was asked for, but torch sees no CUDA GPU on this machine "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                "pass --device cpu, or --device auto to use a GPU only where there is one."
            )
        return torch.device("cuda")
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device {device!r} is not one of cpu, cuda, auto; pass one of them.")


def _for_a_trained_model(message: str) -> str:
    """A message of the shared checkpoint checks, with the advice a user of a trained model can take:
    those checks speak to ``moda fit`` (resuming, starting a new run instead); the facts are the same."""
    replacements = {
        ", or leave out --ckpt_path to start a new run": "",
        "re-run from an earlier checkpoint": "use an earlier checkpoint",
    }
    for old, new in replacements.items():
        message = message.replace(old, new)
    return message


def open_checkpoint(ckpt_path: str | os.PathLike[str], device: torch.device) -> ScoringCheckpoint:
    """Read a ``moda fit`` checkpoint: its file, model configuration and tokenizer.

    The weights are memory-mapped, not checked yet: :func:`check_weights` hashes them, which takes
    a while on a large model, so it runs after the cheaper checks of the text.

    Raises:
        ValueError: If the file is missing or damaged (see ``checkpoint.read_checkpoint``), holds no
            model hyperparameters or tokenizer, or its attention backend cannot run on ``device``
            and has no portable twin.
    """
    path = Path(ckpt_path)
    try:
        checkpoint = read_checkpoint(path, require_training_state=False)
    except ValueError as err:
        raise ValueError(_for_a_trained_model(str(err))) from None
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, Mapping) or "vocab_size" not in hparams:
        raise ValueError(
            f"--ckpt_path {path} holds no model hyperparameters (it was not saved from MoDALightningModule); "
            "pass a .ckpt file written by moda fit."
        )
    notes: list[str] = []
    try:
        config = MoDAConfig.from_mapping(hparams)
        attention, note = choose_attention(config.attention, device)
        if note:
            notes.append(note)
            config = MoDAConfig.from_mapping(hparams, attention=attention)
    except ValueError as err:
        raise ValueError(f"--ckpt_path {path}: {' '.join(str(err).split())}") from None

    data_state = _data_module_state(checkpoint)
    tokenizer = _carried_tokenizer(data_state, path)
    if tk.vocab_size_of(tokenizer) > config.vocab_size:
        raise ValueError(
            f"--ckpt_path {path} carries a tokenizer of {tk.vocab_size_of(tokenizer)} tokens for a model of "
            f"{config.vocab_size}; the file is inconsistent: pass a .ckpt file written by moda fit."
        )
    data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    trained_seq_len = data_state.get("seq_len", data_hparams.get("seq_len"))
    trained_batch_size = data_hparams.get("batch_size")

    if not isinstance(checkpoint.get(CHECKSUM_KEY), Mapping):
        notes.append(
            f"{path} has no checksum (written before moda checkpoints carried one), so damage to its bytes cannot "
            "be detected; its weights are only checked for finite values."
        )
    return ScoringCheckpoint(
        path=path,
        config=config,
        tokenizer=tokenizer,
        weights=_network_weights(checkpoint["state_dict"]),
        trained_seq_len=int(trained_seq_len) if isinstance(trained_seq_len, int) else None,
        trained_batch_size=int(trained_batch_size) if isinstance(trained_batch_size, int) else None,
        notes=notes,
        contents=checkpoint,
    )


def choose_attention(attention: str, device: torch.device) -> tuple[str, str | None]:
    """The backend to run with: ``attention`` if it runs on ``device``, else its portable twin.

    Returns:
        The backend key, and a one-line note when it is not the checkpoint's.

    Raises:
        ValueError: If ``attention`` cannot run on ``device`` and has no portable twin.
    """
    backend = backend_class(attention)()
    try:
        backend.check_available()
        backend.check_device(device.type)
        return attention, None
    except RuntimeError as err:
        twin = PORTABLE_TWIN.get(attention)
        if twin is None:
            raise ValueError(
                f"its attention backend {attention!r} cannot run on {device.type}: {err}"
            ) from None
        return twin, (
            f"the checkpoint was trained with attention={attention}, which cannot run on {device.type} here; "
            f"running {twin}, the same math."
        )


def _data_module_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The data module's saved state: Lightning stores it under the data module's class name, which a
    subclass of TextDataModule changes, so it is found by the tokenizer it holds."""
    for value in checkpoint.values():
        if isinstance(value, Mapping) and "tokenizer_json" in value:
            return value
    return {}


def _carried_tokenizer(data_state: Mapping[str, Any], path: Path) -> Tokenizer:
    text = data_state.get("tokenizer_json")
    if not isinstance(text, str):
        raise ValueError(
            f"--ckpt_path {path} carries no tokenizer (no 'tokenizer_json' in its data module state: it was not "
            "trained with TextDataModule); its token ids cannot be turned back into text. Pass a .ckpt file written "
            "by moda fit."
        )
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"--ckpt_path {path}: the tokenizer it carries does not load ({err}); the file is damaged.") from None
    tk.eot_id(tokenizer, source=f"the tokenizer of {path}")
    return tokenizer


def _network_weights(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``MoDATransformer`` keys from the LightningModule's: without the ``model.`` attribute, and
    without the ``_orig_mod.`` that ``torch.compile``'s wrapper puts in front of a compiled run's."""
    weights = {}
    for key, value in state_dict.items():
        if not key.startswith("model."):
            continue  # another attribute of the module (a metric's state)
        key = key[len("model.") :]
        while key.startswith("_orig_mod."):
            key = key[len("_orig_mod.") :]
        weights[key] = value
    return weights


def check_weights(ckpt: ScoringCheckpoint) -> None:
    """The weights are the ones saved (checksum, where the file has one) and finite.

    Raises:
        ValueError: If the checksum does not match, or a weight holds NaN or inf.
    """
    stored = ckpt.contents.get(CHECKSUM_KEY)
    if isinstance(stored, Mapping) and checkpoint_checksum(ckpt.contents) != stored.get("digest"):
        raise ValueError(
            f"--ckpt_path {ckpt.path} is corrupted: its weights or optimizer state no longer match the checksum "
            f"written when it was saved (damaged on disk or in a copy); use an earlier checkpoint in "
            f"{ckpt.path.parent}, or copy this one again from where it was written."
        )
    bad = [key for key, tensor in ckpt.weights.items() if not all_finite(tensor)]
    if bad:
        raise ValueError(
            f"--ckpt_path {ckpt.path} holds NaN or inf weights ({short_list(bad)}): training had diverged before it "
            f"was saved; use an earlier checkpoint in {ckpt.path.parent}."
        )


def build_model(ckpt: ScoringCheckpoint, device: torch.device) -> MoDATransformer:
    """The bare network with the checkpoint's weights, in eval mode on ``device``.

    Raises:
        ValueError: If the weights do not fit the network the hyperparameters describe.
    """
    model = MoDATransformer(ckpt.config)
    problems = state_dict_mismatches(model.state_dict(), ckpt.weights)
    if problems:
        raise ValueError(
            f"--ckpt_path {ckpt.path} does not fit the model its hyperparameters describe ({'; '.join(problems)}): it "
            "was written by another version of the model code or of its --model.plugins; load it with the code "
            "that wrote it."
        )
    model.load_state_dict(ckpt.weights)
    return model.to(device).eval()



def load_trained(ckpt_path: str | os.PathLike[str], device: str = "auto") -> tuple[MoDATransformer, ScoringCheckpoint]:
    """The checkpoint's network (eval mode, on ``device``: auto, cpu or cuda) after every check, and
    what was read with it (tokenizer, notes for the user, trained shapes).

    Raises:
        ValueError: for a missing, damaged, diverged or foreign checkpoint, or a device this machine lacks.
    """
    target = resolve_device(device)
    ckpt = open_checkpoint(ckpt_path, target)
    check_weights(ckpt)
    return build_model(ckpt, target), ckpt
