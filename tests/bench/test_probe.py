"""bench/probe.py: frozen-feature k-NN and linear probes on a tiny generated cohort."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medssl.models.backbones import build_backbone

PROBE_PY = Path(__file__).resolve().parents[2] / "bench" / "probe.py"
TINY_VIT = dict(name="vit", img_size=[16, 16, 16], patch_size=[8, 8, 8], hidden_size=32,
                mlp_dim=64, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    """bench/probe.py is a script, not a package module: load it from its file."""
    spec = importlib.util.spec_from_file_location("medssl_bench_probe", PROBE_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 volumes (12^3 stored, noise) with integer folds 0/1/2 (24/8/8); class 1 has a
    bright cube in one corner, class 0 in the opposite corner."""
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    lines = ["PatientID,path,fold,label"]
    for i in range(40):
        label = i % 2
        x = rng.normal(0.0, 1.0, (12, 12, 12)).astype(np.float32)
        corner = np.s_[1:5, 1:5, 1:5] if label else np.s_[7:11, 7:11, 7:11]
        x[corner] += 4.0
        nib.save(nib.Nifti1Image(x, np.eye(4)), root / f"s{i:02d}.nii.gz")
        fold = 0 if i < 24 else 1 if i < 32 else 2
        lines.append(f"S{i:02d},s{i:02d}.nii.gz,{fold},{'yes' if label else 'no'}")
    (root / "cohort.csv").write_text("\n".join(lines) + "\n")
    return root / "cohort.csv"


FOLDS = {"train": [0], "val": [1], "test": [2]}


def test_load_splits_keeps_labels_with_their_volumes(probe: ModuleType, cohort: Path) -> None:
    splits, categories = probe.load_splits(cohort, "label", [16, 16, 16], FOLDS)
    assert categories == ["no", "yes"]
    assert {n: len(s.labels) for n, s in splits.items()} == {"train": 24, "val": 8, "test": 8}
    for split in splits.values():
        assert split.images.shape[1:] == (1, 16, 16, 16)
        assert split.images.dtype == torch.float32
        # The bright cube is near the origin for "yes" (class 1): the preprocessed image, not
        # the CSV order, decides which corner is brighter.
        low = split.images[:, 0, :8, :8, :8].mean((1, 2, 3))
        high = split.images[:, 0, 8:, 8:, 8:].mean((1, 2, 3))
        np.testing.assert_array_equal((low > high).numpy().astype(int), split.labels)


def test_cli_raw_and_random_vit(probe: ModuleType, cohort: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "probe.json"
    config = json.dumps({k: v for k, v in TINY_VIT.items() if k != "img_size"})
    assert probe.main([str(cohort), "--resize-to", "16", "16", "16", "--train-folds", "0",
                       "--val-folds", "1", "--test-folds", "2", "--raw", "--random-init",
                       config, "--seeds", "0", "1", "--vit-features", "cls", "mean",
                       "--k", "5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["source"], r["features"], r["seed"]) for r in rows] == [
        ("raw voxels", "voxels", None), ("random vit", "cls", 0), ("random vit", "mean", 0),
        ("random vit", "cls", 1), ("random vit", "mean", 1)]
    assert rows[0]["dim"] == 16**3 and rows[1]["dim"] == 32
    # The corners separate the classes in voxel space: both raw probes must see it.
    assert rows[0]["knn"]["auc"] == 1.0 and rows[0]["linear"]["auc"] == 1.0
    for r in rows:
        assert set(r["knn"]) == {"auc", "accuracy", "balanced_accuracy"}
        assert {"auc", "accuracy", "balanced_accuracy", "C", "val_auc"} <= set(r["linear"])
    assert "| raw voxels | voxels |" in capsys.readouterr().out


def test_linear_probe_span_trick_equals_plain_logistic_regression(probe: ModuleType) -> None:
    """More features than samples: the probe solves in the training span; the reference fits
    scikit-learn on the full standardised features."""
    rng = np.random.default_rng(1)
    w = np.zeros(300)
    w[:10] = 1.0  # a few informative features among many
    x = {n: rng.normal(size=(m, 300)) for n, m in (("train", 60), ("val", 40), ("test", 50))}
    y = {n: (a @ w + 2 * rng.normal(size=len(a)) > 0).astype(int) for n, a in x.items()}
    got, _ = probe.linear_probe((x["train"], y["train"]), (x["val"], y["val"]),
                                (x["test"], y["test"]), 2, cs=[0.001, 0.1])
    scaler = StandardScaler().fit(x["train"])
    best = max(((roc_auc_score(y["val"], m.predict_proba(scaler.transform(x["val"]))[:, 1]),
                 c, m) for c in (0.001, 0.1) for m in [LogisticRegression(
                     C=c, max_iter=5000, tol=1e-8).fit(scaler.transform(x["train"]),
                                                       y["train"])]),
               key=lambda t: t[0])
    expected = roc_auc_score(y["test"], best[2].predict_proba(scaler.transform(x["test"]))[:, 1])
    assert 0.6 < expected < 1.0  # the task is learnable but not trivial
    assert got["C"] == best[1]
    assert got["val_auc"] == pytest.approx(best[0], abs=1e-3)
    assert got["auc"] == pytest.approx(expected, abs=1e-3)


def test_linear_probe_multiclass_selects_on_balanced_accuracy(probe: ModuleType) -> None:
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 8)) * 3
    data = {}
    for n, m in (("train", 90), ("val", 30), ("test", 30)):
        y = np.arange(m) % 3
        data[n] = (centres[y] + rng.normal(size=(m, 8)), y)
    got, _ = probe.linear_probe(data["train"], data["val"], data["test"], 3)
    assert "val_balanced_accuracy" in got and got["balanced_accuracy"] > 0.8
    assert got["auc"] > 0.9  # one-vs-rest macro AUC


