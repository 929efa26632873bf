"""One CSV reader and one set of rules for training and medssl-inspect (issue 12, item 9)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medssl.data.demo import DemoPaths
from medssl.data.table import (
    CohortError,
    read_cohort,
    screen_volumes,
    validate_volumes,
    write_bad_rows,
)


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def cohort_dir(demo: DemoPaths, tmp_path: Path) -> Path:
    """A writable copy of the demo cohort (CSVs use paths relative to it)."""
    return Path(shutil.copytree(demo.root, tmp_path / "c"))


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("\n")
    with pytest.raises(CohortError, match="the file is empty"):
        read_cohort(path, "ssl")


def test_header_only_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "head.csv", ["PatientID", "path", "fold"], [])
    with pytest.raises(CohortError, match=r"no rows \(only a header line\)"):
        read_cohort(path, "ssl")


def test_spaces_around_column_names_and_cells(cohort_dir: Path) -> None:
    df = pd.read_csv(cohort_dir / "ssl.csv", dtype=str)
    path = cohort_dir / "spaced.csv"
    with open(path, "w") as fh:
        fh.write(" PatientID , path ,fold \n")
        for r in df.itertuples():
            fh.write(f"{r.PatientID} , {r.path},  {r.fold}\n")
    cohort = read_cohort(path, "ssl")
    assert [r["PatientID"] for r in cohort.records] == df.PatientID.tolist()
    assert [r["fold"] for r in cohort.records] == df.fold.tolist()


@pytest.mark.parametrize("task", ["ssl", "classification", "mae3d"])
def test_named_folds_work_for_every_task(cohort_dir: Path, task: str) -> None:
    df = pd.read_csv(cohort_dir / "classification.csv", dtype=str)
    names = ["train", "train", "val", "test"]
    df["fold"] = [names[i % 4] for i in range(len(df))]
    df.to_csv(cohort_dir / "named.csv", index=False)
    cohort = read_cohort(cohort_dir / "named.csv", task)
    rows = cohort.select(["train"], "train_folds")
    assert [r["PatientID"] for r in rows] == df.PatientID[df.fold == "train"].tolist()
    assert cohort.folds() == ["test", "train", "val"]


def test_predict_csv_needs_no_fold_and_ignores_one(cohort_dir: Path) -> None:
    """Images to segment are listed by PatientID and path; every row is used, and a fold
    column (copied from a training CSV, any values) is ignored."""
    df = pd.read_csv(cohort_dir / "classification.csv", dtype=str)
    df[["PatientID", "path"]].to_csv(cohort_dir / "plain.csv", index=False)
    plain = read_cohort(cohort_dir / "plain.csv", None)
    assert plain.task == "predict"
    assert [r["PatientID"] for r in plain.select(plain.folds())] == df.PatientID.tolist()
    df.assign(fold="somewhere").to_csv(cohort_dir / "folded.csv", index=False)
    folded = read_cohort(cohort_dir / "folded.csv", "predict")
    assert len(folded.select(folded.folds())) == len(df)
    df[["PatientID"]].to_csv(cohort_dir / "nopath.csv", index=False)
    with pytest.raises(CohortError, match=r"missing column\(s\) \['path'\]"):
        read_cohort(cohort_dir / "nopath.csv", "predict")


def test_integer_folds_are_normalised(cohort_dir: Path) -> None:
    df = pd.read_csv(cohort_dir / "ssl.csv", dtype=str)
    df["fold"] = [f"0{f}" if i % 2 else f"{f}.0" for i, f in enumerate(df.fold)]
    df.to_csv(cohort_dir / "padded.csv", index=False)
    cohort = read_cohort(cohort_dir / "padded.csv", "ssl")
    original = pd.read_csv(cohort_dir / "ssl.csv")
    assert len(cohort.select([1, "2"])) == int(original.fold.isin([1, 2]).sum())


def test_empty_fold_selection_names_the_key(demo: DemoPaths) -> None:
    cohort = read_cohort(demo.ssl_csv, "ssl")
    with pytest.raises(CohortError, match=r"folds is empty.*holds \['0', '1', '2', '3', '4'\]"):
        cohort.select([])
    for empty in ([], None):
        with pytest.raises(CohortError, match="train_folds is empty"):
            cohort.split({"train": empty, "val": [3]})


def test_split_rows_and_rows_in_no_split(demo: DemoPaths) -> None:
    cohort = read_cohort(demo.ssl_csv, "ssl")
    split = cohort.split({"train": [0, 1, 2], "val": [3], "test": None})
    df = pd.read_csv(demo.ssl_csv)
    assert [r["PatientID"] for r in split.rows["train"]] == \
        df.PatientID[df.fold.isin([0, 1, 2])].tolist()
    assert [r["PatientID"] for r in split.rows["val"]] == df.PatientID[df.fold == 3].tolist()
    assert "test" not in split.rows
    assert [r["PatientID"] for r in split.unassigned] == df.PatientID[df.fold == 4].tolist()
    n_left = int((df.fold == 4).sum())
    assert split.summary().endswith(f"; {n_left} rows in no split (fold 4: {n_left})")


def test_patient_in_two_splits_is_leakage(cohort_dir: Path) -> None:
    df = pd.read_csv(cohort_dir / "ssl.csv", dtype=str)
    val_row = df.index[df.fold == "3"][0]
    train_pid = df.PatientID[df.fold == "0"].iloc[0]
    df.loc[val_row, "PatientID"] = train_pid  # a second scan of a training patient in val
    df.to_csv(cohort_dir / "leak.csv", index=False)
    cohort = read_cohort(cohort_dir / "leak.csv", "ssl")
    with pytest.raises(CohortError, match=f"PatientID {train_pid} is in 2 splits "
                                          rf"\(data leakage\): train line\(s\) \d+; val "
                                          rf"line\(s\) {val_row + 2}"):
        cohort.split({"train": [0, 1, 2], "val": [3]})
    cohort.split({"train": [0, 1, 2, 3]})  # both scans in one split is fine


def test_fold_in_two_splits(demo: DemoPaths) -> None:
    cohort = read_cohort(demo.ssl_csv, "ssl")
    with pytest.raises(CohortError, match="fold 2 is in both train_folds and val_folds"):
        cohort.split({"train": [0, 1, 2], "val": [2, 3]})


def test_bad_rows_kept_apart_instead_of_raising(cohort_dir: Path, tmp_path: Path) -> None:
    """For on_bad_sample=skip: CSV problems in Cohort.rejected, header problems from
    screen_volumes, both with reasons; validate_volumes raises on the same rows."""
    df = pd.read_csv(cohort_dir / "ssl.csv", dtype=str)
    df.loc[1, "path"] = "dicom/NOPE"
    df.loc[2, "fold"] = "x"
    df.to_csv(cohort_dir / "bad.csv", index=False)
    victim = sorted((cohort_dir / "dicom" / df.PatientID[4]).iterdir())[0]
    victim.write_bytes(b"")  # a damaged slice
    with pytest.raises(CohortError, match="2 problem"):
        read_cohort(cohort_dir / "bad.csv", "ssl")
    cohort = read_cohort(cohort_dir / "bad.csv", "ssl", strict=False)
    assert [(r["PatientID"], len(p)) for r, p in cohort.rejected] == [(df.PatientID[1], 1),
                                                                      (df.PatientID[2], 1)]
    assert "NOPE does not exist" in cohort.rejected[0][1][0]
    good, bad = screen_volumes(cohort)
    assert [r["PatientID"] for r in good] == [p for i, p in enumerate(df.PatientID)
                                              if i not in (1, 2, 4)]
    assert [r["PatientID"] for r, _ in bad] == [df.PatientID[4]]
    assert str(victim) in bad[0][1][0]
    with pytest.raises(CohortError, match=f"line 6 \\(PatientID {df.PatientID[4]}\\): path: "):
        validate_volumes(cohort)
    write_bad_rows(tmp_path / "out" / "bad_rows.csv", cohort.rejected + bad)
    listed = pd.read_csv(tmp_path / "out" / "bad_rows.csv", dtype=str)
    assert listed.PatientID.tolist() == [df.PatientID[i] for i in (1, 2, 4)]
    assert str(victim) in listed.problem.iloc[2]


def test_header_checks_catch_2d_and_4d_nifti_before_training(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, shape in (("ok", (8, 9, 10)), ("flat", (8, 9)), ("stack", (8, 9, 10, 2))):
        nib.save(nib.Nifti1Image(rng.random(shape).astype("f4"), np.eye(4)),
                 tmp_path / f"{name}.nii.gz")
    path = _write(tmp_path / "c.csv", ["PatientID", "path", "fold"],
                  [["P1", "ok.nii.gz", 0], ["P2", "flat.nii.gz", 0], ["P3", "stack.nii.gz", 1]])
    cohort = read_cohort(path, "ssl")
    with pytest.raises(CohortError, match="2 problem") as err:
        validate_volumes(cohort)
    assert f"c.csv line 3 (PatientID P2): path: {tmp_path / 'flat.nii.gz'}: 2D image" in \
        str(err.value)
    assert f"c.csv line 4 (PatientID P3): path: {tmp_path / 'stack.nii.gz'}: 4D image with 2 " \
        "volumes" in str(err.value)


def test_val_and_test_may_share_folds_with_a_warning(demo: DemoPaths,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Small cohorts evaluate on the validation folds; only training rows must stay apart."""
    cohort = read_cohort(demo.ssl_csv, "ssl")
    with caplog.at_level("WARNING"):
        split = cohort.split({"train": [0, 1, 2], "val": [3, 4], "test": [3, 4]})
    assert split.rows["val"] == split.rows["test"]
    assert "fold 3 is in both val_folds and test_folds" in caplog.text
    with pytest.raises(CohortError, match="fold 3 is in both train_folds and test_folds"):
        cohort.split({"train": [0, 1, 2, 3], "test": [3]})


