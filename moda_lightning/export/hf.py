"""Writing a trained MoDA network as a Hugging Face transformers folder, and reading one back.

The folder holds ``config.json`` (:class:`MoDAHFConfig`, ``model_type`` ``"moda"``, with
``auto_map`` naming the classes below), ``generation_config.json``, ``model.safetensors``, the
tokenizer files, and the modelling code generated from this package's own source
(:mod:`moda_lightning.export.bundle`), which ``trust_remote_code=True`` loads. See docs/export.md.

transformers and safetensors are imported inside the functions that use them: they are needed
for exporting only, not for training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from moda_lightning.attention import backend_class
from moda_lightning.config import MoDAConfig
from moda_lightning.data.tokenizer import EOT, eot_id
from moda_lightning.export.bundle import build_bundle
from moda_lightning.model import MoDATransformer
from moda_lightning.norms import norm_class

WEIGHTS = "model.safetensors"
PREFIX = "model."
"""Where the network sits in ``MoDAForCausalLM``: its state-dict keys get this prefix in the file."""
TIED = ("model.lm_head.weight", "model.embed.weight")
"""(dropped, kept): a tied output projection is the embedding, stored once; transformers re-ties it
on load (``_tied_weights_keys``), as safetensors refuses two names for one tensor."""
AUTO_MAP = {
    "AutoConfig": "configuration_moda.MoDAHFConfig",
    "AutoModelForCausalLM": "modeling_moda.MoDAForCausalLM",
}
_INSTALL = "pip install transformers safetensors"


def require_hf_packages() -> None:
    """Raise ``ValueError`` (one line, with the install command) unless transformers and safetensors import."""
    missing = []
    for name in ("transformers", "safetensors"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(
            f"exporting to a Hugging Face folder needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed here: {_INSTALL}"
        )


def check_exportable(config: MoDAConfig) -> None:
    """Raise ``ValueError`` for a model the folder's code cannot rebuild: one whose attention backend
    or norm placement comes from a plugin (only this package's own source is bundled)."""
    foreign = []
    for kind, key, cls in (("attention backend", config.attention, backend_class(config.attention)),
                           ("norm placement", config.norm, norm_class(config.norm))):  # fmt: skip
        if not cls.__module__.startswith("moda_lightning."):
            foreign.append(f"{kind} {key!r} ({cls.__module__})")
    if foreign:
        raise ValueError(
            f"the model uses {' and '.join(foreign)} from a plugin; an exported folder carries the built-in backends "
            "and norm placements only, so it could not rebuild this network"
        )


def check_out_dir(out: Path, force: bool) -> None:
    """Raise ``ValueError`` if ``out`` cannot take the folder: a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass the path of a folder to create")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} exists and is not empty; pass another folder, or --force to replace it")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, so the folder cannot be created under it")


def write_folder(
    model: MoDATransformer,
    tokenizer: Tokenizer,
    out: str | os.PathLike[str],
    *,
    attention: str | None = None,
    force: bool = False,
) -> list[str]:
    """Write ``model`` and ``tokenizer`` as a transformers folder at ``out``.

    Everything is written into a temporary folder beside ``out`` and moved into place at the end,
    so a failed export leaves no half-written folder (and, with ``force``, the old one intact).

    Args:
        model: the network (its weights are read, on any device).
        tokenizer: the tokenizer it was trained with; it must hold the end-of-text token.
        out: the folder to create.
        attention: the backend key config.json records (default: the model's); the loaded model
            picks its backend per device whatever this says (the fused kernel only where it can run).
        force: replace ``out`` if it exists and is not empty.

    Returns:
        The names of the files written.

    Raises:
        ValueError: for a plugin backend or norm, a tokenizer without end-of-text, an unusable ``out``,
            or missing transformers/safetensors.
        BundleError: (a ValueError) if the model's source holds an import the folder cannot carry.
    """
    require_hf_packages()
    from safetensors.torch import save_file
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from moda_lightning.export.templates.configuration_moda import MoDAHFConfig

    out = Path(out)
    config = dataclasses.replace(model.config, attention=attention or model.config.attention, plugins=[])
    check_exportable(config)
    check_out_dir(out, force)
    eos = eot_id(tokenizer, source="the model's tokenizer")
    bundle = build_bundle()  # before any file is written: an import it cannot carry stops here

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        bundle.write(tmp)
        hf_config = MoDAHFConfig.from_moda(
            config,
            architectures=["MoDAForCausalLM"],
            auto_map=AUTO_MAP,
            eos_token_id=eos,
            pad_token_id=eos,
            dtype=str(model.embed.weight.dtype).removeprefix("torch."),
        )
        hf_config.save_pretrained(tmp)
        # Greedy by default, like `moda generate --temperature 0`; decoding keeps transformers' KV cache.
        GenerationConfig(eos_token_id=eos, pad_token_id=eos, use_cache=True, do_sample=False).save_pretrained(tmp)
        save_file(network_weights(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),  # a copy: saving sets options on it
            eos_token=EOT,
            pad_token=EOT,
            model_max_length=config.max_seq_len,
            clean_up_tokenization_spaces=False,  # decode(encode(text)) == text, as the byte-level BPE gives it
        ).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p.name for p in out.iterdir())


def network_weights(model: MoDATransformer) -> dict[str, Tensor]:
    """The network's state dict under ``MoDAForCausalLM``'s names, on the CPU, contiguous, with a tied
    output projection stored once (as the embedding)."""
    state = {PREFIX + key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if model.lm_head.weight is model.embed.weight:
        del state[TIED[0]]
    return state


def read_exported_config(folder: str | os.PathLike[str], **overrides: Any) -> MoDAConfig:
    """The :class:`MoDAConfig` of an exported folder, from its ``config.json`` alone (cheap: no weights).

    Raises:
        ValueError: if the folder is not one ``moda export`` wrote, or its config is not a valid MoDAConfig.
    """
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{folder} holds no {path.name}; pass a folder written by moda export")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not readable JSON ({err}); export the checkpoint again") from None
    if values.get("model_type") != "moda":
        raise ValueError(
            f"{config_path} describes a {values.get('model_type')!r} model, not a MoDA one (model_type 'moda'); "
            "pass a folder written by moda export"
        )
    names = {field.name for field in dataclasses.fields(MoDAConfig)}
    try:
        config = MoDAConfig.from_mapping({k: v for k, v in values.items() if k in names}, **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: {' '.join(str(err).split())}") from None
    return config


def load_exported(folder: str | os.PathLike[str], **overrides: Any) -> tuple[MoDAConfig, dict[str, Tensor]]:
    """Read an exported folder back: its :class:`MoDAConfig` and a ``MoDATransformer`` state dict.

    Only ``config.json`` and ``model.safetensors`` are read; no code of the folder runs, so this
    needs safetensors but not transformers. ``MoDATransformer(config).load_state_dict(state)``
    rebuilds the network.

    Args:
        folder: a folder written by ``moda export``.
        overrides: MoDAConfig fields to replace, e.g. ``attention="moda_torch"`` to build a folder
            that records ``moda_triton`` on a machine without a GPU.

    Raises:
        ValueError: if the folder is not one ``moda export`` wrote, or its config is not a valid MoDAConfig.
    """
    folder = Path(folder)
    config = read_exported_config(folder, **overrides)
    weights_path = folder / WEIGHTS
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"reading {weights_path} needs safetensors, which is not installed: {_INSTALL}") from None
    stored = load_file(str(weights_path))
    state = {key[len(PREFIX) :]: value for key, value in stored.items() if key.startswith(PREFIX)}
    if foreign := sorted(key for key in stored if not key.startswith(PREFIX)):
        raise ValueError(f"{weights_path} holds weights outside the network ({', '.join(foreign[:3])}); export again")
    dropped, kept = (key[len(PREFIX) :] for key in TIED)
    if config.tie_embeddings and dropped not in state and kept in state:
        state[dropped] = state[kept]  # MoDATransformer's state dict names the tied tensor twice
    return config, state


def export_checkpoint(
    ckpt_path: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False
) -> tuple[list[str], list[str]]:
    """``moda export``'s work: read and check a ``moda fit`` checkpoint, write its folder at ``out``.

    The folder records the attention backend the checkpoint was trained with (the weights are read
    on the CPU, where a ``moda_triton`` checkpoint is built with its portable twin).

    Returns:
        The files written, and notes worth a line to the user (e.g. a checkpoint without checksum).
    """
    from moda_lightning.trained import load_trained

    model, read = load_trained(ckpt_path, "cpu")
    trained = read.contents.get("hyper_parameters", {}).get("attention", model.config.attention)
    # The note on running the portable twin speaks of this process; the folder picks its own backend.
    notes = [note for note in read.notes if f"attention={trained}" not in note]
    with torch.no_grad():
        files = write_folder(model, read.tokenizer, out, attention=trained, force=force)
    return files, notes
