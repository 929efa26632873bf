"""Lightning data module over a cohort CSV: the same loading for every script."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from monai.data import DataLoader, Dataset
from monai.transforms import Resized

from medssl.data.pipeline import (
    IMAGE,
    Preprocessing,
    build_dataset,
    make_datasets,
    preprocessing_transforms,
    to_items,
)
from medssl.data.table import Cohort, category_order, is_missing

log = logging.getLogger(__name__)


class CohortDataModule(L.LightningDataModule):
    """Train/val datasets (and optional k-NN monitor sets) from one cohort CSV.

    Args:
        csv_path: cohort CSV.
        task: CSV format (see ``medssl.data.table``).
        train_folds: folds for training.
        val_folds: folds for validation (None: no validation).
        settings: deterministic preprocessing.
        train_augment: random transforms after preprocessing for training.
        val_augment: random transforms after preprocessing for validation.
        batch_size: samples per device and step.
        n_workers: data loader processes.
        targets: target columns to validate and encode.
        knn_target: a target column; adds un-augmented train ("bank") and val ("query")
            loaders at ``knn_size`` as validation loaders 1 and 2.
        knn_size: spatial size of the k-NN inputs.
        cache, cache_dir, reset_cache: see ``medssl.data.pipeline.build_dataset``.
    """

    def __init__(self, csv_path: str | Path, task: str, train_folds: Sequence[int | str],
                 val_folds: Sequence[int | str] | None, settings: Preprocessing,
                 train_augment: Sequence[Callable] = (), val_augment: Sequence[Callable] = (),
                 batch_size: int = 2, n_workers: int = 0, targets: Sequence[str] = (),
                 knn_target: str | None = None, knn_size: Sequence[int] | None = None,
                 cache: str = "none", cache_dir: str | Path | None = None,
                 reset_cache: bool = False) -> None:
        super().__init__()
        self.csv_path, self.task = csv_path, task
        self.train_folds, self.val_folds = train_folds, val_folds
        self.settings, self.batch_size, self.n_workers = settings, batch_size, n_workers
        self.train_augment, self.val_augment = list(train_augment), list(val_augment)
        self.targets = list(targets)
        self.knn_target, self.knn_size = knn_target, knn_size
        self.cache, self.cache_dir, self.reset_cache = cache, cache_dir, reset_cache
        self.datasets: dict[str, Dataset] = {}
        self.encodings: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets, cohort = make_datasets(
            self.csv_path, self.task, {"train": self.train_folds, "val": self.val_folds},
            self.settings, targets=self.targets,
            augment={"train": self.train_augment, "val": self.val_augment}, cache=self.cache,
            cache_dir=self.cache_dir, reset_cache=self.reset_cache)
        self.encodings = cohort.encodings
        if self.knn_target and self.val_folds:
            self.datasets |= self._knn_datasets(cohort)

    def _knn_datasets(self, cohort: Cohort) -> dict[str, Dataset]:
        """Un-augmented train ("bank") and val ("query") sets of the rows that have a
        ``knn_target`` value; unlabelled rows still train, they only skip the monitor."""
        target = self.knn_target
        labelled = [r for r in cohort.records if not is_missing(r[target])]
        categories = category_order(r[target] for r in labelled)
        self.encodings[target] = categories
        if len(labelled) < len(cohort.records):
            log.info("k-NN monitor: %d of %d rows have a %s value", len(labelled),
                     len(cohort.records), target)
        labelled_ids = {r["row"] for r in labelled}
        steps = [*preprocessing_transforms(self.settings, label=False),
                 Resized(IMAGE, spatial_size=list(self.knn_size), mode="trilinear")]
        out = {}
        for name, folds in (("knn_bank", self.train_folds), ("knn_query", self.val_folds)):
            rows = [dict(r, **{target: categories.index(r[target])})
                    for r in cohort.select(folds) if r["row"] in labelled_ids]
            if rows:
                out[name] = build_dataset(to_items(rows, self.task), steps, self.settings,
                                          self.cache, self.cache_dir)
        return out if len(out) == 2 else {}
    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[name], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.n_workers, drop_last=shuffle,
                          persistent_workers=self.n_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if len(self.datasets["train"]) < self.batch_size:
            raise ValueError(f"{self.csv_path}: {len(self.datasets['train'])} training rows "
                             f"but batch_size={self.batch_size}; lower batch_size")
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        names = [n for n in ("val", "knn_bank", "knn_query") if n in self.datasets]
        return [self._loader(n, shuffle=False) for n in names]
