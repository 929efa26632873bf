"""Segmentation fine-tuning end to end on the tiny demo cohort (CPU), and on real scans."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.data.demo import DemoPaths
from medssl.data.io import load_volume
from medssl.data.table import CohortError
from medssl.models.backbones import build_backbone
from medssl.models.segmentation import to_labels
from medssl.models.weights import save_backbone
from medssl.run import run
from medssl.run.harness import WeightSource
from medssl.run.segmentation import TASK, labelled_subset
from tests.conftest import REPO, compose

SCRIPT = REPO / "downstream" / "segmentation.py"
TINY_VIT = ["backbone.patch_size=[4,8,8]", "backbone.hidden_size=32", "backbone.mlp_dim=64",
            "backbone.num_layers=2", "backbone.num_heads=2", "backbone.img_size=[16,32,32]",
            "+decoder.feature_size=8"]
# Patches of an eighth of a volume (16x32x32 RAS); validation and test slide over whole volumes
# (no overlap: 8 windows, one forward pass; blending is tested in tests/models).
TINY_SEG = [*TINY_VIT, "patch_size=[8,16,16]", "batch_size=2", "num_samples=2", "n_epochs=1",
            "cache=memory", "accelerator=cpu", "devices=1", "progress_bar=false", "n_workers=0",
            "n_overlay_slices=2", "lr=1e-2", "sw_overlap=0", "sw_batch_size=8"]
# 2D: slices along the tiny demo's stored axis 2 are 32x32 (16 per volume); 2D tiny ViT.
TINY_2D = [*TINY_VIT, "n_workers=0", "spatial_dims=2", "backbone.patch_size=[4,4]",
           "backbone.img_size=[16,16]",
           "patch_size=[16,16]", "slice_axis=2", "batch_size=4", "num_samples=1", "n_epochs=1",
           "cache=memory", "accelerator=cpu", "devices=1", "progress_bar=false", "lr=1e-2",
           "sw_overlap=0", "sw_batch_size=64", "hd95=false"]


def _set(cfg: DictConfig, **values: object) -> DictConfig:
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


@pytest.fixture
def seg_cfg(demo: DemoPaths, tmp_path: Path) -> DictConfig:
    """The segmentation config on the tiny demo cohort: tiny ViT + UNETR, CPU."""
    return compose("segmentation", [f"csv_path={demo.segmentation_csv}",
                                    f"results_dir={tmp_path / 'results'}", *TINY_SEG])


@pytest.fixture(scope="module")
def trained(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of one tiny training epoch (no validation or test), shared by the tests of
    test and predict mode."""
    results = tmp_path_factory.mktemp("trained")
    run(compose("segmentation", [f"csv_path={demo.segmentation_csv}", f"results_dir={results}",
                                 *TINY_SEG, "val_folds=[]", "test_folds=[]",
                                 "experiment=train"]))
    return results / "train" / "checkpoints" / "last.ckpt"


