"""A trained model and its tokenizer, from a ``moda fit`` checkpoint, ready to use on any machine.

The checkpoint carries everything: the model's configuration (its hyperparameters), the weights
and the tokenizer (the data module's state), so nothing from the run folder or ``.cache/`` is
needed. ``moda generate`` and ``moda eval`` start here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from moda_lightning.checkpoint import read_checkpoint
from moda_lightning.config import MoDAConfig
from moda_lightning.model import MoDATransformer

# Backends that need a GPU and what computes the same attention elsewhere.
_PORTABLE_TWIN = {"moda_triton": "moda_torch"}


@dataclass
class TrainedModel:
    """What :func:`load_trained` returns. ``notes`` are one-line remarks to show the user."""

    model: MoDATransformer
    tokenizer: Tokenizer
    device: torch.device
    notes: list[str]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ValueError if absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: give auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU; pass --device cpu (or auto).")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: give auto, cpu, cuda or cuda:N.")
    return resolved


def checkpoint_tokenizer(checkpoint: dict[str, Any], where: str) -> Tokenizer:
    """The tokenizer a checkpoint carries (the data module's state holds it as JSON)."""
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get("tokenizer_json"), str):
            try:
                return Tokenizer.from_str(value["tokenizer_json"])
            except Exception as err:  # the tokenizers library raises its own exception type
                raise ValueError(f"{where}: the tokenizer stored in the checkpoint does not load ({err}).") from None
    raise ValueError(
        f"{where} carries no tokenizer (it was not written by moda fit's data module); "
        "train with moda fit, whose checkpoints hold their tokenizer."
    )


def load_trained(ckpt_path: str | os.PathLike[str], device: str = "auto") -> TrainedModel:
    """The checkpoint's network (``MoDATransformer``, eval mode, on ``device``) and tokenizer.

    A network trained on a GPU-only backend is rebuilt with its portable twin on a CPU (the same
    attention, computed by the reference op), with a note saying so.

    Raises:
        ValueError: for a missing, damaged or foreign checkpoint, or a device this machine lacks.
    """
    where = f"--ckpt_path {ckpt_path}"
    target = resolve_device(device)
    checkpoint = read_checkpoint(ckpt_path, require_training_state=False)
    hparams = checkpoint.get("hyper_parameters") or {}
    notes: list[str] = []
    try:
        config = MoDAConfig.from_mapping(hparams)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: its model configuration does not build ({err}).") from None
    twin = _PORTABLE_TWIN.get(config.attention)
    if twin and target.type == "cpu":
        notes.append(f"the checkpoint was trained with attention={config.attention!r}; on the CPU it runs {twin!r}, "
                     "the same attention computed by the reference op")  # fmt: skip
        config = dataclasses.replace(config, attention=twin)
    tokenizer = checkpoint_tokenizer(checkpoint, where)
    model = MoDATransformer(config)
    prefix = "model."
    state = {
        key[len(prefix) :].replace("_orig_mod.", ""): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where}: its weights do not fit the model its configuration builds "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})."
        )
    return TrainedModel(model.to(target).eval(), tokenizer, target, notes)
