"""No patient name, birth date or institution reaches any output of any script."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from medssl.data.demo import generate
from medssl.run import run
from tests.conftest import TINY, TINY_DINO, compose
from tests.scripts.test_classification import TINY_CLS
from tests.scripts.test_mae import TINY_2D as TINY_MAE2D
from tests.scripts.test_mae import TINY_3D as TINY_MAE3D
from tests.scripts.test_segmentation import TINY_SEG

CANARIES = {"PatientName": "Canary^Jane", "PatientBirthDate": "19010203",
            "InstitutionName": "Canary General Hospital", "ReferringPhysicianName": "Dr^Canary"}


@pytest.fixture(scope="module")
def named_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh tiny demo (other tests may add files to the shared one) with identifying DICOM
    fields filled in, and every CSV reading DICOM."""
    root = generate(tmp_path_factory.mktemp("named") / "cohort", TINY).root
    for path in (root / "dicom").rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path)
            for tag, value in CANARIES.items():
                setattr(ds, tag, value)
            ds.save_as(path)
    seg = pd.read_csv(root / "segmentation.csv")
    seg["img_path"] = "dicom/" + seg.PatientID  # the same image, from DICOM
    seg.to_csv(root / "segmentation.csv", index=False)
    mae2d = pd.read_csv(root / "mae2d.csv")
    mae2d["path"] = "dicom/" + mae2d.PatientID
    mae2d.to_csv(root / "mae2d.csv", index=False)
    return root


SCRIPTS = {
    "dino": ("classification.csv", TINY_DINO),
    "classification": ("classification.csv", TINY_CLS),
    "segmentation": ("segmentation.csv", TINY_SEG),
    "mae3d": ("mae3d.csv", TINY_MAE3D),
    "mae2d": ("mae2d.csv", TINY_MAE2D),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_no_identifying_field_in_any_output(script: str, named_cohort: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture,
                                            capfd: pytest.CaptureFixture) -> None:
    csv, tiny = SCRIPTS[script]
    results, cache = tmp_path / "results", tmp_path / "cache"
    cfg = compose(script, [*tiny, f"csv_path={named_cohort / csv}", f"results_dir={results}",
                           "cache=disk", f"cache_dir={cache}", "n_epochs=1"])
    with caplog.at_level(logging.DEBUG):
        run(cfg)
    files = [p for p in [*results.rglob("*"), *cache.rglob("*")] if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(cache.rglob("*"))
    console = capfd.readouterr()
    texts = {"log": caplog.text, "stdout": console.out, "stderr": console.err}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in files}
    for where, text in texts.items():
        for tag, value in CANARIES.items():
            for needle in (value, "Canary"):
                assert needle not in text, f"{tag} ({needle!r}) found in {where}"