def _scalars(folder: Path, tag: str) -> list[float]:
    values = []
    for path in sorted((folder / "tensorboard").glob("events*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values += [e.value for e in events.Scalars(tag)]
    return values


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ----- config ---------------------------------------------------------------------------------
def test_readme_commands_compose() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "dino_weights=results/dino_demo/backbone.pt",
                          "--cfg", "job"], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert re.search(r"^dino_weights: results/dino_demo/backbone.pt$", out, re.M)
    cfg = compose("segmentation", ["csv_path=x", "spatial_dims=2", "patch_size=[64,64]"])
    assert cfg.backbone.spatial_dims == 2 and list(cfg.backbone.img_size) == [64, 64]
    default = compose("segmentation", ["csv_path=x"])
    dino = compose("dino", ["csv_path=x"])
    # The default encoder is the DINO demo's, so its export loads key for key.
    assert OmegaConf.to_container(default.backbone, resolve=True) == \
        OmegaConf.to_container(dino.backbone, resolve=True)


@pytest.mark.parametrize("family", ["vit", "swin_unetr", "unet3d"])
def test_every_backbone_family_composes_and_builds(family: str) -> None:
    cfg = compose("segmentation", ["csv_path=x", f"backbone={family}",
                                   f"patch_size={PATCHES[family]}"])
    assert cfg.lr == 1e-3  # the segmentation recipe, not a pre-training one
    module = TASK.build_module(cfg, None)
    assert module.network.encoder.name == family


def test_channels_last_keeps_values_and_trains(seg_cfg: DictConfig,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from medssl.run.harness import to_channels_last

    cfg = compose("segmentation", ["csv_path=x", "backbone=unet3d",
                                   f"patch_size={PATCHES['unet3d']}"])
    module = TASK.build_module(cfg, None).eval()
    x = torch.randn(1, 1, *PATCHES["unet3d"])
    with torch.no_grad():
        before = module.network(x)
    keys = list(module.state_dict())
    n = to_channels_last(module)
    convs = [m for m in module.modules()  # Conv3d and ConvTranspose3d
             if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert n == len(convs) > 0
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
    with torch.no_grad():
        after = module.network(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # same function
    assert list(module.state_dict()) == keys
    # Through the run layer (the UNETR decoder's convolutions), one epoch.
    with caplog.at_level(logging.INFO, logger="medssl.run.harness"):
        trainer = run(_set(seg_cfg, channels_last=True, experiment="channels_last"))
    assert re.search(r"channels_last: [1-9]\d* convolutions", caplog.text)
    assert np.isfinite(_scalars(Path(seg_cfg.results_dir) / "channels_last", "train/loss")).all()
    assert trainer.global_step > 0


def test_precise_bn_callback_follows_the_config(seg_cfg: DictConfig) -> None:
    from medssl.models.batchnorm import PreciseBatchNorm

    def precise(cfg: DictConfig) -> list:
        return [c for c in TASK.callbacks(cfg, None) if isinstance(c, PreciseBatchNorm)]

    assert [c.max_batches for c in precise(_set(seg_cfg, precise_bn_batches=7))] == [7]
    assert precise(_set(seg_cfg, precise_bn_batches=0)) == []
    with pytest.raises(ValueError, match="precise_bn_batches must be >= 0"):
        precise(_set(seg_cfg, precise_bn_batches=-1))


def test_bad_options_fail_before_training(seg_cfg: DictConfig) -> None:
    patch = list(seg_cfg.patch_size)
    with pytest.raises(ValueError, match="resize_to must be null"):
        TASK.build_data(_set(seg_cfg, spatial_dims=2, patch_size=[16, 32], resize_to=[16, 32]))
    with pytest.raises(ValueError, match="exactly one of sigmoid and softmax"):
        run(_set(seg_cfg, spatial_dims=3, patch_size=patch, resize_to=None, sigmoid=True))
    assert not (Path(seg_cfg.results_dir) / seg_cfg.experiment / "checkpoints").exists()


# ----- training, test outputs, resume ---------------------------------------------------------
def test_3d_trains_lowers_loss_and_writes_test_results(seg_cfg: DictConfig, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    export = tmp_path / "dino" / "backbone.pt"  # what a DINO run with this ViT exports
    save_backbone(export, build_backbone(**OmegaConf.to_container(seg_cfg.backbone,
                                                                  resolve=True)))
    _set(seg_cfg, n_epochs=6, experiment="run3d", dino_weights=str(export))
    with caplog.at_level(logging.INFO, logger="medssl.run.harness"):
        trainer = run(seg_cfg)
    n_keys = len(trainer.lightning_module.network.encoder.state_dict())
    assert f"dino_weights: loaded {n_keys}/{n_keys} keys" in caplog.text
    out = Path(seg_cfg.results_dir) / "run3d"
    loss = _scalars(out, "train/loss")
    assert len(loss) == 6 * 2  # 5 training volumes, batches of 2 (the last one dropped)
    assert np.mean(loss[-4:]) < 0.9 * np.mean(loss[:4])  # measured: 0.82
    dice = _scalars(out, "val/dice")
    assert len(dice) == 6 and dice[-1] > dice[0]
    for tag in ("val/dice", "val/dice_1", "val/dice_4", "val/hd95", "val/loss", "test/dice"):
        assert _scalars(out, tag), tag
    events = EventAccumulator(str(sorted((out / "tensorboard").glob("events*"))[0]))
    events.Reload()
    assert "val/overlay" in events.Tags()["images"]
    assert (out / "backbone.pt").is_file()
    # Test mode outputs: one label map per test case on its file's grid, and the metrics.
    with open(seg_cfg.csv_path) as fh:
        test_rows = [r for r in csv.DictReader(fh) if r["fold"] == "test"]
    with open(out / "test" / "metrics.csv") as fh:
        metrics = list(csv.DictReader(fh))
    assert len(metrics) == len(test_rows) * 4  # one row per case and foreground class
    summary = json.loads((out / "test" / "metrics.json").read_text())
    assert summary["n_cases"] == len(test_rows)
    assert summary["dice"] == pytest.approx(float(trainer.callback_metrics["test/dice"]))
    dice_1 = [float(r["dice"]) for r in metrics if r["class"] == "1"]
    assert summary["per_class"]["1"]["dice"] == pytest.approx(np.nanmean(dice_1))
    for row in test_rows:
        image = nib.load(Path(seg_cfg.csv_path).parent / row["img_path"])
        pred = nib.load(out / "test" / "predictions" / f"{row['PatientID']}.nii.gz")
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-5)
        values = set(np.unique(np.asarray(pred.dataobj)).tolist())
        assert values <= set(range(5))
        volume = [float(r["pred_ml"]) for r in metrics if r["PatientID"] == row["PatientID"]]
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
        counts = [(np.asarray(pred.dataobj) == c).sum() * voxel_ml for c in range(1, 5)]
        assert volume == pytest.approx(counts, rel=1e-4)


def test_2d_trains_lowers_loss_and_scores_whole_volumes(demo: DemoPaths, tmp_path: Path) -> None:
    cfg = compose("segmentation", [f"csv_path={demo.segmentation_csv}",
                                   f"results_dir={tmp_path}", *TINY_2D, "n_epochs=3",
                                   "+trainer.limit_train_batches=6", "experiment=run2d"])
    run(cfg)
    out = tmp_path / "run2d"
    loss = _scalars(out, "train/loss")
    assert len(loss) == 3 * 6
    assert np.mean(loss[-4:]) < 0.8 * np.mean(loss[:4])
    assert len(_scalars(out, "val/dice")) == 3
    assert not _scalars(out, "val/hd95") and not _scalars(out, "test/hd95")  # hd95=false
    image = nib.load(demo.root / "nifti" / "DEMO008_image.nii.gz")
    pred = nib.load(out / "test" / "predictions" / "DEMO008.nii.gz")
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-5)


def test_resume_continues_from_last_checkpoint(seg_cfg: DictConfig) -> None:
    _set(seg_cfg, experiment="resume", test_folds=[], hd95=False)
    run(seg_cfg)
    last = Path(seg_cfg.results_dir) / "resume" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)
    assert first["epoch"] == 0 and first["global_step"] == 2
    # Readable by plain torch too, without MONAI imported (no MetaTensor scores inside).
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], "
                    "weights_only=True); assert 'monai' not in sys.modules", str(last)],
                   check=True)
    trainer = run(_set(seg_cfg, n_epochs=2))  # the same command with more epochs resumes
    second = torch.load(last, map_location="cpu", weights_only=True)
    assert second["epoch"] == 1 and second["global_step"] == 4
    assert trainer.global_step == 4
    out = Path(seg_cfg.results_dir) / "resume"
    assert len(_scalars(out, "train/loss")) == 4  # two epochs of two steps, none replayed
    assert len(_scalars(out, "val/dice")) == 2


