"""The ``moda`` command: LightningCLI over MoDALightningModule and TextDataModule.

``moda fit --config configs/default.yaml`` trains on the built-in corpus; every init argument
of the model, data module and trainer is a flag (``--model.attention=sdpa``). Other projects
can subclass :class:`MoDACLI` to add their own arguments.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moda_lightning.callbacks.save_on_interrupt import SaveOnInterrupt
from moda_lightning.checkpoint import check_checkpoint_file, check_resume, explicit_flags_from_argv
from moda_lightning.data import TextDataModule
from moda_lightning.lightning_module import MoDALightningModule


_DEFAULT_RUN_NAME = "moda"

_RUN_VERSION_ENV = "MODA_RUN_VERSION"
"""Hands the run folder reserved by rank 0 to the processes Lightning launches for the other ranks."""

_reserved_run_dirs: list[Path] = []
"""Run folders this process created; removed again if the run fails before it trained."""

_interrupt_handlers: list[SaveOnInterrupt] = []
"""The fit's SaveOnInterrupt, which knows the exit status of a run stopped by a signal."""


def _is_rank_zero_process() -> bool:
    """Whether this process is global rank 0 (or not distributed), from the launchers' variables."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class _OneLineErrorParser(LightningArgumentParser):
    """A command-line mistake is one ``moda: error:`` line (with the closest valid flags for an
    unknown one), not the whole usage text above the message."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        unknown = re.findall(r"(--[\w.\-]+)", text) if text.startswith("unrecognized arguments") else []
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        hints = []
        for flag in unknown:
            close = difflib.get_close_matches(flag, options, n=3, cutoff=0.75)
            if close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
        parts = [text, *hints] if hints else [text]
        prog = self.prog.replace("cli.py", "moda").replace(" [options]", "")
        print(f"moda: error: {'; '.join(parts)} (`{prog} --help` lists every option)", file=sys.stderr)
        sys.exit(2)