def test_embed_features(probe: ModuleType) -> None:
    torch.manual_seed(0)
    vit = build_backbone(**TINY_VIT)
    vit.blocks[0].mlp.drop1 = torch.nn.Dropout(0.5)  # eval mode must switch it off
    x = torch.rand(5, 1, 16, 16, 16)
    cls = probe.embed(vit, x, "cls", batch_size=2)
    mean = probe.embed(vit, x, "mean", batch_size=3)
    both = probe.embed(vit, x, "both")
    with torch.no_grad():
        tokens = vit.eval().forward_tokens(x)
    assert torch.allclose(cls, tokens[:, 0], atol=1e-5)
    assert torch.allclose(mean, tokens[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(both, torch.cat([cls, mean], 1), atol=1e-5)


def test_embed_mean_needs_a_vit(probe: ModuleType) -> None:
    unet = build_backbone(name="unet3d")
    with pytest.raises(ValueError, match="needs a ViT"):
        probe.embed(unet, torch.rand(1, 1, 8, 8, 8), "mean")


@pytest.mark.parametrize(
    "text",
    [pytest.param("{name: vit, hidden_size: 32}", id="inline-yaml"),
     pytest.param('{"name": "vit", "hidden_size": 32}', id="inline-json")],
)
def test_parse_backbone_config(probe: ModuleType, text: str) -> None:
    assert probe.parse_backbone_config(text) == {"name": "vit", "hidden_size": 32}


def test_parse_backbone_config_file_and_error(probe: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "vit.yaml"
    path.write_text("name: vit\npatch_size: [8, 8, 8]\n")
    assert probe.parse_backbone_config(str(path))["patch_size"] == [8, 8, 8]
    with pytest.raises(ValueError, match="backbone 'name'"):
        probe.parse_backbone_config("{hidden_size: 32}")


def test_shape_descriptors_of_boxes(probe: ModuleType) -> None:
    """A solid a x b x c box: every descriptor has a closed form. The coordinate variance of
    n consecutive integers is (n^2 - 1)/12, and a box's axes are its principal axes."""
    images = torch.zeros(2, 1, 16, 16, 16)
    images[0, 0, 4:12, 5:11, 6:10] = 1.0  # 8 x 6 x 4, centred: its own mirror image
    images[1, 0, 0:6, 5:11, 6:10] = 1.0  # 6 x 6 x 4 against the low x border
    d = probe.shape_descriptors(images).numpy()
    assert d.shape == (2, len(probe.SHAPE_DESCRIPTORS))
    col = {name: d[:, i] for i, name in enumerate(probe.SHAPE_DESCRIPTORS)}
    np.testing.assert_allclose(col["log_volume"], np.log([8 * 6 * 4, 6 * 6 * 4]))
    var = [[(n * n - 1) / 12 for n in (8, 6, 4)], [(n * n - 1) / 12 for n in (6, 6, 4)]]
    np.testing.assert_allclose(d[:, 1:4], [sorted(v, reverse=True) for v in var], rtol=1e-6)
    np.testing.assert_allclose(col["elongation"], [var[0][0] / var[0][2], var[1][0] / var[1][2]])
    np.testing.assert_allclose(col["flatness"], [var[0][1] / var[0][2], var[1][1] / var[1][2]])
    np.testing.assert_array_equal(d[:, 6:9], [[8, 6, 4], [6, 6, 4]])
    # The centred box is symmetric; the border box (x 0..5) and its mirror (x 10..15) do
    # not overlap, so every voxel of both differs: 2 x its volume.
    np.testing.assert_allclose(d[:, 9:12], [[0, 0, 0], [2, 0, 0]])
    # Surface voxels: the box minus its interior (a-2)(b-2)(c-2); the array border is outside.
    surface = [8 * 6 * 4 - 6 * 4 * 2, 6 * 6 * 4 - 4 * 4 * 2]
    np.testing.assert_allclose(col["surface_ratio"],
                               [surface[0] / 192 ** (2 / 3), surface[1] / 144 ** (2 / 3)])
    with pytest.raises(ValueError, match="mask 0 has 0 voxels > 0.5"):
        probe.shape_descriptors(torch.zeros(1, 1, 8, 8, 8))


def test_label_fraction_probes_the_classification_scripts_subsets(
        probe: ModuleType, cohort: Path, tmp_path: Path) -> None:
    """--label-fraction fits on the rows that ``label_fraction``/``seed`` train the
    classifier on (``label_subset`` over the CSV's training rows), val and test stay whole."""
    import csv

    from medssl.run.classification import label_subset

    splits, _ = probe.load_splits(cohort, "label", [16, 16, 16], FOLDS)
    rows = [r for r in csv.DictReader(cohort.open()) if r["fold"] == "0"]
    for fraction, seed, keep in probe.training_subsets(splits["train"].labels, 0.5, [0, 1]):
        expected = {r["PatientID"] for r in label_subset(rows, 0.5, "label", seed)}
        assert {rows[i]["PatientID"] for i in keep} == expected and fraction == 0.5
    out = tmp_path / "probe.json"
    assert probe.main([str(cohort), "--resize-to", "16", "16", "16", "--train-folds", "0",
                       "--val-folds", "1", "--test-folds", "2", "--raw", "--shape",
                       "--label-fraction", "0.5", "--subset-seeds", "0", "1", "--k", "5",
                       "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["source"], r["label_fraction"], r["subset_seed"]) for r in results] == [
        ("raw voxels", 0.5, 0), ("raw voxels", 0.5, 1), ("shape", 0.5, 0), ("shape", 0.5, 1)]
    assert all(r["knn"]["auc"] == 1.0 for r in results[:2])  # 12 volumes still separate