# ----- errors naming rows ---------------------------------------------------------------------
def _copy_demo(demo: DemoPaths, tmp_path: Path) -> Path:
    root = tmp_path / "cohort"
    shutil.copytree(demo.root / "nifti", root / "nifti")
    shutil.copy(demo.segmentation_csv, root / "segmentation.csv")
    return root


def test_misaligned_and_out_of_range_labels_name_their_rows(demo: DemoPaths, seg_cfg: DictConfig,
                                                             tmp_path: Path) -> None:
    root = _copy_demo(demo, tmp_path)
    label = nib.load(root / "nifti" / "DEMO002_label.nii.gz")
    shifted = label.affine.copy()
    shifted[:3, 3] += 5.0  # same shape, moved 5 mm: not on its image's grid
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted),
             root / "nifti" / "DEMO002_label.nii.gz")
    for pid, value in (("DEMO003", 7), ("DEMO007", 5)):
        path = root / "nifti" / f"{pid}_label.nii.gz"
        img = nib.load(path)
        data = np.asarray(img.dataobj).copy()
        data[0, 0, 0] = value
        nib.save(nib.Nifti1Image(data, img.affine), path)
    cfg = _set(seg_cfg, csv_path=str(root / "segmentation.csv"), experiment="bad")
    with pytest.raises(CohortError) as err:
        run(cfg)
    message = str(err.value)
    assert "line 3 (PatientID DEMO002)" in message and "not on the grid" in message
    assert "origin shifted by (5, 5, 5) mm" in message  # what differs, not just that it does
    assert str(root / "nifti" / "DEMO002_image.nii.gz") in message
    nib.save(label, root / "nifti" / "DEMO002_label.nii.gz")  # grids fixed: values remain
    with pytest.raises(CohortError) as err:
        run(cfg)
    message = str(err.value)
    assert "line 4 (PatientID DEMO003)" in message and "[7] outside 0..4" in message
    assert "line 8 (PatientID DEMO007)" in message and "[5] outside 0..4" in message  # test row
    assert str(root / "nifti" / "DEMO003_image.nii.gz") in message
    assert not (Path(cfg.results_dir) / "bad" / "checkpoints").exists()


