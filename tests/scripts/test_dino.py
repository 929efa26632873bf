"""DINO pre-training end to end on the tiny demo cohort (CPU)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.models.backbones import UNet3DEncoder, build_backbone
from medssl.models.dino import DINO
from medssl.models.weights import load_backbone
from medssl.run import run as run_dino
from medssl.run.loggers import ClearMLLogger
from tests.conftest import REPO, TINY_DINO, compose

SCRIPT = REPO / "self_supervised" / "dino.py"


def _set(cfg: DictConfig, **values: object) -> DictConfig:
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


def test_readme_commands_compose() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "batch_size=16", "lr=0.001", "--cfg",
                          "job"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert re.search(r"^batch_size: 16$", out, re.M) and re.search(r"^lr: 0\.001$", out, re.M)
    oai = compose("dino", ["preset=oai", "csv_path=/data/oai.csv"])
    assert oai.backbone.name == "unet3d" and list(oai.global_crop_size) == [40, 224, 224]
    assert list(oai.local_crop_size) == [40, 128, 128] and oai.n_epochs == 70
    assert oai.batch_size == 4 and oai.n_crops == 4
    for name in ("vit", "swin_unetr", "unet3d"):
        assert compose("dino", [f"backbone={name}"]).backbone.name == name


@pytest.mark.parametrize("overrides", [["backbone=vit"], ["backbone=swin_unetr"],
                                       ["backbone=unet3d"], ["preset=oai"],
                                       ["preset=oai", "backbone=vit"]],
                         ids=["vit", "swin_unetr", "unet3d", "oai", "oai-vit"])
def test_default_crops_fit_each_backbone(overrides: list[str]) -> None:
    cfg = compose("dino", ["csv_path=x", *overrides])
    backbone = build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True))
    for what in ("global_crop_size", "local_crop_size"):
        backbone.check_input_size(cfg[what], what)


def test_pretraining_run(dino_cfg: DictConfig) -> None:
    """Teacher follows the EMA; schedules, monitors and exports are written."""
    _set(dino_cfg, n_epochs=8, lr=2e-3, warmup_epochs=1, experiment="run")
    trainer = run_dino(dino_cfg)
    module: DINO = trainer.lightning_module
    out = Path(dino_cfg.results_dir) / "run"
    assert module.ema_updates == trainer.global_step == 8 * 3
    events = EventAccumulator(str(next((out / "tensorboard").glob("events*"))))
    events.Reload()
    loss = [e.value for e in events.Scalars("train/dino_loss")]
    # Whether 24 steps of fresh random crops lower the loss depends on the seed; the loss
    # falling on fixed crops is tested in tests/models/test_dino_module.py.
    assert len(loss) == 24 and all(math.isfinite(x) for x in loss)
    for tag in ("train/lr", "train/weight_decay", "train/momentum", "train/teacher_temp",
                "train/embedding_spread", "train/teacher_entropy_fraction",
                "train/prototype_information", "train/view_top1", "train/view_cosine",
                "val/dino_loss", "val/knn_accuracy",
                f"{dino_cfg.monitor}"):
        assert events.Scalars(tag), tag
    assert "train/crops" in events.Tags()["images"]
    momentum = [e.value for e in events.Scalars("train/momentum")]
    assert momentum[0] == pytest.approx(0.996) and momentum == sorted(momentum)
    teacher = dict(module.teacher_backbone.named_parameters())
    assert any(not torch.equal(p, teacher[n]) for n, p in
               module.student_backbone.named_parameters())
    # Exports: every kept checkpoint has its backbone file; backbone.pt is the best one.
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == dino_cfg.save_top_k + 1 and (out / "checkpoints" / "last.ckpt") in ckpts
    for ckpt in ckpts:
        assert ckpt.with_suffix(".backbone.pt").is_file()
    assert len(list((out / "checkpoints").glob("*.backbone.pt"))) == len(ckpts)
    assert dino_cfg.monitor == "val/knn_auc"  # V00COHORT has two classes
    top_k = next(c for c in trainer.checkpoint_callbacks if c.monitor == dino_cfg.monitor)
    best = Path(top_k.best_model_path).with_suffix(".backbone.pt")
    export = torch.load(out / "backbone.pt", weights_only=True)
    assert export["backbone_config"]["name"] == "vit" and export["method"] == "dino"
    for name, value in torch.load(best, weights_only=True)["state_dict"].items():
        assert torch.equal(value, export["state_dict"][name])
    backbone, report = load_backbone(out / "checkpoints" / "last.backbone.pt")
    assert not report.missing and not report.unexpected and not report.mismatched
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, module.teacher_backbone.state_dict()[name])
    assert (out / "config.yaml").read_text().count("csv_path:") == 1


class _Snapshot(L.Callback):
    """Record the teacher, centre and step when training (re)starts; optionally interrupt."""

    def __init__(self, stop_at_epoch: int | None = None) -> None:
        self.stop_at_epoch, self.start = stop_at_epoch, None

    def on_train_start(self, trainer: L.Trainer, module: DINO) -> None:
        self.start = (trainer.global_step, {k: v.clone() for k, v in
                                            module.teacher_backbone.state_dict().items()},
                      module.center.clone())
        self.optimizer_state = {i: {k: v.clone() for k, v in state.items()} for i, state in
                                trainer.optimizers[0].state_dict()["state"].items()}

    def on_train_epoch_start(self, trainer: L.Trainer, module: DINO) -> None:
        if trainer.current_epoch == self.stop_at_epoch:
            self.stopped_at = trainer.global_step
            raise KeyboardInterrupt  # what Ctrl-C does: Lightning shuts down, then exits 1


def test_interrupted_run_resumes(dino_cfg: DictConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    _set(dino_cfg, n_epochs=3, experiment="resume")
    import medssl.run.harness as harness

    callbacks: list[_Snapshot] = []
    build = harness.build_trainer

    def with_snapshot(*args: object, **kwargs: object) -> L.Trainer:
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(callbacks[-1])
        return trainer

    monkeypatch.setattr(harness, "build_trainer", with_snapshot)
    callbacks.append(_Snapshot(stop_at_epoch=2))
    with pytest.raises(SystemExit):
        run_dino(dino_cfg)
    assert callbacks[-1].stopped_at == 6
    last = Path(dino_cfg.results_dir) / "resume" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    saved = checkpoint["state_dict"]
    callbacks.append(_Snapshot())
    second = run_dino(dino_cfg)  # the same command again
    step, teacher, center = callbacks[-1].start
    assert step == 6 and second.global_step == 9 and second.current_epoch == 3
    for name, value in teacher.items():
        assert torch.equal(value, saved[f"teacher_backbone.{name}"])
    assert torch.equal(center, saved["center"])
    restored = callbacks[-1].optimizer_state
    for index, state in checkpoint["optimizer_states"][0]["state"].items():
        assert torch.equal(restored[index]["exp_avg"], state["exp_avg"])
        assert torch.equal(restored[index]["step"], state["step"])
    assert not torch.equal(center, torch.zeros_like(center))


def test_resume_from_and_suprem_weights_exclude_each_other(dino_cfg: DictConfig,
                                                           tmp_path: Path) -> None:
    _set(dino_cfg, resume_training_from=str(tmp_path / "a.ckpt"),
         suprem_weights=str(tmp_path / "b.pth"))
    with pytest.raises(ValueError, match="at most one weight source.*suprem_weights, "
                       "resume_training_from"):
        run_dino(dino_cfg)


def test_suprem_weights_start_unet3d(dino_cfg: DictConfig, tmp_path: Path, caplog) -> None:
    source = UNet3DEncoder()
    torch.save({"net": {f"module.backbone.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "suprem.pth")
    _set(dino_cfg, suprem_weights=str(tmp_path / "suprem.pth"), experiment="suprem",
         n_epochs=1, lr=1e-12, min_lr=0.0, global_crop_size=[16, 32, 32],
         local_crop_size=[8, 16, 16], n_crops=3)
    with open_dict(dino_cfg):
        dino_cfg.backbone = {"name": "unet3d", "spatial_dims": 3, "in_channels": 1,
                             "act": "relu"}
    with caplog.at_level("INFO"):
        trainer = run_dino(dino_cfg)
    n = len(source.state_dict())
    assert f"suprem_weights: loaded {n}/{n} keys" in caplog.text
    assert "missing: []; unexpected: []; shape mismatches: []" in caplog.text
    conv = "down_tr64.ops.0.conv1.weight"
    expected = source.state_dict()[conv]
    assert torch.allclose(trainer.lightning_module.teacher_backbone.state_dict()[conv],
                          expected, atol=1e-6)


def test_crop_sizes_checked_against_backbone(dino_cfg: DictConfig) -> None:
    _set(dino_cfg, local_crop_size=[8, 12, 16])
    with pytest.raises(ValueError, match=r"local_crop_size \[8, 12, 16\] does not fit"):
        run_dino(dino_cfg)


def test_clearml_offline(dino_cfg: DictConfig, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml"))
    monkeypatch.setenv("HOME", str(tmp_path))
    _set(dino_cfg, clearml=True, experiment="clearml")
    trainer = run_dino(dino_cfg)
    clearml = [lg for lg in trainer.loggers if isinstance(lg, ClearMLLogger)]
    assert clearml, "ClearML logger missing"
    task = clearml[0].task
    folder = Path(task.get_offline_mode_folder())
    assert folder.is_dir() and any(folder.rglob("*"))
    text = "".join(p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file())
    assert "dino_loss" in text
    task.close()


def test_clearml_not_configured_falls_back(dino_cfg: DictConfig, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    for var in ("CLEARML_OFFLINE_MODE", "CLEARML_API_ACCESS_KEY", "CLEARML_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _set(dino_cfg, clearml=True, experiment="noclearml")
    trainer = run_dino(dino_cfg)
    assert [type(lg).__name__ for lg in trainer.loggers] == ["TensorBoardLogger"]
    assert "ClearML is not configured" in caplog.text


def test_csv_without_knn_target_trains_without_monitor(dino_cfg: DictConfig, demo) -> None:
    _set(dino_cfg, csv_path=str(demo.ssl_csv), experiment="noknn")
    trainer = run_dino(dino_cfg)
    assert "val/knn_accuracy" not in trainer.callback_metrics
    assert "val/dino_loss" in trainer.callback_metrics
    # No k-NN monitor: nothing measures feature quality, so backbone.pt is the last epoch.
    assert dino_cfg.monitor is None
    out = Path(dino_cfg.results_dir) / "noknn"
    export = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
    for name, value in trainer.lightning_module.teacher_backbone.state_dict().items():
        assert torch.equal(value, export[name]), name


def test_augment_keys_reach_every_view(dino_cfg: DictConfig) -> None:
    """The ``augment:`` group and the per-view probabilities configure the crops (DINO's two
    different global views by default; flips left-right only)."""
    from medssl.run.dino import TASK

    _set(dino_cfg, local_blur_prob=0.25)
    with open_dict(dino_cfg):
        dino_cfg.augment.flip_axes = [0, 2]
        dino_cfg.augment.rotate_deg = 0.0
    views = TASK._multicrop(dino_cfg).views
    assert len(views) == dino_cfg.n_crops
    assert [v.probs["blur_prob"] for v in views] == [1.0, 0.1] + [0.25] * (len(views) - 2)
    assert [v.probs["invert_prob"] for v in views] == [0.0, 0.2] + [0.0] * (len(views) - 2)
    assert all(v.flip_axes == (0, 2) and not v.rotate_rad.any() for v in views)
    default = compose("dino", ["csv_path=x"])
    assert list(default.augment.flip_axes) == [0]
    assert default.augment.max_aspect_ratio == pytest.approx(4 / 3, abs=1e-3)


def test_recipe_defaults_follow_dino() -> None:
    """ViT: AdamW, stochastic depth 0.1; convnets: DINO's README recipe.

    Head batch norm stays on for the demo ViT: without it the demo collapses to uniform
    outputs (teacher entropy fraction 1.0 by epoch 8), even with ``input_norm`` (issue 7).
    """
    vit = compose("dino", ["csv_path=x"])
    assert (vit.optimizer, vit.head_batch_norm, vit.drop_path_rate) == ("adamw", True, 0.1)
    assert (vit.monitor, vit.monitor_mode) == ("val/knn_auc", "max")
    for name in ("unet3d", "swin_unetr"):
        cfg = compose("dino", ["csv_path=x", f"backbone={name}"])
        assert (cfg.optimizer, cfg.lr) == ("sgd", 0.03)
        assert cfg.weight_decay == cfg.weight_decay_end == 1e-4
        assert list(cfg.global_crop_scale) == [0.14, 1.0]
        assert list(cfg.local_crop_scale) == [0.05, 0.14]
    medmnist = compose("dino", ["preset=medmnist", "csv_path=x"])
    assert list(medmnist.backbone.patch_size) == [8, 8, 8] and medmnist.batch_size == 8
    assert medmnist.lr * medmnist.batch_size / 256 == pytest.approx(5e-4)  # DINO's ViT-S peak
    assert vit.backbone.input_norm == "instance"
    assert medmnist.knn_target == "label" and list(medmnist.val_folds) == ["val"]


def test_ddp_on_two_cpu_processes(demo, tmp_path: Path) -> None:
    """Lightning DDP (gloo) from the command line, as on a multi-GPU machine."""
    tiny = [o for o in TINY_DINO if not o.startswith(("devices=", "cache="))]
    # 3 validation volumes: one rank's share is padded with a repeat.
    tiny += ["cache=memory", f"csv_path={demo.classification_csv}", "train_folds=[0,1,3]",
             "val_folds=[2,4]"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny, "devices=2", "n_epochs=2",
         f"results_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2 caches and serves its share" in result.stdout + result.stderr
    folder = tmp_path / "dino_demo" / "checkpoints"
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    # 5 training volumes over 2 ranks: 3 each (padded by the sampler), batch 2 with the last
    # partial batch dropped -> 1 step per epoch on every rank.
    assert checkpoint["global_step"] == 2 and checkpoint["epoch"] == 1
    backbone, report = load_backbone(folder.parent / "backbone.pt")
    assert report.complete
    events = EventAccumulator(str(next((tmp_path / "dino_demo" / "tensorboard").glob("ev*"))))
    events.Reload()
    assert len(events.Scalars("val/knn_accuracy")) == 2
    # Each rank embedded its share of the k-NN monitor's sets and the features were gathered:
    # the last values are what one process computes with the same teacher on the full sets.
    from medssl.models.knn import KNNMonitor
    from medssl.models.monitors import knn_metrics
    from medssl.run.tasks import get_task

    cfg = compose("dino", [*tiny, f"results_dir={tmp_path / 'single'}"])
    task = get_task("dino")
    data = task.build_data(cfg)
    data.setup("fit")
    monitor = next(c for c in task.callbacks(cfg, data) if isinstance(c, KNNMonitor))
    module = task.build_module(cfg, data)
    module.load_state_dict(checkpoint["state_dict"])
    teacher = module.teacher_backbone.eval()
    bank, bank_y = monitor.embed(teacher, monitor.bank, torch.device("cpu"))
    query, query_y = monitor.embed(teacher, monitor.query, torch.device("cpu"))
    expected = knn_metrics(bank, bank_y, query, query_y, n_classes=monitor.n_classes,
                           k=monitor.k, temperature=monitor.temperature)
    names = [n for n in ("accuracy", "auc", "balanced_accuracy")
             if f"val/knn_{n}" in events.Tags()["scalars"]]
    assert len(names) == 2
    for name in names:
        logged = events.Scalars(f"val/knn_{name}")[-1].value
        value = float(expected.get(name, math.nan))  # AUC: NaN with one class in the query
        assert logged == pytest.approx(value, abs=1e-6, nan_ok=True), name
    # val/dino_loss counts each validation volume once (the ranks' padded shares repeat one).
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(module, datamodule=data,
                                                            verbose=False)
    assert events.Scalars("val/dino_loss")[-1].value == pytest.approx(
        single[0]["val/dino_loss"], rel=1e-5)


def test_unlabelled_rows_train_but_skip_the_knn_monitor(dino_cfg: DictConfig, demo,
                                                        caplog) -> None:
    import pandas as pd

    df = pd.read_csv(demo.classification_csv)
    df.loc[[0, 1], "V00COHORT"] = None  # two subjects without the target
    csv = demo.root / "partly_labelled.csv"
    df.to_csv(csv, index=False)
    _set(dino_cfg, csv_path=str(csv), experiment="partial")
    with caplog.at_level("INFO"):
        trainer = run_dino(dino_cfg)
    assert "k-NN monitor: 6 of 8 rows have a V00COHORT value" in caplog.text
    assert "val/knn_accuracy" in trainer.callback_metrics
    assert trainer.global_step == 3  # all 7 training rows still train: 3 batches of 2


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_knn_target_named_label(dino_cfg: DictConfig, demo, cache: str) -> None:
    """A target column called ``label`` (MedMNIST's) is a class, not a label-map path."""
    import pandas as pd

    df = pd.read_csv(demo.classification_csv).rename(columns={"V00COHORT": "label"})
    csv = demo.root / f"label_column_{cache}.csv"
    df.to_csv(csv, index=False)
    _set(dino_cfg, csv_path=str(csv), experiment=f"label_{cache}", knn_target="label",
         cache=cache, cache_dir=str(Path(dino_cfg.results_dir) / "cache"))
    trainer = run_dino(dino_cfg)
    assert "val/knn_auc" in trainer.callback_metrics


def test_compile_keeps_weights_and_checkpoint_keys(dino_cfg: DictConfig, monkeypatch) -> None:
    """compile=true compiles the backbones in place (TorchDynamo traces them; the eager
    backend keeps the test fast) and the checkpoint and export keep their plain names."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    _set(dino_cfg, compile=True, experiment="compiled")
    trainer = run_dino(dino_cfg)
    module = trainer.lightning_module
    assert len(compiled) == 2  # student and teacher backbones
    assert module.student_backbone._compiled_call_impl is not None
    out = Path(dino_cfg.results_dir) / "compiled"
    export = torch.load(out / "backbone.pt", weights_only=True)["state_dict"]
    assert set(export) == set(module.teacher_backbone.state_dict())
    assert not any("_orig_mod" in k for k in export)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)


def test_augment_on_device_cuts_crops_after_transfer(dino_cfg: DictConfig) -> None:
    """augment_on_device: the loader yields whole volumes; the crops are cut per batch where
    it landed, seeded from torch's generator (the same draws for the same seed)."""
    from medssl.data.datamodule import augment_batch
    from medssl.run.tasks import get_task

    _set(dino_cfg, augment_on_device=True, experiment="device_aug")
    task = get_task("dino")
    data = task.build_data(dino_cfg)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert "crops" not in batch and tuple(batch["image"].shape) == (2, 1, 16, 32, 32)
    crops = data.device_augment
    torch.manual_seed(3)
    first = augment_batch(batch, crops)
    torch.manual_seed(3)
    again = augment_batch(batch, crops)
    shapes = [tuple(c.shape) for c in first["crops"]]
    assert shapes == [(2, 1, 16, 32, 32)] * 2 + [(2, 1, 8, 16, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(first["crops"], again["crops"], strict=True))
    assert not torch.equal(first["crops"][0][0], first["crops"][0][1])  # per-sample draws
    assert first["PatientID"] == batch["PatientID"]
    trainer = run_dino(dino_cfg)
    assert trainer.global_step > 0
    assert torch.isfinite(trainer.callback_metrics["train/dino_loss"])
