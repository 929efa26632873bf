"""The loader against dcm2niix conversions of real scans (skipped where ../shared is absent)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from medssl.data.cli import convert_main
from medssl.data.io import MedsslReader, load_volume

PGBM = "tcia_brain_tumor_progression_PGBM-001"
CASES = {
    "totalsegmentator_ct_jpeg2000": ("totalsegmentator/example_ct_dicom",
                                     "totalsegmentator/reference_dcm2niix/example_ct_dicom.nii.gz"),
    "decubitus_hfs_sagittal": ("dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag",
                               "dcm_qa_decubitus/reference_dcm2niix/HFS/HFS_3_t1_fl2d_sag.nii.gz"),
    **{
        f"pgbm_{name.split('-')[1].lower()}": (f"{PGBM}/PGBM-001_1992-04-02/{name}",
                                               f"{PGBM}/reference_dcm2niix/{name}.nii.gz")
        for name in ("11-T1post-80644", "35623-FLAIRreg-79237", "37908-T2reg-21119",
                     "5388-MaskTumor-63335")
    },
}


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ref = nib.as_closest_canonical(nib.load(str(path)))
    return ref.get_fdata(), ref.affine


@pytest.mark.parametrize("series,reference", list(CASES.values()), ids=list(CASES))
def test_dicom_series_equals_dcm2niix(real_data: Path, series: str, reference: str) -> None:
    volume = load_volume(real_data / series)
    ref_array, ref_affine = _reference(real_data / reference)
    assert volume.array.shape == (1, *ref_array.shape)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], ref_array)
    np.testing.assert_allclose(volume.affine, ref_affine, atol=1e-3)
    assert "".join(nib.aff2axcodes(volume.affine)) == "RAS"


def test_slice_step_comes_from_positions_not_thickness(real_data: Path) -> None:
    volume = load_volume(real_data / CASES["totalsegmentator_ct_jpeg2000"][0])
    assert volume.meta["slice_thickness"] == pytest.approx(3.0)
    assert volume.meta["spacing"][2] == pytest.approx(2.0, abs=1e-3)
    assert volume.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless


def test_nifti_in_lps_is_reoriented(real_data: Path) -> None:
    path = real_data / "totalsegmentator/example_mr_sm.nii.gz"
    img = nib.load(str(path))
    assert "".join(nib.aff2axcodes(img.affine)) == "LPS"
    volume = load_volume(path)
    ref_array, ref_affine = _reference(path)
    np.testing.assert_array_equal(volume.array[0], ref_array.astype(np.float32))
    np.testing.assert_allclose(volume.affine, ref_affine, atol=1e-4)
    assert volume.meta["original_axcodes"] == "LPS"


def test_mask_series_lands_on_image_grid(real_data: Path) -> None:
    image = load_volume(real_data / CASES["pgbm_t1post"][0])
    mask = load_volume(real_data / CASES["pgbm_masktumor"][0])
    assert image.array.shape == mask.array.shape
    np.testing.assert_allclose(image.affine, mask.affine, atol=1e-3)
    assert 0 < (mask.array > 0).mean() < 0.1


def test_monai_loadimaged_with_medssl_reader(real_data: Path) -> None:
    path = str(real_data / CASES["decubitus_hfs_sagittal"][0])
    out = LoadImaged("image", reader=MedsslReader(), ensure_channel_first=True)({"image": path})
    ref_array, ref_affine = _reference(real_data / CASES["decubitus_hfs_sagittal"][1])
    assert tuple(out["image"].shape) == (1, *ref_array.shape)
    np.testing.assert_array_equal(out["image"][0].numpy(), ref_array)
    np.testing.assert_allclose(out["image"].affine.numpy(), ref_affine, atol=1e-3)


def test_several_series_in_one_folder_named_and_selectable(real_data: Path) -> None:
    folder = real_data / "dcm_qa_table_philips/In"
    with pytest.raises(ValueError, match="4 series in one folder") as err:
        load_volume(folder)
    labels = [line.split()[0].removeprefix("series=") for line in str(err.value).splitlines()[1:]]
    assert len(labels) == 4 and all("echo=" in label for label in labels)
    volume = load_volume(folder, series=labels[0])
    assert volume.array.shape == (1, 96, 96, 30)


def test_convert_writes_what_the_loader_reads(real_data: Path, tmp_path: Path) -> None:
    series = real_data / CASES["decubitus_hfs_sagittal"][0]
    out = tmp_path / "out.nii.gz"
    assert convert_main([str(series), str(out)]) == 0
    written = nib.load(str(out))
    volume = load_volume(series)
    np.testing.assert_array_equal(written.get_fdata(), volume.array[0])
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-5)


def test_installed_decoders_cover_common_transfer_syntaxes(real_data: Path) -> None:
    """dcm_qa_ts: one image in 9 syntaxes (explicit/implicit/big endian, RLE, JPEG lossless,
    JPEG-LS, JPEG 2000); every one must decode to the same pixels with our dependencies."""
    import pydicom

    files = sorted((real_data / "dcm_qa_ts/In").glob("*.dcm"))
    assert len(files) == 9
    reference = pydicom.dcmread(files[0]).pixel_array
    for path in files[1:]:
        np.testing.assert_array_equal(pydicom.dcmread(path).pixel_array, reference,
                                      err_msg=str(path))


def test_siemens_mosaic_is_refused_clearly(real_data: Path) -> None:
    with pytest.raises(ValueError, match="mosaic images are not unpacked"):
        load_volume(real_data / "dcm_qa_ts/In/1.dcm")
