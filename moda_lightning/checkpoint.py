"""Checkpoint integrity and resume checks: a bad ``--ckpt_path`` fails before any work, in one error.

Every check on a checkpoint file lives here, in two layers:

* :func:`check_checkpoint_file` reads the file only. LightningCLI loads a checkpoint's
  hyperparameters while it parses the command line, before any hook of ours runs, and a file that
  is missing, a directory, truncated, or not a checkpoint makes that load end in a traceback, so
  the CLI calls this first (right after parsing the arguments).
* :func:`check_resume` runs once the model and data module exist, before training: the checksum,
  finite weights, command-line flags the checkpoint would silently replace, the tokenizer, and
  whether the weights fit the model. It raises ``ValueError`` and neither prints nor exits, so
  other commands (``moda validate``) can call it too.

Files are read with ``torch.load(weights_only=True, mmap=True, map_location="cpu")``: nothing in
the file runs as code, and the tensors are mapped rather than read into memory. Lightning's own
checkpoints load this way as they are: besides tensors they hold only strings, numbers and plain
containers (ModelCheckpoint's state is paths and tensor scores, the data module's strings and
ints, and our hook adds an int and a dict of strings). No type needs allowlisting with
``torch.serialization.add_safe_globals``, and a file that does need one was not written by
``moda fit``: it is refused, never loaded unrestricted.

Integrity: :func:`add_checksum` (called from ``MoDALightningModule.on_save_checkpoint``, the
last hook before the file is written) stores a SHA-256 over every tensor of ``state_dict`` and
``optimizer_states``, each preceded by its key path, dtype and shape, in a fixed (sorted) order.
``torch.load`` checks no CRC of the zip entries, so a few flipped bytes in a tensor load without
complaint; only this digest finds them. It covers the tensors, not the pickled metadata (steps,
hyperparameters): damage there is found only when it breaks the load. Cost, measured on a 2-core CPU (shared with other
work) for a 73M-parameter model with its AdamW state (3 x 73M fp32 tensors, 0.88 GB): 1.1-1.2 s
to hash (SHA-256 at about 0.8 GB/s on one core; a GPU tensor is copied to the CPU one at a time),
next to 1.3-1.7 s for ``torch.save`` of the same dict. At resume, hashing the memory-mapped file
takes the same 1.1-1.2 s and the finiteness check another 0.4-2 s. The checksum is computed on
global rank zero only, the rank that writes the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from lightning.pytorch import LightningDataModule, LightningModule

CHECKSUM_KEY = "moda_checksum"
"""Checkpoint entry holding ``{"algorithm": "sha256", "covers": ..., "digest": <hex>}``."""

_COVERED = ("state_dict", "optimizer_states")
_TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops")
# Values Trainer.fit takes for ckpt_path besides a file; under `moda fit` every run writes to a new
# version folder, so "last" and "best" would find nothing there and training would start afresh.
_LIGHTNING_KEYWORDS = ("last", "best", "hpc")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2 = b"\x80\x02"  # how torch.save's pre-zip format begins


# --- writing ------------------------------------------------------------------------------------


def add_checksum(checkpoint: dict[str, Any]) -> None:
    """Store the SHA-256 of ``checkpoint``'s weights and optimizer state under :data:`CHECKSUM_KEY`.

    Call it last, once nothing else changes the covered tensors. A checkpoint whose tensors are not
    plain ``torch.Tensor``\\ s (sharded state of a distributed strategy) gets no checksum.
    """
    digest = checkpoint_checksum(checkpoint)
    if digest is not None:
        checkpoint[CHECKSUM_KEY] = {"algorithm": "sha256", "covers": "+".join(_COVERED), "digest": digest}


def checkpoint_checksum(checkpoint: Mapping[str, Any]) -> str | None:
    """Hex SHA-256 over the tensors of ``state_dict`` and ``optimizer_states``, or None when some
    tensor is not a plain ``torch.Tensor`` (its bytes are not all on this rank)."""
    sha = hashlib.sha256()
    for key_path, tensor in _covered_tensors(checkpoint):
        if type(tensor) is not torch.Tensor:  # a subclass (DTensor) holds only this rank's shard
            return None
        # Name, dtype and shape go in too, so moving bytes between tensors changes the digest.
        sha.update(f"{key_path}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(_tensor_bytes(tensor))
    return sha.hexdigest()


def _covered_tensors(checkpoint: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for key in _COVERED:
        yield from _tensors_in(checkpoint.get(key), key)


def _tensors_in(value: Any, key_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nest of dicts and lists, in an order that survives save and load."""
    if isinstance(value, torch.Tensor):
        yield key_path, value
    elif isinstance(value, Mapping):
        # Keys are str (state_dict) or int (optimizer parameter ids); str() orders both.
        for key in sorted(value, key=str):
            yield from _tensors_in(value[key], f"{key_path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors_in(item, f"{key_path}[{index}]")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)  # a copy only when the tensor is not contiguous
    return memoryview(flat.view(torch.uint8).cpu().numpy())


# --- reading ------------------------------------------------------------------------------------


def check_checkpoint_file(ckpt_path: str | os.PathLike[str], *, require_training_state: bool = True) -> None:
    """Refuse a ``--ckpt_path`` that is not a readable Lightning checkpoint, reading nothing but the file.

    Call it before LightningCLI loads the checkpoint's hyperparameters (that load would end in a
    traceback on such a file).

    Args:
        ckpt_path: The path given as ``--ckpt_path``.
        require_training_state: Also refuse a weights-only checkpoint (no optimizer, scheduler and
            loop state), which can be evaluated but not resumed.

    Raises:
        ValueError: One line naming the file, what is wrong with it and what to do.
    """
    read_checkpoint(ckpt_path, require_training_state=require_training_state)


def read_checkpoint(ckpt_path: str | os.PathLike[str], *, require_training_state: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (weights_only, memory-mapped) after checking what the file is.

    Raises:
        ValueError: If the path is missing, a directory, empty, truncated, not a ``torch.save``
            file, holds Python objects beyond tensors and plain containers, is not a Lightning
            checkpoint or (with ``require_training_state``) holds weights only.
    """
    text = str(ckpt_path)
    path = Path(ckpt_path)
    where = f"--ckpt_path {text}"
    if "://" in text:
        raise ValueError(
            f"{where} is a URL; moda checks a checkpoint before training and reads local files only: "
            "copy it to a local disk and pass that path."
        )
    if not path.exists():
        if text in _LIGHTNING_KEYWORDS:
            raise ValueError(
                f"--ckpt_path={text} names no file: moda fit writes every run to a new version folder, where "
                f"Lightning's {text!r} finds no checkpoint and would start from scratch; pass the file, "
                "e.g. --ckpt_path=runs/<config>/<attention>-<norm>/version_N/checkpoints/last.ckpt."
            )
        parent = path.parent if str(path.parent) else Path(".")
        hint = f" ({parent} does not exist either)" if not parent.is_dir() else ""
        raise ValueError(
            f"{where} does not exist{hint}; pass the path of a .ckpt file, e.g. "
            "runs/<config>/<attention>-<norm>/version_N/checkpoints/last.ckpt, or leave out --ckpt_path "
            "to start a new run."
        )
    if path.is_dir():
        found = sorted(p.relative_to(path) for p in path.rglob("*.ckpt"))
        example = str(path / found[0]) if found else str(path / "checkpoints" / "last.ckpt")
        listing = f" (it holds {len(found)}: {short_list(found)})" if found else " (it holds no .ckpt file)"
        raise ValueError(f"{where} is a directory{listing}; pass one checkpoint file, e.g. --ckpt_path={example}.")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(4)
    damaged = f"the save or a copy of it was interrupted; re-run from an earlier checkpoint in {_folder_advice(path)}"
    if size == 0:
        raise ValueError(f"{where} is empty (0 bytes): {damaged}.")
    if head == _ZIP_MAGIC and not zipfile.is_zipfile(path):
        raise ValueError(f"{where} is truncated ({size:,} bytes, its zip directory is missing): {damaged}.")
    if head != _ZIP_MAGIC and not head.startswith(_PICKLE_PROTOCOL_2):
        raise ValueError(
            f"{where} is not a PyTorch checkpoint (it starts with {head!r}, not a torch.save archive); "
            "pass a .ckpt file written by moda fit."
        )
    checkpoint = _load_restricted(path, where, mmap=head == _ZIP_MAGIC)
    _check_layout(checkpoint, path, where, require_training_state)
    return checkpoint


def _load_restricted(path: Path, where: str, mmap: bool) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"a Python object of type {found.group(1)}" if found else "Python objects"
        raise ValueError(
            f"{where} holds {what}, beyond the tensors, numbers and strings of a moda checkpoint, and is not "
            "loaded, since loading it would run code from the file; pass a .ckpt file written by moda fit."
        ) from None
    except Exception as err:  # torch reports a damaged archive as RuntimeError, EOFError, KeyError...
        reason = str(err).split(". ")[0].strip() or type(err).__name__
        raise ValueError(
            f"{where} cannot be read as a PyTorch checkpoint ({reason}): it is damaged or not a torch.save file; "
            f"re-run from an earlier checkpoint in {_folder_advice(path)}."
        ) from None


def _check_layout(checkpoint: Any, path: Path, where: str, require_training_state: bool) -> None:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{where} holds a {type(checkpoint).__name__}, not a training checkpoint (a dict with "
            "'state_dict', 'optimizer_states', ...); pass a .ckpt file written by moda fit."
        )
    if "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        keys = ", ".join(sorted(map(str, checkpoint))[:6]) or "none"
        raise ValueError(
            f"{where} is not a Lightning checkpoint (it has no 'state_dict' or 'pytorch-lightning_version'; "
            f"its keys: {keys}); pass a .ckpt file written by moda fit."
        )
    missing = [key for key in _TRAINING_STATE if key not in checkpoint]
    if require_training_state and missing:
        raise ValueError(
            f"{where} holds weights only (no {', '.join(missing)}: saved with save_weights_only=True), which "
            f"cannot resume training; resume from a full checkpoint such as {path.parent / 'last.ckpt'}, "
            "or leave out --ckpt_path to start a new run."
        )


def short_list(items: Sequence[object], limit: int = 3) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _folder_advice(path: Path) -> str:
    """``<folder>`` and the other checkpoints there, newest first, for 're-run from an earlier one'."""
    folder = path.parent if str(path.parent) else Path(".")
    others = [p for p in folder.glob("*.ckpt") if p.name != path.name]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    found = f" ({short_list([p.name for p in others])})" if others else " (it holds no other checkpoint)"
    return f"{folder}{found}, or leave out --ckpt_path to start a new run"


# --- resuming -----------------------------------------------------------------------------------


def check_resume(
    ckpt_path: str | os.PathLike[str],
    model: LightningModule,
    datamodule: LightningDataModule | None,
    explicit_flags: Mapping[str, object],
    *,
    require_training_state: bool = True,
) -> None:
    """Refuse to resume (or evaluate) from ``ckpt_path`` when the run would silently go wrong.

    In order: the file itself (see :func:`read_checkpoint`); its checksum, if it has one (a file
    without, written before checkpoints carried one, is only checked for finite values, which one
    info line says); NaN or inf in a parameter or in the optimizer state; ``--model.*`` flags
    that disagree with the checkpoint's hyperparameters, which LightningCLI replaces with the
    checkpoint's without a word (``--data.*`` flags take effect, so only the tokenizer is
    compared); a tokenizer other than the one the checkpoint was trained with; and weights that
    do not fit ``model``.

    Args:
        ckpt_path: The checkpoint file (``--ckpt_path``).
        model: The module built for the run (with the checkpoint's hyperparameters applied).
        datamodule: The data module of the run, or None to skip the tokenizer check.
        explicit_flags: ``--model.*``/``--data.*`` values given on the command line, as
            :func:`explicit_flags_from_argv` returns them.
        require_training_state: Refuse a weights-only checkpoint (True to resume training).

    Raises:
        ValueError: One line naming the file, what is wrong and what to do.
    """
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, require_training_state=require_training_state)
    _check_integrity(checkpoint, path)
    _check_finite(checkpoint, path, model)
    _check_flags(checkpoint, path, explicit_flags)
    if datamodule is not None:
        _check_tokenizer(checkpoint, path, datamodule)
    _check_fits_model(checkpoint, path, model)


def _check_integrity(checkpoint: Mapping[str, Any], path: Path) -> None:
    stored = checkpoint.get(CHECKSUM_KEY)
    if not isinstance(stored, Mapping) or stored.get("algorithm") != "sha256":
        rank_zero_info(
            f"checkpoint: {path} has no checksum (written before moda checkpoints carried one), so damage to its "
            "bytes cannot be detected; it was checked only for finite weights."
        )
        return
    if checkpoint_checksum(checkpoint) != stored.get("digest"):
        raise ValueError(
            f"--ckpt_path {path} is corrupted: its weights or optimizer state no longer match the checksum written "
            f"when it was saved (damaged on disk or in a copy); re-run from an earlier checkpoint in "
            f"{_folder_advice(path)}."
        )


def _check_finite(checkpoint: Mapping[str, Any], path: Path, model: LightningModule) -> None:
    # Parameters only: a buffer may hold -inf on purpose (an attention mask).
    state = model.state_dict(keep_vars=True)
    parameter_keys = {name for name, value in state.items() if isinstance(value, torch.nn.Parameter)}
    weights = checkpoint["state_dict"]
    suspects = [(f"weight {key}", weights[key]) for key in sorted(weights) if key in parameter_keys]
    suspects += [(key, t) for key, t in _tensors_in(checkpoint.get("optimizer_states"), "optimizer_states")]
    bad = [name for name, t in suspects if isinstance(t, torch.Tensor) and not all_finite(t)]
    if bad:
        listed = short_list(bad)
        raise ValueError(
            f"--ckpt_path {path} holds NaN or inf values ({listed}): training had diverged before it was saved; "
            f"re-run from an earlier checkpoint in {_folder_advice(path)}, with a lower --model.lr or a longer "
            "--model.warmup_steps."
        )


def all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    # min and max propagate NaN and are inf when any value is: one pass and no [N] bool tensor,
    # several times faster than isfinite(t).all() on a large model.
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_flags(checkpoint: Mapping[str, Any], path: Path, explicit_flags: Mapping[str, object]) -> None:
    saved = checkpoint.get("hyper_parameters") or {}
    conflicts = []
    for flag, asked in explicit_flags.items():
        section, _, key = flag.partition(".")
        # LightningCLI replaces only the model's arguments with the checkpoint's hyperparameters.
        if section != "model" or key.startswith("_") or key not in saved:
            continue
        if not _agrees(asked, saved[key]):
            conflicts.append((flag, asked, saved[key]))
    if conflicts:
        was = ", ".join(f"{flag}={_shown(value)}" for flag, _, value in conflicts)
        asks = " ".join(f"--{flag}={_shown(value)}" for flag, value, _ in conflicts)
        these = "the flag" if len(conflicts) == 1 else "these flags"
        raise ValueError(
            f"--ckpt_path {path} was trained with {was} but the command line asks for {asks}; drop {these} to resume "
            "that run, or leave out --ckpt_path to start a new one."
        )


def _agrees(asked: object, saved: object) -> bool:
    """Whether a command-line value means the checkpoint's value (YAML reads 3e-4 as a string)."""
    if isinstance(asked, (list, tuple)) and isinstance(saved, (list, tuple)):
        return len(asked) == len(saved) and all(_agrees(a, s) for a, s in zip(asked, saved))
    if isinstance(asked, bool) or isinstance(saved, bool):
        return type(asked) is type(saved) and asked == saved
    if isinstance(saved, (int, float)) and isinstance(asked, (str, int, float)):
        try:
            return math.isclose(float(asked), float(saved), rel_tol=1e-12, abs_tol=0.0)
        except ValueError:
            return False
    return asked == saved


def _shown(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_tokenizer(checkpoint: Mapping[str, Any], path: Path, datamodule: LightningDataModule) -> None:
    # Lightning stores a data module's state_dict() under its class's qualname; without it (another
    # data module), the model's vocabulary size is all there is to compare.
    state = checkpoint.get(type(datamodule).__qualname__)
    state = state if isinstance(state, Mapping) else {}
    saved_fp = state.get("tokenizer_fingerprint")
    saved_vocab = state.get("vocab_size", (checkpoint.get("hyper_parameters") or {}).get("vocab_size"))
    current_fp = getattr(datamodule, "tokenizer_fingerprint", None)
    current_vocab = getattr(datamodule, "vocab_size", None)
    fp_differs = None not in (saved_fp, current_fp) and saved_fp != current_fp
    vocab_differs = None not in (saved_vocab, current_vocab) and saved_vocab != current_vocab
    if not (fp_differs or vocab_differs):
        return
    saved_file = state.get("tokenizer_path")
    if saved_file and Path(saved_file).is_file():
        fix = f"pass the tokenizer it was trained with, --data.tokenizer={saved_file}"
    else:
        gone = f" ({saved_file} no longer exists)" if saved_file else ""
        data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
        retrain = [f"--data.{key}={_shown(data_hparams[key])}" for key in ("files", "tokenizer_vocab_size")
                   if data_hparams.get(key) is not None]  # fmt: skip
        fix = f"pass the tokenizer.json it was trained with{gone} via --data.tokenizer=<path>"
        fix += f", or train it again with {' '.join(retrain)}" if retrain else ""
    was = f"{saved_vocab} tokens" + (f", fingerprint {saved_fp[:12]}" if saved_fp else "")
    now = f"{current_vocab} tokens" + (f", fingerprint {current_fp[:12]}" if current_fp else "")
    current_file = getattr(datamodule, "tokenizer_path", None)
    raise ValueError(
        f"--ckpt_path {path} was trained with another tokenizer ({was}) than this run's ({now}, {current_file}); "
        f"{fix}, or leave out --ckpt_path to start a new run."
    )


def state_dict_mismatches(expected: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """How a saved state dict differs from a model's: missing and unexpected keys, differing shapes
    (a few of each named); empty when the weights fit."""
    want = {key: tuple(value.shape) for key, value in expected.items()}
    have = {key: tuple(value.shape) for key, value in saved.items() if isinstance(value, torch.Tensor)}
    problems = []
    if missing := sorted(want.keys() - have.keys()):
        problems.append(f"missing {short_list(missing)}")
    if unexpected := sorted(have.keys() - want.keys()):
        problems.append(f"unexpected {short_list(unexpected)}")
    shapes = [key for key in sorted(want.keys() & have.keys()) if want[key] != have[key]]
    problems += [f"{key} is {list(have[key])} in the file but {list(want[key])} here" for key in shapes[:3]]
    if len(shapes) > 3:
        problems.append(f"{len(shapes) - 3} more shapes differ")
    return problems


def _check_fits_model(checkpoint: Mapping[str, Any], path: Path, model: LightningModule) -> None:
    if not getattr(model, "strict_loading", True):
        return  # the module asked Lightning to load a partial state dict
    problems = state_dict_mismatches(model.state_dict(), checkpoint["state_dict"])
    if problems:
        raise ValueError(
            f"--ckpt_path {path} does not fit the model built for it ({'; '.join(problems)}): it was written by "
            "another model, or another version of the model code or its --model.plugins; resume with the code "
            "and plugins that wrote it, or leave out --ckpt_path to start a new run."
        )


# --- the command line ---------------------------------------------------------------------------


def explicit_flags_from_argv(argv: Sequence[str], sections: Sequence[str] = ("model", "data")) -> dict[str, object]:
    """The ``--<section>.<key>`` values typed on a command line, keyed ``"<section>.<key>"``.

    Takes ``--model.d_model=96`` and ``--model.d_model 96`` alike, and ``--model='{d_model: 96}'``
    (a whole section as YAML); values are read with ``yaml.safe_load`` (a string that is not
    valid YAML stays a string); a later flag wins, as in the parser. Values from ``--config``
    files are not included.
    """
    flags: dict[str, object] = {}
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if index == len(args) or args[index].startswith("--"):
                continue  # a switch such as --print_config
            value = args[index]
            index += 1
        section = name.split(".", 1)[0]
        if section not in sections:
            continue
        parsed = _parse_value(value)
        if "." in name:
            flags[name] = parsed
        elif isinstance(parsed, Mapping):
            flags.update(_flatten(parsed, name))
    return flags


def _parse_value(text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flatten(mapping: Mapping[str, Any], prefix: str) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = value
    return flat
