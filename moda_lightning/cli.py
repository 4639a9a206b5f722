"""The ``moda`` command: LightningCLI over MoDALightningModule and TextDataModule.

``moda fit --config configs/default.yaml`` trains on the built-in corpus; every init argument
of the model, data module and trainer is a flag (``--model.attention=sdpa``). Other projects
can subclass :class:`MoDACLI` to add their own arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from moda_lightning.data import TextDataModule
from moda_lightning.lightning_module import MoDALightningModule


_DEFAULT_RUN_NAME = "moda"


class MoDACLI(LightningCLI):
    """LightningCLI with the vocabulary linked from the tokenizer, checkpoints, LR logging and
    bf16 on GPUs / fp32 on CPUs unless ``--trainer.precision`` says otherwise."""

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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            on_gpu = torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
            config.trainer.precision = "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
        self._name_run(config)

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

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, RuntimeError, OSError) as err:
            raise SetupError(err) from err

    def before_fit(self) -> None:
        try:
            self._check_before_fit()
        except (ValueError, RuntimeError) as err:
            raise SetupError(err) from err

    def _check_before_fit(self) -> None:
        seq_len, max_len = self.datamodule.seq_len, self.model.config.max_seq_len
        if seq_len > max_len:
            raise ValueError(
                f"--data.seq_len={seq_len} is longer than the model's max_seq_len={max_len}; "
                f"lower --data.seq_len or raise --model.max_seq_len to at least {seq_len}."
            )
        # Fail before training, not in the first step, when the backend cannot run on the chosen device.
        self.model.model.backend.check_device(self.trainer.strategy.root_device.type)


class SetupError(Exception):
    """A configuration or input problem found before training started; wraps the original error."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``moda`` console script; ``args`` replaces ``sys.argv[1:]`` when given.

    From the command line, a problem found before training (a bad config, an unreadable corpus,
    a backend this machine cannot run) prints one ``moda: error:`` line and exits with status 2;
    ``MODA_DEBUG=1`` shows the traceback. Called with ``args``, the original exception is raised.

    ``moda study ...`` runs a study file (see :mod:`moda_lightning.study`) instead.
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["study"]:
        _study(argv[1:], raise_errors=args is not None)
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
        if args is not None or os.environ.get("MODA_DEBUG"):
            raise err.cause from None
        print(f"moda: error: {err}\n(set MODA_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


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


def _study(argv: list[str], raise_errors: bool) -> None:
    from moda_lightning.study import main as study_main

    try:
        code = study_main(argv)
    except ValueError as err:
        if raise_errors or os.environ.get("MODA_DEBUG"):
            raise
        print(f"moda: error: {err}\n(set MODA_DEBUG=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
