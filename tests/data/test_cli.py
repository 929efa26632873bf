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
