"""2D slice items: lazy reading, normalisation, resizing, expansion of volumes and stacking
predictions back onto the file grid."""

from __future__ import annotations

import builtins
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.data import dicom
from medssl.data.demo import DemoPaths
from medssl.data.geometry import slices_to_file_grid
from medssl.data.io import VolumeError, load_volume, read_slice
from medssl.data.pipeline import (
    Preprocessing,
    cache_key,
    expand_slices,
    make_datasets,
    select_slices,
    to_items,
)
from medssl.data.table import read_cohort


def _canonical_slice(path: Path, k: int, axis: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Stored slice k along ``axis``, computed independently through nibabel's RAS view:
    the plane of the canonical volume and the world positions of its voxels (3, U, V)."""
    img = nib.load(str(path))
    canonical = nib.as_closest_canonical(img)
    target, flip = nib.orientations.io_orientation(img.affine)[axis]
    target = int(target)
    k_ras = k if flip > 0 else img.shape[axis] - 1 - k
    plane = np.take(canonical.get_fdata(), k_ras, axis=target)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in plane.shape], indexing="ij"), 0)
    voxels = np.insert(grid.reshape(2, -1), target, k_ras, axis=0)
    world = (canonical.affine[:3, :3] @ voxels + canonical.affine[:3, 3:]).reshape(3, *plane.shape)
    return plane, world


def _world(affine: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), 0).reshape(2, -1)
    voxels = np.concatenate([grid, np.zeros((1, grid.shape[1])), np.ones((1, grid.shape[1]))])
    return (affine.numpy() @ voxels)[:3].reshape(3, *shape)


def test_csv_slices_equal_the_volume_plane_with_and_without_max_val(demo: DemoPaths) -> None:
    df = pd.read_csv(demo.mae2d_csv)
    ds = make_datasets(demo.mae2d_csv, "mae2d", {"train": 1}, Preprocessing())[0]["train"]
    no_max = make_datasets(demo.mae2d_csv, "mae2d", {"train": 1},
                           Preprocessing(use_max_val=False, lower_percentile=1,
                                         upper_percentile=99))[0]["train"]
    rows = df[df.fold == 1].reset_index(drop=True)
    for i in (0, 5, len(rows) - 1):
        row = rows.iloc[i]
        plane, world = _canonical_slice(demo.root / row.path, int(row.slice))
        item = ds[i]
        assert item["image"].shape == (1, *plane.shape) and item["slice"] == row.slice
        np.testing.assert_allclose(item["image"][0].numpy(), np.clip(plane / row.max_val, 0, 1),
                                   atol=1e-6)
        lo, hi = np.percentile(plane, [1, 99])
        np.testing.assert_allclose(no_max[i]["image"][0].numpy(),
                                   np.clip((plane - lo) / (hi - lo), 0, 1), atol=1e-5)
        np.testing.assert_allclose(_world(item["geometry"]["affine"], plane.shape), world,
                                   atol=1e-4)
        assert item["geometry"]["slice_index"] == row.slice
        assert item["geometry"]["slice_axis"] == 2


def test_2d_resize(demo: DemoPaths) -> None:
    row = pd.read_csv(demo.mae2d_csv).iloc[3]
    item = make_datasets(demo.mae2d_csv, "mae2d", {"train": int(row.fold)},
                         Preprocessing(resize_to=(16, 8)))[0]["train"]
    item = next(item[i] for i in range(len(item)) if item[i]["slice"] == row.slice
                and item[i]["PatientID"] == row.PatientID)
    plane, _ = _canonical_slice(demo.root / row.path, int(row.slice))  # 32 x 32
    blocks = np.clip(plane / row.max_val, 0, 1).reshape(16, 2, 8, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(item["image"][0].numpy(), blocks, atol=1e-5)
    with pytest.raises(ValueError, match=r"resize_to \[8, 8, 8\] has 3 sizes, but the "
                                         r"'train' items are 2D slices; give 2 sizes"):
        make_datasets(demo.mae2d_csv, "mae2d", {"train": 0}, Preprocessing(resize_to=(8, 8, 8)))


def test_nifti_slice_is_read_without_the_rest_of_the_file(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(volume, np.diag([-1.0, 1.0, 2.0, 1.0])), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2 * 6 * 5 * 4])  # the last two slices are gone
    with pytest.raises(VolumeError, match="cannot read NIfTI"):
        load_volume(path)  # a full decode fails ...
    for k in (0, 1):  # ... while the slices still on disk read fine
        got = read_slice(path, k)
        np.testing.assert_array_equal(got.array[0], volume[..., k])
        assert got.file_shape == (6, 5, 4)
    with pytest.raises(VolumeError, match=r"slice 4 is outside stored axis 2 \(4 slices"):
        read_slice(path, 4)


def test_dicom_slice_opens_one_file(demo: DemoPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = demo.root / "dicom" / "DEMO002"
    stored, affine, _ = dicom.read_series(folder)
    read_slice(folder, 0)  # scans the headers once
    opened: list[str] = []
    real_open = builtins.open

    def spy(file: object, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    got = read_slice(folder, 7)
    monkeypatch.undo()
    assert len({p for p in opened if p.startswith(str(folder))}) == 1
    np.testing.assert_array_equal(got.array[0], stored[..., 7])
    np.testing.assert_allclose(got.file_affine, affine)
    across = read_slice(folder, 3, axis=0)  # across the files: the whole series is decoded
    np.testing.assert_array_equal(across.array[0], stored[3])


@pytest.mark.parametrize("axis", [0, 2])
def test_expanded_slices_stack_back_onto_the_file_grid(demo: DemoPaths, axis: int) -> None:
    cohort = read_cohort(demo.segmentation_csv, "segmentation")
    volume = to_items(cohort.select("test"), "segmentation")[:1]
    items = expand_slices(volume, slice_axis=axis, foreground=True)
    label_file = nib.load(volume[0]["seg_path"])
    truth = np.asarray(label_file.dataobj)
    assert len(items) == truth.shape[axis]
    has = [bool(np.take(truth, k, axis=axis).any()) for k in range(truth.shape[axis])]
    assert [i["has_foreground"] for i in items] == has and any(has) and not all(has)
    ds = make_datasets(demo.segmentation_csv, "segmentation", {"test": "test"},
                       Preprocessing(), slices={"test": axis})[0]["test"]
    n = truth.shape[axis]
    outputs = [ds[k] for k in range(n)]  # the first volume's slices come first
    for k in (0, n // 2):
        plane, _ = _canonical_slice(Path(volume[0]["seg_path"]), k, axis)
        np.testing.assert_array_equal(outputs[k]["label"][0].numpy(), plane)
        image, _ = _canonical_slice(Path(volume[0]["img_path"]), k, axis)
        max_val = volume[0]["max_val"]
        np.testing.assert_allclose(outputs[k]["image"][0].numpy(),
                                   np.clip(image / max_val, 0, 1), atol=1e-6)
    stacked = slices_to_file_grid([o["label"] for o in outputs], [o["geometry"] for o in outputs])
    assert stacked.shape == (1, *truth.shape)
    np.testing.assert_array_equal(stacked[0], truth)
    partial = slices_to_file_grid([o["label"][0] for o in outputs[1:]],
                                  [o["geometry"] for o in outputs[1:]], fill=-1)
    assert (np.take(partial, 0, axis=axis) == -1).all()


def test_resized_slices_stack_back_close(demo: DemoPaths) -> None:
    ds = make_datasets(demo.segmentation_csv, "segmentation", {"test": "test"},
                       Preprocessing(resize_to=(24, 20)), slices={"test": 2})[0]["test"]
    truth = np.asarray(nib.load(ds[0]["seg_path"]).dataobj)
    outputs = [ds[k] for k in range(truth.shape[2])]
    assert outputs[0]["label"].shape == (1, 24, 20)
    stacked = slices_to_file_grid([o["label"] for o in outputs], [o["geometry"] for o in outputs])
    assert stacked.shape == (1, *truth.shape) and (stacked[0] == truth).mean() > 0.95


def test_select_slices_keeps_foreground_and_a_share_of_empty(demo: DemoPaths) -> None:
    cohort = read_cohort(demo.segmentation_csv, "segmentation")
    items = expand_slices(to_items(cohort.select("train"), "segmentation"), foreground=True)
    n_fg = sum(i["has_foreground"] for i in items)
    kept = select_slices(items, 0.2, seed=3)
    assert sum(i["has_foreground"] for i in kept) == n_fg
    assert sum(not i["has_foreground"] for i in kept) == round(0.2 * n_fg) < len(items) - n_fg
    assert kept == select_slices(items, 0.2, seed=3) and kept != select_slices(items, 0.2, 4)
    ds = make_datasets(demo.segmentation_csv, "segmentation", {"train": "train"},
                       Preprocessing(), slices={"train": 2}, empty_per_foreground=0.2,
                       seed=3)[0]["train"]
    assert len(ds) == len(kept)
    with pytest.raises(ValueError, match="need has_foreground"):
        select_slices(expand_slices(to_items(cohort.select("val"), "segmentation")), 1.0)


def test_slice_items_through_the_disk_cache(demo: DemoPaths, tmp_path: Path) -> None:
    settings = Preprocessing(resize_to=(16, 16))
    plain = make_datasets(demo.mae2d_csv, "mae2d", {"train": 2}, settings)[0]["train"]
    disk = make_datasets(demo.mae2d_csv, "mae2d", {"train": 2}, settings, cache="disk",
                         cache_dir=tmp_path)[0]["train"]
    for _ in range(2):  # written, then read back
        for i in range(4):  # four slices of one volume: four cache files
            assert torch.equal(plain[i]["image"], disk[i]["image"])
            for key in plain[i]["geometry"]:
                assert torch.equal(plain[i]["geometry"][key], disk[i]["geometry"][key])
    assert len({plain[i]["PatientID"] for i in range(4)}) == 1
    # Every slice's file was written before any was asked for (make_datasets fills the cache).
    assert len(list((tmp_path / cache_key(settings)).glob("*.pt"))) == len(disk)


@pytest.mark.parametrize("series", ["totalsegmentator/example_ct_dicom",
                                    "dcm_qa_decubitus/In/HFS"], ids=["jpeg2000", "sagittal"])
def test_real_dicom_slices_equal_the_series_planes(real_data: Path, series: str) -> None:
    stored, affine, _ = dicom.read_series(real_data / series)
    for k in (0, stored.shape[2] // 2, stored.shape[2] - 1):
        got = read_slice(real_data / series, k)
        np.testing.assert_array_equal(got.array[0], stored[..., k])
        np.testing.assert_allclose(got.file_affine, affine)
