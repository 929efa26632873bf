"""DICOM header parsing: one file's geometry, rescale and series identity, pixels not read.

Single-frame files, enhanced multi-frame files (per-frame functional groups) and legacy
multi-frame files (one position plus SpacingBetweenSlices) all become a list of ``Frame``.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement

from medssl.errors import InputError

log = logging.getLogger(__name__)

_UNCOMPRESSED_SYNTAXES = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
}


class DicomError(InputError):
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
    images_in_acquisition: int | None = None
    bits_stored: int | None = None
    pixel_representation: int = 0  # 1: signed integers
    # The full dataset (pixel data included) when the file was read with ``pixels=True``,
    # so that decoding does not read the file a second time.
    dataset: pydicom.Dataset | None = field(default=None, repr=False, compare=False)


class _Raw:
    """Top-level header values read straight from their raw bytes.

    pydicom converts each element through its value hooks and validation, 20-70 us per
    element; for the dozen numbers and UIDs a volume needs per slice that cost as much as
    reading the file. DS/IS/UI/CS values are ASCII by definition, so splitting their bytes
    on backslashes gives the same values. Elements pydicom has already converted are
    read from the converted value.
    """

    def __init__(self, ds: pydicom.Dataset) -> None:
        self.ds = ds

    def strings(self, tag: int) -> list[str] | None:
        elem = self.ds.get_item(tag)
        if elem is None:
            return None
        value = elem.value
        if isinstance(elem, RawDataElement) and isinstance(value, bytes):
            text = value.decode("latin-1").strip(" \0")
            return [v.strip(" \0") for v in text.split("\\")] if text else None
        if value is None or value == "":
            return None
        if isinstance(value, pydicom.multival.MultiValue | list | tuple):
            return [str(v) for v in value]
        return [str(value)]

    def text(self, tag: int) -> str | None:
        values = self.strings(tag)
        return None if values is None else "\\".join(values)

    def number(self, tag: int) -> float | None:
        values = self.strings(tag)
        try:
            return None if not values else float(values[0])
        except ValueError:
            return None

    def ushort(self, tag: int) -> int | None:
        elem = self.ds.get_item(tag)
        if elem is None:
            return None
        value = elem.value
        if isinstance(elem, RawDataElement) and isinstance(value, bytes):
            if len(value) < 2:
                return None
            return int.from_bytes(value[:2], "little" if elem.is_little_endian else "big")
        return None if value in (None, "") else int(value)


_TAGS = {
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "PixelSpacing": 0x00280030,
    "RescaleSlope": 0x00281053,
    "RescaleIntercept": 0x00281052,
}


def _floats(value: object, n: int, what: str, path: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{path}: {what} is missing or not numeric ({value!r})") from exc
    if arr.shape != (n,):
        raise DicomError(f"{path}: {what} must have {n} values, got {arr.tolist()}")
    return arr


def _scalar(value: object) -> float | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value in (None, "") else float(value)  # type: ignore[arg-type]


def _frame_from_tags(ds: pydicom.Dataset, path: str, frame: int | None, groups: list) -> Frame:
    """Geometry and rescale of one frame; ``groups``: functional groups, most specific first."""
    raw = _Raw(ds)

    def find(seq_name: str, attr: str) -> object:
        for group in groups:
            seq = group.get(seq_name)
            if seq and attr in seq[0]:
                return seq[0].get(attr)
        return raw.strings(_TAGS[attr])

    ipp = find("PlanePositionSequence", "ImagePositionPatient")
    iop = find("PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = find("PixelMeasuresSequence", "PixelSpacing")
    if ipp is None or iop is None or spacing is None:
        missing = [n for n, v in [("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                  ("PixelSpacing", spacing)] if v is None]
        raise DicomError(f"{path}: no {', '.join(missing)}; cannot place the image in space")
    try:
        slope = _scalar(find("PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _scalar(find("PixelValueTransformationSequence", "RescaleIntercept"))
    except ValueError:
        raise DicomError(f"{path}: RescaleSlope/RescaleIntercept is not numeric") from None
    ps = _floats(spacing, 2, "PixelSpacing", path)
    return Frame(
        path=path,
        frame=frame,
        position=_floats(ipp, 3, "ImagePositionPatient", path),
        orientation=_floats(iop, 6, "ImageOrientationPatient", path),
        pixel_spacing=(float(ps[0]), float(ps[1])),
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
    )


def _frames(ds: pydicom.Dataset, path: str) -> list[Frame]:
    n_frames = int(_Raw(ds).number(0x00280008) or 1)  # NumberOfFrames
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") if 0x52009230 in ds else None
    shared = ds.get("SharedFunctionalGroupsSequence") if 0x52009229 in ds else None
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


PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloat...
_IMAGE_SOP_WORDS = ("Image Storage", "Segmentation Storage", "Dose Storage")


def is_image_sop_class(uid: str) -> bool:
    """True for SOP classes whose instances must carry pixel data (MR/CT/... images)."""
    name = pydicom.uid.UID(str(uid)).name
    return any(word in name for word in _IMAGE_SOP_WORDS)


def read_header(path: str, pixels: bool = False) -> DicomFile | None:
    """Read one file's header, and its pixel data too when ``pixels`` is True.

    The file is opened once; with ``pixels=True`` the returned ``DicomFile.dataset``
    holds the full dataset for decoding.

    Returns None for a file that is not DICOM at all and for DICOM objects without an
    image (DICOMDIR, reports); raises ``DicomError`` for a DICOM file that is damaged,
    cut short (its pixel data does not fit in the file) or lacks what a volume needs.
    Messages name the file and never quote header values (they may identify the patient).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(132)
        has_magic = len(head) == 132 and head[128:132] == b"DICM"
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=not pixels, force=not has_magic)
        except Exception as exc:  # pydicom raises many types on damaged input
            if not has_magic:
                return None
            # The exception text is left out: it may quote header bytes (names, dates).
            raise DicomError(f"{path}: unreadable DICOM header (damaged or cut short; "
                             f"{type(exc).__name__})") from None
        header = _parse(ds, path, has_magic)
        if header is None:
            return None
        if pixels:
            _check_pixel_value(ds, header, size)
            header.dataset = ds
        elif header.transfer_syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
            _check_pixel_element(fh, ds, header, size)
    return header


