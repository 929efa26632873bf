"""DICOM series reading with correct geometry.

Why not MONAI's ``PydicomReader``: it orders slices by InstanceNumber, which
scanners do not tie to the spatial order (and which some exports leave
wrong), and it takes the slice spacing from SliceThickness, which differs from
the real slice step in most of our reference data (e.g. 4.8 mm step vs 4 mm
thickness). Here slices are ordered by ImagePositionPatient projected on the
slice normal, the spacing comes from those positions, and a non-uniform step or
a gantry tilt is an error instead of a silently distorted volume.

All geometry is computed in DICOM patient space (LPS) and converted to RAS for
the returned affine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from medssl.data.dicom_header import (
    DicomError,
    DicomFile,
    Frame,
    SeriesKey,
    check_not_truncated,
    read_header,
    slice_normal,
)

__all__ = ["DicomError", "DicomFile", "Frame", "SeriesKey", "read_header", "read_series",
           "scan_folder", "scan_path", "select_series", "series_geometry", "slice_normal"]

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Geometry tolerances in mm (DICOM decimal strings carry limited precision).
_POSITION_TOL_MM = 0.01
_RELATIVE_SPACING_TOL = 0.01
_ORIENTATION_TOL = 1e-4


def scan_folder(folder: str | Path) -> dict[SeriesKey, list[DicomFile]]:
    """Read the headers of every file in ``folder`` (recursively) and group them by series.

    Non-DICOM files are skipped with a warning; damaged DICOM files raise ``DicomError``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    if not paths:
        raise DicomError(f"{folder}: folder is empty")
    groups: dict[SeriesKey, list[DicomFile]] = {}
    skipped = []
    for p in paths:
        header = read_header(str(p))
        if header is None:
            skipped.append(p.name)
            continue
        check_not_truncated(header)
        groups.setdefault(header.key, []).append(header)
    if skipped:
        log.warning("%s: ignored %d non-DICOM or non-image file(s): %s", folder, len(skipped),
                    ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not groups:
        raise DicomError(f"{folder}: no DICOM images among {len(paths)} file(s)")
    return _merge_echo_split(groups)


def _merge_echo_split(groups: dict[SeriesKey, list[DicomFile]]) -> dict[SeriesKey, list[DicomFile]]:
    """Drop echo/type from keys that alone identify their series, so labels stay short."""
    by_uid: dict[str, int] = {}
    for key in groups:
        by_uid[key.series_uid] = by_uid.get(key.series_uid, 0) + 1
    return {
        (SeriesKey(key.series_uid) if by_uid[key.series_uid] == 1 else key): files
        for key, files in groups.items()
    }


def describe_series(groups: dict[SeriesKey, list[DicomFile]]) -> str:
    lines = []
    for key, files in groups.items():
        f = files[0]
        n = sum(x.n_frames for x in files)
        lines.append(f"  series={key.label()}  ({f.modality} '{f.description}', {len(files)} "
                     f"file(s), {n} image(s) of {f.rows}x{f.columns})")
    return "\n".join(lines)


def select_series(
    groups: dict[SeriesKey, list[DicomFile]], folder: str | Path, series: str | None = None
) -> tuple[SeriesKey, list[DicomFile]]:
    """Pick one series; ``series`` is a label from the error message or a SeriesInstanceUID."""
    if series is not None and str(series) != "":
        series = str(series)
        hits = [k for k in groups if k.label() == series]
        if not hits:
            hits = [k for k in groups if k.series_uid == series]
        if len(hits) != 1:
            raise DicomError(
                f"{folder}: series '{series}' "
                f"{'is ambiguous' if hits else 'not found'}; the folder holds:\n"
                + describe_series(groups)
            )
        return hits[0], groups[hits[0]]
    if len(groups) > 1:
        raise DicomError(
            f"{folder}: {len(groups)} series in one folder; pick one with series=<label> "
            "(the `series` CSV column, or --series on the command line):\n"
            + describe_series(groups)
        )
    key = next(iter(groups))
    return key, groups[key]


@dataclass
class SeriesGeometry:
    """Sorted frames of one series and the LPS affine of the (column, row, slice) voxel grid."""

    frames: list[Frame]
    affine_lps: np.ndarray
    shape: tuple[int, int, int]  # (columns, rows, slices)
    spacing: tuple[float, float, float]


def series_geometry(files: Sequence[DicomFile], label: str) -> SeriesGeometry:
    """Order the frames in space and build the affine; raise on geometry we cannot represent."""
    first = files[0]
    multi = [f for f in files if f.n_frames > 1]
    if multi and len(files) > 1:
        raise DicomError(f"series {label}: mixes a multi-frame file ({multi[0].path}) with "
                         f"{len(files) - 1} other file(s)")
    for f in files[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise DicomError(f"series {label}: {f.path} is {f.rows}x{f.columns}, "
                             f"{first.path} is {first.rows}x{first.columns}")
    if any(f.samples_per_pixel != 1 for f in files):
        raise DicomError(f"series {label}: colour images (SamplesPerPixel > 1) are not supported")
    frames = [fr for f in files for fr in f.frames]
    iop = frames[0].orientation
    for fr in frames[1:]:
        if np.abs(fr.orientation - iop).max() > _ORIENTATION_TOL:
            raise DicomError(f"series {label}: ImageOrientationPatient differs between "
                             f"{frames[0].path} and {fr.path}")
        if np.abs(np.subtract(fr.pixel_spacing, frames[0].pixel_spacing)).max() > 1e-4:
            raise DicomError(f"series {label}: PixelSpacing differs between "
                             f"{frames[0].path} and {fr.path}")
    normal = slice_normal(iop)
    dist = np.array([fr.position @ normal for fr in frames])
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]
    if len(frames) > 1:
        steps = np.diff(dist)
        dup = np.flatnonzero(steps < _POSITION_TOL_MM)
        if dup.size:
            a, b = frames[dup[0]], frames[dup[0] + 1]
            raise DicomError(
                f"series {label}: {dup.size + 1} images share a slice position "
                f"({_where(a)} and {_where(b)}); several volumes (echoes, phases, time points) "
                "in one series are not supported"
            )
        step = float(np.median(steps))
        tol = max(_POSITION_TOL_MM, _RELATIVE_SPACING_TOL * step)
        if np.abs(steps - step).max() > tol:
            raise DicomError(
                f"series {label}: non-uniform slice spacing (steps from "
                f"{steps.min():.4f} to {steps.max():.4f} mm); resample it or load another series"
            )
        # In-plane drift of the slice origins means a gantry tilt (sheared volume).
        offsets = np.array([fr.position - frames[0].position for fr in frames])
        shear = offsets - np.outer(dist - dist[0], normal)
        worst = np.linalg.norm(shear, axis=1).max()
        if worst > max(_POSITION_TOL_MM, 1e-3 * (dist[-1] - dist[0])):
            raise DicomError(
                f"series {label}: slice origins drift {worst:.3f} mm off the slice normal "
                "(gantry tilt or sheared acquisition); not supported"
            )
    else:
        step = first.slice_thickness or 1.0
    row_spacing, col_spacing = frames[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_spacing  # voxel axis 0 walks along a row (column index)
    affine[:3, 1] = iop[3:] * row_spacing  # voxel axis 1 walks down a column (row index)
    affine[:3, 2] = normal * step
    affine[:3, 3] = frames[0].position
    return SeriesGeometry(
        frames=frames,
        affine_lps=affine,
        shape=(first.columns, first.rows, len(frames)),
        spacing=(col_spacing, row_spacing, step),
    )


def _where(fr: Frame) -> str:
    return fr.path if fr.frame is None else f"{fr.path} frame {fr.frame}"


def decode_series(geometry: SeriesGeometry, label: str) -> np.ndarray:
    """Decode and rescale pixels into a float32 array of shape (columns, rows, slices)."""
    out = np.empty(geometry.shape, dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for k, fr in enumerate(geometry.frames):
        if fr.path not in cache:
            try:
                ds = pydicom.dcmread(fr.path)
                pixels = ds.pixel_array
            except Exception as exc:  # decoders raise many types; name the file
                raise DicomError(f"series {label}: cannot decode pixel data of {fr.path}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            cache.clear()  # keep at most one multi-frame file in memory
            cache[fr.path] = pixels
        pixels = cache[fr.path]
        plane = pixels if fr.frame is None else pixels[fr.frame]
        if plane.shape != geometry.shape[1::-1]:
            raise DicomError(f"series {label}: {_where(fr)} decodes to {plane.shape}, header says "
                             f"{geometry.shape[1::-1]}")
        out[:, :, k] = (plane.astype(np.float64) * fr.slope + fr.intercept).T
    return out


def scan_path(path: str | Path) -> dict[SeriesKey, list[DicomFile]]:
    """Headers of a DICOM folder (``scan_folder``) or of one DICOM file, grouped by series."""
    path = Path(path)
    if path.is_dir():
        return scan_folder(path)
    header = read_header(str(path))
    if header is None:
        raise DicomError(f"{path}: not a DICOM file")
    check_not_truncated(header)
    return {header.key: [header]}


def read_series(path: str | Path, series: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a DICOM series from a folder (or a single, possibly multi-frame, file).

    Returns:
        array of shape (X, Y, Z) = (columns, rows, slices), float32, rescaled;
        the RAS affine of that grid (not yet reoriented);
        metadata without patient-identifying fields.
    """
    key, files = select_series(scan_path(path), path, series)
    label = key.label()
    geometry = series_geometry(files, label)
    array = decode_series(geometry, label)
    first = files[0]
    meta = {
        "series": label,
        "series_uid": key.series_uid,
        "series_description": first.description,
        "modality": first.modality,
        "n_files": len(files),
        "spacing": geometry.spacing,
        "slice_thickness": first.slice_thickness,
        "transfer_syntax": first.transfer_syntax,
    }
    return array, LPS_TO_RAS @ geometry.affine_lps, meta
