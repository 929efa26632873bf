"""Checkpoints with backbone exports beside them, written atomically."""

from __future__ import annotations

import logging
import os
import re
from operator import attrgetter
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from medssl.models.weights import save_backbone

log = logging.getLogger(__name__)
BEST_EXPORT = "backbone.pt"
TOP_K_NAME = "epoch{epoch:03d}-step{step:06d}"
_TOP_K_FILE = re.compile(r"epoch\d{3}-step\d{6}(-v\d+)?\.ckpt")


def export_backbone(path: Path, backbone: object, extra: dict) -> None:
    """``save_backbone`` through a temporary file and a rename: a kill mid-write leaves the
    previous export intact instead of a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_backbone(tmp, backbone, extra)
    os.replace(tmp, path)


class BackboneCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes ``<name>.backbone.pt`` (the module's ``export_attr``
    sub-network and its config, readable with ``torch.load(weights_only=True)``) beside every
    checkpoint it keeps and, with ``export_best``, ``backbone.pt`` for its current best one, in
    the run folder (the parent of the checkpoint folder): the file users take. ``method`` (the
    task that trained it, e.g. ``dino``) is stored in every export."""

    def __init__(self, export_attr: str | None, export_best: bool, method: str | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.export_attr, self.export_best, self.method = export_attr, export_best, method

    @staticmethod
    def companion(filepath: str | Path) -> Path:
        return Path(filepath).with_suffix(".backbone.pt")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero or self.export_attr is None:
            return
        backbone = attrgetter(self.export_attr)(trainer.lightning_module)
        extra = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                 **({"method": self.method} if self.method else {})}
        export_backbone(self.companion(filepath), backbone, extra)
        if self.export_best and filepath == self.best_model_path:
            export_backbone(Path(filepath).parent.parent / BEST_EXPORT, backbone, extra)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            self.companion(filepath).unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After a resume, drop top-k files the restored state does not know: they were
        written after the checkpoint we resumed from (a kill between the two saves)."""
        super().on_train_start(trainer, pl_module)
        if self.monitor is None or not trainer.is_global_zero or self.dirpath is None:
            return
        known = {Path(p).resolve() for p in self.best_k_models}
        for path in Path(self.dirpath).glob("*.ckpt"):
            if _TOP_K_FILE.fullmatch(path.name) and path.resolve() not in known:
                log.info("Removing %s, written after the checkpoint this run resumed from", path)
                path.unlink()
                self.companion(path).unlink(missing_ok=True)


def checkpoint_callbacks(folder: Path, monitor: str | None, mode: str, save_top_k: int,
                         export_attr: str | None, method: str | None = None
                         ) -> list[BackboneCheckpoint]:
    """The ``save_top_k`` best by ``monitor`` (mode ``min`` for losses, ``max`` for AUC or
    Dice), then ``last.ckpt`` after every epoch.

    Lightning's own ``save_last`` only refreshes last.ckpt in epochs that also enter the
    top k (Lightning >= 2.5), which would resume an interrupted run from a stale epoch; a
    separate always-saving callback avoids that. It comes after the top-k callback so that
    last.ckpt records the top-k state of its own epoch (resuming then knows every kept file).
    """
    callbacks = []
    if monitor is not None:
        callbacks.append(BackboneCheckpoint(
            export_attr, export_best=True, method=method, dirpath=folder, monitor=monitor,
            mode=mode, save_top_k=save_top_k, filename=TOP_K_NAME, auto_insert_metric_name=False))
    callbacks.append(BackboneCheckpoint(
        export_attr, export_best=monitor is None, method=method, dirpath=folder, filename="last",
        monitor=None, save_top_k=1, enable_version_counter=False))
    return callbacks