# ----- predictions on the input file's grid ---------------------------------------------------
def _reoriented_cohort(demo: DemoPaths, root: Path) -> Path:
    """Three copies of one demo subject written as RAS, LPS and oblique NIfTI files."""
    image = nib.load(demo.root / "nifti" / "DEMO001_image.nii.gz")
    label = nib.load(demo.root / "nifti" / "DEMO001_label.nii.gz")
    img, lab = np.asarray(image.dataobj), np.asarray(label.dataobj)
    canonical = nib.as_closest_canonical(image)
    ras_img = np.asarray(canonical.dataobj)
    ras_lab = np.asarray(nib.as_closest_canonical(label).dataobj)
    angle = np.deg2rad(20)
    rotation = np.eye(4)  # 20 degrees about the S axis: an oblique grid
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel i -> n - 1 - i on the first two axes
    flip[:2, 3] = [ras_img.shape[0] - 1, ras_img.shape[1] - 1]
    versions = {
        "RAS": (ras_img, ras_lab, canonical.affine),
        "LPS": (ras_img[::-1, ::-1], ras_lab[::-1, ::-1], canonical.affine @ flip),
        "OBL": (img, lab, rotation @ image.affine),
    }
    assert nib.aff2axcodes(versions["LPS"][2]) == ("L", "P", "S")
    (root / "nifti").mkdir(parents=True)
    rows = []
    for name, (a, b, affine) in versions.items():
        for array, kind in ((a, "img"), (b, "seg")):
            nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine),
                     root / "nifti" / f"{name}_{kind}.nii.gz")
        rows.append(f"{name},nifti/{name}_img.nii.gz,nifti/{name}_seg.nii.gz,test,1000")
    return _csv(root / "segmentation.csv", "PatientID,img_path,seg_path,fold,max_val", rows)


def test_checkpoints_that_do_not_fit_fail_in_one_line(seg_cfg: DictConfig, trained: Path,
                                                      tmp_path: Path) -> None:
    """test_ckpt / resume_training_from with other settings, another script's checkpoint or
    an export: a short error before anything runs, not Lightning's list of every key."""
    _set(seg_cfg, experiment="misfit", test_ckpt=str(trained))
    seg_cfg.backbone.hidden_size, seg_cfg.backbone.mlp_dim = 64, 128
    with pytest.raises(ValueError, match=r"holds a backbone built with other settings: "
                       r"backbone.hidden_size: 32 in the file, 64 configured"):
        run(seg_cfg)
    seg_cfg.backbone.hidden_size, seg_cfg.backbone.mlp_dim = 32, 64
    seg_cfg.backbone.input_norm = "none"
    with pytest.raises(ValueError, match="input_norm"):  # the same weights would compute
        run(seg_cfg)                                     # something else: not silent
    seg_cfg.backbone.input_norm = "instance"
    # A checkpoint of the same backbone with another head: every decoder key is named.
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(trained, weights_only=True)
    ckpt["state_dict"] = {k.replace("network.decoder.", "head."): v
                          for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, other)
    _set(seg_cfg, test_ckpt=None, resume_training_from=str(other))
    with pytest.raises(ValueError, match=r"resume_training_from=.*other.ckpt does not fit this "
                       r"segmentation run: \d+ keys of this model missing \(e.g. "
                       r"network.decoder.*; \d+ keys this model lacks \(e.g. head\."):
        run(seg_cfg)
    export = trained.with_suffix(".backbone.pt")
    _set(seg_cfg, resume_training_from=str(export))
    with pytest.raises(ValueError, match="is not a checkpoint of a run .* use dino_weights="):
        run(seg_cfg)


