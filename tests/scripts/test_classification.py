"""Classification fine-tuning end to end on the tiny demo cohort (CPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.data.demo import generate
from medssl.data.table import CohortError
from medssl.models.backbones import UNet3DEncoder, build_backbone
from medssl.models.weights import check_backbone_config, save_backbone
from medssl.run import run
from medssl.run.classification import class_shares, label_subset
from medssl.run.config import plain
from tests.conftest import REPO, TINY, compose

SCRIPT = REPO / "downstream" / "classification.py"
# Tiny demo: folds 1-2 train (4 subjects, both classes of both targets), 3-4 validate (one
# subject of each class of both targets), 0 tests (2 subjects).
TINY_CLS = [
    "train_folds=[1,2]", "resize_to=[16,32,32]", "backbone.patch_size=[4,8,8]", "n_workers=0",
    "backbone.hidden_size=32", "backbone.mlp_dim=64", "backbone.num_layers=1",
    "backbone.num_heads=2", "batch_size=2",
    "n_epochs=1", "cache=memory", "accelerator=cpu", "devices=1", "progress_bar=false",
    "val_folds=[3,4]", "test_folds=[0]", "bootstrap_resamples=50", "warmup_epochs=0",
]


def _set(cfg: DictConfig, **values: object) -> DictConfig:
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


@pytest.fixture
def cls_cfg(demo, tmp_path: Path) -> DictConfig:
    return compose("classification", [f"csv_path={demo.classification_csv}",
                                      f"results_dir={tmp_path / 'results'}", *TINY_CLS])


def _csv(demo, name: str, change) -> Path:
    df = pd.read_csv(demo.classification_csv, dtype=str, keep_default_na=False)
    change(df)
    path = demo.root / name
    df.to_csv(path, index=False)
    return path


def test_readme_commands_compose() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "dino_weights=x.pt", "train_mode=linear",
                          "label_fraction=0.1", "--cfg", "job"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert re.search(r"^train_mode: linear$", out, re.M)
    assert re.search(r"^label_fraction: 0\.1$", out, re.M)
    cfg = compose("classification", ["resize_to=[32,32,32]"])
    assert plain(cfg.backbone.img_size) == [32, 32, 32]  # the ViT grid follows resize_to


@pytest.mark.parametrize("family", ["swin_unetr", "unet3d"])
def test_every_backbone_family_builds_as_configured(family: str) -> None:
    """``backbone=<family>`` as is: the ViT-only keys the config sets are not passed on."""
    from types import SimpleNamespace

    from medssl.run.classification import TASK

    cfg = compose("classification", ["csv_path=x", f"backbone={family}",
                                     "resize_to=[32,32,32]", "class_weights=none"])
    module = TASK.build_module(cfg, SimpleNamespace(
        classes={t: ["a", "b"] for t in cfg.cls_targets},
        train_labels=lambda: {t: np.array([0, 1, 1]) for t in cfg.cls_targets}))
    assert module.backbone.config["name"] == family
    assert "img_size" not in module.backbone.config


def test_fit_then_test_writes_the_report(cls_cfg: DictConfig, demo) -> None:
    _set(cls_cfg, n_epochs=2, experiment="fit")
    trainer = run(cls_cfg)
    out = Path(cls_cfg.results_dir) / "fit"
    for tag in ("val/auc", "val/acc", "val/bacc", "val/V00COHORT/auc", "val/P02SEX/bacc",
                "train/loss", "val/loss", "train/lr"):
        assert tag in trainer.callback_metrics or tag in _scalars(out), tag
    predictions = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    csv = pd.read_csv(demo.classification_csv, dtype=str)
    test = csv[csv.fold == "0"]
    assert sorted(predictions.PatientID) == sorted(test.PatientID)
    # Each prediction names its CSV row (a patient may have several rows, e.g. two knees).
    lines = {pid: i + 2 for i, pid in enumerate(csv.PatientID)}
    name = Path(demo.classification_csv).name
    assert predictions.row.tolist() == [f"{name} line {lines[p]} (PatientID {p})"
                                        for p in predictions.PatientID]
    for target, classes in trainer.lightning_module.hparams.classes.items():
        probs = predictions[[f"{target}_prob_{c}" for c in classes]].astype(float)
        assert probs.sum(axis=1).tolist() == pytest.approx([1.0] * len(test))
        truth = dict(zip(test.PatientID, test[target], strict=True))
        assert predictions[target].tolist() == [truth[p] for p in predictions.PatientID]
        assert set(predictions[f"{target}_pred"]) <= set(classes)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["targets"]) == {"V00COHORT", "P02SEX"}
    low, high = metrics["targets"]["V00COHORT"]["auc_ci95"]
    assert low <= metrics["targets"]["V00COHORT"]["auc"] <= high
    # Both test subjects are male: no P02SEX AUC (null), but accuracy.
    assert metrics["targets"]["P02SEX"]["auc"] is None
    assert metrics["targets"]["P02SEX"]["acc"] in (0.0, 0.5, 1.0)
    assert metrics["n_subjects"] == 2 and metrics["label_fraction"] == 1.0
    assert (out / "roc_P02SEX.png").is_file() and (out / "confusion_V00COHORT.png").is_file()
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "test/roc_P02SEX" in events.Tags()["images"]
    # test/loss: torch's class-weighted cross-entropy of the written predictions, per target
    # and summed (each row once: it is computed from the gathered rows, not per batch).
    module, total = trainer.lightning_module, 0.0
    for i, target in enumerate(module.targets):
        classes = module.hparams.classes[target]
        known = predictions[target] != ""
        probs = predictions.loc[known, [f"{target}_prob_{c}" for c in classes]].astype(float)
        labels = torch.tensor([classes.index(v) for v in predictions.loc[known, target]])
        weight = getattr(module, f"class_weight_{i}")
        loss = torch.nn.functional.nll_loss(
            torch.tensor(probs.to_numpy()).log(), labels,
            weight=None if weight is None else weight.double()).item()
        assert events.Scalars(f"test/{target}/loss")[-1].value == pytest.approx(loss, rel=1e-4)
        total += loss
    assert events.Scalars("test/loss")[-1].value == pytest.approx(total, rel=1e-4)
    # The encoding travels with the checkpoint.
    best = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["hyper_parameters"]["classes"]["P02SEX"] == ["1: Male", "2: Female"]


def _scalars(out: Path) -> set[str]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def test_training_beats_chance(demo, tmp_path: Path) -> None:
    """Bone size (P02SEX) is visible at 16x32x32: held-out subjects are ranked above chance."""
    cohort = generate(tmp_path / "demo24", replace(TINY, n_subjects=24))
    cfg = compose("classification", [f"csv_path={cohort.classification_csv}",
                                     f"results_dir={tmp_path / 'results'}", *TINY_CLS])
    _set(cfg, n_epochs=8, lr=3e-3, backbone_lr_scale=1.0, aug=False, train_folds=[0, 1, 2],
         val_folds=[], test_folds=[3, 4], cls_targets=["P02SEX"], experiment="learn")
    trainer = run(cfg)
    # 10 test subjects; AUC 0.5 is chance.
    assert trainer.callback_metrics["test/auc"] > 0.8


def test_test_ckpt_evaluates_only(cls_cfg: DictConfig) -> None:
    _set(cls_cfg, experiment="train")
    run(cls_cfg)
    ckpt = Path(cls_cfg.results_dir) / "train" / "checkpoints" / "last.ckpt"
    _set(cls_cfg, experiment="evaluate", test_ckpt=str(ckpt))
    trainer = run(cls_cfg)
    out = Path(cls_cfg.results_dir) / "evaluate"
    assert trainer.global_step == 0 and not (out / "checkpoints").exists()
    assert len(pd.read_csv(out / "predictions.csv")) == 2
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(ckpt)
    # Side by side: `medssl-compare RUN_DIR ...`.
    table = subprocess.run([sys.executable, "-m", "medssl.run.compare",
                            str(out.parent / "train"), str(out)], capture_output=True,
                           text=True, check=True, cwd=REPO).stdout.splitlines()
    trained = json.loads((out.parent / "train" / "metrics.json").read_text())
    assert table[0].split()[:4] == ["run", "AUC", "BACC", "ACC"]
    assert table[1].split()[0] == "train" and table[1].split()[3] == \
        f"{trained['mean']['acc']:.3f}"
    assert table[2].startswith("evaluate ")
    # The heads read the pooling they were trained on: another one is refused, not run.
    _set(cls_cfg, experiment="other_pooling", pooling="cls")
    with pytest.raises(ValueError, match="trained with pooling=mean, but pooling=cls"):
        run(cls_cfg)
    # Likewise the feature standardisation before the heads.
    _set(cls_cfg, experiment="other_norm", pooling="mean", feature_norm=False)
    with pytest.raises(ValueError, match="trained with feature_norm=True, but feature_norm=False"):
        run(cls_cfg)


def test_feature_norm_standardises_what_the_heads_read(cls_cfg: DictConfig) -> None:
    from medssl.run.classification import TASK

    _set(cls_cfg, feature_norm=True)
    data = TASK.build_data(cls_cfg)
    data.setup("fit")
    module = TASK.build_module(cls_cfg, data).train()
    image = torch.rand(4, 1, *cls_cfg.resize_to) * 3 + 5  # any scale and offset
    feats = module.feature_norm(module.features(image, None))
    torch.testing.assert_close(feats.mean(0), torch.zeros(feats.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.var(0, unbiased=False), torch.ones(feats.shape[1]),
                               atol=1e-2, rtol=0)
    assert not list(module.feature_norm.parameters())  # nothing to learn, no lr to tune
    _set(cls_cfg, feature_norm=False)
    assert isinstance(TASK.build_module(cls_cfg, data).feature_norm, torch.nn.Identity)


def test_weight_sources_exclude_each_other(cls_cfg: DictConfig, tmp_path: Path) -> None:
    _set(cls_cfg, dino_weights=str(tmp_path / "a.pt"), test_ckpt=str(tmp_path / "b.ckpt"))
    with pytest.raises(ValueError, match="at most one weight source.*dino_weights, test_ckpt"):
        run(cls_cfg)


def test_dino_and_mae_files_load_the_whole_encoder(cls_cfg: DictConfig, tmp_path: Path,
                                                           caplog) -> None:
    teacher = build_backbone(**plain(cls_cfg.backbone))
    student = build_backbone(**plain(cls_cfg.backbone))
    save_backbone(tmp_path / "backbone.pt", teacher)
    n = len(teacher.state_dict())
    _set(cls_cfg, dino_weights=str(tmp_path / "backbone.pt"), experiment="export", lr=1e-12,
         min_lr=0.0, trainer={"fast_dev_run": 1})
    with caplog.at_level("INFO"):
        trainer = run(cls_cfg)
    assert f"dino_weights: loaded {n}/{n} keys" in caplog.text
    assert "missing: []; unexpected: []; shape mismatches: []" in caplog.text
    assert "is an export of" not in caplog.text  # no method recorded: nothing to say
    loaded = trainer.lightning_module.backbone.state_dict()
    assert all(torch.allclose(v, loaded[k], atol=1e-6) for k, v in teacher.state_dict().items())
    # An MAE run's export given as dino_weights: loaded, with a warning naming both.
    save_backbone(tmp_path / "mae_export.pt", teacher, {"method": "mae"})
    _set(cls_cfg, dino_weights=str(tmp_path / "mae_export.pt"), experiment="mislabelled")
    caplog.clear()
    with caplog.at_level("INFO"):
        run(cls_cfg)
    assert (f"dino_weights={tmp_path / 'mae_export.pt'} is an export of a mae run, not of dino"
            in caplog.text) and f"dino_weights: loaded {n}/{n} keys" in caplog.text
    # A DINO Lightning checkpoint: the teacher is picked, not the student.
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {
        **{f"student_backbone.{k}": v for k, v in student.state_dict().items()},
        **{f"teacher_backbone.{k}": v for k, v in teacher.state_dict().items()}},
        "hyper_parameters": {"backbone_config": teacher.config}}, tmp_path / "dino.ckpt")
    _set(cls_cfg, dino_weights=str(tmp_path / "dino.ckpt"), experiment="ckpt")
    loaded = run(cls_cfg).lightning_module.backbone.state_dict()
    assert all(torch.allclose(v, loaded[k], atol=1e-6) for k, v in teacher.state_dict().items())
    # An MAE Lightning checkpoint: the encoder is picked, the decoder left out.
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {
        **{f"encoder.{k}": v for k, v in student.state_dict().items()},
        "decoder.proj.weight": torch.zeros(4, 32)},
        "hyper_parameters": {"backbone_config": student.config}}, tmp_path / "mae.ckpt")
    _set(cls_cfg, dino_weights=None, mae_weights=str(tmp_path / "mae.ckpt"), experiment="mae")
    loaded = run(cls_cfg).lightning_module.backbone.state_dict()
    assert all(torch.allclose(v, loaded[k], atol=1e-6) for k, v in student.state_dict().items())


def test_suprem_file_loads_the_unet3d_encoder(cls_cfg: DictConfig, tmp_path: Path,
                                              caplog) -> None:
    source = UNet3DEncoder()
    torch.save({"net": {f"module.backbone.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "suprem.pth")
    _set(cls_cfg, suprem_weights=str(tmp_path / "suprem.pth"), experiment="suprem",
         trainer={"fast_dev_run": 1}, lr=1e-12, min_lr=0.0,
         backbone={"name": "unet3d", "spatial_dims": 3, "in_channels": 1, "act": "relu"})
    with caplog.at_level("INFO"):
        trainer = run(cls_cfg)
    n = len(source.state_dict())
    assert f"suprem_weights: loaded {n}/{n} keys" in caplog.text
    conv = "down_tr64.ops.0.conv1.weight"
    assert torch.allclose(trainer.lightning_module.backbone.state_dict()[conv],
                          source.state_dict()[conv], atol=1e-6)


def test_wrong_weight_files_fail_clearly(cls_cfg: DictConfig, tmp_path: Path) -> None:
    torch.save({"net": {"something.else": torch.zeros(3)}}, tmp_path / "other.pth")
    _set(cls_cfg, mae_weights=str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="no checkpoint key matched the model"):
        run(cls_cfg)
    other = dict(plain(cls_cfg.backbone), patch_size=[8, 8, 8], hidden_size=64)
    save_backbone(tmp_path / "vit8.pt", build_backbone(**other))
    _set(cls_cfg, mae_weights=None, dino_weights=str(tmp_path / "vit8.pt"))
    with pytest.raises(ValueError, match=r"backbone.hidden_size: 64 in the file, 32 configured; "
                       r"backbone.patch_size: \[8, 8, 8\] in the file, \[4, 8, 8\] configured"):
        run(cls_cfg)
    # An empty file, before any volume is read (the demo CSV points at no cache yet).
    (tmp_path / "empty.pt").touch()
    _set(cls_cfg, dino_weights=str(tmp_path / "empty.pt"), csv_path=str(tmp_path / "none.csv"))
    with pytest.raises(ValueError, match=r"empty.pt is not a readable PyTorch checkpoint \(it "
                       r"is empty"):
        run(cls_cfg)


def test_resume_from_another_scripts_checkpoint_says_so(cls_cfg: DictConfig,
                                                         tmp_path: Path) -> None:
    """A DINO or segmentation checkpoint has no class encoding: say that, not a hint about
    pooling or feature_norm."""
    other = tmp_path / "dino.ckpt"
    torch.save({"state_dict": {"teacher_backbone.w": torch.zeros(1)}, "global_step": 3,
                "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {"backbone_config": plain(cls_cfg.backbone)}}, other)
    _set(cls_cfg, resume_training_from=str(other))
    with pytest.raises(ValueError, match=r"dino.ckpt is not a classification checkpoint of "
                       r"ours \(no class encoding.*use dino_weights="):
        run(cls_cfg)


def test_unseen_category_names_the_row(cls_cfg: DictConfig, demo) -> None:
    def change(df: pd.DataFrame) -> None:
        df.loc[df.PatientID == "DEMO004", "V00COHORT"] = "2: Incidence"

    _set(cls_cfg, csv_path=str(_csv(demo, "unseen.csv", change)), val_folds=[4],
         test_folds=[3])
    with pytest.raises(CohortError, match=r"unseen.csv line 5 \(PatientID DEMO004\): "
                       r"V00COHORT='2: Incidence' in the test folds was never seen in the "
                       r"training rows \(categories \['1: Progression', '3: Non-exposed"):
        run(cls_cfg)


def test_one_class_written_two_ways_is_an_error(cls_cfg: DictConfig, demo) -> None:
    first = {}

    def change(df: pd.DataFrame) -> None:  # the first training row's class, in lower case
        i = df.index[df.fold.isin(["1", "2"])][0]
        first.update(line=i + 2, pid=df.PatientID[i], value=df.P02SEX[i])
        df.loc[i, "P02SEX"] = df.P02SEX[i].lower()

    _set(cls_cfg, csv_path=str(_csv(demo, "spelling.csv", change)))
    with pytest.raises(CohortError) as err:
        run(cls_cfg)
    assert (f"{first['value'].lower()!r} (spelling.csv line {first['line']} (PatientID "
            f"{first['pid']}))") in str(err.value)
    assert f"{first['value']!r} (spelling.csv line" in str(err.value)
    assert "are one class written differently" in str(err.value)


def test_training_classes_and_counts_are_logged(cls_cfg: DictConfig, demo, caplog) -> None:
    _set(cls_cfg, n_epochs=1, experiment="counts", test_folds=[])
    with caplog.at_level("INFO"):
        run(cls_cfg)
    df = pd.read_csv(demo.classification_csv, dtype=str)
    train = df[df.fold.astype(int).isin(plain(cls_cfg.train_folds))]
    counts = train.P02SEX.value_counts()
    expected = ", ".join(f"{c!r} ({counts[c]})" for c in sorted(counts.index))
    assert f"P02SEX: {len(counts)} classes from the training rows: {expected}" in caplog.text


def test_empty_targets_train_the_other_target(cls_cfg: DictConfig, demo, caplog) -> None:
    def change(df: pd.DataFrame) -> None:
        df.loc[df.PatientID.isin(["DEMO001", "DEMO003"]), "P02SEX"] = ""
        df.loc[df.PatientID == "DEMO006", "V00COHORT"] = ""  # a test subject

    _set(cls_cfg, csv_path=str(_csv(demo, "partial.csv", change)), experiment="partial")
    with caplog.at_level("INFO"):
        trainer = run(cls_cfg)
    assert "P02SEX: 1 of 4 training rows have no value" in caplog.text  # DEMO003
    assert trainer.global_step == 2  # all 4 training rows train: 2 batches of 2
    predictions = pd.read_csv(Path(cls_cfg.results_dir) / "partial" / "predictions.csv",
                              dtype=str, keep_default_na=False)
    assert predictions.set_index("PatientID").loc["DEMO006", "V00COHORT"] == ""


def test_label_fraction_keeps_class_proportions() -> None:
    rows = [{"row": str(i), "y": "a" if i % 4 else "b"} for i in range(400)]  # 25% "b"
    subsets = [label_subset(rows, 0.1, "y", seed) for seed in (0, 1)]
    for subset in subsets:
        assert len(subset) == 40 and Counter(r["y"] for r in subset) == {"a": 30, "b": 10}
        assert [int(r["row"]) for r in subset] == sorted(int(r["row"]) for r in subset)
    assert subsets[0] != subsets[1]
    assert label_subset(rows, 0.1, "y", 0) == subsets[0]
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(rows, 0.0, "y", 0)


def test_label_fraction_is_recorded(cls_cfg: DictConfig) -> None:
    _set(cls_cfg, label_fraction=0.5, experiment="fraction", cls_targets=["V00COHORT"])
    trainer = run(cls_cfg)
    out = Path(cls_cfg.results_dir) / "fraction"
    rows = pd.read_csv(out / "train_rows.csv")
    assert len(rows) == 2 and trainer.global_step == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_fraction"] == 0.5 and metrics["n_train_rows"] == 2
    truth = pd.read_csv(cls_cfg.csv_path).set_index("PatientID")["V00COHORT"]
    assert sorted(truth[rows.PatientID]) == ["1: Progression", "3: Non-exposed control group"]


def test_linear_mode_keeps_the_backbone(cls_cfg: DictConfig, tmp_path: Path) -> None:
    backbone = build_backbone(**plain(cls_cfg.backbone))
    save_backbone(tmp_path / "backbone.pt", backbone)
    _set(cls_cfg, dino_weights=str(tmp_path / "backbone.pt"), train_mode="linear", n_epochs=2,
         experiment="linear")
    trainer = run(cls_cfg)
    trained = trainer.lightning_module.backbone.state_dict()
    assert all(torch.allclose(v, trained[k], atol=1e-6)
               for k, v in backbone.state_dict().items())
    assert trainer.callback_metrics["test/auc"] >= 0


def test_resume_from_last_checkpoint(cls_cfg: DictConfig) -> None:
    _set(cls_cfg, experiment="resume", n_epochs=1)
    run(cls_cfg)
    last = Path(cls_cfg.results_dir) / "resume" / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["epoch"] == 0 and first["global_step"] == 2
    _set(cls_cfg, n_epochs=2)
    trainer = run(cls_cfg)  # the same command, one more epoch: resumes from last.ckpt
    assert trainer.global_step == 4 and trainer.current_epoch == 2
    second = torch.load(last, weights_only=True)
    assert second["epoch"] == 1
    assert any(not torch.equal(v, second["state_dict"][k])
               for k, v in first["state_dict"].items())


def test_resume_with_other_classes_fails(cls_cfg: DictConfig) -> None:
    _set(cls_cfg, experiment="classes", cls_targets=["P02SEX"])
    run(cls_cfg)
    _set(cls_cfg, cls_targets=["V00COHORT"], n_epochs=2)
    with pytest.raises(ValueError, match="was trained with classes"):
        run(cls_cfg)


def test_debug_fast_dev_run(cls_cfg: DictConfig) -> None:
    _set(cls_cfg, experiment="fdr", trainer={"fast_dev_run": 1})
    trainer = run(cls_cfg)
    assert trainer.global_step == 1


def _fake_medmnist(path: Path) -> None:
    """A MedMNIST-3D-like file: 28^3 uint8 masks, label 1 = a small sphere, 0 = a large one."""
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(28)] * 3, indexing="ij"))
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        images = np.zeros((n, 28, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            centre = 14 + rng.normal(0, 1.5, 3)[:, None, None, None]
            radius = (6 if label else 9) + rng.uniform(-1, 1)
            images[i][((grid - centre) ** 2).sum(0) < radius**2] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)


def test_medmnist_benchmark_quick(tmp_path: Path) -> None:
    pytest.importorskip("medssl.data.medmnist", reason="needs medssl-from-medmnist (dinom)")
    _fake_medmnist(tmp_path / "fake3d.npz")
    tiny = ["backbone.hidden_size=32", "backbone.mlp_dim=64", "backbone.num_layers=1",
            "backbone.num_heads=2", "batch_size=4", "accelerator=cpu", "devices=1"]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "medmnist.py"), "--quick", "--npz",
         str(tmp_path / "fake3d.npz"), "--out", str(tmp_path / "bench"), "--fractions", "0.5",
         "--set", *tiny, "--dino-set", "out_dim=64", "hidden_dim=32", "bottleneck_dim=16",
         "n_crops=4", "knn_k=3"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "bench" / "runs.json").read_text())["runs"]
    assert sorted(r["arm"] for r in runs) == ["dino-finetune", "dino-linear", "scratch"]
    assert all(0 <= r["auc"] <= 1 and r["seconds"] > 0 for r in runs)
    for r in runs:  # half of the 16 training rows, stratified
        folder = tmp_path / "bench" / "runs" / f"{r['arm']}_f0.5_s0"
        assert len(pd.read_csv(folder / "train_rows.csv")) == 8
        # Quick mode's 3 epochs; the linear probe keeps its steps at half the rows: 6 epochs.
        epochs = OmegaConf.load(folder / "config.yaml").n_epochs
        assert epochs == (6 if r["arm"] == "dino-linear" else 3)
    summary = (tmp_path / "bench" / "summary.md").read_text()
    assert summary.count("| 0.5 |") == 3 and "quick mode" in summary


def test_backbone_settings_without_parameters_may_differ(caplog) -> None:
    vit = {"name": "vit", "img_size": [16, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32,
           "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "dropout_rate": 0.0}
    with caplog.at_level("INFO"):
        check_backbone_config("export.pt", dict(vit, dropout_rate=0.1), vit)
    assert "backbone.dropout_rate: 0.1 in the file, 0.0 configured" in caplog.text
    with pytest.raises(ValueError, match=r"backbone.img_size: \[16, 16, 16\] in the file"):
        check_backbone_config("export.pt", dict(vit, img_size=[16, 16, 16]), vit)
    # Same parameters, other computation: refused (a file without the key had none).
    with pytest.raises(ValueError, match="trained with backbone.input_norm=none, but this "
                                         "network has backbone.input_norm=instance"):
        check_backbone_config("export.pt", vit, dict(vit, input_norm="instance"))
    # Another backbone altogether: named as such (not every ViT key against None), and the
    # advice picks the config group, not backbone.name=.
    with pytest.raises(ValueError, match=r"other settings: a vit backbone in the file, unet3d "
                                         r"configured\. .*e.g. `backbone=vit backbone\."):
        check_backbone_config("export.pt", vit, {"name": "unet3d", "spatial_dims": 3})


def test_patience_stops_early(cls_cfg: DictConfig) -> None:
    # No learning (lr ~ 0): the validation AUC never improves after the first epoch.
    _set(cls_cfg, n_epochs=6, patience=2, lr=1e-12, min_lr=0.0, experiment="patience",
         test_folds=[])
    trainer = run(cls_cfg)
    assert trainer.current_epoch == 3 and trainer.global_step == 6


def test_ddp_on_two_cpu_processes(demo, tmp_path: Path) -> None:
    """Lightning DDP (gloo): predictions gathered from both ranks once each, head-only first
    epoch included."""
    tiny = [o for o in TINY_CLS if not o.startswith(("devices=", "val_folds=", "test_folds="))]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny, "devices=2", "n_epochs=2", "val_folds=[4]",
         "test_folds=[0,3]", "freeze_backbone_epochs=1", f"results_dir={tmp_path}",
         f"csv_path={demo.classification_csv}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 4 training rows over 2 ranks: 2 each, batch 2 -> 1 step per epoch on every rank.
    checkpoint = torch.load(tmp_path / "cls_demo" / "checkpoints" / "last.ckpt",
                            weights_only=True)
    assert checkpoint["global_step"] == 2
    predictions = pd.read_csv(tmp_path / "cls_demo" / "predictions.csv")
    # 3 test rows, padded to 4 by the distributed sampler: each subject once in the report.
    assert sorted(predictions.PatientID) == ["DEMO001", "DEMO004", "DEMO006"]


def test_class_shares_are_add_one_smoothed() -> None:
    labels = {"t": np.array([0, 0, 0, 1, -1, 0])}  # -1: no value, not counted
    shares = class_shares(labels, {"t": ["a", "b", "c"]})["t"]
    assert shares == pytest.approx([5 / 8, 2 / 8, 1 / 8])


def test_precise_bn_in_finetune_mode_only(cls_cfg: DictConfig) -> None:
    from medssl.models.batchnorm import PreciseBatchNorm
    from medssl.run.classification import TASK

    def precise(**values: object) -> list:
        return [c for c in TASK.callbacks(_set(cls_cfg, **values), None)
                if isinstance(c, PreciseBatchNorm)]

    assert [c.max_batches for c in precise(train_mode="finetune", precise_bn_batches=7)] == [7]
    assert precise(train_mode="linear", precise_bn_batches=7) == []
    assert precise(train_mode="finetune", precise_bn_batches=0) == []
    with pytest.raises(ValueError, match="precise_bn_batches must be >= 0"):
        precise(train_mode="linear", precise_bn_batches=-1)


def test_backbone_lr_scale_follows_the_weight_source(cls_cfg: DictConfig, tmp_path: Path) -> None:
    """null: the pretrained factor with dino/mae/suprem weights, 1 from scratch, the stored
    value when resuming; a configured value always wins."""
    from types import SimpleNamespace

    from medssl.run.classification import PRETRAINED_BACKBONE_LR_SCALE, TASK, backbone_lr_scale
    from medssl.run.harness import WeightSource

    targets = cls_cfg.cls_targets
    data = SimpleNamespace(classes={t: ["a", "b"] for t in targets},
                           train_labels=lambda: {t: np.array([0, 1, 1]) for t in targets})

    def scale(**values: object) -> float:
        return TASK.build_module(_set(cls_cfg, **values), data).hparams.backbone_lr_scale

    assert compose("classification", []).backbone_lr_scale is None  # the shipped default
    assert scale(backbone_lr_scale=None) == 1.0
    save_backbone(tmp_path / "backbone.pt", build_backbone(**plain(cls_cfg.backbone)))
    assert scale(dino_weights=str(tmp_path / "backbone.pt")) == PRETRAINED_BACKBONE_LR_SCALE
    assert scale(dino_weights=None, suprem_weights=str(tmp_path / "backbone.pt")) == 0.03
    assert scale(backbone_lr_scale=0.5) == 0.5
    resumed = WeightSource("resume_training_from", tmp_path / "last.ckpt")
    assert backbone_lr_scale(None, resumed, {"backbone_lr_scale": 0.03}) == 0.03
    assert backbone_lr_scale(None, resumed, {}) == 1.0
    with pytest.raises(ValueError, match="backbone_lr_scale, grad_clip >= 0, got 0.001, "
                       r"1e-06, -1.0"):
        scale(backbone_lr_scale=-1.0)
