"""bench/dino_views.py: view agreement of a backbone on DINO's views."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from medssl.data.demo import DemoPaths
from tests.conftest import TINY_DINO

DINO_VIEWS_PY = Path(__file__).resolve().parents[2] / "bench" / "dino_views.py"
# Every view the whole volume, unaugmented: the two global views are the same picture.
IDENTICAL_VIEWS = [
    "global_crop_scale=[1,1]", "global_blur_prob=[0,0]", "global_invert_prob=[0,0]",
    "local_blur_prob=0", "augment.intensity_scale_prob=0", "augment.gamma_prob=0",
    "augment.noise_prob=0", "augment.rotate_prob=0", "augment.flip_prob=0",
]


@pytest.fixture(scope="module")
def views() -> ModuleType:
    """bench/dino_views.py is a script, not a package module: load it from its file."""
    spec = importlib.util.spec_from_file_location("medssl_bench_dino_views", DINO_VIEWS_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_agreement_of_identical_and_of_swapped_views(views: ModuleType) -> None:
    a = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    same = views.view_agreement(a, a)
    assert same["same"] == pytest.approx(1.0)
    assert same["top1"] == 1.0
    # Pair every volume with another one's view: its own view is never the nearest.
    swapped = views.view_agreement(a, a.roll(1, dims=0))
    assert swapped["top1"] == 0.0
    assert swapped["same"] < 0.5
    # A component shared by every volume (what a fresh ViT's output is mostly made of) is
    # centred away: it changes nothing.
    shifted = views.view_agreement(a + 10.0, a.roll(1, dims=0) - 3.0)
    assert shifted == pytest.approx(swapped, abs=1e-5)
    with pytest.raises(ValueError, match="B >= 2"):
        views.view_agreement(a[:1], a[:1])


def test_identical_views_are_retrieved_and_augmented_ones_less(
        views: ModuleType, demo: DemoPaths, tmp_path: Path) -> None:
    base = [f"csv_path={demo.classification_csv}", f"results_dir={tmp_path}", *TINY_DINO,
            "batch_size=4"]
    identical = views.measure(views.compose_config([*base, *IDENTICAL_VIEWS]))
    assert identical["global"]["same"] == pytest.approx(1.0, abs=1e-5)
    assert identical["global"]["top1"] == 1.0
    # Local views are a fraction of the volume: never the same picture.
    assert identical["local"]["same"] < 0.99
    augmented = views.measure(views.compose_config(base), n_batches=3)  # past one epoch
    assert set(augmented) == {"global", "local"}
    assert augmented["global"]["same"] < 0.99
    for values in augmented.values():
        assert 0.0 <= values["top1"] <= 1.0


def test_a_run_to_resume_is_not_a_weight_source(
        views: ModuleType, demo: DemoPaths, tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    cfg = views.compose_config([f"csv_path={demo.classification_csv}",
                                f"results_dir={tmp_path}", *TINY_DINO,
                                f"resume_training_from={ckpt}"])
    with pytest.raises(ValueError, match="resume_training_from: give pretrained weights"):
        views.measure(cfg)