@pytest.mark.parametrize("resize_to", [None, [8, 16, 16]], ids=["native", "resized"])
def test_test_mode_writes_predictions_on_each_input_grid(
        demo: DemoPaths, seg_cfg: DictConfig, trained: Path, tmp_path: Path,
        resize_to: list | None) -> None:
    """RAS, LPS and oblique inputs: the label map has the input's shape and affine, and seen in
    nibabel's closest-canonical orientation it is the network's prediction on the RAS grid."""
    csv_path = _reoriented_cohort(demo, tmp_path / "reoriented")
    cfg = _set(seg_cfg, csv_path=str(csv_path), experiment="test", test_ckpt=str(trained),
               resize_to=resize_to)
    trainer = run(cfg)
    module, data = trainer.lightning_module.eval(), trainer.datamodule
    out = Path(cfg.results_dir) / "test" / "test" / "predictions"
    for item in data.datasets["test"]:
        name = item["PatientID"]
        source = nib.load(tmp_path / "reoriented" / "nifti" / f"{name}_img.nii.gz")
        pred = nib.load(out / f"{name}.nii.gz")
        assert pred.shape == source.shape, name
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-5)
        with torch.no_grad():
            logits = module.infer(item["image"].as_tensor()[None])
        expected = to_labels(logits, sigmoid=False)[0].numpy()
        seen = np.asarray(nib.as_closest_canonical(pred).dataobj)
        if resize_to is None:
            np.testing.assert_array_equal(seen, expected)
        else:  # nearest back to the file grid: every voxel copies one of the small grid's
            assert seen.shape == nib.as_closest_canonical(source).shape
            idx = [((np.arange(n) + 0.5) * m / n).astype(int) for n, m in
                   zip(seen.shape, expected.shape, strict=True)]
            np.testing.assert_array_equal(seen, expected[np.ix_(*idx)])


def test_predict_csv_writes_label_maps_only(demo: DemoPaths, seg_cfg: DictConfig,
                                            trained: Path, tmp_path: Path) -> None:
    predict = _csv(tmp_path / "unlabelled.csv", "PatientID,path",  # no fold column needed
                   [f"DEMO00{n},{demo.root}/nifti/DEMO00{n}_image.nii.gz" for n in (1, 2)])
    _set(seg_cfg, experiment="predict", test_ckpt=str(trained), test_folds=[],
         predict_csv=str(predict))
    run(seg_cfg)
    out = Path(seg_cfg.results_dir) / "predict"
    assert sorted(p.name for p in (out / "predict").iterdir()) == ["DEMO001.nii.gz",
                                                                   "DEMO002.nii.gz"]
    image = nib.load(demo.root / "nifti" / "DEMO002_image.nii.gz")
    pred = nib.load(out / "predict" / "DEMO002.nii.gz")
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-5)
    assert not (out / "test").exists()


