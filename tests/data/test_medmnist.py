"""medssl-from-medmnist: MedMNIST 3D .npz -> NIfTI volumes + cohort CSV."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medssl.data.io import load_volume
from medssl.data.medmnist import MedMNISTError, convert, main

REAL_NPZ = Path("/work/shared/real_data/medmnist3d/adrenalmnist3d.npz")
COUNTS = {"train": 5, "val": 2, "test": 3}


def _arrays(labels_per_row: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 volumes of a non-cubic shape (4, 5, 6), so axis order is checked."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in COUNTS.items():
        out[f"{split}_images"] = rng.integers(0, 256, (n, 4, 5, 6), dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, 3, (n, labels_per_row), dtype=np.uint8)
    return out


def _npz(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "tinymnist3d") -> Path:
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def test_writes_volumes_and_csv(tmp_path: Path) -> None:
    arrays = _arrays()
    csv_path = convert(_npz(tmp_path, arrays), tmp_path / "out")
    assert csv_path == tmp_path / "out" / "tinymnist3d.csv"
    table = pd.read_csv(csv_path, dtype=str)
    assert list(table.columns) == ["PatientID", "path", "fold", "label"]
    assert table["fold"].tolist() == [s for s, n in COUNTS.items() for _ in range(n)]
    assert table["PatientID"].is_unique
    for split in COUNTS:
        rows = table[table["fold"] == split]
        assert rows["label"].astype(int).tolist() == arrays[f"{split}_labels"][:, 0].tolist()
        for i, rel in enumerate(rows["path"]):
            assert not Path(rel).is_absolute()  # the folder can move as a whole
            img = nib.load(csv_path.parent / rel)
            np.testing.assert_array_equal(np.asarray(img.dataobj), arrays[f"{split}_images"][i])
            np.testing.assert_array_equal(img.affine, np.eye(4))
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)


def test_loader_sees_the_npz_array(tmp_path: Path) -> None:
    """Identity affine = RAS: our loader returns the npz volume unchanged (channel first)."""
    arrays = _arrays()
    csv_path = convert(_npz(tmp_path, arrays), tmp_path)
    first = pd.read_csv(csv_path).iloc[COUNTS["train"]]  # first val row
    volume = load_volume(csv_path.parent / first["path"])
    np.testing.assert_array_equal(volume.array[0], arrays["val_images"][0].astype(np.float32))


def test_multi_label_columns(tmp_path: Path) -> None:
    arrays = _arrays(labels_per_row=3)
    table = pd.read_csv(convert(_npz(tmp_path, arrays), tmp_path))
    assert list(table.columns)[3:] == ["label_0", "label_1", "label_2"]
    np.testing.assert_array_equal(table[["label_0", "label_1", "label_2"]].to_numpy()[:5],
                                  arrays["train_labels"])


def test_flat_labels_and_missing_split(tmp_path: Path) -> None:
    arrays = {k: v for k, v in _arrays().items() if not k.startswith("val")}
    arrays["train_labels"] = arrays["train_labels"][:, 0]  # (N,) instead of (N, 1)
    table = pd.read_csv(convert(_npz(tmp_path, arrays), tmp_path, name="custom"))
    assert sorted(set(table["fold"])) == ["test", "train"]
    assert (tmp_path / "custom" / "train_0.nii.gz").is_file()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param(lambda a: a.pop("val_labels"), "no 'val_labels'", id="labels-missing"),
        pytest.param(lambda a: a.update(test_labels=a["test_labels"][:2]),
                     "3 test images but 2 test labels", id="count-mismatch"),
        pytest.param(lambda a: a.update(train_images=a["train_images"][:, 0]),
                     "MedMNIST 3D", id="2d-images"),
        pytest.param(lambda a: [a.pop(k) for k in list(a)] and a.update(x=np.zeros(3)),
                     "no train/val/test_images", id="not-medmnist"),
    ],
)
def test_bad_npz_names_file_and_problem(tmp_path: Path, change, match: str) -> None:
    arrays = _arrays()
    change(arrays)
    path = _npz(tmp_path, arrays)
    with pytest.raises(MedMNISTError, match=match) as info:
        convert(path, tmp_path / "out")
    assert str(path) in str(info.value)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    npz = _npz(tmp_path, _arrays())
    assert main([str(npz), str(tmp_path / "out")]) == 0
    assert "10 volumes (5 train, 2 val, 3 test)" in capsys.readouterr().out
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    assert main([str(bad), str(tmp_path / "out")]) == 1
    assert "cannot read as .npz" in capsys.readouterr().err


@pytest.mark.slow  # writes 1,584 files
@pytest.mark.skipif(not REAL_NPZ.is_file(), reason="real MedMNIST data not present")
def test_real_adrenalmnist3d(tmp_path: Path) -> None:
    csv_path = convert(REAL_NPZ, tmp_path)
    table = pd.read_csv(csv_path)
    assert table["fold"].value_counts().to_dict() == {"train": 1188, "test": 298, "val": 98}
    assert table.loc[table["fold"] == "train", "label"].sum() == 259  # 929 negative, 259 positive
    with np.load(REAL_NPZ) as npz:
        row = table[table["PatientID"] == "test_297"].iloc[0]
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / row["path"]).dataobj),
                                      npz["test_images"][297])
