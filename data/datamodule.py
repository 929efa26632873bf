"""Lightning data module over a cohort CSV: the same loading for every script."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from monai.data import DataLoader, Dataset
from monai.transforms import Resized

from medssl.data.pipeline import IMAGE, Preprocessing, make_datasets


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
        self.targets = list(dict.fromkeys([*targets, *([knn_target] if knn_target else [])]))
        self.knn_target, self.knn_size = knn_target, knn_size
        self.cache, self.cache_dir, self.reset_cache = cache, cache_dir, reset_cache
        self.datasets: dict[str, Dataset] = {}
        self.encodings: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = {"train": self.train_folds, "val": self.val_folds}
        augment = {"train": self.train_augment, "val": self.val_augment}
        if self.knn_target and self.val_folds:
            resize = [Resized(IMAGE, spatial_size=list(self.knn_size), mode="trilinear")]
            splits |= {"knn_bank": self.train_folds, "knn_query": self.val_folds}
            augment |= {"knn_bank": resize, "knn_query": resize}
        self.datasets, cohort = make_datasets(
            self.csv_path, self.task, splits, self.settings, targets=self.targets,
            augment=augment, cache=self.cache, cache_dir=self.cache_dir,
            reset_cache=self.reset_cache)
        self.encodings = cohort.encodings

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
