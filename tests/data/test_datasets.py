"""CSV reading, validation errors, preprocessing outputs and caching."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.data import io as medssl_io
from medssl.data import pipeline as datamodule_pipeline
from medssl.data.datamodule import CohortDataModule
from medssl.data.demo import COHORTS, SEXES, DemoPaths
from medssl.data.io import VolumeError
from medssl.data.pipeline import (
    Preprocessing,
    build_dataset,
    cache_key,
    make_datasets,
    preprocessing_transforms,
    to_items,
)
from medssl.data.table import CohortError, read_cohort
from medssl.data.transforms import GridResized

SMALL = Preprocessing(resize_to=(8, 16, 16))


def _edit_csv(src: Path, dst: Path, **changes: dict[int, dict]) -> Path:
    """Copy a CSV next to the demo data (relative paths keep working) with edited cells."""
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    for row, values in changes.get("rows", {}).items():
        for col, value in values.items():
            df.loc[row, col] = value
    df = df.drop(columns=changes.get("drop", []))
    df.to_csv(dst, index=False)
    return dst


def test_classification_dataset_shapes_values_and_targets(demo: DemoPaths) -> None:
    datasets, cohort = make_datasets(demo.classification_csv, "classification",
                                     {"train": [0, 1, 2], "val": "3"}, SMALL,
                                     targets=["V00COHORT", "P02SEX"])
    assert cohort.encodings["V00COHORT"] == list(COHORTS)
    df = pd.read_csv(demo.classification_csv)
    assert len(datasets["train"]) == int(df.fold.isin([0, 1, 2]).sum())
    assert len(datasets["val"]) == int((df.fold == 3).sum())
    item = datasets["val"][0]
    assert tuple(item["image"].shape) == (1, 8, 16, 16)
    assert item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) < 0.05 and 0.9 < float(item["image"].max()) <= 1.0
    expected = df[df.fold == 3].iloc[0]
    assert item["V00COHORT"] == COHORTS.index(expected.V00COHORT)
    assert item["PatientID"] == expected.PatientID and "line" in item["row"]


def test_segmentation_dataset_keeps_labels_aligned(demo: DemoPaths) -> None:
    datasets, _ = make_datasets(demo.segmentation_csv, "segmentation",
                                {"train": ["train"], "test": "test"}, Preprocessing())
    item = datasets["test"][0]
    assert item["image"].shape == item["label"].shape == (1, 16, 32, 32)
    label = item["label"]
    assert set(torch.unique(label).tolist()) <= {0, 1, 2, 3, 4}  # nearest, no blending
    image = item["image"]
    assert image[label == 2].mean() > image[label == 1].mean() > image[label == 0].mean()
    resized, _ = make_datasets(demo.segmentation_csv, "segmentation", {"test": "test"}, SMALL)
    assert set(torch.unique(resized["test"][0]["label"]).tolist()) <= {0, 1, 2, 3, 4}


def test_percentile_normalisation_is_configurable(demo: DemoPaths) -> None:
    raw, _ = make_datasets(demo.ssl_csv, "ssl", {"train": 0},
                           Preprocessing(normalize=False), validate=False)
    clipped, _ = make_datasets(demo.ssl_csv, "ssl", {"train": 0},
                               Preprocessing(lower_percentile=5, upper_percentile=95))
    x, y = raw["train"][0]["image"], clipped["train"][0]["image"]
    hi, lo = np.percentile(x.numpy(), 95), np.percentile(x.numpy(), 5)
    np.testing.assert_allclose(y.numpy(), np.clip((x.numpy() - lo) / (hi - lo), 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="lower_percentile < upper_percentile"):
        Preprocessing(lower_percentile=90, upper_percentile=10)


def test_missing_column(demo: DemoPaths) -> None:
    csv = _edit_csv(demo.classification_csv, demo.root / "nocol.csv", drop=["fold"])
    with pytest.raises(CohortError, match=r"missing column\(s\) \['fold'\]"):
        read_cohort(csv, "classification")


def test_bad_rows_reported_all_at_once(demo: DemoPaths) -> None:
    csv = _edit_csv(demo.classification_csv, demo.root / "bad.csv", rows={
        1: {"path": "dicom/NOPE"}, 3: {"P02SEX": ""}, 5: {"fold": "x"}})
    with pytest.raises(CohortError, match="3 problem") as err:
        read_cohort(csv, "classification", targets=["V00COHORT", "P02SEX"])
    msg = str(err.value)
    assert "bad.csv line 3 (PatientID DEMO002): path" in msg and "NOPE does not exist" in msg
    assert "line 5 (PatientID DEMO004): target P02SEX is missing (NaN/empty)" in msg
    assert "line 7 (PatientID DEMO006): fold 'x' is not an integer" in msg


def test_empty_folder_row(demo: DemoPaths) -> None:
    (demo.root / "dicom" / "EMPTY").mkdir(exist_ok=True)
    csv = _edit_csv(demo.ssl_csv, demo.root / "empty.csv", rows={0: {"path": "dicom/EMPTY"}})
    with pytest.raises(CohortError, match=r"line 2 \(PatientID DEMO001\): path .*EMPTY is an "
                                          "empty folder"):
        read_cohort(csv, "ssl")


def test_unknown_fold_values(demo: DemoPaths) -> None:
    csv = _edit_csv(demo.segmentation_csv, demo.root / "fold.csv", rows={2: {"fold": "trian"}})
    with pytest.raises(CohortError, match=r"line 4 .*fold 'trian' is not one of \['train', "):
        read_cohort(csv, "segmentation")
    cohort = read_cohort(demo.ssl_csv, "ssl")
    with pytest.raises(CohortError, match=r"fold\(s\) \['7'\] requested.*holds only \['0', '1'"):
        cohort.select([0, 7])
    assert len(cohort.select(["0", 1])) == len(cohort.select([0, "1"])) > 0


def test_category_outside_known_encoding(demo: DemoPaths) -> None:
    with pytest.raises(CohortError, match="V00COHORT='3: Non-exposed control group' is not one"):
        read_cohort(demo.classification_csv, "classification", ["V00COHORT"],
                    encodings={"V00COHORT": [COHORTS[0]]})


def test_segmentation_on_another_grid(demo: DemoPaths) -> None:
    seg = nib.load(demo.root / "nifti/DEMO001_label.nii.gz")
    cropped = nib.Nifti1Image(np.asarray(seg.dataobj)[:, :-2], seg.affine)
    nib.save(cropped, demo.root / "nifti/cropped_label.nii.gz")
    csv = _edit_csv(demo.segmentation_csv, demo.root / "grid.csv",
                    rows={0: {"seg_path": "nifti/cropped_label.nii.gz"}})
    with pytest.raises(CohortError, match=r"line 2 \(PatientID DEMO001\): segmentation .*"
                                          "cropped_label.nii.gz .*not on the grid of image"):
        make_datasets(csv, "segmentation", {"train": "train"}, SMALL)
    # Without the header check, loading the row fails with the same names.
    datasets, _ = make_datasets(csv, "segmentation", {"train": "train"}, SMALL, validate=False)
    with pytest.raises(VolumeError, match="DEMO001.*cropped_label.nii.gz.*differs"):
        datasets["train"][0]


def test_damaged_series_detected_before_training(demo: DemoPaths, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(demo.root, root)
    victims = sorted((root / "dicom" / "DEMO003").iterdir())
    victims[4].unlink()  # a missing slice: non-uniform spacing
    for p in (root / "dicom" / "DEMO002").iterdir():  # a second series in DEMO005's folder
        shutil.copy(p, root / "dicom" / "DEMO005" / f"x{p.name}")
    with pytest.raises(CohortError, match="2 problem") as err:
        make_datasets(root / "ssl.csv", "ssl", {"train": [0, 1, 2, 3, 4]}, SMALL)
    assert "(PatientID DEMO003): path: series" in str(err.value)
    assert "non-uniform slice spacing" in str(err.value)
    assert "(PatientID DEMO005): path:" in str(err.value) and "2 series" in str(err.value)


def test_corrupt_pixels_name_row_and_file(demo: DemoPaths, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(demo.root, root)
    victim = sorted((root / "dicom" / "DEMO001").iterdir())[3]
    data = bytearray(victim.read_bytes())
    victim.write_bytes(bytes(data[:-600]))  # pixel data cut short
    datasets, _ = make_datasets(root / "ssl.csv", "ssl", {"train": 0}, SMALL, validate=False)
    with pytest.raises(VolumeError, match="ssl.csv line 2 \\(PatientID DEMO001\\): image: ") as err:
        datasets["train"][0]
    assert str(victim) in str(err.value) and "cannot decode pixel data" in str(err.value)


def test_cache_modes_agree_and_disk_cache_is_keyed(demo: DemoPaths, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {}
    for mode in ("none", "memory", "disk"):
        ds, _ = make_datasets(demo.ssl_csv, "ssl", {"train": 1}, SMALL, cache=mode,
                              cache_dir=tmp_path / "cache")
        outputs[mode] = [ds["train"][i]["image"] for i in range(len(ds["train"]))]
    for a, b, c in zip(*outputs.values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    folder = tmp_path / "cache" / cache_key(SMALL)
    assert len(list(folder.glob("*.pt"))) == len(outputs["disk"])

    def fail(*args: object, **kwargs: object) -> None:
        raise VolumeError("a cached volume was decoded again")

    monkeypatch.setattr(medssl_io, "load_volume", fail)
    cached, _ = make_datasets(demo.ssl_csv, "ssl", {"train": 1}, SMALL, cache="disk",
                              cache_dir=tmp_path / "cache", validate=False)
    assert torch.equal(cached["train"][0]["image"], outputs["none"][0])
    extra = build_dataset(to_items(read_cohort(demo.ssl_csv, "ssl").select(1), "ssl"),
                          [*preprocessing_transforms(SMALL), GridResized("image", (4, 4, 4))],
                          SMALL, cache="disk", cache_dir=tmp_path / "cache")
    with pytest.raises(VolumeError, match="decoded again"):
        extra[0]  # same settings, one more step: its own files, never the plain ones
    other = Preprocessing(resize_to=(8, 16, 16), upper_percentile=99.0)
    assert cache_key(other) != cache_key(SMALL)  # other settings never see these files
    fresh, _ = make_datasets(demo.ssl_csv, "ssl", {"train": 1}, SMALL, cache="disk",
                             cache_dir=tmp_path / "cache", reset_cache=True, validate=False)
    assert not list(folder.glob("*.pt"))
    with pytest.raises(VolumeError, match="decoded again"):
        fresh["train"][0]


def test_loadvolumed_error_names_row(demo: DemoPaths) -> None:
    transform = medssl_io.LoadVolumed("image")
    with pytest.raises(VolumeError, match="my.csv line 9: image: .*no such file"):
        transform({"image": str(demo.root / "missing"), "row": "my.csv line 9"})


def test_datamodule_serves_every_split(demo: DemoPaths) -> None:
    data = CohortDataModule(demo.classification_csv, "classification",
                            {"train": [0, 1, 2], "val": 3, "test": 4, "predict": None}, SMALL,
                            batch_size=2, eval_batch_size=3, targets=["V00COHORT"])
    data.setup("fit")
    df = pd.read_csv(demo.classification_csv)
    n_train = int(df.fold.isin([0, 1, 2]).sum())
    assert data.cohort.encodings["V00COHORT"] == list(COHORTS)
    assert len(data.train_dataloader()) == n_train // 2  # incomplete batch dropped
    batch = next(iter(data.test_dataloader()))
    n_test = int((df.fold == 4).sum())
    assert batch["image"].shape == (min(3, n_test), 1, 8, 16, 16)
    assert batch["geometry"]["file_affine"].shape == (min(3, n_test), 4, 4)
    expected = df[df.fold == 4].PatientID.tolist()[:3]
    assert list(batch["PatientID"]) == expected  # evaluation keeps the CSV order
    assert len(data.val_dataloader().dataset) == int((df.fold == 3).sum())
    with pytest.raises(ValueError, match="no 'predict' split configured"):
        data.predict_dataloader()


def test_datamodule_validates_all_splits_once_before_training(
        demo: DemoPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "c"
    shutil.copytree(demo.root, root)
    df = pd.read_csv(root / "ssl.csv")
    victim = df[df.fold == 4].iloc[0]
    shutil.rmtree(root / "dicom" / victim.PatientID)
    (root / "dicom" / victim.PatientID).mkdir()
    (root / "dicom" / victim.PatientID / "x.dcm").write_bytes(b"not dicom")
    calls = []
    data = CohortDataModule(root / "ssl.csv", "ssl", {"train": [0, 1], "val": [1, 2],
                                                      "test": 4}, SMALL)
    with pytest.raises(CohortError, match=f"PatientID {victim.PatientID}.*damaged slice"):
        data.setup()  # the test split's volume is checked before anything trains
    monkeypatch.setattr(datamodule_pipeline, "validate_volumes",
                        lambda cohort, records: calls.append(sorted(r["row"] for r in records)))
    CohortDataModule(demo.ssl_csv, "ssl", {"train": [0, 1], "val": [1, 2]}, SMALL).setup()
    union = sorted(r for r in df.index if df.fold[r] in (0, 1, 2))
    assert len(calls) == 1 and len(calls[0]) == len(union)


def test_datamodule_errors(demo: DemoPaths) -> None:
    with pytest.raises(ValueError, match="tran"):
        CohortDataModule(demo.ssl_csv, "ssl", {"tran": 0}, SMALL)
    data = CohortDataModule(demo.ssl_csv, "ssl", {"train": 0}, SMALL, batch_size=50)
    data.setup()
    with pytest.raises(ValueError, match=r"ssl.csv: \d training items but batch_size=50"):
        data.train_dataloader()
    assert data.val_dataloader() == []  # no val split: Lightning skips validation


def test_disk_cache_serves_current_csv_fields(demo: DemoPaths, tmp_path: Path) -> None:
    csv = _edit_csv(demo.classification_csv, demo.root / "relabel.csv")
    first, _ = make_datasets(csv, "classification", {"train": 0}, SMALL, targets=["P02SEX"],
                             cache="disk", cache_dir=tmp_path)
    before = first["train"][0]
    df = pd.read_csv(csv, dtype=str)
    row = int(df.index[df.fold == "0"][0])
    other = next(s for s in SEXES if s != df.P02SEX[row])
    _edit_csv(csv, csv, rows={row: {"P02SEX": other}})
    again, _ = make_datasets(csv, "classification", {"train": 0}, SMALL, targets=["P02SEX"],
                             cache="disk", cache_dir=tmp_path)
    after = again["train"][0]  # the volume from the cache, the target from the edited CSV
    assert torch.equal(after["image"], before["image"])
    assert after["P02SEX"] == SEXES.index(other) != before["P02SEX"]
