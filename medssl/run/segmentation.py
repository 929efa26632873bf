"""Segmentation fine-tuning as a run-layer task: data, module, weights, test and predict outputs."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import MISSING, DictConfig

from medssl.data.datamodule import CohortDataModule
from medssl.data.geometry import invert_to_file_grid, save_on_file_grid
from medssl.data.io import is_nifti
from medssl.data.pipeline import Preprocessing
from medssl.data.seg_transforms import SliceDimd, check_label_values, segmentation_augment
from medssl.data.table import PREDICT_FOLD, Cohort
from medssl.errors import InputError
from medssl.models.segmentation import METRICS, SegmentationModule
from medssl.models.weights import LoadReport, load_encoder_weights, load_segmenter_weights
from medssl.run.config import RunConfig, backbone_config, kwargs_for, plain, schema
from medssl.run.harness import Task, WeightSource, precise_bn, run_dir

log = logging.getLogger(__name__)
FULL_NETWORK_SOURCES = ("suprem_weights", "baseline_weights")


@schema("segmentation")
@dataclass
class SegmentationConfig(RunConfig):
    """Segmentation keys (values and comments: ``configs/segmentation.yaml``)."""

    test_folds: list[Any] = MISSING
    num_classes: int = MISSING
    spatial_dims: int = MISSING
    slice_axis: int = MISSING
    empty_per_foreground: float | None = MISSING
    patch_size: list[int] = MISSING
    pos: float = MISSING
    neg: float = MISSING
    num_samples: int = MISSING
    label_fraction: float = MISSING
    eval_batch_size: int = MISSING
    aug: bool = MISSING
    aug_prob: float = MISSING
    rotate_deg: float = MISSING
    scale_range: float = MISSING
    flip_axes: list[int] | None = MISSING
    intensity_scale: float = MISSING
    intensity_shift: float = MISSING
    noise_std: float = MISSING
    decoder: dict[str, Any] = MISSING
    loss: str = MISSING
    include_background: bool = MISSING
    softmax: bool = MISSING
    sigmoid: bool = MISSING
    weight_decay: float = MISSING
    encoder_lr_scale: float = MISSING
    freeze_encoder_epochs: int = MISSING
    grad_clip: float = MISSING
    precise_bn_batches: int = MISSING
    sw_batch_size: int = MISSING
    sw_overlap: float = MISSING
    sw_mode: str = MISSING
    hd95: bool = MISSING
    n_overlay_slices: int = MISSING
    save_test_results: bool = MISSING
    predict_csv: str | None = MISSING


def labelled_subset(patient_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the subjects (at least one); the subjects of a smaller
    fraction are a subset of a larger one's (one permutation, cut at different lengths)."""
    if not 0 < fraction <= 1:
        raise InputError(f"label_fraction must be in (0, 1], got {fraction}")
    subjects = sorted(set(patient_ids))
    order = np.random.default_rng(seed).permutation(len(subjects))
    n = max(1, round(fraction * len(subjects)))
    return {subjects[i] for i in order[:n]}


