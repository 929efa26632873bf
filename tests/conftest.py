"""Shared fixtures: a tiny generated demo cohort and the optional real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from medssl.data.demo import DemoPaths, DemoSpec, generate
from medssl.run import compose_config

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


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as the entry script would, plus overrides."""
    return compose_config(REPO / "configs", config_name, overrides)


TINY_DINO = [
    "resize_to=[16,32,32]", "global_crop_size=[16,32,32]", "local_crop_size=[8,16,16]",
    "backbone.patch_size=[4,8,8]", "backbone.hidden_size=32", "backbone.mlp_dim=64",
    "backbone.num_layers=1", "backbone.num_heads=2", "out_dim=64", "hidden_dim=32",
    "bottleneck_dim=16", "n_crops=4", "batch_size=2", "n_epochs=1", "cache=none",
    "accelerator=cpu", "devices=1", "knn_k=3", "progress_bar=false", "n_workers=0",
]


@pytest.fixture
def dino_cfg(demo: DemoPaths, tmp_path: Path) -> DictConfig:
    """The DINO config on the tiny demo cohort, CPU, results under tmp_path."""
    return compose("dino", [f"csv_path={demo.classification_csv}",
                            f"results_dir={tmp_path / 'results'}", *TINY_DINO])
