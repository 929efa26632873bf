"""The generated demo cohort: determinism, DICOM geometry, label alignment, CSV formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medssl.data.demo import COHORTS, LABELS, SEXES, DemoPaths, DemoSpec, ensure_demo, generate
from medssl.data.io import load_volume
from tests.conftest import TINY


def test_same_seed_same_cohort_other_seed_differs(demo: DemoPaths, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", TINY)
    other = generate(tmp_path / "other", DemoSpec(**{**TINY.__dict__, "seed": 1}))
    for name in ("classification.csv", "segmentation.csv", "mae2d.csv"):
        assert (demo.root / name).read_text() == (again.root / name).read_text()
    a = load_volume(demo.root / "nifti/DEMO001_image.nii.gz").array
    assert np.array_equal(a, load_volume(again.root / "nifti/DEMO001_image.nii.gz").array)
    assert not np.array_equal(a, load_volume(other.root / "nifti/DEMO001_image.nii.gz").array)


def test_ensure_demo_reuses_and_regenerates(tmp_path: Path) -> None:
    spec = DemoSpec(n_subjects=4, rows=16, columns=16, slices=8)
    paths = ensure_demo(tmp_path / "d", spec)
    stamp = paths.ssl_csv.stat().st_mtime_ns
    assert ensure_demo(tmp_path / "d", spec).ssl_csv.stat().st_mtime_ns == stamp
    bigger = DemoSpec(n_subjects=5, rows=16, columns=16, slices=8)
    assert len(pd.read_csv(ensure_demo(tmp_path / "d", bigger).ssl_csv)) == 5


def test_dicom_headers_are_realistic_and_anonymous(demo: DemoPaths) -> None:
    files = sorted((demo.root / "dicom" / "DEMO002").iterdir())
    assert len(files) == TINY.slices
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    h = headers[0]
    assert h.Modality == "MR" and h.PatientID == "DEMO002" and str(h.PatientName) == "ANONYMOUS"
    assert "PatientSex" not in h and "PatientBirthDate" not in h  # targets not in headers
    assert [float(v) for v in h.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]  # sagittal
    assert len({x.SeriesInstanceUID for x in headers}) == 1
    positions = sorted(float(x.ImagePositionPatient[0]) for x in headers)
    np.testing.assert_allclose(np.diff(positions), TINY.slice_step, atol=1e-4)
    assert float(h.SliceThickness) != TINY.slice_step  # the trap real scans have
    assert {float(x.RescaleSlope) for x in headers} <= {0.5, 1.0, 2.0}


def test_labels_align_with_anatomy(demo: DemoPaths) -> None:
    df = pd.read_csv(demo.segmentation_csv)
    for _, row in df.iterrows():
        image = load_volume(demo.root / row.img_path).array[0]
        label = load_volume(demo.root / row.seg_path).array[0]
        assert image.shape == label.shape
        present = set(np.unique(label).astype(int))
        assert {0, 1, 2, 3} <= present <= set(LABELS)  # thin tibial cartilage may vanish at 4 mm
        mean = {k: image[label == k].mean() for k in present}
        # Cartilage is brightest, bone next, and background (air + soft tissue) darkest.
        assert mean[2] > mean[1] > mean[0] and mean[3] > mean[0]
        assert 4 not in present or mean[4] > mean[3]
        assert row.max_val == pytest.approx(float(image.max()), rel=1e-5)


def test_csv_formats(demo: DemoPaths) -> None:
    cls = pd.read_csv(demo.classification_csv)
    assert list(cls.columns) == ["PatientID", "path", "fold", "V00COHORT", "P02SEX"]
    assert cls.fold.dtype.kind == "i" and set(cls.V00COHORT) == set(COHORTS)
    assert set(cls.P02SEX) == set(SEXES)
    assert list(pd.read_csv(demo.ssl_csv).columns) == ["PatientID", "path", "fold"]
    assert list(pd.read_csv(demo.mae3d_csv).columns) == ["PatientID", "path", "fold"]
    seg = pd.read_csv(demo.segmentation_csv)
    assert list(seg.columns) == ["PatientID", "img_path", "seg_path", "fold", "max_val"]
    assert set(seg.fold) == {"train", "val", "test"}
    mae2d = pd.read_csv(demo.mae2d_csv)
    assert list(mae2d.columns) == ["PatientID", "path", "slice", "fold", "max_val"]
    assert len(mae2d) == TINY.n_subjects * TINY.slices
    assert (mae2d.groupby("PatientID").slice.max() == TINY.slices - 1).all()
    for p in [*cls.path, *seg.img_path, *seg.seg_path]:
        assert (demo.root / p).exists()


def test_targets_depend_on_image_content(demo: DemoPaths) -> None:
    """Bone volume separates sexes and cartilage volume the cohorts."""
    cls = pd.read_csv(demo.classification_csv)
    bone, cartilage = {}, {}
    for pid in cls.PatientID:
        label = load_volume(demo.root / f"nifti/{pid}_label.nii.gz").array[0]
        bone[pid] = np.isin(label, (1, 3)).sum()
        cartilage[pid] = np.isin(label, (2, 4)).sum()
    male = SEXES[0] == cls.P02SEX
    progression = COHORTS[0] == cls.V00COHORT
    assert max(bone[p] for p in cls.PatientID[~male]) < min(bone[p] for p in cls.PatientID[male])
    thin = [cartilage[p] for p in cls.PatientID[progression]]
    thick = [cartilage[p] for p in cls.PatientID[~progression]]
    assert np.mean(thin) < 0.75 * np.mean(thick)


def test_default_geometry_has_every_class(tmp_path: Path) -> None:
    paths = generate(tmp_path / "d", DemoSpec(n_subjects=4))
    for label_path in sorted((paths.root / "nifti").glob("*_label.nii.gz")):
        assert set(np.unique(load_volume(label_path).array).astype(int)) == set(LABELS)


def test_ensure_demo_is_safe_from_parallel_ranks(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    spec = DemoSpec(n_subjects=3, rows=16, columns=16, slices=8)
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: ensure_demo(tmp_path / "d", spec).root, range(4)))
    assert set(roots) == {tmp_path / "d"}
    assert len(pd.read_csv(tmp_path / "d" / "ssl.csv")) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-")]  # no leftovers
