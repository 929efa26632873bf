"""What every entry script shares: results folder, resume, loggers, checkpoints, trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from medssl.data.demo import ensure_demo
from medssl.models.clearml_logger import make_clearml_logger
from medssl.models.weights import save_backbone

log = logging.getLogger(__name__)


def _demo_csv(name: str) -> str:
    """``${demo_csv:NAME}``: the demo cohort's NAME.csv, generated on first use."""
    return str(getattr(ensure_demo(), f"{name}_csv").resolve())


if not OmegaConf.has_resolver("demo_csv"):
    OmegaConf.register_new_resolver("demo_csv", _demo_csv)


class BackboneCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that writes ``<name>.backbone.pt`` (teacher backbone + its config,
    readable with ``torch.load(weights_only=True)``) beside every checkpoint it keeps and,
    with ``export_best``, ``backbone.pt`` for its current best checkpoint."""

    def __init__(self, backbone_attr: str, export_best: bool, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.backbone_attr, self.export_best = backbone_attr, export_best

    @staticmethod
    def companion(filepath: str) -> Path:
        return Path(filepath).with_suffix(".backbone.pt")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            backbone = getattr(trainer.lightning_module, self.backbone_attr)
            extra = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
            save_backbone(self.companion(filepath), backbone, extra)
            if self.export_best and filepath == self.best_model_path:
                save_backbone(Path(filepath).parent / "backbone.pt", backbone, extra)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            self.companion(filepath).unlink(missing_ok=True)


def checkpoint_callbacks(cfg: DictConfig, monitor: str | None,
                         backbone_attr: str) -> list[BackboneCheckpoint]:
    """``last.ckpt`` after every epoch, plus the ``save_top_k`` best by ``monitor``.

    Lightning's own ``save_last`` only refreshes last.ckpt in epochs that also enter the
    top k (Lightning >= 2.5), which would resume an interrupted run from a stale epoch;
    a separate always-saving callback avoids that.
    """
    folder = run_dir(cfg) / "checkpoints"
    callbacks = [BackboneCheckpoint(backbone_attr, export_best=monitor is None, dirpath=folder,
                                    filename="last", monitor=None, save_top_k=1,
                                    enable_version_counter=False)]
    if monitor is not None:
        callbacks.append(BackboneCheckpoint(
            backbone_attr, export_best=True, dirpath=folder, monitor=monitor, mode="min",
            save_top_k=cfg.save_top_k, filename=f"epoch{{epoch:03d}}-{monitor}{{{monitor}:.4f}}",
            auto_insert_metric_name=False))
    return callbacks


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / cfg.experiment


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume: ``resume_training_from``, else an earlier run's last.ckpt."""
    if cfg.resume_training_from is not None and cfg.get("suprem_weights") is not None:
        raise ValueError("resume_training_from and suprem_weights exclude each other: resuming "
                         "restores every weight; start a new experiment to use SuPreM weights")
    if cfg.resume_training_from is not None:
        path = Path(cfg.resume_training_from)
        if not path.is_file():
            raise FileNotFoundError(f"resume_training_from={path}: no such checkpoint")
        return str(path)
    last = run_dir(cfg) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("Resuming the interrupted run from %s", last)
        return str(last)
    return None


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers: list[Logger] = [TensorBoardLogger(save_dir=cfg.results_dir, name=cfg.experiment,
                                               version="tensorboard", default_hp_metric=False)]
    if cfg.clearml:
        clearml = make_clearml_logger(cfg.clearml_project_name, cfg.experiment,
                                      OmegaConf.to_container(cfg, resolve=True))
        if clearml is not None:
            loggers.append(clearml)
    return loggers


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_trainer(cfg: DictConfig, monitor: str | None, backbone_attr: str) -> L.Trainer:
    """Lightning trainer: CPU, one GPU or DDP over devices/nodes, chosen by ``accelerator``,
    ``devices`` and ``num_nodes``."""
    return L.Trainer(
        default_root_dir=run_dir(cfg), max_epochs=cfg.n_epochs, accelerator=cfg.accelerator,
        devices=cfg.devices, num_nodes=cfg.num_nodes, precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate_grad_batches, logger=build_loggers(cfg),
        callbacks=checkpoint_callbacks(cfg, monitor, backbone_attr),
        # Batch-norm statistics over all GPUs under DDP (SyncBatchNorm only runs on GPUs).
        sync_batchnorm=_on_gpu(cfg.accelerator),
        log_every_n_steps=1, num_sanity_val_steps=0, enable_progress_bar=cfg.progress_bar)