# ----- weights --------------------------------------------------------------------------------
FAMILIES = {
    "vit": {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": [16, 32, 32],
            "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2,
            "num_heads": 2},
    "swin_unetr": {"name": "swin_unetr", "spatial_dims": 3, "in_channels": 1,
                   "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
    "unet3d": {"name": "unet3d", "spatial_dims": 3, "in_channels": 1, "act": "relu"},
    "efficientnet": {"name": "efficientnet", "spatial_dims": 2, "in_channels": 1,
                     "model_name": "efficientnet-b0"},
}
PATCHES = {"vit": [16, 32, 32], "swin_unetr": [32, 32, 64], "unet3d": [16, 32, 32],
           "efficientnet": [32, 32]}  # the smallest patches each family can segment


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dino_export_loads_every_encoder_key(family: str, seg_cfg: DictConfig,
                                             tmp_path: Path) -> None:
    """A DINO export (``save_backbone`` of the teacher, as the checkpoint callback writes it)
    starts the encoder of each decoder family with every key matched and equal."""
    config = FAMILIES[family]
    teacher = build_backbone(**config)
    export = tmp_path / "backbone.pt"
    save_backbone(export, teacher, {"epoch": 3})
    cfg = _set(seg_cfg, backbone=dict(config), patch_size=PATCHES[family],
               decoder={}, dino_weights=str(export))
    module = TASK.build_module(cfg, None)
    report = TASK.load_pretrained(module, WeightSource("dino_weights", export))
    assert report.complete and sorted(report.loaded) == sorted(teacher.state_dict())
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(module.network.encoder.state_dict()[name], value)


def test_label_fraction_subsets_are_nested_and_seeded() -> None:
    subjects = [f"P{n}" for n in range(16)]
    two, four = labelled_subset(subjects, 2 / 16, 0), labelled_subset(subjects, 4 / 16, 0)
    assert len(two) == 2 and len(four) == 4 and two < four
    assert labelled_subset(subjects, 4 / 16, 0) == four != labelled_subset(subjects, 4 / 16, 1)
    with pytest.raises(ValueError, match="label_fraction"):
        labelled_subset(subjects, 0.0, 0)


def test_label_fraction_trains_on_that_many_subjects(seg_cfg: DictConfig) -> None:
    data = TASK.build_data(_set(seg_cfg, label_fraction=0.4))
    data.setup("fit")
    train = data.datasets["train"]
    subjects = {item["PatientID"] for item in train.data}
    assert len(train) == 2 and len(subjects) == 2  # 40% of the 5 training subjects
    # Chosen before caching: the memory cache holds no volume of the subjects left out.
    cached = {json.loads(key)["image"] for key in train.memory.entries}
    assert cached == {item["image"] for d in data.datasets.values() for item in d.data}


# ----- real scans (skipped where ../shared/real_data is absent) ---------------------------------
PGBM = "tcia_brain_tumor_progression_PGBM-001"
REAL_CASES = {  # image, label, dcm2niix reference of a DICOM image (None: the image is NIfTI)
    "ct": ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", None),
    "mr_lps": ("totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz",
               None),
    "flair_dicom_mask": (f"{PGBM}/PGBM-001_1992-04-02/35623-FLAIRreg-79237",
                         f"{PGBM}/PGBM-001_1992-04-02/5388-MaskTumor-63335",
                         f"{PGBM}/reference_dcm2niix/35623-FLAIRreg-79237.nii.gz"),
    "colin27_aal": ("mricron_data_debian/ch2.nii.gz", "mricron_data_debian/aal.nii.gz", None),
    # A JPEG 2000 DICOM series with an LAS NIfTI label map on its grid (LPS as stored).
    "ct_dicom": ("totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz",
                 "totalsegmentator/reference_dcm2niix/example_ct_dicom.nii.gz"),
}


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_real_scans_train_and_predict_on_the_original_grid(case: str, real_data: Path,
                                                           tmp_path: Path) -> None:
    """A training step on each real scan, then test mode: the label map lands on the input's
    grid (NIfTI: its shape and affine; DICOM: the grid dcm2niix writes, compared in the
    closest canonical orientation)."""
    image, label, reference = (real_data / p if p else None for p in REAL_CASES[case])
    labels = nib.load(label).get_fdata() if label.suffix == ".gz" else None
    num_classes = 2 if labels is None else int(labels.max()) + 1  # the DICOM mask is 0/1
    # max_val is a required column today (the issue makes it optional): the image maximum.
    max_val = float(load_volume(image).array.max())
    csv_path = _csv(tmp_path / "cohort.csv", "PatientID,img_path,seg_path,fold,max_val",
                    [f"{name},{image},{label},{name},{max_val}" for name in ("train", "test")])
    cfg = compose("segmentation", [f"csv_path={csv_path}", f"results_dir={tmp_path}",
                                   *TINY_SEG, "resize_to=[16,32,32]", "val_folds=[]",
                                   "batch_size=1", f"num_classes={num_classes}", "hd95=false",
                                   "experiment=real"])
    trainer = run(cfg)
    assert trainer.global_step == 1
    pred = nib.load(tmp_path / "real" / "test" / "predictions" / "test.nii.gz")
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() < num_classes
    if reference is None:
        source = nib.load(image)
        assert pred.shape == source.shape
        np.testing.assert_allclose(pred.affine, source.affine, atol=1e-4)
    else:
        got, want = nib.as_closest_canonical(pred), nib.as_closest_canonical(nib.load(reference))
        assert got.shape == want.shape
        np.testing.assert_allclose(got.affine, want.affine, atol=2e-3)
