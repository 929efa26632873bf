"""medssl-inspect and medssl-convert on generated data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medssl.data.cli import convert_main, inspect_main
from medssl.data.demo import DemoPaths
from medssl.data.io import load_volume


def test_inspect_clean_cohort(demo: DemoPaths, capsys: pytest.CaptureFixture) -> None:
    assert inspect_main([str(demo.segmentation_csv)]) == 0
    out = capsys.readouterr().out
    assert "16 volume(s) checked, 0 with problems" in out
    assert "16x32x32" in out and "PIL" in out


def test_inspect_reports_problems_and_hides_names(demo: DemoPaths, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "c"
    shutil.copytree(demo.root, root)
    for p in (root / "dicom" / "DEMO001").iterdir():  # identifying fields in one series
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientBirthDate = "Doe^Jane", "19700101"
        ds.save_as(p)
    sorted((root / "dicom" / "DEMO002").iterdir())[5].unlink()
    assert inspect_main([str(root / "ssl.csv")]) == 1
    out = capsys.readouterr().out
    assert "Doe" not in out and "Jane" not in out and "19700101" not in out
    line = next(x for x in out.splitlines() if "DEMO002" in x)
    assert " no " in line and "non-uniform slice spacing" in line
    assert next(x for x in out.splitlines() if "DEMO001" in x).split()[3] == "yes"
    assert "1 with problems" in out
    assert " MR " in out and "6x4.4x4.4" in out  # RAS spacing: slice step first


def test_convert_round_trip(demo: DemoPaths, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "demo.nii.gz"
    assert convert_main([str(demo.root / "dicom" / "DEMO004"), str(out)]) == 0
    written, volume = nib.load(str(out)), load_volume(demo.root / "dicom" / "DEMO004")
    assert "".join(nib.aff2axcodes(written.affine)) == "RAS"
    np.testing.assert_array_equal(written.get_fdata(), volume.array[0])
    assert convert_main([str(demo.root / "nope"), str(out)]) == 1


def test_console_scripts_installed(demo: DemoPaths, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([bin_dir / "medssl-inspect", str(demo.ssl_csv)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([bin_dir / "medssl-demo", str(tmp_path / "d"), "--subjects", "2"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and (tmp_path / "d" / "ssl.csv").exists(), result.stderr


def _inspect(csv_path: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = inspect_main([str(csv_path), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("content,message", [("", "the file is empty"),
                                             ("PatientID,path,fold\n", "no rows")],
                         ids=["empty_file", "header_only"])
def test_inspect_unusable_csv_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               content: str, message: str) -> None:
    path = tmp_path / "cohort.csv"
    path.write_text(content)
    code, out, err = _inspect(path, capsys)
    assert code == 2 and message in err and "Traceback" not in err + out


def test_inspect_applies_the_training_rules(demo: DemoPaths, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """Spaces around column names are accepted and fold values checked, as in training."""
    lines = demo.ssl_csv.read_text().splitlines()
    lines[0] = " PatientID , path , fold "
    spaced = demo.root / "spaced.csv"
    spaced.write_text("\n".join(lines) + "\n")
    code, out, _ = _inspect(spaced, capsys)
    assert code == 0 and f"{len(lines) - 1} volume(s) checked, 0 with problems" in out
    pid, path, _ = lines[3].split(",")
    lines[3] = f"{pid},{path},x"
    bad = demo.root / "badfold.csv"
    bad.write_text("\n".join(lines) + "\n")
    code, out, _ = _inspect(bad, capsys)
    row = next(x for x in out.splitlines() if x.startswith("4 "))
    assert code == 1 and pid in row and "fold 'x' is not an integer" in row


def test_inspect_catches_a_slice_cut_short(demo: DemoPaths, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "c"
    shutil.copytree(demo.root, root)
    victim = sorted((root / "dicom" / "DEMO003").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-100])  # shorter by less than its header
    code, out, _ = _inspect(root / "ssl.csv", capsys)
    row = next(x for x in out.splitlines() if "DEMO003" in x)
    assert code == 1 and str(victim) in row and "truncated" in row


def test_inspect_reports_2d_and_4d_nifti_per_row(demo: DemoPaths, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    for name, shape in (("flat", (32, 32)), ("series4d", (16, 32, 32, 3))):
        nib.save(nib.Nifti1Image(rng.random(shape).astype("f4"), np.eye(4)),
                 tmp_path / f"{name}.nii.gz")
    csv_path = tmp_path / "cohort.csv"
    csv_path.write_text("PatientID,path,fold\nP1,flat.nii.gz,0\nP2,series4d.nii.gz,0\n"
                        f"P3,{demo.root / 'nifti' / 'DEMO001_image.nii.gz'},1\n")
    code, out, err = _inspect(csv_path, capsys)
    assert code == 1 and "Traceback" not in err
    assert "2D image" in next(x for x in out.splitlines() if " P1 " in x)
    assert "4D image with 3 volumes" in next(x for x in out.splitlines() if " P2 " in x)
    assert next(x for x in out.splitlines() if " P3 " in x).split()[3] == "yes"


def test_inspect_checks_splits_for_leakage(demo: DemoPaths, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _inspect(demo.ssl_csv, capsys, "--split", "train=0,1,2", "--split", "val=3")
    folds = [int(x.split(",")[2]) for x in demo.ssl_csv.read_text().splitlines()[1:]]
    n = {f: folds.count(f) for f in range(5)}
    assert code == 0 and (f"splits: train {n[0] + n[1] + n[2]} rows, val {n[3]} rows; {n[4]} rows "
                          f"in no split (fold 4: {n[4]})") in out
    lines = demo.ssl_csv.read_text().splitlines()
    pid0 = lines[1].split(",")[0]  # fold 0
    fold3 = next(i for i, x in enumerate(lines) if x.endswith(",3"))
    lines[fold3] = ",".join([pid0, *lines[fold3].split(",")[1:]])
    leak = demo.root / "leak.csv"
    leak.write_text("\n".join(lines) + "\n")
    code, _, err = _inspect(leak, capsys, "--split", "train=0,1,2", "--split", "val=3")
    assert code == 2 and f"PatientID {pid0} is in 2 splits (data leakage)" in err