def test_max_val_is_optional_for_segmentation_but_checked_where_given(cohort_dir: Path) -> None:
    df = pd.read_csv(cohort_dir / "segmentation.csv", dtype=str)
    df.drop(columns="max_val").to_csv(cohort_dir / "no_max_val.csv", index=False)
    cohort = read_cohort(cohort_dir / "no_max_val.csv", "segmentation")
    assert len(cohort.records) == len(df) and "max_val" not in cohort.records[0]
    # An empty cell scales that row by percentiles; a value must be a positive number.
    df.loc[1, "max_val"] = ""
    df.loc[2, "max_val"] = "0"
    df.to_csv(cohort_dir / "bad_max_val.csv", index=False)
    with pytest.raises(CohortError, match=r"1 problem\(s\):\n.*line 4 .*max_val '0' is not a "
                       r"positive number \(or leave the cell empty"):
        read_cohort(cohort_dir / "bad_max_val.csv", "segmentation")
    # A classification CSV with a max_val column is checked the same way.
    cls = pd.read_csv(cohort_dir / "classification.csv", dtype=str)
    cls["max_val"] = ["-1"] + ["100"] * (len(cls) - 1)
    cls.to_csv(cohort_dir / "cls_max_val.csv", index=False)
    with pytest.raises(CohortError, match=r"line 2 .*max_val '-1' is not a positive number"):
        read_cohort(cohort_dir / "cls_max_val.csv", "classification")
    # mae2d needs it: slices are scaled without reading their volume.
    mae = pd.read_csv(cohort_dir / "mae2d.csv", dtype=str).drop(columns="max_val")
    mae.to_csv(cohort_dir / "mae2d_no_max_val.csv", index=False)
    with pytest.raises(CohortError, match=r"missing column\(s\) \['max_val'\]"):
        read_cohort(cohort_dir / "mae2d_no_max_val.csv", "mae2d")


