"""Random state as a function of (seed, epoch), so a resumed run repeats an uninterrupted one."""

from __future__ import annotations

import lightning as L
import torch
from monai.data.utils import set_rnd


def epoch_seed(seed: int, epoch: int, batch: int = -1) -> int:
    """A distinct 31-bit seed per (seed, epoch, batch)."""
    return (seed * 1_000_003 + epoch * 7_919 + (batch + 1) * 104_729 + 1) % 2**31


class EpochSeed(L.Callback):
    """Re-seed python, numpy, torch and every MONAI random transform of the training data at
    the start of each epoch from (seed, epoch), and torch again before each training batch
    from (seed, epoch, batch) for the module's own randomness (masks, stochastic depth).

    Resuming restores weights, optimizer and schedules from ``last.ckpt`` (end of an epoch);
    with the random state a function of the epoch, the resumed epochs draw the same shuffles
    and augmentations as an uninterrupted run, so both end with the same weights (exactly on
    CPU with ``n_workers=0``; data workers draw their streams when their iterator starts).
    The training shuffle is seeded by epoch in the data module's sampler.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        L.seed_everything(seed, workers=True, verbose=False)
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            set_rnd(loader.dataset, seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: object, batch_idx: int) -> None:
        torch.manual_seed(epoch_seed(self.seed, trainer.current_epoch, batch_idx))
