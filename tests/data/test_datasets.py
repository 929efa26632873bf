"""CSV reading, validation errors, preprocessing outputs and caching."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medssl.data import io as medssl_io
from medssl.data import pipeline as datamodule_pipeline
from medssl.data.cache import build_dataset, cache_key
from medssl.data.datamodule import CohortDataModule
from medssl.data.demo import COHORTS, SEXES, DemoPaths
from medssl.data.io import VolumeError
from medssl.data.pipeline import (
    Preprocessing,
    make_datasets,
    preprocessing_transforms,
    rank_share,
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
                                          "cropped_label.nii.gz .*not on the grid of image"
                                          r".*: \(\d+, \d+, \d+\) voxels against"):
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
    with pytest.raises(VolumeError, match="decoded again"):  # emptied, then refilled at once
        make_datasets(demo.ssl_csv, "ssl", {"train": 1}, SMALL, cache="disk",
                      cache_dir=tmp_path / "cache", reset_cache=True, validate=False)
    assert not list(folder.glob("*.pt"))


def test_disk_cache_is_filled_before_training_each_process_its_share(demo: DemoPaths,
                                                                     tmp_path: Path) -> None:
    """Every file is written by make_datasets (not in the first epoch); under DDP each process
    writes its interleaved share of every split, and together they write all."""
    def files() -> int:
        return len(list((tmp_path / cache_key(SMALL)).glob("*.pt")))

    splits = {"train": [0, 1], "val": 2}
    ds, _ = make_datasets(demo.ssl_csv, "ssl", splits, SMALL, cache="disk", cache_dir=tmp_path,
                          share=(1, 2))
    sizes = [len(d) for d in ds.values()]
    assert min(sizes) >= 2 and files() == sum(n // 2 for n in sizes)
    make_datasets(demo.ssl_csv, "ssl", splits, SMALL, cache="disk", cache_dir=tmp_path,
                  share=(0, 2))
    assert files() == sum(sizes)


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


@pytest.mark.parametrize(("n", "world"), [(7, 2), (8, 2), (5, 3), (2, 4)])
@pytest.mark.parametrize("seed", [None, 3])
def test_rank_share_is_torchs_distributed_split(n: int, world: int, seed: int | None) -> None:
    items = [{"row": f"line {i}"} for i in range(n)]
    shares = [rank_share(items, rank, world, seed) for rank in range(world)]
    for rank, share in enumerate(shares):
        # The reference: what torch's DistributedSampler hands this rank in epoch 0.
        sampler = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=seed is not None, seed=seed or 0)
        assert share == [items[i] for i in sampler]
    assert len({len(share) for share in shares}) == 1  # equal step counts on every rank
    assert {item["row"] for share in shares for item in share} == {i["row"] for i in items}


def test_memory_cache_under_ddp_holds_only_the_ranks_share(demo: DemoPaths) -> None:
    splits = {"train": [0, 1, 2], "val": 3, "test": 4}
    df = pd.read_csv(demo.classification_csv)
    served: dict[str, list[str]] = {name: [] for name in splits}
    for rank in (0, 1):
        data = CohortDataModule(demo.classification_csv, "classification", splits, SMALL,
                                batch_size=2, cache="memory", seed=5)
        data.layout = (rank, 2)
        data.setup("fit")
        cache = data.datasets["train"].memory
        volumes = {name: {i["image"] for i in d.data} for name, d in data.datasets.items()}
        assert len(cache.entries) == len(set().union(*volumes.values()))  # nothing else
        for name, dataset in data.datasets.items():
            n = int(df.fold.isin(np.atleast_1d(splits[name])).sum())
            assert len(dataset) == -(-n // 2)  # half, padded as DistributedSampler pads
            served[name] += [item["PatientID"] for item in dataset]
        # One-replica samplers: Lightning keeps them instead of splitting the share again.
        for loader in (data.train_dataloader(), data.test_dataloader()):
            assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
            assert loader.sampler.num_replicas == 1
    for name, folds in splits.items():  # the two ranks together serve every row
        assert set(served[name]) == set(df[df.fold.isin(np.atleast_1d(folds))].PatientID)
    # A copy of rank 1's module in another rank's process (spawn/fork launch) is refused.
    data.trainer = SimpleNamespace(global_rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="holds the share of rank 1 of 2, but this process "
                                           "trains as rank 0 of 2"):
        data.train_dataloader()


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
    data = CohortDataModule(root / "ssl.csv", "ssl", {"train": [0, 1], "val": [2],
                                                      "test": 4}, SMALL)
    with pytest.raises(CohortError, match=f"PatientID {victim.PatientID}.*damaged slice"):
        data.setup()  # the test split's volume is checked before anything trains
    validate = datamodule_pipeline.validate_volumes
    monkeypatch.setattr(datamodule_pipeline, "validate_volumes", lambda cohort, records: (
        calls.append(sorted(r["row"] for r in records)) or validate(cohort, records)))
    CohortDataModule(demo.ssl_csv, "ssl", {"train": [0, 1], "val": [2],
                                           "predict": [1, 2]}, SMALL).setup()
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



def test_disk_cache_serves_no_fields_of_the_dataset_that_wrote_it(demo: DemoPaths,
                                                                   tmp_path: Path) -> None:
    """Two datasets over the same files share cached volumes, never each other's extra
    fields (a k-NN monitor's class key leaking into training items broke collation)."""
    from medssl.data.pipeline import preprocessing_transforms, to_items

    rows = read_cohort(demo.classification_csv, "classification").select([0])
    steps = preprocessing_transforms(SMALL)
    tagged = build_dataset([dict(i, extra=7) for i in to_items(rows, "ssl")], steps, SMALL,
                           "disk", tmp_path)
    plain = build_dataset(to_items(rows, "ssl"), steps, SMALL, "disk", tmp_path)
    assert tagged[0]["extra"] == 7  # writes the file
    served = plain[0]  # reads it back
    assert "extra" not in served and torch.equal(served["image"], tagged[0]["image"])
    assert served["row"] == rows[0]["row"]  # CSV fields from the current item


# ----- splits (issue 12, item 9) ----------------------------------------------------------


def test_patient_in_two_splits_is_an_error(demo: DemoPaths) -> None:
    df = pd.read_csv(demo.ssl_csv, dtype=str)
    leak = df.PatientID[df.fold == "0"].iloc[0]
    row = int(df.index[df.fold == "3"][0])
    csv = _edit_csv(demo.ssl_csv, demo.root / "leak.csv", rows={row: {"PatientID": leak}})
    with pytest.raises(CohortError, match=f"PatientID {leak} is in 2 splits") as err:
        make_datasets(csv, "ssl", {"train": [0, 1, 2], "val": [3]}, SMALL)
    assert f"val line(s) {row + 2}" in str(err.value)
    with pytest.raises(CohortError, match="PatientID.*is in 2 splits"):
        CohortDataModule(csv, "ssl", {"train": [0, 1, 2], "val": [3]}, SMALL).setup()


def test_rows_in_no_split_are_counted_in_the_log(demo: DemoPaths,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    df = pd.read_csv(demo.ssl_csv)
    left = int(df.fold.isin([3, 4]).sum())
    with caplog.at_level("INFO", logger="medssl.data.pipeline"):
        make_datasets(demo.ssl_csv, "ssl", {"train": [0, 1], "val": [2]}, SMALL)
    assert f"{left} rows in no split" in caplog.text
    assert f"train {int(df.fold.isin([0, 1]).sum())} rows" in caplog.text


def test_empty_train_folds_is_named(demo: DemoPaths) -> None:
    data = CohortDataModule(demo.ssl_csv, "ssl", {"train": [], "val": [3]}, SMALL)
    with pytest.raises(CohortError, match="train_folds is empty"):
        data.setup()
    with pytest.raises(CohortError, match="train_folds is empty"):
        make_datasets(demo.ssl_csv, "ssl", {"train": None, "val": [3]}, SMALL)
    only_test, _ = make_datasets(demo.ssl_csv, "ssl", {"test": [4]}, SMALL)  # no train asked
    assert len(only_test["test"]) == int((pd.read_csv(demo.ssl_csv).fold == 4).sum())


# ----- on_bad_sample (issue 12) -----------------------------------------------------------


def _damaged_cohort(demo: DemoPaths, root: Path) -> tuple[Path, pd.DataFrame, dict[int, str]]:
    """A copy of the demo with three bad rows: a missing path, a bad fold, a damaged slice.

    Returns the CSV, its table and row index -> the text its problem must contain.
    """
    shutil.copytree(demo.root, root)
    df = pd.read_csv(root / "ssl.csv", dtype=str)
    train = df.index[df.fold.isin(["0", "1", "2"])].tolist()
    df.loc[train[0], "path"] = "dicom/NOPE"
    df.loc[train[1], "fold"] = "x"
    victim = sorted((root / "dicom" / df.PatientID[train[2]]).iterdir())[0]
    victim.write_bytes(b"")
    df.to_csv(root / "ssl.csv", index=False)
    return root / "ssl.csv", df, {train[0]: "NOPE does not exist", train[1]: "fold 'x'",
                                  train[2]: str(victim)}


def test_on_bad_sample_skip_leaves_bad_rows_out_and_lists_them(
        demo: DemoPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv, df, problems = _damaged_cohort(demo, tmp_path / "c")
    splits = {"train": [0, 1, 2], "val": [3]}
    with pytest.raises(CohortError, match="problem"):
        CohortDataModule(csv, "ssl", splits, SMALL).setup()  # error: today's behaviour
    with pytest.raises(CohortError, match="problem"):
        CohortDataModule(csv, "ssl", splits, SMALL, on_bad_sample="error").setup()
    data = CohortDataModule(csv, "ssl", splits, SMALL, on_bad_sample="skip")
    with caplog.at_level("WARNING"):
        data.setup()
    good = [p for i, p in enumerate(df.PatientID) if df.fold[i] in ("0", "1", "2")
            and i not in problems]
    assert [item["PatientID"] for item in data.datasets["train"].data] == good
    assert len(data.datasets["val"]) == int((df.fold == "3").sum())
    assert [r["row"] for r, _ in data.bad_rows] == [
        f"ssl.csv line {i + 2} (PatientID {df.PatientID[i]})" for i in sorted(problems)]
    for (_, found), i in zip(data.bad_rows, sorted(problems), strict=True):
        assert problems[i] in " ".join(found)
    assert "3 bad row(s) left out" in caplog.text
    assert {r["row"] for r in data.cohort.records}.isdisjoint(r["row"] for r, _ in data.bad_rows)
    batch = next(iter(data.train_dataloader()))
    assert set(batch["PatientID"]) <= set(good)
    with pytest.raises(ValueError, match="on_bad_sample"):
        CohortDataModule(csv, "ssl", splits, SMALL, on_bad_sample="ignore")


def test_on_bad_sample_skip_with_every_train_row_bad(demo: DemoPaths) -> None:
    df = pd.read_csv(demo.ssl_csv)
    fold0 = df.index[df.fold == 0].tolist()
    missing = _edit_csv(demo.ssl_csv, demo.root / "allbad.csv",
                        rows={i: {"path": "dicom/NOPE"} for i in fold0})
    with pytest.raises(CohortError, match=r"train_folds: every row .* left out as bad") as err:
        make_datasets(missing, "ssl", {"train": [0], "val": [3]}, SMALL, on_bad_sample="skip")
    assert f"line {fold0[0] + 2} (PatientID {df.PatientID[fold0[0]]}): path" in str(err.value)
    (demo.root / "dicom" / "JUNK").mkdir(exist_ok=True)
    (demo.root / "dicom" / "JUNK" / "x.dcm").write_bytes(b"not dicom")
    unreadable = _edit_csv(demo.ssl_csv, demo.root / "junk.csv",
                           rows={i: {"path": "dicom/JUNK"} for i in fold0})
    with pytest.raises(CohortError, match=r"train_folds: every row .* left out as bad") as err:
        make_datasets(unreadable, "ssl", {"train": [0], "val": [3]}, SMALL,
                      on_bad_sample="skip")
    assert f"line {fold0[-1] + 2} (PatientID {df.PatientID[fold0[-1]]}): path: " in \
        str(err.value)


# ----- grid check in RAS (issue 12) ---------------------------------------------------------


def test_label_stored_in_another_orientation_is_on_the_image_grid(tmp_path: Path) -> None:
    """An LAS image and its label stored RAS (the same voxels, flipped) describe one grid."""
    rng = np.random.default_rng(0)
    image = rng.random((8, 9, 10)).astype("f4") * 100
    label = (image > 50).astype("u1")
    las = np.diag([-2.0, 3.0, 4.0, 1.0])
    las[:3, 3] = [20.0, -5.0, 7.0]
    ras = las.copy()
    ras[0] = [2.0, 0, 0, 20.0 - 2.0 * 7]  # x flipped: voxel 0 is the old voxel 7
    nib.save(nib.Nifti1Image(image, las), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label[::-1].copy(), ras), tmp_path / "seg.nii.gz")
    shifted = ras.copy()
    shifted[1, 3] += 3.0  # one voxel off along y
    nib.save(nib.Nifti1Image(label[::-1].copy(), shifted), tmp_path / "off.nii.gz")
    pd.DataFrame({"PatientID": ["P1", "P2"], "img_path": ["img.nii.gz"] * 2,
                  "seg_path": ["seg.nii.gz", "off.nii.gz"], "fold": ["train", "val"],
                  "max_val": [100, 100]}).to_csv(tmp_path / "seg.csv", index=False)
    with pytest.raises(CohortError, match="1 problem") as err:
        make_datasets(tmp_path / "seg.csv", "segmentation", {"train": "train", "val": "val"},
                      Preprocessing())
    assert "(PatientID P2): segmentation" in str(err.value) and "off.nii.gz" in str(err.value)
    datasets, _ = make_datasets(tmp_path / "seg.csv", "segmentation", {"train": "train"},
                                Preprocessing(normalize=False))
    item = datasets["train"][0]  # loads: both in RAS, voxel for voxel
    np.testing.assert_array_equal(item["label"][0].numpy(), label[::-1])
    np.testing.assert_allclose(item["image"][0].numpy(), image[::-1], rtol=1e-6)


def test_real_dicom_series_and_its_las_label_map(real_data: Path, tmp_path: Path) -> None:
    """TotalSegmentator's LAS label map on the grid of its LPS DICOM series."""
    folder = real_data / "totalsegmentator"
    pd.DataFrame({"PatientID": ["TS1"], "img_path": [folder / "example_ct_dicom"],
                  "seg_path": [folder / "example_seg_dicom.nii.gz"], "fold": ["train"],
                  "max_val": [2000]}).to_csv(tmp_path / "ts.csv", index=False)
    datasets, _ = make_datasets(tmp_path / "ts.csv", "segmentation", {"train": "train"},
                                Preprocessing())
    reference = nib.as_closest_canonical(nib.load(folder / "example_seg_dicom.nii.gz"))
    item = datasets["train"][0]
    assert item["image"].shape[1:] == item["label"].shape[1:] == reference.shape
    np.testing.assert_array_equal(item["label"][0].numpy(), np.asarray(reference.dataobj))
