"""Preprocessing pipelines on MONAI dictionary transforms, and datasets with selectable caching."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Resized,
    ScaleIntensityRangePercentilesd,
)
from monai.utils import look_up_option

from medssl.data.dicom import DicomError
from medssl.data.io import LoadVolumed, VolumeError
from medssl.data.table import Cohort, CohortError, read_cohort, validate_volumes

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")
IMAGE, LABEL = "image", "label"
CACHE_FORMAT = 1  # bump when the loader's output changes, to retire old disk caches


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic preprocessing settings (everything that changes cached volumes).

    Attributes:
        resize_to: output spatial size (X, Y, Z) in RAS order; None keeps the native grid.
        lower_percentile: intensities below this percentile are clipped, then map to 0.
        upper_percentile: intensities above this percentile are clipped, then map to 1.
        normalize: False skips the percentile scaling (e.g. CT already in HU windows).
    """

    resize_to: tuple[int, ...] | None = None
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    normalize: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError("need 0 <= lower_percentile < upper_percentile <= 100, got "
                             f"{self.lower_percentile}, {self.upper_percentile}")
        if self.resize_to is not None:
            object.__setattr__(self, "resize_to", tuple(int(s) for s in self.resize_to))
            if len(self.resize_to) != 3 or min(self.resize_to) < 1:
                raise ValueError(f"resize_to must be 3 positive sizes, got {self.resize_to}")


class CheckSameGridd(MapTransform):
    """Fail, naming the CSV row and both files, when a label is not on its image's grid."""

    def __init__(self, keys: KeysCollection, reference_key: str = IMAGE, row_key: str = "row",
                 atol_mm: float = 1e-2) -> None:
        super().__init__(keys)
        self.reference_key, self.row_key, self.atol_mm = reference_key, row_key, atol_mm

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        ref = d[self.reference_key]
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[1:] != ref.shape[1:] or not np.allclose(
                np.asarray(img.affine), np.asarray(ref.affine), atol=self.atol_mm
            ):
                raise VolumeError(
                    f"{d.get(self.row_key, '')}: {key} {img.meta.get('filename_or_obj')} has "
                    f"grid {tuple(img.shape[1:])} that differs from {self.reference_key} "
                    f"{ref.meta.get('filename_or_obj')} {tuple(ref.shape[1:])} (or its affine)"
                )
        return d


def preprocessing_transforms(settings: Preprocessing, label: bool = False) -> list[Callable]:
    """Load, RAS orientation, percentile normalisation, resize; channel first throughout.

    Args:
        settings: the preprocessing settings.
        label: also load ``label`` (nearest-neighbour resize, no intensity change).

    Returns:
        a list of dictionary transforms over the keys ``image`` (and ``label``).
    """
    keys = [IMAGE, LABEL] if label else [IMAGE]
    steps: list[Callable] = [LoadVolumed(keys)]
    if label:
        steps.append(CheckSameGridd([LABEL]))
    # The loader already returns RAS; this keeps the guarantee if the reader is swapped.
    steps.append(Orientationd(keys, axcodes="RAS", labels=None))
    if settings.normalize:
        steps.append(ScaleIntensityRangePercentilesd(
            IMAGE, lower=settings.lower_percentile, upper=settings.upper_percentile,
            b_min=0.0, b_max=1.0, clip=True))
    if settings.resize_to is not None:
        modes = ["trilinear", "nearest"][: len(keys)]
        steps.append(Resized(keys, spatial_size=settings.resize_to, mode=modes,
                             anti_aliasing=[True, False][: len(keys)]))
    steps.append(EnsureTyped(keys, dtype=torch.float32))
    return steps


def _item_hash(item: Mapping) -> bytes:
    """Cache key of one row: its volume paths, series choice and file modification times."""
    parts = {}
    for key in (IMAGE, LABEL, "series"):
        if key in item and item[key] is not None:
            value = str(item[key])
            mtime = os.stat(value).st_mtime_ns if os.path.exists(value) else None
            parts[key] = (value, mtime)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest().encode()


