"""Damaged, incomplete or unusable input: every case is an error naming the file (issue 12)."""

from __future__ import annotations

import itertools
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence

from medssl.data.demo import DemoPaths
from medssl.data.dicom import DicomError
from medssl.data.dicom_header import native_pixels, read_header
from medssl.data.io import (
    LoadVolumed,
    VolumeError,
    canonical_layout,
    load_volume,
    native_view,
    read_volume_info,
    to_canonical,
)
from medssl.data.pipeline import Preprocessing, make_datasets

FAKE_NAME, FAKE_BIRTH = "Doe^Jane", "19700101"


@pytest.fixture
def series(demo: DemoPaths, tmp_path: Path) -> Path:
    """A writable copy of one demo subject's DICOM series (16 slices of 32x32)."""
    return Path(shutil.copytree(demo.root / "dicom" / "DEMO001", tmp_path / "DEMO001"))


def _by_instance(folder: Path) -> list[Path]:
    """Files in InstanceNumber order, which is slice-position order in the demo."""
    return sorted(folder.iterdir(), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))


def _pixel_offset(path: Path) -> int:
    """Byte offset of the PixelData element, found independently of medssl."""
    with open(path, "rb") as fh:
        pydicom.dcmread(fh, stop_before_pixels=True)
        return fh.tell()


def _cut(size: int, offset: int, where: str) -> int:
    return {"zero_bytes": 0, "100_bytes": 100, "inside_header": offset // 2 + 3,
            "inside_pixel_element_header": offset + 6, "100_bytes_short": size - 100,
            "1_byte_short": size - 1}[where]


CUTS = ["zero_bytes", "100_bytes", "inside_header", "inside_pixel_element_header",
        "100_bytes_short", "1_byte_short"]


@pytest.mark.parametrize("where", CUTS)
@pytest.mark.parametrize("edge", [0, -1], ids=["first_slice", "last_slice"])
def test_damaged_edge_slice_is_an_error_naming_it(series: Path, where: str, edge: int) -> None:
    victim = _by_instance(series)[edge]
    data = victim.read_bytes()
    victim.write_bytes(data[: _cut(len(data), _pixel_offset(victim), where)])
    for check in (load_volume, read_volume_info):  # header-only checks catch it too
        with pytest.raises(DicomError) as err:
            check(series)
        assert str(victim) in str(err.value), (check.__name__, str(err.value))


@pytest.mark.parametrize("content", [b"", b"\0" * 100, b"\0" * 128 + b"DIC"],
                         ids=["empty", "preamble_only", "preamble_and_part_of_magic"])
def test_damaged_member_with_another_name_is_an_error(series: Path, content: bytes) -> None:
    """A .dcm name or a DICOM preamble marks a file as part of the series even when its name
    differs from the others (here all named IMnnnn)."""
    victim = series / ("lost.dcm" if content == b"" else "lost")
    victim.write_bytes(content)
    with pytest.raises(DicomError, match="lost"):
        read_volume_info(series)


def test_garbage_file_the_size_of_a_slice_is_an_error(series: Path) -> None:
    size = _by_instance(series)[0].stat().st_size
    victim = series / "x"
    victim.write_bytes(np.random.default_rng(0).integers(1, 255, size, dtype=np.uint8).tobytes())
    with pytest.raises(DicomError, match=re.escape(str(victim)) + ".*size"):
        load_volume(series)


