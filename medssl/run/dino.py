"""DINO pre-training as a run-layer task: multi-crop data, the DINO module, the k-NN monitor."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from monai.data import DataLoader
from omegaconf import MISSING, DictConfig, open_dict

from medssl.data.augment import MultiCropd
from medssl.data.datamodule import CohortDataModule
from medssl.data.pipeline import (
    IMAGE,
    Preprocessing,
    build_dataset,
    preprocessing_transforms,
    rank_share,
    to_items,
)
from medssl.data.table import category_order, is_missing
from medssl.models.dino import DINO
from medssl.models.knn import KNNMonitor
from medssl.models.weights import LoadReport
from medssl.run.config import RunConfig, backbone_config, kwargs_for, plain, schema
from medssl.run.harness import Task, WeightSource

log = logging.getLogger(__name__)
# Batch key of the k-NN monitor's class index (not the CSV column's name, which may be "label").
KNN_KEY = "knn_class"


@dataclass
class AugmentConfig:
    """``augment:`` keys: ``RandCropView`` arguments shared by every view (values and comments:
    ``configs/dino.yaml``)."""

    max_aspect_ratio: float = MISSING
    flip_axes: list[int] = MISSING
    flip_prob: float = MISSING
    rotate_deg: float = MISSING
    rotate_prob: float = MISSING
    intensity_scale: float = MISSING
    intensity_scale_prob: float = MISSING
    gamma: list[float] = MISSING
    gamma_prob: float = MISSING
    noise_std: float = MISSING
    noise_prob: float = MISSING
    blur_sigma: list[float] = MISSING
    padding_mode: str = MISSING


@schema("dino")
@dataclass
class DinoConfig(RunConfig):
    """DINO keys (values and comments: ``configs/dino.yaml``)."""

    knn_target: str | None = MISSING
    knn_k: int = MISSING
    min_lr: float = MISSING
    warmup_epochs: int = MISSING
    weight_decay: float = MISSING
    weight_decay_end: float = MISSING
    momentum_teacher: float = MISSING
    n_crops: int = MISSING
    global_crop_size: list[int] = MISSING
    global_crop_scale: list[float] = MISSING
    local_crop_size: list[int] = MISSING
    local_crop_scale: list[float] = MISSING
    global_blur_prob: list[float] = MISSING
    global_invert_prob: list[float] = MISSING
    local_blur_prob: float = MISSING
    local_invert_prob: float = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_on_device: bool = MISSING
    optimizer: str = MISSING
    out_dim: int = MISSING
    hidden_dim: int = MISSING
    bottleneck_dim: int = MISSING
    head_batch_norm: bool = MISSING
    teacher_temp: float = MISSING
    warmup_teacher_temp: float = MISSING
    warmup_teacher_temp_epochs: int = MISSING
    student_temp: float = MISSING
    norm_last_layer: bool = MISSING
    freeze_last_layer: int = MISSING
    clip_grad: float = MISSING
    drop_path_rate: float = MISSING
    centering: str = MISSING
    center_momentum: float = MISSING
    koleo_weight: float = MISSING
    pooling: str = MISSING


def preprocessing(cfg: DictConfig, **changes: Any) -> Preprocessing:
    """The run's preprocessing settings from the config keys of the same names."""
    return Preprocessing(**kwargs_for(Preprocessing, cfg, **changes))


