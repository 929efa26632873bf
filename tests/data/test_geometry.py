"""Invertible preprocessing: items carry their geometry through every cache and collation,
and predictions go back onto the input file's grid (shape and affine as on disk)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import DataLoader, decollate_batch

from medssl.data import dicom
from medssl.data.demo import DemoPaths
from medssl.data.geometry import invert_to_file_grid, save_on_file_grid
from medssl.data.pipeline import Preprocessing, make_datasets


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


AFFINES = {
    "ras": np.diag([1.5, 2.0, 3.0]),
    "lps": np.diag([-1.5, -2.0, 3.0]),
    # rotated 25 degrees in-plane and stored with axes permuted (stored axis 0 runs S-I)
    "oblique": _rotation_z(25) @ np.diag([1.5, 2.0, 3.0]) @ np.array([[0, 1, 0], [0, 0, 1],
                                                                        [-1, 0, 0]]),
}
SHAPE = (14, 12, 10)


def _write_case(folder: Path, name: str, linear: np.ndarray) -> tuple[Path, Path]:
    """An image and a label map of two ellipsoids (values 1, 2) on the same grid."""
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, [-10.0, 20.0, 5.0]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    label = np.zeros(SHAPE, np.uint8)
    label[(((grid - [6, 5, 4]) / [4.5, 4, 3]) ** 2).sum(-1) <= 1] = 1
    label[(((grid - [9, 7, 6]) / [3, 3, 2.5]) ** 2).sum(-1) <= 1] = 2
    image = (100.0 * label + np.random.default_rng(0).uniform(0, 20, SHAPE)).astype(np.float32)
    paths = folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return paths


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("orient")
    rows = []
    for name, linear in AFFINES.items():
        image, label = _write_case(folder, name, linear)
        rows.append([name, image.name, label.name, "train", 250.0])
    pd.DataFrame(rows, columns=["PatientID", "img_path", "seg_path", "fold", "max_val"]).to_csv(
        folder / "seg.csv", index=False)
    return folder / "seg.csv"


def _items(csv: Path, settings: Preprocessing, cache: str, cache_dir: Path) -> list[dict]:
    ds = make_datasets(csv, "segmentation", {"train": "train"}, settings, cache=cache,
                       cache_dir=cache_dir)[0]["train"]
    items = [ds[i] for i in range(len(ds))]
    if cache == "disk":  # second pass: served from the saved files (weights_only loading)
        items = [ds[i] for i in range(len(ds))]
        assert not hasattr(items[0]["image"], "meta")
    return items


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_labels_return_exactly_to_the_file_grid(cases: Path, tmp_path: Path, cache: str) -> None:
    items = _items(cases, Preprocessing(), cache, tmp_path / "cache")
    for item in items:
        label_path = cases.parent / f"{item['PatientID']}_label.nii.gz"
        on_disk = nib.load(label_path)
        canonical = nib.as_closest_canonical(on_disk)  # independent RAS reorientation
        np.testing.assert_array_equal(item["label"][0].numpy(), canonical.get_fdata())
        np.testing.assert_allclose(item["geometry"]["affine"].numpy(), canonical.affine,
                                   atol=1e-6)
        back = invert_to_file_grid(item["label"], item["geometry"], "nearest")
        assert back.shape == (1, *SHAPE)
        np.testing.assert_array_equal(back[0], np.asarray(on_disk.dataobj))
        image = invert_to_file_grid(item["image"][0], item["geometry"], "area")
        raw = nib.load(cases.parent / f"{item['PatientID']}_image.nii.gz").get_fdata()
        np.testing.assert_allclose(image, np.clip(raw / 250.0, 0, 1), atol=1e-6)  # max_val
        for reference in (label_path, None):
            out = tmp_path / f"{item['PatientID']}_{reference is None}.nii.gz"
            save_on_file_grid(back, item["geometry"], out, reference=reference)
            written = nib.load(out)
            assert written.shape == on_disk.shape
            np.testing.assert_allclose(written.affine, on_disk.affine, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(on_disk.dataobj))
        with_ref = nib.load(tmp_path / f"{item['PatientID']}_False.nii.gz")
        assert np.array_equal(with_ref.affine, on_disk.affine)
        assert with_ref.header.get_qform(coded=True)[1] == on_disk.header.get_qform(coded=True)[1]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_resized_labels_return_close_to_the_file_grid(cases: Path, tmp_path: Path,
                                                      cache: str) -> None:
    settings = Preprocessing(resize_to=(8, 7, 9))
    ds = make_datasets(cases, "segmentation", {"train": "train"}, settings, cache=cache,
                       cache_dir=tmp_path / "cache")[0]["train"]
    batch = next(iter(DataLoader(ds, batch_size=3)))  # default collation, then split again
    assert batch["geometry"]["file_affine"].shape == (3, 4, 4)
    for label, geometry, pid in zip(batch["label"], decollate_batch(batch["geometry"]),
                                    batch["PatientID"], strict=True):
        assert label.shape == (1, 8, 7, 9)
        back = invert_to_file_grid(label.numpy(), geometry, "nearest")
        truth = np.asarray(nib.load(cases.parent / f"{pid}_label.nii.gz").dataobj)
        assert back.shape == (1, *SHAPE) and set(np.unique(back)) <= {0, 1, 2}
        for value in (1, 2):  # Dice of each structure after down- and up-sampling
            a, b = back[0] == value, truth == value
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.7, (pid, value)
        assert (back[0] == truth).mean() > 0.9


def test_geometry_affine_follows_the_resize(cases: Path) -> None:
    item = make_datasets(cases, "segmentation", {"train": "train"},
                         Preprocessing(resize_to=(7, 6, 5)))[0]["train"][0]
    canonical = nib.as_closest_canonical(nib.load(cases.parent / "ras_image.nii.gz"))
    factors = np.array(canonical.shape) / [7, 6, 5]
    # Preprocessed voxel (0, 0, 0) covers canonical voxels 0..f-1: its centre is their mean.
    centre = canonical.affine @ [*((factors - 1) / 2), 1]
    np.testing.assert_allclose(item["geometry"]["affine"].numpy() @ [0, 0, 0, 1], centre)
    assert item["geometry"]["oriented_shape"].tolist() == list(canonical.shape)
    assert item["geometry"]["file_shape"].tolist() == list(SHAPE)


def test_dicom_volume_inverts_to_the_loader_grid(demo: DemoPaths) -> None:
    item = make_datasets(demo.ssl_csv, "ssl", {"train": 0},
                         Preprocessing(lower_percentile=0, upper_percentile=100))[0]["train"][0]
    stored, affine, _ = dicom.read_series(item["path"])  # (columns, rows, slices) grid
    geometry = item["geometry"]
    np.testing.assert_allclose(geometry["file_affine"].numpy(), affine)
    back = invert_to_file_grid(item["image"], geometry, "area")[0]
    expected = (stored - stored.min()) / (stored.max() - stored.min())
    np.testing.assert_allclose(back, expected, atol=1e-6)


def test_arrays_off_the_grid_are_refused(cases: Path) -> None:
    item = make_datasets(cases, "segmentation", {"train": "train"}, Preprocessing())[0]["train"][0]
    with pytest.raises(ValueError, match=r"shape \(1, 5, 5, 5\) is not on the preprocessed grid"):
        invert_to_file_grid(torch.zeros(1, 5, 5, 5), item["geometry"])


def test_real_label_maps_return_to_their_grids(real_data: Path, tmp_path: Path) -> None:
    """An LPS MR with its NIfTI label map, and a glioblastoma T1 series with its tumour mask
    stored as a DICOM series: masks inverted onto the image file's grid match the files."""
    ts = real_data / "totalsegmentator"
    pgbm = real_data / "tcia_brain_tumor_progression_PGBM-001/PGBM-001_1992-04-02"
    rows = [["mr", ts / "example_mr_sm.nii.gz", ts / "example_seg_mr.nii.gz", "train", 1000],
            ["pgbm", pgbm / "11-T1post-80644", pgbm / "5388-MaskTumor-63335", "train", 1000]]
    pd.DataFrame(rows, columns=["PatientID", "img_path", "seg_path", "fold", "max_val"]).to_csv(
        tmp_path / "real.csv", index=False)
    # 128x128x24 grows the MR (117x91x20: nearest there and back is exact) and shrinks the
    # 320x260x24 T1 series.
    for settings, exact in ((Preprocessing(), True),
                            (Preprocessing(resize_to=(128, 128, 24)), False)):
        ds = make_datasets(tmp_path / "real.csv", "segmentation", {"train": "train"}, settings,
                           cache="disk", cache_dir=tmp_path / "cache")[0]["train"]
        for i, (_, _, seg, *_) in enumerate(rows):
            ds[i]
            item = ds[i]  # from the disk cache
            back = invert_to_file_grid(item["label"][0], item["geometry"], "nearest")
            if str(seg).endswith(".nii.gz"):
                file = nib.load(seg)
                truth, affine = np.asarray(file.dataobj), file.affine
            else:  # the DICOM loader's (columns, rows, slices) grid
                truth, affine, _ = dicom.read_series(seg)
            out = tmp_path / f"{item['PatientID']}.nii.gz"
            save_on_file_grid(back, item["geometry"], out)
            written = nib.load(out)
            assert written.shape == truth.shape
            np.testing.assert_allclose(written.affine, affine, atol=1e-4)
            got = np.asarray(written.dataobj)
            if exact:
                np.testing.assert_array_equal(got, truth)
            else:  # the tumour mask is 0.3% of the volume: compare the foreground
                a, b = got != 0, truth != 0
                dice = 2 * (a & b).sum() / (a.sum() + b.sum())
                assert dice > 0.75, (item["PatientID"], dice)