class SegmentationData(CohortDataModule):
    """The cohort data module plus the label-value check and the ``label_fraction`` subset.

    Args:
        num_classes: label values must be integers in ``0..num_classes-1``.
        label_fraction: fraction of the training subjects (``PatientID``) kept.
        **kwargs: ``CohortDataModule`` arguments.
    """

    def __init__(self, num_classes: int, label_fraction: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.label_fraction = num_classes, label_fraction
        self._checked = False

    def select(self, name: str, items: list[dict], cohort: Cohort) -> list[dict]:
        """Label values checked (once, every selected row) and the training subjects cut to
        ``label_fraction``, before anything is cached."""
        if not self._checked:
            rows = {r["row"]: r for folds in self.splits.values() if folds
                    for r in cohort.select(folds)}
            check_label_values(list(rows.values()), self.num_classes, cohort.csv_path)
            self._checked = True
        if name == "train" and self.label_fraction < 1:
            subjects = {item["PatientID"] for item in items}
            keep = labelled_subset(list(subjects), self.label_fraction, self.seed)
            items = [item for item in items if item["PatientID"] in keep]
            log.info("label_fraction %g: training on %d of %d subjects (%s)",
                     self.label_fraction, len(keep), len(subjects), ", ".join(sorted(keep)))
        return super().select(name, items, cohort)


def _file_name(patient: str, row: str, repeated: bool) -> str:
    """Output name: the PatientID, with the CSV line when the ID occurs on several lines."""
    line = re.search(r"line (\d+)", row)
    return f"{patient}_line{line.group(1)}" if repeated and line else patient


class SegmentationWriter(L.Callback):
    """Writes label maps on each input file's grid (test and predict) and the test metrics.

    Test: ``test_dir/predictions/<PatientID>.nii.gz`` per case, ``test_dir/metrics.csv`` (one
    row per case and foreground class: Dice, HD95 in mm, predicted and reference volume in
    mL) and ``test_dir/metrics.json`` (means over cases per class, and over classes).
    Predict: ``predict_dir/<PatientID>.nii.gz``. A NIfTI input's header is copied, so the
    output has its shape and affine; a DICOM input gets the loader's grid.
    """

    def __init__(self, test_dir: Path, predict_dir: Path, save_test: bool = True) -> None:
        super().__init__()
        self.test_dir, self.predict_dir, self.save_test = test_dir, predict_dir, save_test
        self._rows: list[dict[str, Any]] = []
        self._repeated: set[str] = set()

    @staticmethod
    def _repeats(trainer: L.Trainer) -> set[str]:
        counts = Counter(r["PatientID"] for r in trainer.datamodule.cohort.records)
        return {p for p, n in counts.items() if n > 1}

    def _write(self, label_map: torch.Tensor, batch: dict, b: int, folder: Path) -> str:
        geometry = {k: v[b] for k, v in batch["geometry"].items()}
        source = batch["img_path"][b] if "img_path" in batch else batch["path"][b]
        patient = str(batch["PatientID"][b])
        name = _file_name(patient, str(batch["row"][b]), patient in self._repeated)
        path = folder / f"{name}.nii.gz"
        on_file = invert_to_file_grid(label_map, geometry, mode="nearest")
        # Written aside, then renamed: under DDP the sampler's padding can give one case to two
        # ranks, which then write the same file; a rename never leaves a half-written one.
        tmp = folder / f".{name}.{os.getpid()}.nii.gz"
        save_on_file_grid(on_file, geometry, tmp, reference=source if is_nifti(source) else None)
        os.replace(tmp, path)
        return path.name

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._repeated = [], self._repeats(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        metrics = outputs["metrics"]
        for b, label_map in enumerate(outputs["prediction"]):
            name = self._write(label_map, batch, b, self.test_dir / "predictions") \
                if self.save_test else ""
            for c in range(metrics["dice"].shape[1]):
                self._rows.append({"PatientID": str(batch["PatientID"][b]),
                                   "row": str(batch["row"][b]), "class": c + 1,
                                   **{k: float(metrics[k][b, c]) for k in METRICS},
                                   "prediction": name})

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[list[dict]] = [[] for _ in range(trainer.world_size)]
            torch.distributed.all_gather_object(gathered, rows)
            # The sampler pads ranks to equal length by repeating cases: keep each once.
            rows = list({(r["row"], r["class"]): r for part in gathered for r in part}.values())
            lines = trainer.datamodule.cohort.lines  # in CSV order, as with one device
            rows.sort(key=lambda r: (lines.get(r["row"], 0), r["class"]))
        if not trainer.is_global_zero or not self.save_test or not rows:
            return
        self.test_dir.mkdir(parents=True, exist_ok=True)
        with open(self.test_dir / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (self.test_dir / "metrics.json").write_text(json.dumps(summary(rows), indent=1))
        log.info("Test predictions and metrics in %s", self.test_dir)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._repeated = self._repeats(trainer)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             outputs: Any, batch: dict, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        for b, label_map in enumerate(outputs):
            self._write(label_map, batch, b, self.predict_dir)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases per class (NaNs skipped), then over classes, as in ``test/dice``."""
    classes = sorted({r["class"] for r in rows})
    per_class = {str(c): {k: _mean([r[k] for r in rows if r["class"] == c]) for k in METRICS}
                 for c in classes}
    out: dict[str, Any] = {"n_cases": len({r["row"] for r in rows})}
    for key in ("dice", "hd95"):
        out[key] = _mean([v[key] for v in per_class.values() if v[key] is not None])
    return out | {"per_class": per_class}


class SegmentationTask(Task):
    name = "segmentation"
    export_attr = "network.encoder"
    init_attr = "network.encoder"
    has_test = True

    @staticmethod
    def _settings(cfg: DictConfig) -> Preprocessing:
        return Preprocessing(**kwargs_for(Preprocessing, cfg))

    @staticmethod
    def _whole_volume(cfg: DictConfig) -> list:
        """Transforms of whole-volume items: a 2D network needs the axis to slice along."""
        return [SliceDimd(cfg.slice_axis)] if cfg.spatial_dims == 2 else []

    def build_data(self, cfg: DictConfig) -> SegmentationData:
        if cfg.spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {cfg.spatial_dims}")
        if len(cfg.patch_size) != cfg.spatial_dims:
            raise InputError(f"patch_size {plain(cfg.patch_size)} has {len(cfg.patch_size)} "
                             f"sizes; spatial_dims={cfg.spatial_dims} needs {cfg.spatial_dims}"
                             + (" (e.g. patch_size=[64,64]; a ViT also needs a 2D "
                                "backbone.patch_size)" if cfg.spatial_dims == 2 else ""))
        if cfg.spatial_dims == 2 and cfg.resize_to is not None:
            raise InputError("resize_to must be null with spatial_dims=2: slices are trained in "
                             "patches of patch_size at their own resolution, and validation and "
                             "test segment whole volumes slice by slice")
        if cfg.test_ckpt is not None:  # evaluation only: no training data to load
            splits = {"test": plain(cfg.test_folds) or None}
        else:
            splits = {"train": plain(cfg.train_folds), "val": plain(cfg.val_folds) or None,
                      "test": plain(cfg.test_folds) or None}
        whole = self._whole_volume(cfg)
        augment = {"train": segmentation_augment(**kwargs_for(segmentation_augment, cfg)),
                   "val": whole, "test": whole}
        sliced = cfg.spatial_dims == 2 and "train" in splits
        return SegmentationData(
            num_classes=cfg.num_classes, label_fraction=cfg.label_fraction,
            **kwargs_for(CohortDataModule, cfg, task="segmentation", splits=splits,
                         settings=self._settings(cfg),
                         augment={k: v for k, v in augment.items() if k in splits},
                         slices={"train": cfg.slice_axis} if sliced else None,
                         seed=0 if cfg.seed is None else cfg.seed))

    def build_predict_data(self, cfg: DictConfig) -> CohortDataModule | None:
        if cfg.predict_csv is None:
            return None
        return CohortDataModule(**kwargs_for(
            CohortDataModule, cfg, csv_path=cfg.predict_csv, task="predict",
            splits={"predict": [PREDICT_FOLD]}, settings=self._settings(cfg),
            augment={"predict": self._whole_volume(cfg)}))

    def build_module(self, cfg: DictConfig, data: L.LightningDataModule) -> SegmentationModule:
        return SegmentationModule(**kwargs_for(SegmentationModule, cfg,
                                               backbone_config=backbone_config(cfg)))

    def load_pretrained(self, module: L.LightningModule, source: WeightSource) -> LoadReport:
        """Exports (DINO, MAE) start the encoder and must match every encoder key; SuPreM-style
        files hold a whole network and start encoder and decoder (the output layer when the
        class count agrees)."""
        if source.key in FULL_NETWORK_SOURCES:
            return load_segmenter_weights(module.network, source.path)
        return load_encoder_weights(module.network, source.path, strict=True)

    def callbacks(self, cfg: DictConfig, data: L.LightningDataModule) -> list[L.Callback]:
        folder = run_dir(cfg)
        return [SegmentationWriter(folder / "test", folder / "predict", cfg.save_test_results),
                *precise_bn(cfg, _segmenter_forward)]


def _segmenter_forward(module: L.LightningModule, batch: dict) -> None:
    module(batch["image"])


TASK = SegmentationTask()