def _parse(ds: pydicom.Dataset, path: str, has_magic: bool) -> DicomFile | None:
    meta = getattr(ds, "file_meta", None) or {}
    if meta.get("MediaStorageSOPClassUID") == pydicom.uid.MediaStorageDirectoryStorage:
        return None  # a DICOMDIR index, no image
    raw = _Raw(ds)
    # Present is enough: anonymised exports may blank these UIDs.
    essentials = [name for name, tag in (("SOPClassUID", 0x00080016),
                                         ("SeriesInstanceUID", 0x0020000E)) if tag not in ds]
    sop_class, series_uid = raw.text(0x00080016) or "", raw.text(0x0020000E) or ""
    if essentials:
        if not has_magic:
            return None  # force=True parses almost anything; this was not DICOM
        raise DicomError(f"{path}: damaged DICOM header (no {', '.join(essentials)}; "
                         "the file may be cut short)")
    rows, cols = raw.ushort(0x00280010), raw.ushort(0x00280011)
    if rows is None:  # pixel data itself is not read here
        if is_image_sop_class(sop_class):
            raise DicomError(f"{path}: damaged DICOM header (an image without Rows; the "
                             "file may be cut short)")
        log.warning("%s: DICOM object without an image (SOP class %s), ignored",
                    path, sop_class)
        return None
    if cols is None:
        raise DicomError(f"{path}: damaged DICOM header (no valid Rows/Columns)")
    echo = ds.get("EchoNumbers", "") if 0x00180086 in ds else ""
    image_type = raw.text(0x00080008) or ""
    if "MOSAIC" in image_type.upper():
        raise DicomError(f"{path}: Siemens mosaic images are not unpacked by medssl; "
                         "convert the series with dcm2niix and use the NIfTI")
    frames = _frames(ds, path)
    return DicomFile(
        path=path,
        key=SeriesKey(series_uid, str(echo), image_type),
        rows=rows,
        columns=cols,
        frames=frames,
        n_frames=len(frames),
        modality=raw.text(0x00080060) or "",
        description=str(ds.get("SeriesDescription", "")) if 0x0008103E in ds else "",
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
        samples_per_pixel=raw.ushort(0x00280002) or 1,
        bits_allocated=raw.ushort(0x00280100) or 16,
        instance_number=_int_or_none(raw.number(0x00200013)),
        slice_thickness=raw.number(0x00180050),
        images_in_acquisition=_int_or_none(raw.number(0x00201002)),
        bits_stored=raw.ushort(0x00280101),
        pixel_representation=raw.ushort(0x00280103) or 0,
    )


def _int_or_none(value: object) -> int | None:
    try:
        return None if value in (None, "") else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def native_pixel_bytes(f: DicomFile) -> int | None:
    """Bytes the pixel data needs when stored uncompressed; None for compressed syntaxes."""
    if f.transfer_syntax not in _UNCOMPRESSED_SYNTAXES:
        return None
    bits = f.rows * f.columns * f.samples_per_pixel * f.bits_allocated * f.n_frames
    return (bits + 7) // 8


