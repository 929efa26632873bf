"""Deterministic preprocessing transforms: intensity scaling to [0, 1] and grid resizing.

Each is an array transform plus a thin dictionary wrapper (MONAI's convention). The
dictionary wrappers keep ``item["geometry"]`` (see ``medssl.data.geometry``) in step
with the grid they produce, so preprocessing can be inverted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep

from medssl.data.dicom import DicomError
from medssl.data.geometry import (
    GEOMETRY,
    RESIZE_MODES,
    orient_slice,
    resize_grid,
    resized_affine,
    volume_geometry,
)
from medssl.data.io import LoadVolumed, VolumeError, read_slice
from medssl.data.table import is_missing
from medssl.errors import InputError, one_of

log = logging.getLogger(__name__)

SLICE, SLICE_AXIS = "slice", "slice_axis"

class GridResize(Transform):
    """Array transform: ``resize_grid`` to a fixed spatial size."""

    def __init__(self, spatial_size: Sequence[int], mode: str = "area") -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = one_of("resize mode", mode, RESIZE_MODES)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        old = tuple(img.shape[1:])
        plain = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        out = resize_grid(plain, self.spatial_size, self.mode)
        if not isinstance(img, MetaTensor):
            return out
        meta = {k: v for k, v in img.meta.items() if k != "affine"}  # replaced below
        meta["spatial_shape"] = np.asarray(self.spatial_size)
        return MetaTensor(out, affine=resized_affine(img.affine, old, self.spatial_size),
                          meta=meta)


class GridResized(MapTransform):
    """Resize ``keys`` to ``spatial_size`` and update ``geometry_key`` to the new grid.

    Args:
        keys: the images and label maps to resize.
        spatial_size: output size; its length must equal the items' spatial dimensions.
        mode: one per key (or one for all), ``area`` for images, ``nearest`` for labels.
        geometry_key: the item's geometry dict (``shape`` and ``affine`` are updated).
        row_key: the CSV location put in front of errors.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int],
                 mode: str | Sequence[str] = "area", geometry_key: str = "geometry",
                 row_key: str = "row") -> None:
        super().__init__(keys)
        modes = ensure_tuple_rep(mode, len(self.keys))
        self.resizers = [GridResize(spatial_size, m) for m in modes]
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.geometry_key, self.row_key = geometry_key, row_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key, resize in self.key_iterator(d, self.resizers):
            spatial = tuple(d[key].shape[1:])
            if len(spatial) != len(self.spatial_size):
                raise VolumeError(
                    f"{d.get(self.row_key, '')}: resize_to {list(self.spatial_size)} has "
                    f"{len(self.spatial_size)} sizes but {key} is {len(spatial)}D "
                    f"(spatial shape {spatial}); give {len(spatial)} sizes")
            d[key] = resize(d[key])
        geometry = d.get(self.geometry_key)
        if geometry is not None and tuple(geometry["shape"].tolist()) != self.spatial_size:
            old = tuple(int(s) for s in geometry["shape"])
            geometry = dict(geometry)
            geometry["affine"] = resized_affine(geometry["affine"], old, self.spatial_size)
            geometry["shape"] = torch.tensor(self.spatial_size, dtype=torch.int64)
            d[self.geometry_key] = geometry
        return d


# Percentile limits are computed on at least this many voxels: np.percentile over a whole
# 160x384x384 series (23.6M voxels) made ScaleToUnit take 0.54 s on a lightly loaded core
# (1-1.6 s loaded), from this sample 0.11 s. Volumes under twice this stay exact. On real
# scans the sampled limits moved by under 0.1% of the window (tests/data/test_preprocessing.py).
PERCENTILE_VOXELS = 2**20