def cache_key(settings: Preprocessing) -> str:
    """Short hash of everything that determines a cached volume."""
    payload = {"settings": asdict(settings), "format": CACHE_FORMAT}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_error(exc: BaseException) -> BaseException | None:
    """The VolumeError/DicomError inside MONAI's "applying transform" wrappers, if any."""
    while exc is not None:
        if isinstance(exc, VolumeError | DicomError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class _ClearErrors:
    """Mixin: re-raise our data errors (naming CSV row and file) instead of MONAI's
    generic "applying transform <object at 0x...>" wrapper, keeping the chain."""

    def _transform(self, index: int) -> object:
        try:
            return super()._transform(index)  # type: ignore[misc]
        except RuntimeError as exc:
            cause = _data_error(exc)
            if cause is None:
                raise
            raise type(cause)(str(cause)) from exc


class _Dataset(_ClearErrors, Dataset):
    pass


class _CacheDataset(_ClearErrors, CacheDataset):
    pass


class _PersistentDataset(_ClearErrors, PersistentDataset):
    pass


def build_dataset(
    records: Sequence[dict],
    transforms: Sequence[Callable],
    settings: Preprocessing,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    reset_cache: bool = False,
    num_workers: int = 0,
) -> Dataset:
    """A MONAI dataset over ``records`` with the chosen caching.

    Args:
        records: dicts with ``image`` (and ``label``) paths, ``row`` and any targets.
        transforms: deterministic preprocessing first, then any random augmentation;
            MONAI caches the output of the transforms before the first random one.
        settings: the preprocessing settings; the disk cache lives in a sub-folder named by
            their hash, so changed settings never serve stale volumes.
        cache: ``none``, ``memory`` (CacheDataset) or ``disk`` (PersistentDataset).
        cache_dir: folder for ``disk``.
        reset_cache: delete this settings' disk cache before building.
        num_workers: threads used to fill the memory cache.
    """
    cache = look_up_option(cache, CACHE_MODES)
    transform = Compose(list(transforms))
    if cache == "none":
        return _Dataset(list(records), transform)
    if cache == "memory":
        return _CacheDataset(list(records), transform, num_workers=max(num_workers, 1),
                            progress=False)
    if cache_dir is None:
        raise ValueError("cache='disk' needs cache_dir")
    folder = Path(cache_dir) / cache_key(settings)
    if reset_cache and folder.exists():
        log.info("Removing the disk cache %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    return _PersistentDataset(list(records), transform, cache_dir=folder, hash_func=_item_hash,
                             track_meta=False, weights_only=True)


def to_items(records: Sequence[dict], task: str) -> list[dict]:
    """Cohort rows -> dataset items with ``image`` (and ``label``) keys."""
    items = []
    for r in records:
        item = dict(r)
        if task == "segmentation":
            item[IMAGE], item[LABEL] = r["img_path"], r["seg_path"]
        else:
            item[IMAGE] = r["path"]
        items.append(item)
    return items


def make_datasets(
    csv_path: str | Path,
    task: str,
    splits: Mapping[str, Sequence[int | str] | int | str | None],
    settings: Preprocessing,
    targets: Sequence[str] = (),
    augment: Mapping[str, Sequence[Callable]] | None = None,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    reset_cache: bool = False,
    validate: bool = True,
) -> tuple[dict[str, Dataset], Cohort]:
    """Read the CSV, check every selected row and build one dataset per split.

    Args:
        csv_path: cohort CSV (formats in ``medssl.data.table``).
        task: the CSV format to expect.
        splits: split name (e.g. ``train``) -> folds to select; None/empty skips the split.
        settings: preprocessing settings.
        targets: target columns to check and encode.
        augment: split name -> random transforms appended after preprocessing.
        cache, cache_dir, reset_cache: see ``build_dataset``.
        validate: read every selected volume's headers first and report all bad rows.

    Returns:
        the datasets by split and the cohort (with its target encodings).
    """
    cohort = read_cohort(csv_path, task, targets)
    selected = {name: cohort.select(folds) for name, folds in splits.items()
                if folds is not None and folds != []}
    empty = [name for name, rows in selected.items() if not rows]
    if empty:
        raise CohortError(f"{cohort.csv_path}: no rows selected for {empty}")
    if validate:
        seen: dict[str, dict] = {}
        for rows in selected.values():
            seen.update({r["row"]: r for r in rows})
        validate_volumes(cohort, list(seen.values()))
    base = preprocessing_transforms(settings, label=task == "segmentation")
    datasets = {
        name: build_dataset(to_items(rows, task), [*base, *(augment or {}).get(name, ())],
                            settings, cache, cache_dir, reset_cache and n == 0)
        for n, (name, rows) in enumerate(selected.items())
    }
    return datasets, cohort
