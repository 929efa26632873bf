"""Batch-norm statistics re-estimated with the current weights (PreciseBN).

A batch norm's running mean and variance are an exponential average over the last ~10 training
batches, each computed under older weights. While the layers before it still move (fine-tuning
at a high learning rate), they lag behind what those layers now produce, and an evaluation or a
checkpoint taken then uses stale statistics. Where the features differ little between samples
relative to their mean, as pre-trained features do, a small lag shifts every logit alike: on
AdrenalMNIST3D a classifier checkpoint predicted 62% of its own *training* volumes positive
(prevalence 22%, accuracy 0.54); the same weights with statistics re-estimated on the training
set predicted 41% (accuracy 0.84), AUC unchanged (bench/results/classification.md).

The fix is PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3; fvcore's
``update_bn_stats``): before each validation, reset the statistics and average them over
training batches run through the current weights, with no gradients. torch's
``torch.optim.swa_utils.update_bn`` does the same for a plain loader of tensors; it is not used
because our batches are dicts and because it resets every batch norm, including those of a
frozen backbone kept in evaluation mode, which then would never be re-estimated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.errors import InputError

__all__ = ["PreciseBatchNorm", "recompute_bn_statistics"]


def _training_norms(module: nn.Module) -> list[_BatchNorm]:
    """The batch norms with running statistics that ``module.train()`` puts in training mode."""
    was_training = module.training
    module.train()
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training
             and m.track_running_stats]
    module.train(was_training)
    return norms


@torch.no_grad()
def recompute_bn_statistics(module: nn.Module, batches: Iterable[Any],
                            forward: Callable[[nn.Module, Any], Any],
                            max_batches: int | None = None) -> int:
    """Replace the running statistics of ``module``'s batch norms by their plain average over
    ``batches`` run through the current weights in training mode.

    Only batch norms that are in training mode under ``module.train()`` are re-estimated (a
    module may keep a frozen part in evaluation mode); the others and every parameter stay as
    they are. The module's train/eval mode is restored.

    Args:
        module: the model.
        batches: inputs, each passed as ``forward(module, batch)``.
        forward: runs the model on one batch.
        max_batches: stop after this many batches (None: all).

    Returns:
        the number of batches used; with none, the statistics are left unchanged.
    """
    norms = _training_norms(module)
    if not norms:
        return 0
    was_training = module.training
    module.train()
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    n = 0
    try:
        for batch in islice(batches, max_batches):
            forward(module, batch)
            n += 1
    finally:
        for m, (momentum, mean, var, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if n == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        module.train(was_training)
    return n


class PreciseBatchNorm(L.Callback):
    """Re-estimate batch-norm statistics on training batches before each validation during
    ``fit`` (and at the end of a training epoch that has no validation), so metrics,
    checkpoint selection and the saved checkpoints use statistics of the current weights.

    Under DDP each process averages over its own batches, then the processes' means and
    second moments are averaged (equal batch counts: the samplers pad).

    Args:
        forward: runs the LightningModule on one training batch (already on its device).
        max_batches: training batches per re-estimation (fvcore's default is 200).
    """

    def __init__(self, forward: Callable[[nn.Module, Any], Any], max_batches: int = 200) -> None:
        if max_batches < 1:
            raise InputError(f"max_batches must be >= 1, got {max_batches}")
        self.forward, self.max_batches = forward, max_batches
        self._done_epoch = -1

    def _recompute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if loader is None:
            return
        strategy = trainer.strategy

        def run(module: nn.Module, batch: Any) -> None:
            with trainer.precision_plugin.forward_context():
                self.forward(module, strategy.batch_to_device(batch))

        if recompute_bn_statistics(pl_module, loader, run, self.max_batches) and \
                trainer.world_size > 1:
            with torch.no_grad():
                for m in _training_norms(pl_module):
                    mean = strategy.reduce(m.running_mean.clone(), reduce_op="mean")
                    square = strategy.reduce(m.running_var + m.running_mean ** 2,
                                             reduce_op="mean")
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(square - mean ** 2)
        self._done_epoch = trainer.current_epoch

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule
                                  ) -> None:
        # Only at the end of a training epoch: mid-epoch, iterating the training loader again
        # would reset its workers under the running epoch.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and \
                trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._recompute(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before ModelCheckpoint's hook (Lightning orders checkpoint callbacks last).
        if self._done_epoch != trainer.current_epoch:
            self._recompute(trainer, pl_module)
