"""Segmentation data pieces on MONAI: label checks, patch sampling and joint augmentation.

- ``check_label_values``: every label map holds integers in ``0..num_classes-1`` (all bad rows
  reported at once, naming the row, both files and the values found).
- ``segmentation_augment``: training transforms for volumes (3D) or slices (2D): pad to the
  patch, sample patches around labels at a positive/negative ratio, then spatial augmentation
  applied to image and label together (the label always nearest-neighbour), then intensity
  augmentation of the image alone.
- ``SliceDimd``: for 2D models scored on whole volumes, the volume axis that the training
  slices were cut along.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from medssl.data.dicom import DicomError
from medssl.data.io import VolumeError, load_volume
from medssl.data.table import CohortError, list_problems
from medssl.errors import InputError

IMAGE, LABEL = "image", "label"
SLICE_DIM = "slice_dim"  # item key: volume axis (0..2 after the channel) the 2D slices run along
_SHOWN_VALUES = 8


def label_problem(path: str | Path, num_classes: int, series: str | None = None) -> str | None:
    """What is wrong with the values of one label map, or None.

    Args:
        path: a NIfTI label map or a DICOM series holding one.
        num_classes: classes including the background; values must be integers in
            ``0..num_classes-1``.
        series: the series to read from a folder holding several.
    """
    try:
        values = load_volume(path, series, allow_constant=True).array  # all background is valid
    except (VolumeError, DicomError) as exc:
        return f"cannot read the label map ({exc})"
    fractional = values[values != np.round(values)]
    if fractional.size:
        shown = np.unique(fractional)[:_SHOWN_VALUES].tolist()
        return (f"holds non-integer values {shown} ({fractional.size} voxels); a label map "
                "must hold class indices (was it resampled with linear interpolation?)")
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        shown = [int(v) for v in np.unique(outside)[:_SHOWN_VALUES]]
        return (f"holds values {shown} outside 0..{num_classes - 1} ({outside.size} voxels); "
                f"num_classes={num_classes} counts the background, so raise it or remap "
                "the labels")
    return None


def check_label_values(records: Sequence[Mapping], num_classes: int, csv_path: str | Path,
                       workers: int = 4) -> None:
    """Check every row's label map values; report all bad rows at once.

    Args:
        records: cohort rows (``medssl.data.table.Cohort.records``) with ``img_path``,
            ``seg_path`` and ``row``.
        num_classes: classes including the background.
        csv_path: the CSV, named in the error.
        workers: threads reading label maps.

    Raises:
        CohortError: naming each bad row, its image and label files and the values found.
    """
    if num_classes < 2:
        raise InputError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    volumes = sorted({(r["seg_path"], r.get("series") or None) for r in records}, key=str)

    def check(volume: tuple[str, str | None]) -> str | None:
        return label_problem(volume[0], num_classes, volume[1])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip(volumes, pool.map(check, volumes), strict=True))
    problems = []
    for r in records:
        problem = found[(r["seg_path"], r.get("series") or None)]
        if problem is not None:
            problems.append(f"{r['row']}: label {r['seg_path']} (image {r['img_path']}) "
                            f"{problem}")
    if problems:
        raise CohortError(f"{csv_path}: {len(problems)} label map problem(s):"
                          + list_problems(problems))


def segmentation_augment(
    patch_size: Sequence[int],
    pos: float = 1.0,
    neg: float = 1.0,
    num_samples: int = 1,
    aug: bool = True,
    aug_prob: float = 0.5,
    rotate_deg: float = 15.0,
    scale_range: float = 0.1,
    flip_axes: Sequence[int] | None = None,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    noise_std: float = 0.02,
) -> list[Callable]:
    """Training transforms over ``image`` and ``label`` (channel first, 2D or 3D).

    Patches of ``patch_size`` are cut around labelled voxels with probability
    ``pos / (pos + neg)`` (MONAI ``RandCropByPosNegLabeld``); items smaller than the patch are
    zero-padded first. Spatial augmentation (rotation, scaling, flips) draws one transform
    per item and applies it to image (bilinear) and label (nearest neighbour, so label
    values are never blended). Intensity augmentation touches the image only.

    Args:
        patch_size: spatial size of the training patches; its length (2 or 3) is the
            spatial dimension of the items.
        pos, neg: relative frequency of patches centred on foreground / background voxels.
        num_samples: patches cut from each item per visit (each is a separate sample).
        aug: False keeps only the patch sampling.
        aug_prob: probability of each random transform.
        rotate_deg: maximum rotation about each axis, in degrees.
        scale_range: maximum relative zoom (0.1: 0.9x to 1.1x).
        flip_axes: spatial axes that may be flipped (each with ``aug_prob``); None: every
            axis of the patch; axes beyond the patch's dimension are an error.
        intensity_scale: image multiplied by ``1 + U(-s, s)``.
        intensity_shift: ``U(-s, s)`` added to the image (images are scaled to [0, 1]).
        noise_std: standard deviation of additive Gaussian noise.

    Returns:
        MONAI dictionary transforms; they output plain tensors (no metadata) for collation.
    """
    ndim = len(patch_size)
    if ndim not in (2, 3) or min(patch_size) < 1:
        raise InputError(f"patch_size must be 2 or 3 positive sizes, got {list(patch_size)}")
    if pos < 0 or neg < 0 or pos + neg <= 0:
        raise InputError(f"need pos >= 0, neg >= 0 and pos + neg > 0, got pos={pos}, neg={neg}")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    if not 0 <= aug_prob <= 1:
        raise InputError(f"aug_prob must be in [0, 1], got {aug_prob}")
    flip_axes = list(range(ndim)) if flip_axes is None else list(flip_axes)
    bad_axes = [a for a in flip_axes if not 0 <= a < ndim]
    if bad_axes:
        raise InputError(f"flip_axes {list(flip_axes)} name axes outside 0..{ndim - 1} of a "
                         f"{ndim}D patch")
    keys = [IMAGE, LABEL]
    patch = [int(s) for s in patch_size]
    steps: list[Callable] = [
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys, label_key=LABEL, spatial_size=patch, pos=pos, neg=neg,
                               num_samples=num_samples),
    ]
    if aug:
        rotate = math.radians(rotate_deg)
        steps += [
            RandAffined(keys, prob=aug_prob, rotate_range=[rotate] * (3 if ndim == 3 else 1),
                        scale_range=[scale_range] * ndim, mode=["bilinear", "nearest"],
                        padding_mode="zeros"),
            *[RandFlipd(keys, prob=aug_prob, spatial_axis=axis) for axis in flip_axes],
            RandScaleIntensityd(IMAGE, factors=intensity_scale, prob=aug_prob),
            RandShiftIntensityd(IMAGE, offsets=intensity_shift, prob=aug_prob),
            RandGaussianNoised(IMAGE, std=noise_std, prob=aug_prob),
        ]
    # Plain tensors: items whose random transforms differ carry different metadata, which
    # does not collate.
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return steps


def ras_slice_dim(file_affine: np.ndarray, slice_axis: int) -> int:
    """The axis of the RAS-reoriented volume that stored axis ``slice_axis`` became.

    Slicing the reoriented volume along it gives the planes of 2D slice items cut along
    ``slice_axis`` (their axes, too, point along increasing R, A, S).
    """
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be 0, 1 or 2 (a stored voxel axis), got {slice_axis}")
    return int(nib.orientations.io_orientation(np.asarray(file_affine))[slice_axis, 0])


class SliceDimd(MapTransform):
    """Record under ``slice_dim`` the volume axis matching stored axis ``slice_axis``.

    For 2D models evaluated slice by slice on whole volumes: the item's
    ``geometry["file_affine"]`` (``medssl.data.geometry``) gives the reorientation.
    """

    def __init__(self, slice_axis: int, geometry_key: str = "geometry",
                 out_key: str = SLICE_DIM) -> None:
        super().__init__(keys=[geometry_key])
        ras_slice_dim(np.eye(4), slice_axis)  # validates slice_axis
        self.slice_axis, self.geometry_key, self.out_key = slice_axis, geometry_key, out_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        affine = torch.as_tensor(d[self.geometry_key]["file_affine"]).numpy()
        d[self.out_key] = ras_slice_dim(affine, self.slice_axis)
        return d
