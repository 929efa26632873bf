"""bench/dino_views.py: view agreement of a backbone on DINO's views."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.data.demo import DemoPaths
from tests.conftest import TINY_DINO

DINO_VIEWS_PY = Path(__file__).resolve().parents[2] / "bench" / "dino_views.py"
# Global views cover the whole volume and nothing is augmented: the two are the same picture.
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


def test_agreement_as_numbers_with_chance(views: ModuleType) -> None:
    """The script reports the training monitor's values (tested in
    tests/models/test_monitors.py) as floats, with the chance level 1 / B."""
    a = torch.eye(4)
    got = views.view_agreement(a, a[[0, 1, 3, 2]])
    assert got == pytest.approx({"same": 1 / 3, "other": -1 / 9, "top1": 0.5,
                                 "top1_chance": 0.25})
    assert all(isinstance(v, float) for v in got.values())


def test_identical_views_are_retrieved_and_augmented_ones_less(
        views: ModuleType, demo: DemoPaths, tmp_path: Path) -> None:
    base = [f"csv_path={demo.classification_csv}", f"results_dir={tmp_path}", *TINY_DINO,
            "batch_size=4"]
    identical = views.measure(views.dino_config([*base, *IDENTICAL_VIEWS]))
    assert identical["global"]["same"] == pytest.approx(1.0, abs=1e-5)
    assert identical["global"]["top1"] == 1.0
    # Local views are a fraction of the volume: never the same picture.
    assert identical["local"]["same"] < 0.99
    # Views a run would cut on the device are cut in the loaders here: the same views.
    on_device = views.measure(views.dino_config([*base, *IDENTICAL_VIEWS,
                                                    "augment_on_device=true"]))
    for kind in ("global", "local"):
        assert on_device[kind] == pytest.approx(identical[kind], abs=1e-6)
    augmented = views.measure(views.dino_config(base), n_batches=3)  # past one epoch
    assert set(augmented) == {"global", "local"}
    assert augmented["global"]["same"] < 0.99
    for values in augmented.values():
        assert 0.0 <= values["top1"] <= 1.0


def test_a_run_to_resume_is_not_a_weight_source(
        views: ModuleType, demo: DemoPaths, tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    cfg = views.dino_config([f"csv_path={demo.classification_csv}",
                                f"results_dir={tmp_path}", *TINY_DINO,
                                f"resume_training_from={ckpt}"])
    with pytest.raises(ValueError, match="resume_training_from: give pretrained weights"):
        views.measure(cfg)


def brain_blocks(t1: Path, out: Path, size: int = 28) -> Path:
    """Non-overlapping size^3 blocks of a brain MRI with at least 20% of voxels above the
    mean head intensity, as a cohort CSV (every 10th block in val)."""
    volume = np.asarray(nib.load(t1).dataobj, dtype=np.float32)
    threshold = volume[volume > 0].mean()
    rows = ["PatientID,path,fold,label"]
    starts = [range(0, n - size + 1, size) for n in volume.shape]
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                block = volume[x:x + size, y:y + size, z:z + size]
                if (block > threshold).mean() < 0.2:
                    continue
                k = len(rows) - 1
                path = out / f"b{k:03d}.nii.gz"
                nib.save(nib.Nifti1Image(block, np.eye(4)), path)
                rows.append(f"b{k:03d},{path},{'val' if k % 10 == 9 else 'train'},{k % 2}")
    csv = out / "blocks.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_a_fresh_vit_tells_real_mri_views_apart(
        views: ModuleType, real_data: Path, tmp_path: Path) -> None:
    """The control of bench/results/dino.md: on blocks of a real brain MRI a random ViT finds
    a block's own global view far above chance (0.31 at batch 64 there), the signal DINO
    bootstraps from."""
    csv = brain_blocks(real_data / "mricron_data_debian" / "ch2.nii.gz", tmp_path)
    cfg = views.dino_config(["preset=medmnist", f"csv_path={csv}", f"results_dir={tmp_path}",
                                "batch_size=32", "cache=none", "n_workers=0"])
    result = views.measure(cfg, n_batches=2)
    assert result["global"]["top1"] > 5 / 32  # chance: 1 / 32
    assert result["global"]["same"] > result["global"]["other"] + 0.2
