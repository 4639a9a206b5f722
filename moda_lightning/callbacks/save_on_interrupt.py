"""SaveOnInterrupt: SIGTERM or Ctrl-C stops training at the next optimizer step with a checkpoint.

Schedulers preempt a job with SIGTERM and a grace period; people stop runs with Ctrl-C. Either
way the run should be resumable from where it stopped, and a scheduler must see a failure, not
success (Lightning's own SIGTERM handling ends the process with status 0). So the first signal
only records the request. The next training batch that completes an optimizer step (never one
inside a gradient-accumulation window, whose partial gradients no checkpoint holds) raises
Lightning's own stop flag, so the loop ends once that step is logged and its LR step taken; the
callback then saves ``last.ckpt`` and prints the command that resumes it, and ``moda fit`` exits
with :attr:`SaveOnInterrupt.exit_status`, 128 + the signal number (143 for SIGTERM, 130 for
Ctrl-C). A second Ctrl-C stops at once, without a checkpoint.

Under distributed training every rank must stop at the same step, so the ranks agree on the
request (one small all-reduce per step, like Lightning's own SIGTERM check) and save together.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnInterrupt(Callback):
    """Stop at the next optimizer step on SIGTERM / SIGINT, save a resumable checkpoint, exit non-zero.

    Args:
        command: The command line that started the run (e.g. ``["moda", "fit", "--config", ...]``);
            the printed resume command is this with ``--ckpt_path`` set to the saved checkpoint.
            None: only the checkpoint's path is printed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command
        self.requested: int | None = None
        self.saved: Path | None = None
        self._previous: dict[int, Any] = {}

    # --- signal handling ------------------------------------------------------------------------

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = signum
        print(
            f"\nmoda: {signal.Signals(signum).name} received; stopping after the current optimizer step with a "
            "checkpoint" + (" (Ctrl-C again stops now, without one)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    # --- stopping -------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps_optimizer = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if not steps_optimizer:
            return
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            if self.requested is None:
                self.requested = signal.SIGTERM  # another rank got it
            # Lightning's own stop: it ends the loop once this step is logged and its LR step
            # taken, so the checkpoint below is of a finished step.
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if self.requested is None or not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            print(
                f"moda: saved {path} at step {trainer.global_step}; resume with:\n  {self.resume_command(path)}",
                file=sys.stderr,
                flush=True,
            )

    @property
    def exit_status(self) -> int | None:
        """128 + the signal that stopped training (the shell's convention), None if none did."""
        return None if self.saved is None or self.requested is None else 128 + self.requested

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        """``last.ckpt`` in the run's checkpoint folder: where ``moda study`` and a user look first."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folder = Path(callback.dirpath)
        else:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"

    def resume_command(self, checkpoint: Path) -> str:
        if not self.command:
            return f"<the same command> --ckpt_path={checkpoint}"
        words, skip = [], False
        for word in self.command:
            if skip:
                skip = False
                continue
            if word == "--ckpt_path":
                skip = True
                continue
            if not word.startswith("--ckpt_path="):
                words.append(word)
        return shlex.join([*words, f"--ckpt_path={checkpoint}"])
