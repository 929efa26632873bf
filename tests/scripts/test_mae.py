"""MAE pre-training end to end on the tiny demo cohort (CPU), 3D and 2D, ViT and CNN."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medssl.data.datamodule import CohortDataModule
from medssl.models.backbones import build_backbone
from medssl.models.classifier import Classifier
from medssl.models.mae import MaskedAutoencoder, random_cuboid_mask
from medssl.models.segmenters import build_segmenter
from medssl.models.weights import load_backbone, load_weights
from medssl.run import run
from medssl.run.harness import WeightSource
from medssl.run.mae import TASK
from medssl.run.tasks import get_task
from tests.conftest import REPO, compose

TINY_VIT = ["backbone.hidden_size=32", "backbone.mlp_dim=64", "backbone.num_layers=1",
            "backbone.num_heads=2", "decoder_hidden_size=24", "decoder_mlp_dim=48",
            "decoder_num_heads=2"]
COMMON = ["n_epochs=1", "warmup_epochs=0", "lr=2e-3", "cache=memory", "accelerator=cpu",
          "devices=1", "progress_bar=false", "n_workers=0"]
# The tiny demo: volumes of 16 x 32 x 32 (RAS), 16 slices of 32 x 32 each.
TINY_3D = ["resize_to=[16,32,32]", "backbone.patch_size=[4,8,8]", "mae_cfg.cuboid_size=[4,8,8]",
           "batch_size=2", *TINY_VIT, *COMMON]
TINY_2D = ["resize_to=[32,32]", "backbone.patch_size=[8,8]", "mae_cfg.cuboid_size=[8,8]",
           "batch_size=16", *TINY_VIT, *COMMON]
# The full UNet3D costs ~1 s per step even at 8 x 16 x 16: smaller volumes for it. Its
# backbone dict is given whole (the unet3d group also carries DINO's convnet recipe keys).
UNET3D = {"name": "unet3d", "spatial_dims": 3, "in_channels": 1, "act": "relu"}
UNET2D = UNET3D | {"spatial_dims": 2}
UNET3D_3D = ["resize_to=[8,16,16]", "mae_cfg.cuboid_size=[4,4,4]",
             "mae_cfg.mask_percentage=0.5", "batch_size=2", *COMMON]
UNET_2D = ["resize_to=[32,32]", "mae_cfg.cuboid_size=[8,8]", "mae_cfg.mask_percentage=0.5",
           "batch_size=16", *COMMON]
def _with_backbone(cfg: DictConfig, backbone: dict | None) -> DictConfig:
    if backbone is not None:
        with open_dict(cfg):
            cfg.backbone = backbone
    return cfg


def _cfg(demo, tmp_path: Path, script: str, overrides: list[str],
         backbone: dict | None = None) -> DictConfig:
    csv = demo.mae3d_csv if script == "mae3d" else demo.mae2d_csv
    return _with_backbone(compose(script, [f"csv_path={csv}",
                                           f"results_dir={tmp_path / 'results'}", *overrides]),
                          backbone)


def _set(cfg: DictConfig, **values: object) -> DictConfig:
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return events


# ----- configs --------------------------------------------------------------------------------
@pytest.mark.parametrize(("script", "overrides", "backbone", "encoder"), [
    pytest.param("mae3d", [], None, "ViTBackbone", id="3d-vit"),
    pytest.param("mae3d", ["backbone=unet3d"], None, "UNet3DEncoder", id="3d-unet3d"),
    pytest.param("mae3d", ["backbone=swin_unetr"], None, "SwinEncoder", id="3d-swin"),
    pytest.param("mae3d", [], UNET3D, "UNet3DEncoder", id="3d-unet3d-dict"),
    pytest.param("mae3d", ["preset=mae_oai"], None, "UNet3DEncoder", id="3d-oai"),
    pytest.param("mae3d", ["preset=mae_oai", "backbone=vit"], None, "ViTBackbone",
                 id="3d-oai-vit"),
    pytest.param("mae2d", [], None, "ViTBackbone", id="2d-vit"),
    pytest.param("mae2d", ["backbone=unet3d"], None, "UNet3DEncoder", id="2d-unet"),
    pytest.param("mae2d", [], UNET2D, "UNet3DEncoder", id="2d-unet-dict"),
])
def test_default_configs_build(script: str, overrides: list[str], backbone: dict | None,
                               encoder: str) -> None:
    """Every default and preset composes, and its masking fits its input and backbone."""
    cfg = _with_backbone(compose(script, ["csv_path=x", *overrides]), backbone)
    module = TASK.build_module(cfg, None)
    assert type(module.encoder).__name__ == encoder
    assert module.encoder.spatial_dims == len(cfg.resize_to) == (3 if script == "mae3d" else 2)


@pytest.mark.parametrize(("script", "overrides", "message"), [
    pytest.param("mae3d", ["mae_cfg.cuboid_size=[4,8]"], r"must have 3 values for 3D input",
                 id="3d-two-values"),
    pytest.param("mae2d", ["mae_cfg.cuboid_size=[8,8,8]"], r"must have 2 values for 2D input",
                 id="2d-three-values"),
    pytest.param("mae3d", ["mae_cfg.cuboid_size=[4,8,12]"], r"must divide the input size",
                 id="not-dividing"),
    pytest.param("mae3d", ["mae_cfg.mask_percentage=75"], r"mask_percentage is the masked "
                 r"fraction in \(0, 1\)", id="percent"),
    pytest.param("mae3d", ["resize_to=[32,64]"], r"resize_to must give 3 sizes", id="resize"),
])
def test_bad_masking_fails_before_reading_data(demo, tmp_path: Path, monkeypatch,
                                               script: str, overrides: list[str],
                                               message: str) -> None:
    tiny = TINY_3D if script == "mae3d" else TINY_2D
    cfg = _cfg(demo, tmp_path, script, [*tiny, *overrides])

    def no_data(*args: object) -> None:
        raise AssertionError("the data was read before the masking keys were checked")

    monkeypatch.setattr(CohortDataModule, "setup", no_data)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "results").exists()


# ----- runs -----------------------------------------------------------------------------------
def _loads_downstream(export: Path, module: MaskedAutoencoder) -> None:
    """``mae_weights=export`` through the classification and segmentation tasks' own loaders
    (backbone-config check, encoder-only strict load): every encoder key, equal values."""
    config = torch.load(export, weights_only=True)["backbone_config"]
    source = WeightSource("mae_weights", export)
    classifier = Classifier(backbone_config=config, classes={"target": ["a", "b"]})
    seg_cfg = _with_backbone(compose("segmentation", ["csv_path=x"]), config)
    segmentation = get_task("segmentation").build_module(seg_cfg, None)
    for task, encoder in (("classification", classifier.backbone),
                          ("segmentation", segmentation.network.encoder)):
        report = get_task(task).load_pretrained(
            classifier if task == "classification" else segmentation, source)
        assert report.complete and len(report.loaded) == len(encoder.state_dict()), task
        for name, value in encoder.state_dict().items():
            assert torch.equal(value, module.encoder.state_dict()[name]), (task, name)


def test_vit_3d_run_exports_an_encoder_that_loads_downstream(demo, tmp_path: Path,
                                                             caplog) -> None:
    cfg = _cfg(demo, tmp_path, "mae3d", [*TINY_3D, "n_epochs=2", "experiment=vit"])
    trainer = run(cfg)
    module: MaskedAutoencoder = trainer.lightning_module
    out = Path(cfg.results_dir) / "vit"
    assert trainer.global_step == 2 * 3  # 7 training volumes, batch 2, incomplete dropped
    events = _events(out)
    for tag in ("train/mae_loss", "train/lr", "val/mae_loss"):
        assert len(events.Scalars(tag)) >= 2, tag
    panels = events.Images("val/reconstruction")
    assert len(panels) == 2 and panels[0].width > 3 * 64  # original | masked | reconstruction
    # backbone.pt: the encoder and its config; it rebuilds the encoder key for key.
    export = out / "backbone.pt"
    backbone, report = load_backbone(export)
    assert report.complete and type(backbone).__name__ == "ViTBackbone"
    for name, value in module.encoder.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], value), name
    config = torch.load(export, weights_only=True)["backbone_config"]
    _loads_downstream(export, module)
    # The Lightning checkpoint serves as well (the encoder sits under "encoder.").
    report = load_weights(build_backbone(**config), out / "checkpoints" / "last.ckpt")
    assert report.complete and report.prefix == "encoder."
    # mae_weights starts a new MAE run from the export, every key matched and logged.
    _set(cfg, experiment="from_export", mae_weights=str(export), n_epochs=1)
    with caplog.at_level("INFO"):
        second = run(cfg)
    n = len(module.encoder.state_dict())
    assert f"mae_weights: loaded {n}/{n} keys" in caplog.text
    assert second.global_step == 3


def test_vit_2d_run_on_slices(demo, tmp_path: Path) -> None:
    cfg = _cfg(demo, tmp_path, "mae2d", [*TINY_2D, "experiment=vit2d"])
    trainer = run(cfg)
    assert trainer.global_step == 7 * 16 // 16  # 7 training subjects x 16 slices, batch 16
    out = Path(cfg.results_dir) / "vit2d"
    backbone, report = load_backbone(out / "backbone.pt")
    assert report.complete and backbone.spatial_dims == 2
    segmenter = build_segmenter(backbone.config, num_classes=2)
    assert load_weights(segmenter.encoder, out / "backbone.pt").complete
    assert _events(out).Images("val/reconstruction")


def test_unet3d_inpainting_run(demo, tmp_path: Path) -> None:
    cfg = _cfg(demo, tmp_path, "mae3d", [*UNET3D_3D, "experiment=unet"], UNET3D)
    trainer = run(cfg)
    module: MaskedAutoencoder = trainer.lightning_module
    export = Path(cfg.results_dir) / "unet" / "backbone.pt"
    config = torch.load(export, weights_only=True)["backbone_config"]
    assert config["name"] == "unet3d" and "img_size" not in config
    _loads_downstream(export, module)


@pytest.mark.parametrize(("script", "overrides", "backbone", "steps"), [
    pytest.param("mae3d", TINY_3D, None, 25, id="3d-vit"),
    pytest.param("mae2d", TINY_2D, None, 25, id="2d-vit"),
    pytest.param("mae3d", UNET3D_3D, UNET3D, 6, id="3d-unet3d"),
    pytest.param("mae2d", UNET_2D, UNET2D, 6, id="2d-unet"),
])
def test_loss_falls_on_fixed_demo_inputs(demo, tmp_path: Path, script: str,
                                         overrides: list[str], backbone: dict | None,
                                         steps: int) -> None:
    """Training on one fixed demo batch with fixed masks lowers its masked-only loss."""
    cfg = _cfg(demo, tmp_path, script, [*overrides, "batch_size=4", "cache=none"], backbone)
    data = TASK.build_data(cfg)
    data.setup("fit")
    x = next(iter(data.val_dataloader() if script == "mae3d" else data.train_dataloader()))
    x = x["image"][:4]
    L.seed_everything(0)
    module = TASK.build_module(cfg, data)
    mask = random_cuboid_mask(len(x), module.grid, module.hparams.mask_percentage,
                              generator=torch.Generator().manual_seed(0))
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(steps):
        loss, _ = module.loss(x, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


class _Interrupt(L.Callback):
    """Record the step and encoder when training (re)starts; optionally stop at an epoch."""

    def __init__(self, stop_at_epoch: int | None = None) -> None:
        self.stop_at_epoch, self.start = stop_at_epoch, None

    def on_train_start(self, trainer: L.Trainer, module: MaskedAutoencoder) -> None:
        self.start = (trainer.global_step,
                      {k: v.clone() for k, v in module.encoder.state_dict().items()})

    def on_train_epoch_start(self, trainer: L.Trainer, module: MaskedAutoencoder) -> None:
        if trainer.current_epoch == self.stop_at_epoch:
            raise KeyboardInterrupt  # what Ctrl-C does: Lightning shuts down, then exits 1


@pytest.fixture
def interrupt(monkeypatch) -> list[_Interrupt]:
    """Append an ``_Interrupt`` to this list before a run; the run's trainer gets it."""
    import medssl.run.harness as harness

    callbacks: list[_Interrupt] = []
    build = harness.build_trainer

    def with_callback(*args: object, **kwargs: object) -> L.Trainer:
        trainer = build(*args, **kwargs)
        trainer.callbacks.append(callbacks[-1])
        return trainer

    monkeypatch.setattr(harness, "build_trainer", with_callback)
    return callbacks