def _truncated(f: DicomFile, size: int, short: int | None) -> DicomError:
    what = ("it ends before its pixel data" if short is None
            else f"{size} bytes, {short} byte(s) short of its pixel data")
    return DicomError(f"{f.path}: file is truncated ({what}); cannot decode pixel data")


def _check_pixel_value(ds: pydicom.Dataset, f: DicomFile, size: int) -> None:
    """Full read: the pixel data element is there and, uncompressed, long enough."""
    tag = next((t for t in PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise _truncated(f, size, None)
    expected = native_pixel_bytes(f)
    if expected is not None and tag == PIXEL_TAGS[0]:
        got = len(ds[tag].value or b"")
        if got < expected:
            raise _truncated(f, size, expected - got)


def _check_pixel_element(fh: BinaryIO, ds: pydicom.Dataset, f: DicomFile, size: int) -> None:
    """Header-only read: the pixel data element that follows the header fits in the file.

    ``fh`` stands where pydicom stopped, at the pixel data element. Its declared length
    (or, for compressed data, its chain of fragments) must end within the file: cheap
    seeks, no pixel decoding. Comparing the file size with the pixel bytes alone would
    miss a file cut short by less than its header.
    """
    start = fh.tell()
    implicit, little = getattr(ds, "original_encoding", (False, True))
    end = "<" if little is not False else ">"
    element = fh.read(12)
    if len(element) < 8:
        raise _truncated(f, size, None)
    group, elem = struct.unpack(end + "HH", element[:4])
    if (group << 16 | elem) not in PIXEL_TAGS:
        raise _truncated(f, size, None)
    if implicit:
        (length,), offset = struct.unpack(end + "I", element[4:8]), 8
    else:
        if len(element) < 12:
            raise _truncated(f, size, None)
        (length,), offset = struct.unpack(end + "I", element[8:12]), 12
    if length != 0xFFFFFFFF:
        expected = native_pixel_bytes(f)
        need = start + offset + max(length, expected or 0)
        if size < need:
            raise _truncated(f, size, need - size)
        return
    # Encapsulated (compressed) pixel data: items (FFFE,E000) then a delimiter (FFFE,E0DD).
    pos = start + offset
    while True:
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            raise _truncated(f, size, None)
        group, elem, length = struct.unpack(end + "HHI", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF:
            raise DicomError(f"{f.path}: damaged compressed pixel data (unexpected item); "
                             "cannot decode pixel data")
        pos += 8 + length
        if pos > size:
            raise _truncated(f, size, pos - size)


_NATIVE_LITTLE_ENDIAN = {pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian}


def native_pixels(ds: pydicom.Dataset, f: DicomFile) -> np.ndarray | None:
    """Uncompressed little-endian integer pixels as an array on the file's bytes, shaped
    (rows, columns) or (frames, rows, columns); None where pydicom must decode.

    Equal to ``ds.pixel_array`` (unused high bits cleared or sign-extended the same way)
    without its per-call overhead, which matters at one call per slice.
    """
    if (f.transfer_syntax not in _NATIVE_LITTLE_ENDIAN or f.samples_per_pixel != 1
            or f.bits_allocated not in (8, 16, 32)):
        return None
    elem = ds.get_item(PIXEL_TAGS[0])
    data = None if elem is None else elem.value
    if not isinstance(data, bytes | bytearray):
        return None
    dtype = np.dtype(f"<{'i' if f.pixel_representation else 'u'}{f.bits_allocated // 8}")
    count = f.rows * f.columns * f.n_frames
    if len(data) < count * dtype.itemsize:
        return None  # let pydicom report the short data
    arr = np.frombuffer(data, dtype, count=count)
    stored = f.bits_stored or f.bits_allocated
    if 0 < stored < f.bits_allocated:
        # Bits above BitsStored are undefined (PS3.5 8.1.1): shift them out and back,
        # sign-extending signed data, as pydicom's correct_unused_bits does.
        shift = f.bits_allocated - stored
        arr = (arr << shift) >> shift
    return arr.reshape((f.n_frames, f.rows, f.columns) if f.n_frames > 1 else (f.rows, f.columns))


def check_not_truncated(f: DicomFile) -> None:
    """Uncompressed pixel data must fit in the file; kept for callers of the old API
    (``read_header`` now checks the pixel data element itself)."""
    expected = native_pixel_bytes(f)
    size = os.path.getsize(f.path)
    if expected is not None and size < expected:
        raise _truncated(f, size, expected - size)


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)