def test_grid_difference_says_what_differs(tmp_path: Path) -> None:
    from medssl.data.io import read_volume_info
    from medssl.data.table import _grid_difference

    def info(name: str, affine: np.ndarray, shape: tuple[int, ...] = (4, 5, 6)):
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), tmp_path / name)
        return read_volume_info(str(tmp_path / name))

    base = np.diag([1.0, 1.0, 2.0, 1.0])
    image = info("image.nii.gz", base)
    assert _grid_difference(image, info("same.nii.gz", base)) is None
    # The same grid stored left-right flipped (LAS) is one grid once loaded in RAS order.
    las = base.copy()
    las[0, 0], las[0, 3] = -1.0, 3.0
    assert _grid_difference(image, info("las.nii.gz", las)) is None
    finer = np.diag([0.5, 1.0, 2.0, 1.0])
    assert _grid_difference(image, info("finer.nii.gz", finer)) == (
        "voxel size (0.5, 1, 2) mm against (1, 1, 2) mm")
    rotated = base.copy()  # 20 degrees about the last axis: not a relabelling of axes
    c, s_ = np.cos(np.radians(20)), np.sin(np.radians(20))
    rotated[:2, :2] = [[c, -s_], [s_, c]]
    assert _grid_difference(image, info("rot.nii.gz", rotated)) == (
        "the axes point in other directions (rotated or sheared grid)")
    shifted = base.copy()
    shifted[:3, 3] = [0.0, -2.5, 4.0]
    assert _grid_difference(image, info("shifted.nii.gz", shifted)) == (
        "origin shifted by (0, -2.5, 4) mm")
    assert _grid_difference(image, info("small.nii.gz", base, (4, 5, 5))) == (
        "(4, 5, 5) voxels against (4, 5, 6) in RAS order")


def test_an_identical_row_is_an_error_naming_both_lines(cohort_dir: Path) -> None:
    df = pd.read_csv(cohort_dir / "ssl.csv", dtype=str)
    pd.concat([df, df.iloc[[1]]]).to_csv(cohort_dir / "dup.csv", index=False)
    with pytest.raises(CohortError, match=rf"1 problem\(s\):\n  dup.csv line {len(df) + 2} "
                       rf"\(PatientID {df.PatientID[1]}\): identical to line 3"):
        read_cohort(cohort_dir / "dup.csv", "ssl")
    # The same patient with another volume (e.g. the other knee) is not a duplicate.
    other = df.iloc[[1]].assign(path=df.path[2])
    pd.concat([df, other]).to_csv(cohort_dir / "two_volumes.csv", index=False)
    assert len(read_cohort(cohort_dir / "two_volumes.csv", "ssl").records) == len(df) + 1
