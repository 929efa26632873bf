"""``run(cfg)`` per entry script: compose data, module and trainer from a Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from medssl.data.augment import MultiCropd
from medssl.data.datamodule import CohortDataModule
from medssl.data.pipeline import IMAGE, Preprocessing
from medssl.models.dino import DINO
from medssl.models.harness import build_trainer, resume_checkpoint, run_dir, save_config
from medssl.models.weights import load_weights

log = logging.getLogger(__name__)


def _multicrop(cfg: DictConfig, fixed_seed: int | None = None) -> MultiCropd:
    return MultiCropd(IMAGE, global_size=cfg.global_crop_size, local_size=cfg.local_crop_size,
                      global_scale=cfg.global_crop_scale, local_scale=cfg.local_crop_scale,
                      n_crops=cfg.n_crops, fixed_seed=fixed_seed)


def _knn_target(cfg: DictConfig) -> str | None:
    """``knn_target`` when the CSV has that column; otherwise the k-NN monitor is off."""
    if cfg.knn_target is None or not Path(cfg.csv_path).is_file():
        return cfg.knn_target  # a missing CSV is reported by the data module, with context
    columns = pd.read_csv(cfg.csv_path, nrows=0).columns.str.strip()
    if cfg.knn_target not in columns:
        log.info("knn_target %s is not a column of %s: no k-NN monitor", cfg.knn_target,
                 cfg.csv_path)
        return None
    return cfg.knn_target


def run_dino(cfg: DictConfig) -> L.Trainer:
    """DINO pre-training as configured by ``configs/dino.yaml``; returns the fitted trainer."""
    resume = resume_checkpoint(cfg)  # fails early on conflicting options
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    backbone_config = OmegaConf.to_container(cfg.backbone, resolve=True)
    val_folds = list(cfg.val_folds or []) or None
    knn_target = _knn_target(cfg) if val_folds else None
    module = DINO(
        backbone_config, out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim,
        bottleneck_dim=cfg.bottleneck_dim, head_batch_norm=cfg.head_batch_norm, lr=cfg.lr,
        min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs, weight_decay=cfg.weight_decay,
        weight_decay_end=cfg.weight_decay_end, momentum_teacher=cfg.momentum_teacher,
        teacher_temp=cfg.teacher_temp, warmup_teacher_temp=cfg.warmup_teacher_temp,
        warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
        student_temp=cfg.student_temp, norm_last_layer=cfg.norm_last_layer,
        freeze_last_layer=cfg.freeze_last_layer, clip_grad=cfg.clip_grad,
        knn_target=knn_target, knn_k=cfg.knn_k)
    for what in ("global_crop_size", "local_crop_size"):
        module.student_backbone.check_input_size(cfg[what], what)
    if cfg.suprem_weights is not None:
        report = load_weights(module.student_backbone, cfg.suprem_weights)
        module.teacher_backbone.load_state_dict(module.student_backbone.state_dict())
        (log.info if report.complete else log.warning)("suprem_weights: %s", report)
    data = CohortDataModule(
        cfg.csv_path, "ssl", list(cfg.train_folds), val_folds,
        Preprocessing(resize_to=cfg.resize_to, lower_percentile=cfg.lower_percentile,
                      upper_percentile=cfg.upper_percentile),
        train_augment=[_multicrop(cfg)],
        val_augment=[_multicrop(cfg, fixed_seed=0 if cfg.seed is None else cfg.seed)],
        batch_size=cfg.batch_size, n_workers=cfg.n_workers, knn_target=knn_target,
        knn_size=cfg.global_crop_size, cache=cfg.cache, cache_dir=cfg.cache_dir,
        reset_cache=cfg.reset_cache)
    data.setup("fit")  # every CSV and volume problem surfaces here, before training
    save_config(cfg)
    trainer = build_trainer(cfg, "val_dino_loss" if val_folds else None, "teacher_backbone")
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    log.info("Results in %s", run_dir(cfg))
    return trainer