def _dicomdir(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "KNEE"
    ds.DirectoryRecordSequence = Sequence([])
    ds.save_as(path, enforce_file_format=True)


def test_foreign_files_are_still_skipped_with_a_warning(series: Path, caplog) -> None:
    reference = load_volume(series)
    (series / "README.txt").write_text("Knee study, exported by the PACS\n")
    (series / ".DS_Store").write_bytes(b"")
    _dicomdir(series / "DICOMDIR")
    with caplog.at_level(logging.WARNING):
        volume = load_volume(series)
    np.testing.assert_array_equal(volume.array, reference.array)
    for name in ("README.txt", ".DS_Store", "DICOMDIR"):
        assert name in caplog.text


def _set(paths: list[Path], **tags: object) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        for tag, value in tags.items():
            setattr(ds, tag, value)
        ds.save_as(p)


@pytest.mark.parametrize("edge", [0, -1], ids=["first_slice", "last_slice"])
def test_missing_edge_slice_from_images_in_acquisition(series: Path, edge: int) -> None:
    files = _by_instance(series)
    _set(files, ImagesInAcquisition=len(files))
    files[edge].unlink()
    for check in (load_volume, read_volume_info):
        with pytest.raises(DicomError, match="15 image.*ImagesInAcquisition.*16"):
            check(series)


def test_missing_first_slice_from_instance_numbers(series: Path) -> None:
    _by_instance(series)[0].unlink()
    with pytest.raises(DicomError, match="InstanceNumber.*starts at 2"):
        read_volume_info(series)


def test_numbering_of_a_partial_export_or_of_echoes_is_accepted(series: Path) -> None:
    """Numbering that starts high (an exported range) or interleaves echoes is not a gap."""
    reference = load_volume(series)
    files = _by_instance(series)
    for k, p in enumerate(files):
        _set([p], InstanceNumber=267 + k)
    np.testing.assert_array_equal(load_volume(series).array, reference.array)
    # A second echo stored in the same series, instance numbers interleaved (1, 3, ... / 2, 4,
    # ...), ImagesInAcquisition counting both echoes.
    for k, p in enumerate(files):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber, ds.EchoNumbers, ds.ImagesInAcquisition = 2 * k + 1, 1, 32
        ds.save_as(p)
        ds.InstanceNumber, ds.EchoNumbers = 2 * k + 2, 2
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(series / f"echo2_{p.name}")
    for echo in (1, 2):
        label = f"{ds.SeriesInstanceUID}:echo={echo}"
        np.testing.assert_array_equal(load_volume(series, label).array, reference.array)
        read_volume_info(series, label)


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_voxels_are_an_error_naming_row_and_file(tmp_path: Path, bad: float) -> None:
    array = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    array[1, 2, 3] = array[4, 5, 6] = bad
    path = _nifti(tmp_path / "scan.nii.gz", array)
    with pytest.raises(VolumeError, match=re.escape(f"{path}: 2 non-finite voxel")):
        load_volume(path)
    where = "my.csv line 4 (PatientID P4)"
    with pytest.raises(VolumeError, match=re.escape(f"{where}: image: {path}: 2 non-finite")):
        LoadVolumed("image")({"image": str(path), "row": where})


def test_constant_volume_is_an_error_but_not_a_constant_label(series: Path,
                                                              tmp_path: Path) -> None:
    for p in series.iterdir():
        ds = pydicom.dcmread(p)
        ds.PixelData = np.full((32, 32), 7, np.uint16).tobytes()
        ds.save_as(p)
    with pytest.raises(VolumeError, match=re.escape(f"{series}: constant volume (every voxel is")):
        load_volume(series)
    empty_mask = _nifti(tmp_path / "mask.nii.gz", np.zeros((8, 9, 10), np.uint8))
    image = _nifti(tmp_path / "image.nii.gz", np.arange(720, dtype=np.float32).reshape(8, 9, 10))
    out = LoadVolumed(["image", "label"])({"image": str(image), "label": str(empty_mask)})
    assert float(out["label"].abs().sum()) == 0 and out["image"].shape == (1, 8, 9, 10)
    with pytest.raises(VolumeError, match="constant volume"):
        LoadVolumed(["image", "label"])({"image": str(empty_mask), "label": str(empty_mask)})


@pytest.mark.parametrize("shape,problem", [((8, 9, 10, 2), "4D image with 2 volumes"),
                                           ((8, 9), "2D image")], ids=["4d", "2d"])
def test_nifti_that_is_not_one_3d_volume(tmp_path: Path, shape: tuple, problem: str) -> None:
    path = _nifti(tmp_path / "x.nii.gz", np.random.default_rng(0).random(shape).astype("f4"))
    for check in (load_volume, read_volume_info):
        with pytest.raises(VolumeError, match=re.escape(f"{path}: {problem}")):
            check(path)


def test_single_volume_4d_nifti_is_fine(tmp_path: Path) -> None:
    array = np.random.default_rng(0).random((8, 9, 10, 1)).astype("f4")
    path = _nifti(tmp_path / "x.nii.gz", array)
    np.testing.assert_array_equal(load_volume(path).array[0], array[..., 0])
    assert read_volume_info(path).shape == (8, 9, 10)


def _messages(fn, *args) -> str:
    try:
        fn(*args)
    except (DicomError, VolumeError) as exc:
        return str(exc)
    return ""


def test_no_identifying_field_in_any_error(series: Path, caplog) -> None:
    _set(list(series.iterdir()), PatientName=FAKE_NAME, PatientBirthDate=FAKE_BIRTH,
         InstitutionName="Hospital of Jane")
    victim = _by_instance(series)[-1]
    data = victim.read_bytes()
    name_at = data.find(b"Doe^Jane")
    assert name_at > 0
    texts = []
    with caplog.at_level(logging.DEBUG):
        for cut in (name_at + 3, name_at + 8, name_at + 12, _pixel_offset(victim) + 6,
                    len(data) - 5):
            victim.write_bytes(data[:cut])
            texts += [_messages(load_volume, series), _messages(read_volume_info, series)]
        victim.write_bytes(data[:name_at] + b"\xff" * 40 + data[name_at + 40:])
        texts += [_messages(load_volume, series), _messages(read_volume_info, series)]
    assert all(texts), texts
    text = "\n".join(texts) + caplog.text
    for secret in ("Doe", "Jane", FAKE_BIRTH, "Hospital"):
        assert secret not in text


def test_decoding_into_the_ras_view_equals_reorienting_afterwards() -> None:
    """``native_view`` fills a RAS array like ``to_canonical`` (nibabel) reorients one, for
    all 48 axis permutations and flips."""
    rng = np.random.default_rng(0)
    grid = rng.random((3, 4, 5)).astype(np.float32)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = np.eye(3)[:, perm] * np.array(signs) * [1.0, 2.0, 3.0]
            affine[:3, 3] = rng.normal(size=3)
            expected, expected_affine, _ = to_canonical(grid, affine)
            shape, ras_affine = canonical_layout(grid.shape, affine)
            out = np.empty(shape, np.float32)
            native_view(out, affine)[...] = grid
            np.testing.assert_array_equal(out, expected)
            np.testing.assert_allclose(ras_affine, expected_affine)


@pytest.mark.parametrize("bits,stored,signed", [(16, 12, 0), (16, 12, 1), (16, 16, 1), (8, 8, 0),
                                                (32, 32, 1), (32, 20, 0)],
                         ids=["u12in16", "s12in16", "s16", "u8", "s32", "u20in32"])
def test_fast_native_pixels_equal_pydicom(series: Path, bits: int, stored: int,
                                          signed: int) -> None:
    """Our direct read of uncompressed pixels equals pydicom's ``pixel_array``, including
    junk in the bits above BitsStored (cleared, or sign-extended for signed data)."""
    path = _by_instance(series)[0]
    ds = pydicom.dcmread(path)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    info = np.iinfo(dtype)
    values = np.random.default_rng(bits + stored + signed).integers(
        info.min, info.max, (32, 32), dtype=dtype, endpoint=True)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, stored - 1
    ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept = signed, "1", "0"
    ds.PixelData = values.tobytes()
    ds.save_as(path)
    expected = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert not np.array_equal(expected, values) or stored == bits  # junk bits were corrected
    header = read_header(str(path), pixels=True)
    np.testing.assert_array_equal(native_pixels(header.dataset, header), expected)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_every_bad_volume_is_reported_at_once_by_the_caches(tmp_path: Path, cache: str) -> None:
    """A NaN volume, a constant one and a truncated file in one cohort: one error names all
    three rows before any item is served, instead of one per run."""
    good = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    nan = good.copy()
    nan[1, 1, 1] = np.nan
    paths = {"P1": _nifti(tmp_path / "good.nii.gz", good),
             "P2": _nifti(tmp_path / "nan.nii.gz", nan),
             "P3": _nifti(tmp_path / "const.nii.gz", np.full((8, 9, 10), 3, np.float32))}
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(paths["P1"].read_bytes()[:-200])
    paths["P4"] = truncated
    csv = tmp_path / "c.csv"
    csv.write_text("PatientID,path,fold\n" + "".join(f"{p},{f.name},0\n" for p, f in paths.items()))
    with pytest.raises(VolumeError) as err:
        make_datasets(csv, "ssl", {"train": 0}, Preprocessing(), cache=cache,
                      cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert message.startswith("3 volumes cannot be used")
    for line, pid, problem in ((3, "P2", "non-finite"), (4, "P3", "constant volume"),
                               (5, "P4", "cannot read")):
        assert re.search(rf"c.csv line {line} \(PatientID {pid}\): .*{problem}", message), pid
    assert "P1" not in message