class MoDACLI(LightningCLI):
    """LightningCLI with the vocabulary linked from the tokenizer, checkpoints, LR logging and
    bf16 on GPUs / fp32 on CPUs unless ``--trainer.precision`` says otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        self.command_line = ["moda", *(sys.argv[1:] if given is None else [str(a) for a in given])]
        self.started = time.monotonic()
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("prog", "moda")
        self.parser_class = _OneLineErrorParser
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's vocabulary follows the tokenizer; it is never written twice.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.filename": "step{step:06d}-val_loss{val/loss:.3f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
                "trainer.gradient_clip_val": 1.0,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": _DEFAULT_RUN_NAME},
                },
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the checkpoint's hyperparameters right after this, with a bare
        # torch.load: a file that is not a checkpoint must be refused here, in one line.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            try:
                check_checkpoint_file(ckpt_path, require_training_state=subcommand == "fit")
            except ValueError as err:
                raise SetupError(err) from err
            self._model_config_before_ckpt = dict(self.config[subcommand].get("model") or {})
        init_from = (self.config[subcommand].get("model") or {}).get("init_from") if subcommand else None
        if init_from:  # before the data module tokenizes anything
            try:
                check_init_from(init_from, self.config[subcommand].model)
            except ValueError as err:
                raise SetupError(err) from err

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand:  # a run, not only a parse
            try:
                check_before_building(config)
            except (ValueError, RuntimeError) as err:
                raise SetupError(err) from err
        if config.trainer.precision is None:
            on_gpu = torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
            config.trainer.precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
        self._name_run(config)
        if self.subcommand == "fit":
            self._reserve_run_folder(config)

    _BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")

    def _keep_batch_counts_of_one(self, written: dict[str, str]) -> None:
        """``--trainer.limit_val_batches=1`` means one batch, not all of them.

        Trainer annotates these ``float | int`` (float first), so the parser turns a written ``1``
        into ``1.0``, which Lightning reads as 100% of the batches: a user asking for one
        validation batch would silently get every one. The written text decides: ``1`` on the
        command line or in a config file's ``trainer:`` section is the count 1, set on the
        trainer after it is built (the parser would turn it back into 1.0 before).
        """
        for key, value in written.items():
            if value == "1" and getattr(self.trainer, key, None) == 1.0:
                setattr(self.trainer, key, 1)

    def _written_trainer_values(self) -> dict[str, str]:
        """Trainer values as written, from config files (their ``trainer:`` section or the file it
        names) and then the command line, later sources winning."""
        import yaml

        written: dict[str, str] = {}
        config = self.config.get(self.subcommand, {}) if self.subcommand else self.config
        files = [str(f) for f in (config.get("config") or [])]
        for file in files:
            try:
                section = (yaml.safe_load(Path(file).read_text()) or {}).get("trainer")
                if isinstance(section, str):  # `trainer: trainer/gpu.yaml`, relative to the file
                    section = yaml.safe_load((Path(file).parent / section).read_text())
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(section, dict):
                written.update({k: str(v) for k, v in section.items() if k in self._BATCH_LIMITS})
        words = self.command_line
        for i, word in enumerate(words):
            for key in self._BATCH_LIMITS:
                flag = f"--trainer.{key}"
                if word.startswith(flag + "="):
                    written[key] = word[len(flag) + 1 :]
                elif word == flag and i + 1 < len(words):
                    written[key] = words[i + 1]
        return written

    @staticmethod
    def _name_run(config) -> None:
        """Put a run under ``runs/<config name>/<attention>-<norm>/version_N`` unless the logger is named,
        so baseline and MoDA runs of one config sit side by side in TensorBoard."""
        logger = config.trainer.logger
        init_args = getattr(logger, "init_args", None)
        if not str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger") or init_args is None:
            return
        if init_args.get("name") != _DEFAULT_RUN_NAME:
            return
        config_files = config.get("config") or []
        stem = Path(str(config_files[0])).stem if config_files else _DEFAULT_RUN_NAME
        init_args.name = f"{stem}/{config.model.attention}-{config.model.norm}"

    @staticmethod
    def _reserve_run_folder(config) -> None:
        """Create the next ``version_N`` folder now and pin the logger to it.

        TensorBoardLogger picks its version by listing the folder when it first writes, so two runs
        started together in one folder would both take ``version_0``; ``mkdir`` is atomic, so here
        each run owns the folder it created.
        """
        logger = config.trainer.logger
        init_args = getattr(logger, "init_args", None)
        if not str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger") or init_args is None:
            return
        if init_args.get("version") is not None:
            return
        if not _is_rank_zero_process():
            inherited = os.environ.get(_RUN_VERSION_ENV)
            init_args.version = int(inherited) if inherited is not None else None
            return
        root = Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "")
        taken = [int(d.name[8:]) for d in root.glob("version_*") if d.name[8:].isdigit()]
        version = max(taken, default=-1) + 1
        try:
            root.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    (root / f"version_{version}").mkdir()
                    break
                except FileExistsError:
                    version += 1
        except OSError as err:
            raise SetupError(
                OSError(
                    f"cannot create the run folder in {root} ({err.strerror}); write runs elsewhere with "
                    "--trainer.logger.init_args.save_dir=DIR"
                )
            ) from err
        _reserved_run_dirs.append(root / f"version_{version}")
        init_args.version = version
        os.environ[_RUN_VERSION_ENV] = str(version)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # The checkpoint callback is this CLI's own; `--trainer.enable_checkpointing=false` asks for
        # no checkpoints, which Lightning would refuse beside it.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if config.get("limit_val_batches") == 0:
            # No validation, so no validation loss to rank checkpoints by: keep `last.ckpt` alone,
            # where Lightning would warn at every save that the monitored key is missing.
            for ckpt in callbacks:
                if isinstance(ckpt, ModelCheckpoint) and ckpt.monitor == "val/loss":
                    ckpt.monitor, ckpt.save_top_k = None, 0
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        try:
            written = self._written_trainer_values()
            with _without_full_batch_notes(written):
                super().instantiate_classes()
        except (ValueError, TypeError, RuntimeError, OSError) as err:
            raise SetupError(err) from err
        self._keep_batch_counts_of_one(written)

    def before_fit(self) -> None:
        try:
            self._check_before_fit()
        except (ValueError, RuntimeError, OSError) as err:
            raise SetupError(err) from err
        if self.trainer.logger is None:
            # `--trainer.logger=false` leaves the learning rate nowhere to go; Lightning's monitor
            # would stop the run at its start rather than log nothing.
            self.trainer.callbacks[:] = [c for c in self.trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        interrupt = next((c for c in self.trainer.callbacks if isinstance(c, SaveOnInterrupt)), None)
        if interrupt is None:
            interrupt = SaveOnInterrupt(self.command_line)
            self.trainer.callbacks.append(interrupt)
        _interrupt_handlers.append(interrupt)

    def _say_what_the_checkpoint_set(self) -> None:
        """Name the model settings of the config files that the checkpoint's replaced (flags typed
        on the command line that disagree are refused by ``check_resume`` instead)."""
        before = getattr(self, "_model_config_before_ckpt", None) or {}
        after = self.config[self.subcommand].get("model") or {}
        replaced = [f"model.{k}={after[k]!r} (config: {before[k]!r})" for k in sorted(before) if k in after and before[k] != after[k]]
        if replaced and self.trainer.is_global_zero:
            print(f"moda: from the checkpoint, replacing the config files' values: {', '.join(replaced)}", file=sys.stderr)

    def _run_subcommand(self, subcommand: str) -> None:
        # A problem found inside fit before the first step (data setup, a checkpoint that does not
        # load, memory) is still a setup problem: one line, and no run folder left behind.
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError, RuntimeError, OSError) as err:
            if self.trainer.global_step == 0:
                raise SetupError(err) from err
            raise

    def after_fit(self) -> None:
        """Say where the run is and how it ended: folder, checkpoints, final validation, tokens, time."""
        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast from rank zero: every rank must ask
        if not trainer.is_global_zero:
            return
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        tokens = getattr(self.model, "tokens_seen", 0)
        lines = [f"moda: trained {trainer.global_step} steps, {tokens:,} tokens, in {minutes}m{seconds:02d}s"]
        lines.append(f"  run folder        {log_dir}")
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            lines.append(f"  final validation  loss {float(val):.4f}, perplexity {math.exp(float(val)):.2f}")
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint):
            if ckpt.best_model_path:
                score = f" ({ckpt.monitor} {float(ckpt.best_model_score):.4f})" if ckpt.best_model_score is not None else ""
                lines.append(f"  best checkpoint   {ckpt.best_model_path}{score}")
            if ckpt.last_model_path:
                lines.append(f"  last checkpoint   {ckpt.last_model_path}")
        print("\n".join(lines), flush=True)

    def _check_before_fit(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path:
            # Checksum, finite weights, flags the checkpoint would override, tokenizer: before any step.
            check_resume(ckpt_path, self.model, self.datamodule, explicit_flags_from_argv(self.command_line))
            self._say_what_the_checkpoint_set()
        # Again with the built objects: a data module of the user's own may set its length itself.
        check_sequence_length(self.datamodule.seq_len, self.model.config.max_seq_len)
        # Fail before training, not in the first step, when the backend cannot run on the chosen device.
        self.model.model.backend.check_device(self.trainer.strategy.root_device.type)


def check_before_building(config: Any) -> None:
    """Refuse what the config alone shows cannot run, before anything is built: the data module trains
    its tokenizer and tokenizes the corpus when it is built (minutes on a large corpus), and the run
    would only then stop at the model, the trainer or the first batch. Checked here: the model's
    architecture and training settings, a sequence longer than the model's, and a trainer accelerator
    or attention backend this machine lacks.

    Raises:
        ValueError: For a bad setting, with every problem the checks found.
        RuntimeError: For what this machine cannot run, with the flags that run the config here.
    """
    from moda_lightning.attention import build_backend
    from moda_lightning.config import MoDAConfig
    from moda_lightning.lightning_module import check_graphs_on_one_process, check_training_args

    model = dict(config.get("model") or {})
    attention = model.get("attention")
    accelerator = str(config.trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        portable = " --model.attention=moda_torch" if attention == "moda_triton" else ""
        if model.get("compile"):
            portable += " --model.compile=false"  # compiling for a CPU needs a C++ toolchain and takes minutes
        raise RuntimeError(
            f"this config trains on a GPU (trainer.accelerator={accelerator}) and no CUDA GPU is visible here; "
            f"to train on this machine's CPU add --trainer.accelerator=cpu{portable}"
        )
    if attention:
        build_backend(attention)  # its own check that it can run here
    MoDAConfig.from_mapping(model, vocab_size=1)  # the tokenizer sets the vocabulary, once built
    training = ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "z_loss")
    if all(k in model for k in training):
        check_training_args(**{k: model[k] for k in training})
    seq_len = (config.get("data") or {}).get("seq_len")
    if seq_len is not None and model.get("max_seq_len") is not None:
        check_sequence_length(seq_len, model["max_seq_len"])
    if model.get("compile"):
        check_graphs_on_one_process(model.get("compile_mode", "default"), planned_processes(config.trainer))


def planned_processes(trainer: Any) -> int:
    """How many processes a trainer config starts: devices per node, as Lightning reads them for a
    GPU (``auto`` and ``-1``: every visible GPU) or a CPU, times the nodes. 1 where the devices value
    cannot be read: Lightning refuses it itself, with its own message."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import CUDAAccelerator

    devices = trainer.get("devices", "auto")
    try:
        if str(trainer.get("accelerator")) in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            every = devices in ("auto", -1, "-1")
            per_node = len(CUDAAccelerator.parse_devices(CUDAAccelerator.auto_device_count() if every else devices) or [0])
        else:
            per_node = int(devices) if str(devices).isdigit() else 1
    except (MisconfigurationException, ValueError, TypeError):
        return 1
    return per_node * int(trainer.get("num_nodes") or 1)