class DinoTask(Task):
    name = "dino"
    export_attr = "teacher_backbone"
    init_attr = "student_backbone"

    def _multicrop(self, cfg: DictConfig, fixed_seed: int | None = None) -> MultiCropd:
        # Per-view probabilities are top-level keys named as MultiCropd's arguments; the
        # ``augment:`` group holds the RandCropView options every view shares.
        return MultiCropd(IMAGE, **kwargs_for(
            MultiCropd, cfg, global_size=plain(cfg.global_crop_size),
            local_size=plain(cfg.local_crop_size), global_scale=plain(cfg.global_crop_scale),
            local_scale=plain(cfg.local_crop_scale), fixed_seed=fixed_seed),
            **plain(cfg.augment))

    def build_data(self, cfg: DictConfig) -> CohortDataModule:
        # Validation crops are seeded per row: val/dino_loss is comparable across epochs.
        val_crops = self._multicrop(cfg, fixed_seed=0 if cfg.seed is None else cfg.seed)
        # augment_on_device: loaders hand over whole preprocessed volumes and the crops are
        # cut and augmented where the batch lands (the GPU), not in CPU workers.
        train_crops = [self._multicrop(cfg)]
        return CohortDataModule(**kwargs_for(
            CohortDataModule, cfg, task="ssl", settings=preprocessing(cfg),
            splits={"train": plain(cfg.train_folds), "val": plain(cfg.val_folds) or None},
            augment={"train": [] if cfg.augment_on_device else train_crops, "val": [val_crops]},
            device_augment=train_crops if cfg.augment_on_device else ()))

    def build_module(self, cfg: DictConfig, data: L.LightningDataModule) -> DINO:
        module = DINO(**kwargs_for(DINO, cfg, backbone_config=backbone_config(cfg)))
        for what in ("global_crop_size", "local_crop_size"):
            module.student_backbone.check_input_size(cfg[what], what)
        return module

    def load_pretrained(self, module: L.LightningModule, source: WeightSource) -> LoadReport:
        report = super().load_pretrained(module, source)
        module.teacher_backbone.load_state_dict(module.student_backbone.state_dict())
        return report

    def callbacks(self, cfg: DictConfig, data: CohortDataModule) -> list[L.Callback]:
        """The k-NN monitor on teacher features, when the CSV has ``knn_target`` values.

        Also settles what picks ``backbone.pt`` (the harness reads ``cfg.monitor`` after this):
        a k-NN ``monitor`` becomes ``val/knn_auc`` for two classes and
        ``val/knn_balanced_accuracy`` for more; without the k-NN monitor it becomes null, so
        the export is the last epoch's teacher.
        """
        callbacks = self._knn_callbacks(cfg, data)
        monitor = cfg.monitor
        if monitor is not None and monitor.startswith("val/knn_"):
            if not callbacks:
                monitor = None
            elif callbacks[0].n_classes > 2 and monitor == "val/knn_auc":
                monitor = "val/knn_balanced_accuracy"
            if monitor != cfg.monitor:
                log.info("monitor %s -> %s (k-NN monitor %s)", cfg.monitor, monitor,
                         f"with {callbacks[0].n_classes} classes" if callbacks else "off")
                with open_dict(cfg):
                    cfg.monitor = monitor
        return callbacks

    def _knn_callbacks(self, cfg: DictConfig, data: CohortDataModule) -> list[KNNMonitor]:
        target = cfg.knn_target
        if target is None or not cfg.val_folds:
            return []
        cohort = data.cohort
        if target not in cohort.records[0]:
            log.info("knn_target %s is not a column of %s: no k-NN monitor", target,
                     cohort.csv_path)
            return []
        labelled = [r for r in cohort.records if not is_missing(r[target])]
        if len(labelled) < len(cohort.records):
            log.info("k-NN monitor: %d of %d rows have a %s value", len(labelled),
                     len(cohort.records), target)
        categories = category_order(r[target] for r in labelled)
        ids = {r["row"] for r in labelled}
        # The whole volume at the global-crop size: what the teacher sees, un-augmented.
        settings = preprocessing(cfg, resize_to=plain(cfg.global_crop_size))
        steps = preprocessing_transforms(settings)
        # Under DDP each rank caches and embeds its share of the monitor sets; the monitor
        # gathers the features.
        rank, world = data.layout
        loaders, sizes = [], []
        for folds in (cfg.train_folds, cfg.val_folds):
            rows = [dict(r, **{KNN_KEY: categories.index(r[target])})
                    for r in cohort.select(plain(folds)) if r["row"] in ids]
            if not rows:
                log.info("k-NN monitor off: no %s values in folds %s", target, list(folds))
                return []
            items = to_items(rows, "ssl")
            sizes.append(len(items))
            if world > 1:
                items = rank_share(items, rank, world)
            dataset = build_dataset(items, steps, settings, cfg.cache, cfg.cache_dir)
            loaders.append(DataLoader(dataset, batch_size=cfg.batch_size,
                                      **data.loader_options()))
        return [KNNMonitor(*loaders, target=KNN_KEY, backbone_attr="teacher_backbone",
                           k=cfg.knn_k, n_classes=len(categories),
                           sizes=(sizes[0], sizes[1]) if world > 1 else None)]


TASK = DinoTask()
