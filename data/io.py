"""One volume loader for DICOM series, multi-frame DICOM and NIfTI, in canonical RAS orientation.

``load_volume`` is the function; ``MedsslReader`` plugs it into MONAI's
``LoadImage``/``LoadImaged`` and ``LoadVolumed`` is the dictionary transform our
pipelines use (it also takes a per-row ``series`` choice and names the CSV row in
errors).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.pixels
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys, SpaceKeys

from medssl.data import dicom
from medssl.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(InputError):
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


def canonical_layout(shape: Sequence[int],
                     affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a (X, Y, Z) grid once reoriented to the closest RAS orientation."""
    ornt = nib.orientations.io_orientation(affine)
    ras_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        ras_shape[int(target)] = int(shape[axis])
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, tuple(shape[:3]))
    return tuple(ras_shape), ras_affine


def native_view(ras_array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A view of a RAS-ordered array indexed like the stored grid that ``affine`` describes.

    Writing the stored grid through this view fills ``ras_array`` in RAS order without
    a reorienting copy (the inverse of ``to_canonical``).
    """
    ornt = nib.orientations.io_orientation(affine)
    view = ras_array.transpose([int(t) for t in ornt[:, 0]])
    for axis, flip in enumerate(ornt[:, 1]):
        if flip < 0:
            view = np.flip(view, axis)
    return view


def _nifti_shape(path: Path, shape: Sequence[int]) -> tuple[int, ...]:
    """The 3D shape of a NIfTI image; a 2D image or several volumes in one file are errors."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) < 3:
        raise VolumeError(f"{path}: {len(dims)}D image (shape {tuple(shape)}); medssl needs 3D "
                          "volumes")
    if len(dims) > 3:
        n = int(np.prod(dims[3:]))
        what = f"4D image with {n} volumes" if len(dims) == 4 else f"{len(dims)}D image"
        raise VolumeError(f"{path}: {what} (shape {tuple(shape)}); medssl reads one 3D volume "
                          "per file: split it into one file per volume and list each")
    return tuple(int(d) for d in dims)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    shape = _nifti_shape(path, img.shape)
    try:
        array = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    return array, img.affine.astype(np.float64), {}


def check_content(path: str | Path, array: np.ndarray, value_range: tuple[float, float],
                  allow_constant: bool = False) -> None:
    """Refuse a volume with NaN/inf voxels or (unless allowed) one value everywhere.

    Args:
        path: the volume's file or folder, for the message.
        array: the voxels (only scanned again to count bad voxels for the message).
        value_range: the voxels' min and max (NaN when there are NaN voxels).
        allow_constant: accept a constant volume (an empty label map is valid).
    """
    lo, hi = value_range
    if not (np.isfinite(lo) and np.isfinite(hi)):
        n = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise VolumeError(f"{path}: {n} non-finite voxel(s) (NaN or inf); training on them "
                          "turns the loss into NaN. Fix or leave out this volume")
    if lo == hi and not allow_constant:
        raise VolumeError(f"{path}: constant volume (every voxel is {lo:g}); a blank image "
                          "carries nothing to learn. Fix or leave out this volume")


def load_volume(path: str | Path, series: str | None = None,
                allow_constant: bool = False) -> Volume:
    """Read a DICOM folder, a DICOM file (single or multi-frame) or a NIfTI file.

    DICOM files are each read once and decoded straight into the RAS-ordered output
    (no float64 volume, no reorienting copy). Every volume is checked for NaN/inf
    voxels and for being constant when it is first loaded, before any cache.

    Args:
        path: the folder or file.
        series: which series to read from a folder holding several (a label from the
            error message, or a SeriesInstanceUID).
        allow_constant: accept a volume holding one value everywhere (label maps).

    Returns:
        the volume, channel first, reoriented to RAS.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if is_nifti(path):
        native, affine, meta = _read_nifti(path)
        meta["source"] = "nifti"
        array, affine_ras, codes = to_canonical(native, affine)
        value_range = (float(array.min()), float(array.max()))
    else:
        key, geometry, meta = dicom.open_series(path, series, pixels=True)
        meta["source"] = "dicom"
        affine = dicom.LPS_TO_RAS @ geometry.affine_lps
        ras_shape, affine_ras = canonical_layout(geometry.shape, affine)
        codes = "".join(nib.orientations.aff2axcodes(affine))
        array = np.empty(ras_shape, dtype=np.float32)
        value_range = dicom.decode_into(geometry, key.label(), native_view(array, affine))
    check_content(path, array, value_range, allow_constant)
    meta.update(
        filename_or_obj=str(path),
        spacing=tuple(float(z) for z in np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0))),
        original_affine=affine,
        original_axcodes=codes,
    )
    return Volume(array[None], affine_ras, meta)


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
        affine, shape = img.affine, _nifti_shape(path, img.shape)
        modality, n_series = "", 1
    else:
        _, geometry, meta = dicom.open_series(path, series)
        affine, shape = dicom.LPS_TO_RAS @ geometry.affine_lps, geometry.shape
        modality, n_series = meta["modality"], meta["n_series"]
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

    def __init__(self, series: str | None = None, allow_constant: bool = False) -> None:
        super().__init__()
        self.series = series
        self.allow_constant = allow_constant

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, str | Path) else list(filename)
        return all(is_nifti(n) or not Path(n).suffix or Path(n).suffix.lower() == ".dcm"
                   or Path(n).is_dir() for n in names)

    def read(self, data: Sequence[str] | str, **kwargs: object) -> Volume:
        if not isinstance(data, str | Path):
            if len(data) != 1:
                raise VolumeError("MedsslReader reads one volume per call")
            data = data[0]
        return load_volume(data, self.series, self.allow_constant)

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
    a ``row`` entry (the CSV location) is put in front of any error message. Volumes
    with NaN/inf voxels are refused, and so are constant ones except under
    ``allow_constant_keys`` (an empty label map is a valid label).
    """

    def __init__(self, keys: KeysCollection, series_key: str = "series", row_key: str = "row",
                 allow_missing_keys: bool = False,
                 allow_constant_keys: KeysCollection = ("label",)) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_key = series_key
        self.row_key = row_key
        self.allow_constant_keys = {allow_constant_keys} if isinstance(
            allow_constant_keys, str) else set(allow_constant_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        series = d.get(self.series_key)
        for key in self.key_iterator(d):
            try:
                volume = load_volume(str(d[key]), None if _blank(series) else str(series),
                                     allow_constant=key in self.allow_constant_keys)
            except (VolumeError, dicom.DicomError) as exc:
                where = d.get(self.row_key)
                raise VolumeError(f"{where}: {key}: {exc}" if where else str(exc)) from exc
            d[key] = to_metatensor(volume)
        return d


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value == ""


# ---------------------------------------------------------------------------------------
# Single slices (2D items): read one stored plane without decoding the whole volume.


@dataclass
class Slice:
    """One stored plane of a volume, not reoriented.

    Attributes:
        array: float32 (1, A, B): the stored axes other than ``axis``, in stored order.
        file_affine: 4x4 voxel-to-RAS affine of the whole stored grid (NIfTI: the file's;
            DICOM: the loader's (columns, rows, slices) grid).
        file_shape: the stored grid's spatial shape.
        axis: the stored axis the plane was cut along.
        index: the plane's index along ``axis``.
        meta: ``filename_or_obj``, ``source`` and, for DICOM, ``series``.
    """

    array: np.ndarray
    file_affine: np.ndarray
    file_shape: tuple[int, int, int]
    axis: int
    index: int
    meta: dict


def read_slice(path: str | Path, index: int, axis: int = 2, series: str | None = None) -> Slice:
    """Read the plane ``index`` along stored axis ``axis`` of a NIfTI file or DICOM series.

    ``axis`` counts the axes as stored: the NIfTI array's axes, or for DICOM the loader's
    (columns, rows, slices) grid, whose axis 2 runs through the files in spatial order.
    NIfTI planes are read through nibabel's array proxy (only that plane's bytes; a
    ``.nii.gz`` is decompressed up to it). DICOM planes along axis 2 decode one file (or
    one frame); the series' headers are scanned once per folder and process.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if axis not in (0, 1, 2):
        raise VolumeError(f"{path}: slice axis {axis} is not one of 0, 1, 2")
    if is_nifti(path):
        array, affine, shape = _read_nifti_slice(path, index, axis)
        meta = {"source": "nifti"}
    else:
        array, affine, shape, meta = _read_dicom_slice(path, index, axis, series)
    meta["filename_or_obj"] = str(path)
    array = np.ascontiguousarray(array, dtype=np.float32)
    # blank planes are common (edge slices), non-finite voxels never are
    check_content(f"{path} slice {index} along axis {axis}", array,
                  (float(array.min()), float(array.max())), allow_constant=True)
    return Slice(array, affine, shape, axis, index, meta)


def _check_index(path: Path, index: int, axis: int, shape: Sequence[int]) -> None:
    if not 0 <= index < shape[axis]:
        raise VolumeError(f"{path}: slice {index} is outside stored axis {axis} "
                          f"({shape[axis]} slices; stored shape {tuple(shape)})")


def _read_nifti_slice(path: Path, index: int, axis: int
                      ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    try:
        # mmap=False: the proxy then reads just the plane's bytes (a memory map would
        # need the whole file to be present and mapped).
        img = nib.load(str(path), mmap=False)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read NIfTI header ({exc})") from exc
    shape = _nifti_shape(path, img.shape)  # 3D, as load_volume requires
    _check_index(path, index, axis, shape)
    where: list[slice | int] = [slice(None)] * 3 + [0] * (len(img.shape) - 3)
    where[axis] = index
    try:
        plane = np.asarray(img.dataobj[tuple(where)], dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read slice {index} along axis {axis} "
                          f"({type(exc).__name__}: {exc})") from exc
    return plane[None], img.affine.astype(np.float64), shape


@functools.lru_cache(maxsize=64)
def _series_geometry(path: str, series: str | None, mtime_ns: int) -> tuple[object, dict]:
    """Header scan of one series, kept per (path, series, modification time)."""
    _, geometry, meta = dicom.open_series(path, series)
    return geometry, {"source": "dicom", "series": meta["series"], "modality": meta["modality"]}


def _read_dicom_slice(path: Path, index: int, axis: int, series: str | None
                      ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int], dict]:
    geometry, meta = _series_geometry(str(path), None if _blank(series) else str(series),
                                      path.stat().st_mtime_ns)
    shape = tuple(int(s) for s in geometry.shape)
    _check_index(path, index, axis, shape)
    affine = dicom.LPS_TO_RAS @ geometry.affine_lps
    if axis != 2:  # a plane across the files needs every file's pixels
        volume = dicom.decode_series(geometry, meta["series"])
        plane = np.take(volume, index, axis=axis)
    else:
        frame = geometry.frames[index]
        try:
            ds = pydicom.dcmread(frame.path)
            pixels = pydicom.pixels.pixel_array(ds, index=frame.frame)
        except Exception as exc:  # decoders raise many types; name the file
            raise dicom.DicomError(f"series {meta['series']}: cannot decode pixel data of "
                                   f"{frame.path}: {type(exc).__name__}: {exc}") from exc
        if pixels.shape != shape[1::-1]:
            raise dicom.DicomError(f"series {meta['series']}: {frame.path} decodes to "
                                   f"{pixels.shape}, header says {shape[1::-1]}")
        # rescaled in float64 and rounded once, as dicom.decode_into does
        plane = (pixels.astype(np.float64) * frame.slope + frame.intercept).T
    return plane[None], affine, shape, dict(meta)


def slices_with_foreground(path: str | Path, axis: int = 2,
                           series: str | None = None) -> np.ndarray:
    """Per stored slice along ``axis``: does the label map hold any non-zero voxel?

    Reads the whole label map once (label maps are small next to the images).
    """
    path = Path(path)
    if is_nifti(path):
        array = _read_nifti(path)[0]
    else:
        array = dicom.read_series(path, None if _blank(series) else str(series))[0]
    other = tuple(a for a in range(array.ndim) if a != axis)
    return np.asarray(array != 0).any(axis=other)
