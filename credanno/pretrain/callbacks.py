"""Hooks into the training loop: what a run reports or writes besides the weights.

:class:`~credanno.pretrain.train.Trainer` calls each hook on every callback of its list, on
every rank, in list order. A hook does nothing unless a subclass overrides it; one that
writes files checks ``trainer.env.is_main`` itself. The default list (monitor, progress bar,
metrics writer) is :func:`credanno.pretrain.train.default_callbacks`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from credanno.pretrain.train import Trainer


class Callback:
    """Base class: every hook is a no-op. ``epoch`` is 0-based (the row's ``epoch`` is
    ``epoch + 1``, the number of finished epochs)."""

    def on_train_start(self, trainer: Trainer, start_epoch: int) -> None:
        """Before the first epoch this call trains (``start_epoch`` > 0 on a resume)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the epoch's first step."""

    def on_step_end(self, trainer: Trainer, epoch: int, step: int,
                    loss_sum: torch.Tensor) -> None:
        """After each step; ``loss_sum`` is the sum of this epoch's losses so far (on the
        device: reading it synchronises)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int,
                     row: dict[str, Any]) -> dict[str, Any]:
        """After a finite-loss epoch, before its checkpoint: extra metrics for its row."""
        return {}

    def on_checkpoint(self, trainer: Trainer, metrics: list[dict[str, Any]]) -> None:
        """After rank 0 wrote the checkpoint holding ``metrics`` (one row per epoch)."""

    def on_train_end(self, trainer: Trainer, metrics: list[dict[str, Any]]) -> None:
        """After the last epoch, when training succeeded."""

    def close(self) -> None:
        """Once training stops, also after an error."""


class ProgressBar(Callback):
    """A tqdm bar over all steps of the run (rank 0 only): mean loss, lr and images/s."""

    #: update the bar every this many steps (reading the loss synchronises the device)
    EVERY = 5

    def __init__(self) -> None:
        self.bar = None
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, start_epoch: int) -> None:
        if not trainer.env.is_main:
            return
        from tqdm.auto import tqdm

        steps = trainer.steps_per_epoch
        self.bar = tqdm(total=trainer.cfg.epochs * steps, initial=start_epoch * steps,
                        unit="step", desc=f"pretrain {trainer.run_dir.name}", leave=False)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, trainer: Trainer, epoch: int, step: int,
                    loss_sum: torch.Tensor) -> None:
        steps = trainer.steps_per_epoch
        if self.bar is None or not (step % self.EVERY == self.EVERY - 1 or step == steps - 1):
            return
        elapsed = time.perf_counter() - self._start
        it = epoch * steps + step
        self.bar.update(step + 1 - self.bar.n + epoch * steps)
        self.bar.set_postfix(loss=f"{loss_sum.item() / (step + 1):.3f}",
                             lr=f"{trainer.lr_schedule[it]:.2e}",
                             img_s=f"{(step + 1) * trainer.cfg.batch_size / elapsed:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
