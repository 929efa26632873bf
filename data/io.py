"""One volume loader for DICOM series, multi-frame DICOM and NIfTI, in canonical RAS orientation.

``load_volume`` is the function; ``MedsslReader`` plugs it into MONAI's
``LoadImage``/``LoadImaged`` and ``LoadVolumed`` is the dictionary transform our
pipelines use (it also takes a per-row ``series`` choice and names the CSV row in
errors).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys, SpaceKeys

from medssl.data import dicom

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(ValueError):
    """A path that does not hold one readable volume."""


@dataclass
class Volume:
    """A channel-first volume in RAS orientation.

    Attributes:
        array: float32, shape (C, X, Y, Z); voxel axes 0, 1, 2 point towards the
            patient's Right, Anterior and Superior (RAS).
        affine: 4x4 voxel-to-RAS-world matrix (mm).
        meta: non-identifying metadata (source, spacing, original orientation, series, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Reorient a (X, Y, Z[, C]) array to the closest RAS orientation.

    Returns the reoriented array, its affine and the original axis codes (e.g. 'LPS').
    """
    ornt = nib.orientations.io_orientation(affine)
    codes = "".join(nib.orientations.aff2axcodes(affine))
    ras = nib.orientations.axcodes2ornt("RAS")
    transform = nib.orientations.ornt_transform(ornt, ras)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape[:3])
    return np.ascontiguousarray(out), new_affine, codes


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if array.ndim not in (3, 4):
        raise VolumeError(f"{path}: expected a 3D or 4D image, got shape {array.shape}")
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    return array, img.affine.astype(np.float64), {}


def load_volume(path: str | Path, series: str | None = None) -> Volume:
    """Read a DICOM folder, a DICOM file (single or multi-frame) or a NIfTI file.

    Args:
        path: the folder or file.
        series: which series to read from a folder holding several (a label from the
            error message, or a SeriesInstanceUID).

    Returns:
        the volume, channel first, reoriented to RAS.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if is_nifti(path):
        array, affine, meta = _read_nifti(path)
        meta["source"] = "nifti"
    else:
        array, affine, meta = dicom.read_series(path, series)
        meta["source"] = "dicom"
    array, affine_ras, codes = to_canonical(array, affine)
    array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
    meta.update(
        filename_or_obj=str(path),
        spacing=tuple(float(z) for z in np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))),
        original_affine=affine,
        original_axcodes=codes,
    )
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine_ras, meta)


@dataclass
class VolumeInfo:
    """What the headers say about a volume (pixels not decoded)."""

    shape: tuple[int, ...]  # in RAS order, as load_volume returns it
    spacing: tuple[float, ...]  # in RAS order
    original_shape: tuple[int, ...]  # as stored: (columns, rows, slices) for DICOM
    axcodes: str  # orientation as stored
    modality: str
    n_series: int
    affine: np.ndarray


def read_volume_info(path: str | Path, series: str | None = None) -> VolumeInfo:
    """Header-only counterpart of ``load_volume``: geometry checks without decoding pixels.

    Shape and spacing are reported in RAS order, as ``load_volume`` would return them.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if is_nifti(path):
        try:
            img = nib.load(str(path))
        except Exception as exc:
            raise VolumeError(f"{path}: cannot read NIfTI header ({exc})") from exc
        affine, shape = img.affine, img.shape[:3]
        modality, n_series = "", 1
    else:
        groups = dicom.scan_path(path)
        key, files = dicom.select_series(groups, path, series)
        geometry = dicom.series_geometry(files, key.label())
        affine, shape = dicom.LPS_TO_RAS @ geometry.affine_lps, geometry.shape
        modality, n_series = files[0].modality, len(groups)
    ornt = nib.orientations.io_orientation(affine)
    perm = [int(i) for i in ornt[:, 0]]
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_shape = [0, 0, 0]
    ras_spacing = [0.0, 0.0, 0.0]
    for axis, target in enumerate(perm):
        ras_shape[target] = int(shape[axis])
        ras_spacing[target] = float(zooms[axis])
    return VolumeInfo(
        shape=tuple(ras_shape),
        spacing=tuple(round(s, 4) for s in ras_spacing),
        original_shape=tuple(int(n) for n in shape),
        axcodes="".join(nib.orientations.aff2axcodes(affine)),
        modality=modality,
        n_series=n_series,
        affine=np.asarray(affine),
    )


def save_nifti(volume: Volume, out_path: str | Path) -> None:
    """Write a volume to NIfTI (one channel as 3D, several as 4D) with its RAS affine."""
    array = volume.array[0] if volume.array.shape[0] == 1 else np.moveaxis(volume.array, 0, -1)
    img = nib.Nifti1Image(array.astype(np.float32), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    nib.save(img, str(out_path))


def to_metatensor(volume: Volume) -> MetaTensor:
    meta = dict(volume.meta)
    meta[MetaKeys.SPACE] = SpaceKeys.RAS
    meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(volume.array.shape[1:])
    meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
    meta["original_affine"] = torch.as_tensor(volume.meta["original_affine"])
    return MetaTensor(torch.from_numpy(volume.array), affine=torch.as_tensor(volume.affine),
                      meta=meta)


class MedsslReader(ImageReader):
    """MONAI reader wrapping ``load_volume``: ``LoadImaged(keys, reader=MedsslReader())``.

    The returned array is channel first; ``LoadImaged(..., ensure_channel_first=True)``
    keeps it that way.
    """

    def __init__(self, series: str | None = None) -> None:
        super().__init__()
        self.series = series

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, str | Path) else list(filename)
        return all(is_nifti(n) or not Path(n).suffix or Path(n).suffix.lower() == ".dcm"
                   or Path(n).is_dir() for n in names)

    def read(self, data: Sequence[str] | str, **kwargs: object) -> Volume:
        if not isinstance(data, str | Path):
            if len(data) != 1:
                raise VolumeError("MedsslReader reads one volume per call")
            data = data[0]
        return load_volume(data, self.series)

    def get_data(self, img: Volume) -> tuple[np.ndarray, dict]:
        meta = dict(img.meta)
        meta[MetaKeys.AFFINE] = img.affine
        meta[MetaKeys.ORIGINAL_AFFINE] = img.meta["original_affine"]
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(img.array.shape[1:])
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        meta[MetaKeys.SPACE] = SpaceKeys.RAS
        return img.array, meta


class LoadVolumed(MapTransform):
    """Load each key's path into a RAS ``MetaTensor`` of shape (C, X, Y, Z).

    A ``series`` entry in the dictionary picks the series of a multi-series folder, and
    a ``row`` entry (the CSV location) is put in front of any error message.
    """

    def __init__(self, keys: KeysCollection, series_key: str = "series", row_key: str = "row",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_key = series_key
        self.row_key = row_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        series = d.get(self.series_key)
        for key in self.key_iterator(d):
            try:
                volume = load_volume(str(d[key]), None if _blank(series) else str(series))
            except (VolumeError, dicom.DicomError) as exc:
                where = d.get(self.row_key)
                raise VolumeError(f"{where}: {key}: {exc}" if where else str(exc)) from exc
            d[key] = to_metatensor(volume)
        return d


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""
