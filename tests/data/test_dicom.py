"""DICOM geometry and bad-input handling on generated series."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medssl.data.demo import DemoPaths
from medssl.data.dicom import DicomError
from medssl.data.io import VolumeError, load_volume, read_volume_info


@pytest.fixture
def series(demo: DemoPaths, tmp_path: Path) -> Path:
    """A writable copy of one demo subject's DICOM series."""
    return Path(shutil.copytree(demo.root / "dicom" / "DEMO001", tmp_path / "DEMO001"))


def _files(folder: Path) -> list[tuple[Path, Dataset]]:
    """Files with their datasets, in slice-position order (InstanceNumber order in the demo)."""
    items = [(p, pydicom.dcmread(p)) for p in folder.iterdir()]
    return sorted(items, key=lambda item: int(item[1].InstanceNumber))


def test_series_equals_its_nifti_twin(demo: DemoPaths) -> None:
    from_dicom = load_volume(demo.root / "dicom" / "DEMO003")
    from_nifti = load_volume(demo.root / "nifti" / "DEMO003_image.nii.gz")
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    assert from_dicom.meta["original_axcodes"] == "PIR"  # sagittal, stored like the scanner
    assert "".join(nib.aff2axcodes(from_dicom.affine)) == "RAS"


def test_order_ignores_file_names_and_instance_numbers(series: Path) -> None:
    before = load_volume(series)
    files = _files(series)
    rng = np.random.default_rng(1)
    for (path, ds), number in zip(files, rng.permutation(len(files)), strict=True):
        ds.InstanceNumber = int(number) + 1
        path.unlink()
        ds.save_as(series / f"renamed_{number:03d}.dcm")
    after = load_volume(series)
    np.testing.assert_array_equal(before.array, after.array)
    np.testing.assert_allclose(before.affine, after.affine)


def test_rescale_slope_and_intercept_applied(series: Path) -> None:
    path, ds = _files(series)[5]
    raw = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    ds.RescaleSlope, ds.RescaleIntercept = "3", "-7"
    ds.save_as(path)
    volume = load_volume(series)
    # The 6th slice in position order; RAS axis 0 runs against instance order here.
    plane = volume.array[0, volume.array.shape[1] - 6]
    assert plane.min() >= -7
    assert np.isclose(plane.sum(), (raw * 3 - 7).sum(), rtol=1e-5)
    assert not np.isclose(plane.sum(), (raw * slope + intercept).sum(), rtol=1e-3)


def test_non_dicom_files_are_ignored_with_warning(series: Path, caplog) -> None:
    (series / "notes.txt").write_text("acquired on a Tuesday")
    (series / "DICOMDIR.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        volume = load_volume(series)
    assert volume.array.shape[1:] == (16, 32, 32)
    assert "ignored 2 non-DICOM or non-image file(s)" in caplog.text and "notes.txt" in caplog.text


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DicomError, match="folder is empty"):
        load_volume(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no such file or folder"):
        load_volume(tmp_path / "nope")


def test_two_series_in_one_folder(series: Path, demo: DemoPaths) -> None:
    for p in (demo.root / "dicom" / "DEMO002").iterdir():
        shutil.copy(p, series / f"other_{p.name}")
    with pytest.raises(DicomError, match="2 series in one folder") as err:
        load_volume(series)
    assert str(series) in str(err.value) and "SAG_3D_DESS_DEMO" in str(err.value)
    uid = str(pydicom.dcmread(next((demo.root / "dicom" / "DEMO002").iterdir())).SeriesInstanceUID)
    picked = load_volume(series, series=uid)
    np.testing.assert_array_equal(picked.array, load_volume(demo.root / "dicom" / "DEMO002").array)
    with pytest.raises(DicomError, match="not found"):
        load_volume(series, series="1.2.3")


def test_truncated_file_is_named(series: Path) -> None:
    path = _files(series)[3][0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomError, match="truncated") as err:
        load_volume(series)
    assert str(path) in str(err.value)
    with pytest.raises(DicomError, match="truncated"):
        read_volume_info(series)  # caught from headers, before any decoding


def test_corrupt_header_is_named(series: Path) -> None:
    path = _files(series)[2][0]
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:132]) + b"\xff" * 64)  # DICOM magic, then garbage
    with pytest.raises(DicomError, match="unreadable DICOM header|damaged DICOM header") as err:
        load_volume(series)
    assert str(path) in str(err.value)


