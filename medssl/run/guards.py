"""A non-finite training loss or gradient stops the run naming the batch's patients, for every
method."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss or a gradient became NaN or inf; the message names the batch's rows."""


def _batch_rows(batch: object) -> str:
    """"PatientID(s) A, B (rows: ...)" for a batch of cohort items; "" for other batches."""
    if not isinstance(batch, Mapping) or "PatientID" not in batch:
        return ""
    ids = ", ".join(str(p) for p in batch["PatientID"])
    rows = batch.get("row")
    return f"PatientID(s) {ids}" + (f" (rows: {'; '.join(map(str, rows))})" if rows else "")


class FiniteLossCheck(L.Callback):
    """Stop at the first non-finite training loss (before its backward pass) or non-finite
    gradient (before clipping and the optimizer step, which would spread it into every
    weight), naming the batch's PatientIDs and CSV rows (usually a damaged volume or too high
    a learning rate). Nothing is saved on the way out, so ``last.ckpt`` keeps the last good
    epoch. Under DDP every process stops at the same step. Under ``16-mixed`` precision the
    gradient scaler skips steps with non-finite gradients itself, so only the loss is checked.
    An error a module raises itself during a training batch is logged with the batch's
    patients too."""

    def __init__(self) -> None:
        self._batch: object = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        self._batch = batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        self._batch = None

    def _stop(self, trainer: L.Trainer, finite: bool, what: Callable[[], str]) -> None:
        # One small all-reduce: a rank that stopped alone would leave the others waiting.
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        where = _batch_rows(self._batch) or "no PatientIDs"
        when = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        what = (f"{what()} at {when}; the batch held {where}" if not finite else
                f"non-finite training loss or gradient on another process at {when} (this "
                f"process's batch held {where})")
        raise NonFiniteLossError(
            f"{what}. Check those rows' volumes, or lower lr / lengthen the warm-up. Nothing "
            "was saved after the last good epoch: re-running resumes from last.ckpt")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        self._stop(trainer, bool(torch.isfinite(loss.detach()).all()), lambda: (
            f"non-finite training loss ({loss.detach().float().flatten()[0].item()})"))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if str(trainer.precision).startswith("16"):
            return
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch.stack(torch._foreach_norm([g for _, g in named])).float()
        bad = [n for (n, _), ok in zip(named, torch.isfinite(norms).tolist(), strict=True)
               if not ok]
        self._stop(trainer, not bad, lambda: f"non-finite gradient in {len(bad)} parameter(s) "
                   f"(e.g. {', '.join(bad[:3])}) with a finite loss")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if self._batch is not None and not isinstance(exception, NonFiniteLossError):
            where = _batch_rows(self._batch)
            if where:
                log.error("Training stopped inside a batch holding %s", where)