def test_interrupted_run_resumes_exactly(demo, tmp_path: Path,
                                         interrupt: list[_Interrupt]) -> None:
    """3 epochs, interrupted at the start of epoch 2, then the same command again: the state
    is restored and, masks and augmentation following (seed, epoch, batch), the run ends with
    the weights of an uninterrupted one."""
    interrupt.append(_Interrupt())
    straight = run(_cfg(demo, tmp_path, "mae3d", [*TINY_3D, "n_epochs=3", "experiment=a"]))
    cfg = _cfg(demo, tmp_path, "mae3d", [*TINY_3D, "n_epochs=3", "experiment=b"])
    interrupt.append(_Interrupt(stop_at_epoch=2))
    with pytest.raises(SystemExit):
        run(cfg)
    saved = torch.load(Path(cfg.results_dir) / "b" / "checkpoints" / "last.ckpt",
                       weights_only=True)
    interrupt.append(_Interrupt())
    resumed = run(cfg)  # the same command again
    step, encoder = interrupt[-1].start
    assert step == 6 and resumed.global_step == 9 and resumed.current_epoch == 3
    for name, value in encoder.items():
        assert torch.equal(value, saved["state_dict"][f"encoder.{name}"]), name
    expected = straight.lightning_module.encoder.state_dict()
    for name, value in resumed.lightning_module.encoder.state_dict().items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(demo, tmp_path: Path) -> None:
    """Lightning DDP (gloo) from the command line: every parameter gets a gradient (DDP fails
    on unused ones), one set of outputs."""
    folds = ["train_folds=[0,1,3]", "val_folds=[2,4]"]  # 3 validation volumes: one padded
    result = subprocess.run(
        [sys.executable, str(REPO / "self_supervised" / "mae3d.py"), *TINY_3D, *folds,
         "devices=2", "n_epochs=2", f"results_dir={tmp_path}", f"csv_path={demo.mae3d_csv}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "mae3d_demo" / "checkpoints"
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    # 5 training volumes over 2 ranks: 3 each (padded by the sampler), batch 2 with the last
    # partial batch dropped -> 1 step per epoch.
    assert checkpoint["global_step"] == 2 and checkpoint["epoch"] == 1
    backbone, report = load_backbone(folder.parent / "backbone.pt")
    assert report.complete
    events = list((tmp_path / "mae3d_demo" / "tensorboard").glob("events*"))
    assert len(events) == 1
    # val/mae_loss is what one process computes with the same weights: each validation
    # volume once, under its own mask, whatever the ranks' shares and batches.
    cfg = compose("mae3d", [*TINY_3D, *folds, f"results_dir={tmp_path / 'single'}",
                            f"csv_path={demo.mae3d_csv}", "batch_size=1"])
    data = TASK.build_data(cfg)
    data.setup("fit")
    module = TASK.build_module(cfg, data)
    module.load_state_dict(checkpoint["state_dict"])
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False).validate(module, datamodule=data,
                                                            verbose=False)
    logged = EventAccumulator(str(events[0]))
    logged.Reload()
    assert logged.Scalars("val/mae_loss")[-1].value == pytest.approx(
        single[0]["val/mae_loss"], rel=1e-5)
