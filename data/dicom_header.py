"""DICOM header parsing: one file's geometry, rescale and series identity, pixels not read.

Single-frame files, enhanced multi-frame files (per-frame functional groups) and legacy
multi-frame files (one position plus SpacingBetweenSlices) all become a list of ``Frame``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pydicom

log = logging.getLogger(__name__)

_UNCOMPRESSED_SYNTAXES = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
}


class DicomError(ValueError):
    """A DICOM input that cannot be turned into a correct volume."""


@dataclass(frozen=True)
class SeriesKey:
    """What separates one volume from another inside a folder."""

    series_uid: str
    echo: str = ""
    image_type: str = ""

    def label(self) -> str:
        parts = [self.series_uid]
        if self.echo:
            parts.append(f"echo={self.echo}")
        if self.image_type:
            parts.append(f"type={self.image_type}")
        return ":".join(parts)


@dataclass
class Frame:
    """One 2D image of a series: a single-frame file or one frame of a multi-frame file."""

    path: str
    frame: int | None
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slope: float = 1.0
    intercept: float = 0.0


@dataclass
class DicomFile:
    """Header information of one DICOM file (pixels not read)."""

    path: str
    key: SeriesKey
    rows: int
    columns: int
    frames: list[Frame]
    n_frames: int
    modality: str
    description: str
    transfer_syntax: str
    samples_per_pixel: int
    bits_allocated: int
    instance_number: int | None
    slice_thickness: float | None


def _floats(value: object, n: int, what: str, path: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{path}: {what} is missing or not numeric ({value!r})") from exc
    if arr.shape != (n,):
        raise DicomError(f"{path}: {what} must have {n} values, got {arr.tolist()}")
    return arr


def _frame_from_tags(ds: pydicom.Dataset, path: str, frame: int | None, groups: list) -> Frame:
    """Geometry and rescale of one frame; ``groups``: functional groups, most specific first."""

    def find(seq_name: str, attr: str) -> object:
        for group in groups:
            seq = group.get(seq_name)
            if seq and attr in seq[0]:
                return seq[0].get(attr)
        return ds.get(attr)

    ipp = find("PlanePositionSequence", "ImagePositionPatient")
    iop = find("PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = find("PixelMeasuresSequence", "PixelSpacing")
    if ipp is None or iop is None or spacing is None:
        missing = [n for n, v in [("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                  ("PixelSpacing", spacing)] if v is None]
        raise DicomError(f"{path}: no {', '.join(missing)}; cannot place the image in space")
    slope = find("PixelValueTransformationSequence", "RescaleSlope")
    intercept = find("PixelValueTransformationSequence", "RescaleIntercept")
    ps = _floats(spacing, 2, "PixelSpacing", path)
    return Frame(
        path=path,
        frame=frame,
        position=_floats(ipp, 3, "ImagePositionPatient", path),
        orientation=_floats(iop, 6, "ImageOrientationPatient", path),
        pixel_spacing=(float(ps[0]), float(ps[1])),
        slope=1.0 if slope is None else float(slope),
        intercept=0.0 if intercept is None else float(intercept),
    )


def _frames(ds: pydicom.Dataset, path: str) -> list[Frame]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_groups = [shared[0]] if shared else []
    if per_frame:
        if len(per_frame) != n_frames:
            raise DicomError(
                f"{path}: NumberOfFrames is {n_frames} but there are {len(per_frame)} "
                "per-frame functional groups"
            )
        return [_frame_from_tags(ds, path, i, [item, *shared_groups])
                for i, item in enumerate(per_frame)]
    first = _frame_from_tags(ds, path, 0 if n_frames > 1 else None, shared_groups)
    if n_frames == 1:
        return [first]
    # Legacy multi-frame file: one position, frames stacked along the normal.
    step = ds.get("SpacingBetweenSlices")
    if step is None:
        raise DicomError(
            f"{path}: multi-frame file without per-frame positions or SpacingBetweenSlices"
        )
    normal = slice_normal(first.orientation)
    return [
        Frame(path, i, first.position + i * float(step) * normal, first.orientation,
              first.pixel_spacing, first.slope, first.intercept)
        for i in range(n_frames)
    ]


def _is_dicom_file(path: str) -> bool:
    """True when the file carries the DICOM preamble magic ('DICM' at byte 128)."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_header(path: str) -> DicomFile | None:
    """Read one file's header without pixel data.

    Returns None for a file that is not DICOM at all; raises ``DicomError`` for a
    DICOM file that is damaged or lacks what a volume needs.
    """
    has_magic = _is_dicom_file(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_magic)
    except Exception as exc:  # pydicom raises many types on damaged input
        if not has_magic:
            return None
        raise DicomError(f"{path}: unreadable DICOM header ({exc})") from exc
    essentials = [t for t in ("SOPClassUID", "SeriesInstanceUID") if t not in ds]
    if essentials:
        if not has_magic:
            return None  # force=True parses almost anything; this was not DICOM
        raise DicomError(f"{path}: damaged DICOM header (no {', '.join(essentials)})")
    if "Rows" not in ds:  # pixel data itself is not read here
        log.warning("%s: DICOM object without an image (SOP class %s), ignored",
                    path, ds.SOPClassUID)
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except AttributeError as exc:
        raise DicomError(f"{path}: no Rows/Columns") from exc
    echo = ds.get("EchoNumbers", "")
    image_type = ds.get("ImageType", "")
    if isinstance(image_type, pydicom.multival.MultiValue):
        image_type = "\\".join(str(v) for v in image_type)
    if "MOSAIC" in str(image_type).upper():
        raise DicomError(f"{path}: Siemens mosaic images are not unpacked by medssl; "
                         "convert the series with dcm2niix and use the NIfTI")
    frames = _frames(ds, path)
    thickness = ds.get("SliceThickness")
    instance = ds.get("InstanceNumber")
    return DicomFile(
        path=path,
        key=SeriesKey(str(ds.SeriesInstanceUID), str(echo), str(image_type)),
        rows=rows,
        columns=cols,
        frames=frames,
        n_frames=len(frames),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        transfer_syntax=str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 16),
        instance_number=None if instance in (None, "") else int(instance),
        slice_thickness=None if thickness in (None, "") else float(thickness),
    )


def check_not_truncated(f: DicomFile) -> None:
    """Uncompressed pixel data must fit in the file; cheap check without decoding."""
    if f.transfer_syntax not in _UNCOMPRESSED_SYNTAXES:
        return
    expected = f.rows * f.columns * f.samples_per_pixel * f.bits_allocated // 8 * f.n_frames
    size = os.path.getsize(f.path)
    if size < expected:
        raise DicomError(
            f"{f.path}: file is truncated ({size} bytes, pixel data alone needs {expected})"
        )


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)