def test_missing_slice_gives_non_uniform_spacing(series: Path) -> None:
    _files(series)[7][0].unlink()
    with pytest.raises(DicomError, match="non-uniform slice spacing") as err:
        load_volume(series)
    assert "6.0000 to 12.0000 mm" in str(err.value)


def test_gantry_tilt_is_refused(series: Path) -> None:
    for k, (path, ds) in enumerate(_files(series)):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.5f}", f"{y:.5f}", f"{z + 0.5 * k:.5f}"]  # shear along S
        ds.save_as(path)
    with pytest.raises(DicomError, match="gantry tilt"):
        load_volume(series)


def test_duplicate_positions_are_refused(series: Path) -> None:
    path, ds = _files(series)[4]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series / "copy_of_slice")
    with pytest.raises(DicomError, match="share a slice position"):
        load_volume(series)


def _to_multiframe(series: Path, out: Path, legacy: bool = False) -> Path:
    """Pack a single-frame series into one enhanced (or legacy) multi-frame file."""
    files = _files(series)
    first = files[0][1]
    ds = copy.deepcopy(first)
    ds.NumberOfFrames = len(files)
    ds.PixelData = b"".join(f[1].PixelData for f in files)
    if legacy:
        # Legacy files give one position; frames follow the slice normal, which points
        # against the demo's instance order.
        ds.ImagePositionPatient = files[-1][1].ImagePositionPatient
        ds.PixelData = b"".join(f[1].PixelData for f in files[::-1])
        ds.SpacingBetweenSlices = "6.0"
    else:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            del ds[tag]
        shared, measures, plane = Dataset(), Dataset(), Dataset()
        measures.PixelSpacing = first.PixelSpacing
        plane.ImageOrientationPatient = first.ImageOrientationPatient
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.PlaneOrientationSequence = Sequence([plane])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per_frame = []
        for _, f in files[::-1]:  # frames stored in reverse order on purpose
            item, pos = Dataset(), Dataset()
            pos.ImagePositionPatient = f.ImagePositionPatient
            item.PlanePositionSequence = Sequence([pos])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.PixelData = b"".join(f[1].PixelData for f in files[::-1])
    path = out / ("legacy.dcm" if legacy else "enhanced.dcm")
    ds.save_as(path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["enhanced", "legacy"])
def test_multiframe_file_equals_series(series: Path, tmp_path: Path, legacy: bool) -> None:
    path = _to_multiframe(series, tmp_path, legacy)
    single = load_volume(series)
    multi = load_volume(path)
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-4)


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless],
                         ids=["rle", "jpeg2000"])
def test_compressed_series_equals_uncompressed(series: Path, syntax: pydicom.uid.UID) -> None:
    before = load_volume(series)
    for path, ds in _files(series):
        ds.compress(syntax)
        ds.save_as(path)
    after = load_volume(series)
    assert after.meta["transfer_syntax"] == syntax
    np.testing.assert_array_equal(after.array, before.array)


def test_truncated_single_file_caught_from_headers(series: Path) -> None:
    path = _files(series)[3][0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomError, match="truncated"):
        read_volume_info(path)  # the same check for a file as for a folder


def test_multiframe_file_mixed_with_slices_is_refused(series: Path, tmp_path: Path) -> None:
    path = _to_multiframe(series, tmp_path)
    path.rename(series / "enhanced.dcm")
    for check in (load_volume, read_volume_info):
        with pytest.raises(DicomError, match="mixes a multi-frame file"):
            check(series)