def check_sequence_length(seq_len: int, max_seq_len: int) -> None:
    """Refuse training windows longer than the model's positions reach."""
    if seq_len > max_seq_len:
        raise ValueError(
            f"--data.seq_len={seq_len} is longer than the model's max_seq_len={max_seq_len}; "
            f"lower --data.seq_len or raise --model.max_seq_len to at least {seq_len}."
        )


class SetupError(Exception):
    """A configuration or input problem found before training started; wraps the original error."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _DropNotes(logging.Filter):
    """Drops Lightning info lines that start with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _without_full_batch_notes(written: dict[str, str]):
    """Trainer announces ``limit_val_batches=1.0`` as "100% of the batches" while it is built; for
    a written ``1`` that note is wrong (the count is restored right after), so it is not shown."""
    notes = _DropNotes(tuple(f"`Trainer({key}=1.0)`" for key, value in written.items() if value == "1"))
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addFilter(notes)
    try:
        yield
    finally:
        logger.removeFilter(notes)


class _DropAdvertisements(logging.Filter):
    """Lightning's logger-product tip is printed on every run and asks nothing of the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def _quiet_unactionable_messages() -> None:
    """Silence what a user cannot act on; every other warning stays (Python shows each once)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisements) for f in logger.filters):
        logger.addFilter(_DropAdvertisements())
    # Lightning's own code calls a torch API that torch has deprecated; nothing to do on our side.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``moda`` console script; ``args`` replaces ``sys.argv[1:]`` when given.

    From the command line, a problem found before training (a bad config, an unreadable corpus,
    a backend this machine cannot run) prints one ``moda: error:`` line and exits with status 2;
    ``MODA_DEBUG=1`` shows the traceback. Called with ``args``, the original exception is raised.

    ``moda study ...`` runs a study file (see :mod:`moda_lightning.study`) instead, and
    ``moda eval ...`` scores text files with a checkpoint (:mod:`moda_lightning.evaluate`), and
    ``moda generate ...`` continues prompts with one (:mod:`moda_lightning.generation.command`), and
    ``moda export ...`` writes one as a Hugging Face folder (:mod:`moda_lightning.export.command`).
    """
    argv = sys.argv[1:] if args is None else args
    _quiet_unactionable_messages()
    if argv[:1] in (["study"], ["eval"], ["generate"], ["export"]):
        _tool(argv[0], argv[1:], raise_errors=args is not None)
        return
    try:
        MoDACLI(
            MoDALightningModule,
            TextDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            # argparse would take a unique prefix for a whole option: `--model.attn=true` would
            # silently set `attn_kv_proj`. Options must be spelled out.
            parser_kwargs={"allow_abbrev": False},
            args=args,
        )
    except SetupError as err:
        _discard_untrained_run_dirs()
        if args is not None or os.environ.get("MODA_DEBUG"):
            raise err.cause from None
        print(f"moda: error: {err}\n(set MODA_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        # Lightning's stop is a SystemExit with status 0: a scheduler would read success.
        statuses = [h.exit_status for h in _interrupt_handlers if h.exit_status is not None]
        sys.exit(statuses[0] if statuses else 128 + signal.SIGTERM)
    finally:
        _reserved_run_dirs.clear()
        _interrupt_handlers.clear()


def check_init_from(folder: str, model_args: Any) -> None:
    """``--model.init_from`` names a ``moda export`` folder of the architecture the model flags describe
    (its vocabulary is compared when the model is built, once the tokenizer is known)."""
    from moda_lightning.config import MoDAConfig
    from moda_lightning.export.hf import read_exported_config
    from moda_lightning.lightning_module import check_same_architecture

    exported = read_exported_config(folder)
    values = model_args.as_dict() if hasattr(model_args, "as_dict") else dict(model_args)
    check_same_architecture(MoDAConfig.from_mapping(values, vocab_size=exported.vocab_size), exported, folder)


def _discard_untrained_run_dirs() -> None:
    """Remove the run folders this process created, unless one holds a checkpoint."""
    for run_dir in _reserved_run_dirs:
        if run_dir.is_dir() and not any(run_dir.rglob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)


def resolved_fit_config(args: list[str]) -> dict[str, Any]:
    """The configuration ``moda fit ARGS`` would run with: config files, ``trainer:`` includes,
    stacked overlays and defaults merged, parsed by this CLI (``--print_config``); nothing is
    instantiated, trained or read.

    Raises:
        ValueError: If the arguments do not parse; the message is the parser's last line.
    """
    import contextlib
    import io
    import warnings

    import yaml

    printed, errors = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended")  # in-process use is ours
            main(["fit", *args, "--print_config"])
    except SystemExit as exit_:  # --print_config exits 0 after printing; a parse error exits 2
        if exit_.code not in (0, None):
            last = errors.getvalue().strip().splitlines()
            raise ValueError(f"`moda fit {' '.join(args)}` does not parse: {last[-1] if last else exit_}") from None
    return yaml.safe_load(printed.getvalue())


def _tool(name: str, argv: list[str], raise_errors: bool) -> None:
    """``moda study``, ``eval``, ``generate`` or ``export``: a command of its own module, its ValueErrors one line."""
    import importlib

    modules = {
        "study": "moda_lightning.study",
        "eval": "moda_lightning.evaluate",
        "generate": "moda_lightning.generation.command",
        "export": "moda_lightning.export.command",
    }
    tool_main = importlib.import_module(modules[name]).main
    try:
        code = tool_main(argv)
    except ValueError as err:
        if raise_errors or os.environ.get("MODA_DEBUG"):
            raise
        print(f"moda: error: {err}\n(set MODA_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
