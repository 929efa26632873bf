"""Shared fixtures: a tiny generated demo cohort and the optional real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medssl.data.demo import DemoPaths, DemoSpec, generate

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("MEDSSL_REAL_DATA", REPO.parent / "shared" / "real_data"))
TINY = DemoSpec(n_subjects=8, rows=32, columns=32, slices=16, pixel_spacing=4.4, slice_step=6.0)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """A tiny demo cohort (8 subjects of 32x32x16), generated once per test session."""
    return generate(tmp_path_factory.mktemp("demo") / "cohort", TINY)


@pytest.fixture
def real_data() -> Path:
    """The shared real scans; tests using them skip where the folder is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not present")
    return REAL_DATA