def percentile_step(shape: Sequence[int], min_voxels: int = PERCENTILE_VOXELS) -> int:
    """Step of the flat (C-order) voxel sample used for percentiles: every ``step``-th voxel
    still gives at least ``min_voxels``, and the step shares no factor with the last axis.

    Coprime, the sample's position along a row shifts from row to row, so every row of every
    slice is visited at evenly spread positions; striding each axis instead would skip whole
    slices (every 3rd of 24 thick MR slices moved the limits by 8%).
    """
    step = max(1, int(np.prod(shape)) // max(1, min_voxels))
    while math.gcd(step, int(shape[-1])) != 1:
        step -= 1
    return step


def intensity_limits(values: np.ndarray, lower: float, upper: float,
                     min_voxels: int = PERCENTILE_VOXELS) -> tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles of ``values`` (C, *spatial).

    Large volumes are sampled every ``percentile_step`` voxels (deterministic) instead of
    read whole: the limits only set the intensity window, and the sample keeps enough voxels
    that they move by much less than the intensity noise.
    """
    step = percentile_step(values.shape, min_voxels)
    sample = values if step == 1 else values.flat[::step]  # flat[] also serves strided views
    lo, hi = np.percentile(sample, [lower, upper])
    # The 0th and 100th percentiles are the extremes, which a sample can miss: read them whole.
    return (float(values.min()) if lower == 0 else float(lo),
            float(values.max()) if upper == 100 else float(hi))


class ScaleToUnit(Transform):
    """Array transform: intensities to [0, 1], by a known maximum or by percentiles.

    With ``max_val``: ``x / max_val`` clipped to [0, 1] (a cohort-wide constant, so the
    same tissue has the same value in every volume and every slice). Otherwise the
    ``lower``/``upper`` percentiles map to 0/1, clipped (on a regular voxel grid for large
    volumes, see ``intensity_limits``). When they coincide (under
    ``100 - upper`` percent of voxels differ from the background, e.g. a small mask-like
    volume or an edge slice), the image's minimum and maximum are used instead, with a
    warning; a constant image (a blank slice) becomes zeros. Nothing is left unscaled.
    Each warning is given once per ``name`` (slices of one file share it).
    """

    def __init__(self, lower: float = 0.5, upper: float = 99.5) -> None:
        if not 0 <= lower < upper <= 100:
            raise InputError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper
        self._warned: set[tuple[str, str]] = set()

    def _warn_once(self, name: str, kind: str, message: str, *args: object) -> None:
        if (name, kind) not in self._warned:
            self._warned.add((name, kind))
            log.warning("%s: " + message, name, *args)

    def __call__(self, img: torch.Tensor, max_val: float | None = None,
                 name: str = "") -> torch.Tensor:
        """Scale ``img``; ``name`` (the file) is used in the warnings."""
        if max_val is not None:
            return (img / float(max_val)).clamp_(0.0, 1.0)
        values = (img.as_tensor() if isinstance(img, MetaTensor) else img).detach().cpu()
        lo, hi = intensity_limits(values.numpy(), self.lower, self.upper)
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
            if hi <= lo:
                self._warn_once(name, "constant", "constant intensity %g; scaled to zeros", lo)
                return torch.zeros_like(img)
            self._warn_once(name, "min-max", "the %g and %g intensity percentiles coincide "
                            "(%g); scaled by min-max [%g, %g] instead", self.lower, self.upper,
                            lo, lo, hi)
        # One new tensor, then in place: the temporaries cost as much as the percentiles.
        return (img - lo).div_(hi - lo).clamp_(0.0, 1.0)


class ScaleToUnitd(MapTransform):
    """Dictionary wrapper of ``ScaleToUnit``; the item's ``max_val`` is used when present.

    Args:
        keys: the images to scale (never label maps).
        lower, upper: percentiles mapped to 0 and 1 when the item has no ``max_val``.
        max_val_key: the item's maximum intensity (the ``max_val`` CSV column); None
            always scales by percentiles.
        row_key: the CSV location, named in warnings when the image has no file name.
    """

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5,
                 max_val_key: str | None = "max_val", row_key: str = "row") -> None:
        super().__init__(keys)
        self.scaler = ScaleToUnit(lower, upper)
        self.max_val_key, self.row_key = max_val_key, row_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        max_val = None if self.max_val_key is None else d.get(self.max_val_key)
        if max_val is not None and is_missing(max_val):
            max_val = None
        elif max_val is not None:
            try:
                max_val = float(max_val)
            except ValueError:
                max_val = float("nan")
            if not np.isfinite(max_val) or max_val <= 0:
                raise VolumeError(f"{d.get(self.row_key, '')}: {self.max_val_key} "
                                  f"'{d[self.max_val_key]}' is not a positive number")
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {})
            name = str(meta.get("filename_or_obj") or d.get(self.row_key, ""))
            d[key] = self.scaler(d[key], max_val, name)
        return d


class CheckSameGridd(MapTransform):
    """Fail, naming the CSV row and both files, when a label is not on its image's grid."""

    def __init__(self, keys: KeysCollection, reference_key: str = "image", row_key: str = "row",
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


class LoadItemd(MapTransform):
    """Load ``keys`` and record the item's geometry (``medssl.data.geometry``).

    A volume item becomes a RAS ``MetaTensor`` (C, X, Y, Z). An item with ``slice_axis``
    (a slice item, see ``to_items`` and ``expand_slices``) becomes its stored plane
    ``slice`` along that axis, read without decoding the volume and turned so its axes
    point along increasing R, A, S: (C, U, V).

    Args:
        keys: the path keys; the first one's grid is the item's geometry.
        geometry_key: where the geometry goes.
        series_key: a per-item series choice for DICOM folders holding several.
        row_key: the CSV location put in front of errors.
    """

    def __init__(self, keys: KeysCollection, geometry_key: str = GEOMETRY,
                 series_key: str = "series", row_key: str = "row") -> None:
        super().__init__(keys)
        self.volumes = LoadVolumed(keys, series_key, row_key)
        self.geometry_key, self.series_key, self.row_key = geometry_key, series_key, row_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(SLICE_AXIS) is None:
            d = self.volumes(d)
            ref = d[self.keys[0]]
            d[self.geometry_key] = volume_geometry(
                np.asarray(ref.meta["original_affine"]), ref.shape[1:], np.asarray(ref.affine))
            return d
        series = d.get(self.series_key)
        for key in self.key_iterator(d):
            try:
                plane = read_slice(str(d[key]), int(d[SLICE]), int(d[SLICE_AXIS]),
                                   None if is_missing(series) else str(series))
            except (VolumeError, DicomError) as exc:
                raise VolumeError(f"{d.get(self.row_key, '')}: {key}: {exc}") from exc
            array, geometry = orient_slice(plane.array, plane.file_affine, plane.file_shape,
                                           plane.axis, plane.index)
            meta = dict(plane.meta, original_affine=torch.as_tensor(plane.file_affine))
            d[key] = MetaTensor(torch.from_numpy(array), affine=geometry["affine"], meta=meta)
            if key == self.keys[0]:
                d[self.geometry_key] = geometry
        return d
