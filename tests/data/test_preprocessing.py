"""Resizing (area down, linear up, nearest labels) and intensity scaling to [0, 1]."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.data.geometry import resize_grid, resized_affine
from medssl.data.io import load_volume
from medssl.data.pipeline import Preprocessing, make_datasets
from medssl.data.transforms import (
    PERCENTILE_VOXELS,
    ScaleToUnit,
    intensity_limits,
    percentile_step,
)


def _cohort(tmp_path: Path, volumes: dict[str, np.ndarray], affine: np.ndarray | None = None,
            **columns: list) -> Path:
    """NIfTI files plus an ``ssl`` CSV (extra columns allowed) listing them."""
    rows = []
    for n, (name, array) in enumerate(volumes.items()):
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine),
                 tmp_path / f"{name}.nii")
        rows.append({"PatientID": name, "path": f"{name}.nii", "fold": 0,
                     **{k: v[n] for k, v in columns.items()}})
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    return tmp_path / "c.csv"


def test_area_downsampling_averages_blocks() -> None:
    x = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 4, 6, 8) ** 1.5
    out = resize_grid(x, (2, 3, 4), "area")
    blocks = x.numpy().reshape(2, 2, 3, 2, 4, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out.numpy()[0], blocks, rtol=1e-6)


def test_growing_axes_interpolate_linearly_and_shrinking_ones_average() -> None:
    x = torch.tensor([[[0.0, 10.0], [20.0, 30.0], [40.0, 50.0], [60.0, 70.0]]])  # (1, 4, 2)
    out = resize_grid(x, (2, 4), "area")
    # axis 0 shrinks 4 -> 2: block means; axis 1 grows 2 -> 4: output centres at input
    # coordinates -0.25, 0.25, 0.75, 1.25 (edges clamp), i.e. weights 0, .25, .75, 1.
    expected = np.array([[10.0, 12.5, 17.5, 20.0], [50.0, 52.5, 57.5, 60.0]])
    np.testing.assert_allclose(out.numpy()[0], expected, atol=1e-5)


def test_nearest_copies_the_voxel_under_each_centre() -> None:
    labels = torch.tensor([[3, 1, 4, 1, 5]], dtype=torch.int16)[None]  # (1, 1, 5)
    out = resize_grid(labels, (1, 3), "nearest")
    # centres (j + 0.5) * 5 / 3 = 0.83, 2.5, 4.17 -> input voxels 0, 2, 4
    assert out.dtype == torch.int16 and out.tolist() == [[[3, 4, 5]]]
    grown = resize_grid(labels, (2, 10), "nearest")
    assert grown[0, 0].tolist() == [3, 3, 1, 1, 4, 4, 1, 1, 5, 5] and torch.equal(
        grown[0, 0], grown[0, 1])


def test_resized_affine_keeps_voxel_centres_in_place() -> None:
    affine = torch.tensor([[0.0, 0, 2, 10], [-1.5, 0, 0, 5], [0, 3, 0, -7], [0, 0, 0, 1]],
                          dtype=torch.float64)
    new = resized_affine(affine, (8, 6, 4), (4, 3, 4))
    # Output voxel (1, 2, 3) averages input voxels 2..3, 4..5 and 3: their mean position.
    inputs = np.array([[i, j, 3, 1] for i in (2, 3) for j in (4, 5)], dtype=float)
    centre = (affine.numpy() @ inputs.T).mean(axis=1)
    np.testing.assert_allclose(new.numpy() @ [1, 2, 3, 1], centre)


@pytest.mark.parametrize("resize_to", [(4,), (4, 4, 4, 4), (0, 4)], ids=["one", "four", "zero"])
def test_resize_to_needs_two_or_three_positive_sizes(resize_to: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="resize_to must be 2 .slices. or 3 .volumes. positive"):
        Preprocessing(resize_to=resize_to)


def test_resize_to_must_match_the_items(tmp_path: Path) -> None:
    csv = _cohort(tmp_path, {"a": np.zeros((6, 6, 4), np.float32)})
    with pytest.raises(ValueError, match=r"resize_to \[4, 4\] has 2 sizes, but the 'train' "
                                         r"items are 3D volumes; give 3 sizes"):
        make_datasets(csv, "ssl", {"train": 0}, Preprocessing(resize_to=(4, 4)))


def test_resized_volume_is_area_average_of_the_scaled_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 100, (8, 12, 4)).astype(np.float32)
    csv = _cohort(tmp_path, {"a": raw})
    item = make_datasets(csv, "ssl", {"train": 0}, Preprocessing(
        resize_to=(4, 6, 8), lower_percentile=0, upper_percentile=100))[0]["train"][0]
    scaled = (raw - raw.min()) / (raw.max() - raw.min())  # identity affine: already RAS
    shrunk = scaled.reshape(4, 2, 6, 2, 4).mean(axis=(1, 3))
    # axis 2 grows 4 -> 8: every output pair straddles input voxels at +-0.25.
    padded = np.concatenate([shrunk[..., :1], shrunk, shrunk[..., -1:]], axis=-1)
    grown = np.empty((4, 6, 8), np.float32)
    grown[..., 0::2] = 0.25 * padded[..., :-2] + 0.75 * padded[..., 1:-1]
    grown[..., 1::2] = 0.75 * padded[..., 1:-1] + 0.25 * padded[..., 2:]
    np.testing.assert_allclose(item["image"][0].numpy(), grown, atol=1e-5)
    assert item["geometry"]["shape"].tolist() == [4, 6, 8]


def test_coinciding_percentiles_fall_back_to_min_max(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    sparse = np.zeros((10, 10, 10), np.float32)
    sparse[1, 2, 3], sparse[4, 5, 6] = 254.0, 127.0  # 0.2% foreground: both percentiles 0
    csv = _cohort(tmp_path, {"sparse": sparse})
    ds = make_datasets(csv, "ssl", {"train": 0}, Preprocessing())[0]["train"]
    with caplog.at_level(logging.WARNING):
        out = ds[0]["image"][0].numpy()
    np.testing.assert_allclose(out, sparse / 254.0, atol=1e-6)
    assert "sparse.nii" in caplog.text and "coincide" in caplog.text and "min-max" in caplog.text


def test_blank_images_become_zeros_with_one_warning_per_file(
        caplog: pytest.LogCaptureFixture) -> None:
    scale = ScaleToUnit()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # e.g. three blank edge slices of one file
            assert float(scale(torch.full((1, 4, 4), 7.0), name="a.nii").abs().max()) == 0.0
        scale(torch.full((1, 4, 4), 7.0), name="b.nii")
    assert caplog.text.count("constant intensity 7; scaled to zeros") == 2
    assert "a.nii" in caplog.text and "b.nii" in caplog.text


def test_percentile_scaling_matches_numpy() -> None:
    x = torch.from_numpy(np.random.default_rng(1).gamma(2.0, 50.0, (1, 20, 20, 20))).float()
    lo, hi = np.percentile(x.numpy(), [2, 98])
    out = ScaleToUnit(2, 98)(x)
    np.testing.assert_allclose(out.numpy(), np.clip((x.numpy() - lo) / (hi - lo), 0, 1),
                               atol=1e-6)


# Sampled percentile limits may move by this share of the exact window (upper - lower limit)
# when sampling 4x fewer voxels (FEW_VOXELS) than the shipped PERCENTILE_VOXELS (2**20).
# Measured: up to 0.53% on the real CT (8 HU, under its noise), 0.15% on the real MR.
LIMIT_TOLERANCE, FEW_VOXELS = 0.01, 2**18


def _window_error(values: np.ndarray, lower: float, upper: float,
                  min_voxels: int = FEW_VOXELS) -> float:
    exact = np.percentile(values, [lower, upper])  # the whole volume, as before sampling
    lo, hi = intensity_limits(values, lower, upper, min_voxels=min_voxels)
    return max(abs(lo - exact[0]), abs(hi - exact[1])) / (exact[1] - exact[0])


def test_percentile_sample_step_by_hand() -> None:
    # 160x384x384 = 23.6M voxels // 2**20 = 22; 22, 21 and 20 share a factor with 384 =
    # 2**7 * 3, 19 does not. 80x256x256 = 5 * 2**20, and 5 is coprime with 256.
    assert percentile_step((1, 160, 384, 384)) == 19
    assert percentile_step((1, 80, 256, 256)) == 5
    # 512x512x20 = 5.2M -> 5, but 5 and 4 divide the 20-slice axis: 3.
    assert percentile_step((1, 512, 512, 20)) == 3
    assert percentile_step((1, 32, 32, 16)) == 1 and percentile_step((1, 1400, 1400)) == 1


def test_sampled_voxels_reach_every_slice_and_row_of_every_axis() -> None:
    shape = (1, 24, 40, 36)  # few thick slices: striding each axis by 3 would skip 2 of 3
    step = percentile_step(shape, min_voxels=1000)
    index = np.arange(0, int(np.prod(shape)), step)
    assert step > 3 and len(index) >= 1000
    for axis, coords in enumerate(np.unravel_index(index, shape)[1:], start=1):
        assert len(np.unique(coords)) == shape[axis]


def test_sampled_limits_agree_with_exact_ones_on_generated_volumes() -> None:
    rng = np.random.default_rng(3)
    # Thick-slice MR-like volume: dark background, a bright sphere, slice-to-slice gain
    # changes (what makes skipping slices wrong) and Rician-like noise.
    z, y, x = np.mgrid[:24, :256, :255]
    sphere = ((y - 128) ** 2 + (x - 110) ** 2 + (10 * (z - 12)) ** 2 < 100**2) * 800.0
    gain = rng.uniform(0.6, 1.4, (24, 1, 1))
    mr = np.abs(sphere * gain + rng.normal(0, 30, sphere.shape))[None].astype(np.float32)
    ct = rng.gamma(2.0, 200.0, (1, 96, 96, 95)).astype(np.float32) - 1024
    for volume in (mr, ct, np.ascontiguousarray(mr[:, ::-1].transpose(0, 3, 2, 1))[:, ::-1]):
        assert percentile_step(volume.shape, FEW_VOXELS) > 1
        for lower, upper in ((0.5, 99.5), (1, 99), (5, 95)):
            assert _window_error(volume, lower, upper) < LIMIT_TOLERANCE
        # The extremes are read whole: a sample would miss a single bright voxel.
        volume = volume.copy()
        volume.flat[1] = 1e6
        assert intensity_limits(volume, 0, 100, min_voxels=FEW_VOXELS) == (
            float(volume.min()), 1e6)


def test_sampled_limits_agree_with_exact_ones_on_real_scans(real_data: Path) -> None:
    pgbm = real_data / "tcia_brain_tumor_progression_PGBM-001/PGBM-001_1992-04-02"
    scans = [real_data / "totalsegmentator/example_ct_dicom",  # CT, JPEG 2000
             real_data / "dcm_qa_decubitus/In/HFS",  # sagittal head MR
             real_data / "mricron_data_debian/ch2.nii.gz",  # 1 mm brain T1
             pgbm / "11-T1post-80644", pgbm / "35623-FLAIRreg-79237",  # 24 thick slices
             pgbm / "37908-T2reg-21119"]
    for scan in scans:
        values = load_volume(scan).array.astype(np.float32)
        assert percentile_step(values.shape, FEW_VOXELS) > 1, scan
        for lower, upper in ((0.5, 99.5), (1, 99)):
            assert _window_error(values, lower, upper) < LIMIT_TOLERANCE, (scan, lower)
            if percentile_step(values.shape) > 1:  # CT and ch2 are sampled when shipped
                error = _window_error(values, lower, upper, PERCENTILE_VOXELS)
                assert error < LIMIT_TOLERANCE / 4, (scan, lower)  # measured 0.07%, 0


def test_max_val_column_scales_instead_of_percentiles(tmp_path: Path) -> None:
    raw = np.random.default_rng(2).uniform(0, 500, (6, 6, 4)).astype(np.float32)
    csv = _cohort(tmp_path, {"a": raw, "b": raw}, max_val=[400.0, ""])
    ds = make_datasets(csv, "ssl", {"train": 0}, Preprocessing())[0]["train"]
    np.testing.assert_allclose(ds[0]["image"][0].numpy(), np.clip(raw / 400.0, 0, 1), atol=1e-6)
    lo, hi = np.percentile(raw, [0.5, 99.5])  # empty max_val: the volume's percentiles
    np.testing.assert_allclose(ds[1]["image"][0].numpy(), np.clip((raw - lo) / (hi - lo), 0, 1),
                               atol=1e-5)
    off = make_datasets(csv, "ssl", {"train": 0}, Preprocessing(use_max_val=False))[0]["train"]
    np.testing.assert_allclose(off[0]["image"][0].numpy(), ds[1]["image"][0].numpy())
    bad = _cohort(tmp_path, {"a": raw}, max_val=["-3"])
    with pytest.raises(ValueError, match=r"c.csv line 2 \(PatientID a\): max_val '-3' is not"):
        make_datasets(bad, "ssl", {"train": 0}, Preprocessing())[0]["train"][0]
