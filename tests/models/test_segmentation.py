"""Segmentation module: loss wiring, label maps, metrics, sliding-window inference, schedules."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medssl.models.segmentation import (
    SegmentationModule,
    build_loss,
    case_metrics,
    overlay_grid,
    to_labels,
)

# Tiny ViTs under a narrow UNETR decoder: seconds on a CPU.
VIT3D = {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": [8, 16, 16],
         "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2,
         "num_heads": 2}
VIT2D = VIT3D | {"spatial_dims": 2, "img_size": [8, 8], "patch_size": [4, 4]}


def _module(**kwargs: object) -> SegmentationModule:
    args = {"backbone_config": VIT3D, "num_classes": 3, "patch_size": [8, 16, 16],
            "decoder": {"feature_size": 8}, "hd95": False} | kwargs
    return SegmentationModule(**args)


# ----- loss and label maps -----------------------------------------------------------------
def test_dice_ce_matches_hand_computation() -> None:
    """Soft Dice over every (case, class) plus cross-entropy, written out by hand."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6, generator=g)
    label = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=g).float()
    p = logits.softmax(1)
    y = F.one_hot(label[:, 0].long(), 3).movedim(-1, 1).float()
    inter, total = (p * y).sum((2, 3, 4)), (p + y).sum((2, 3, 4))
    dice = (1 - (2 * inter + 1e-5) / (total + 1e-5)).mean()
    ce = F.cross_entropy(logits, label[:, 0].long())
    got = build_loss("dice_ce", include_background=True, softmax=True)(logits, label)
    torch.testing.assert_close(got, dice + ce)
    no_bg = (1 - (2 * inter + 1e-5) / (total + 1e-5))[:, 1:].mean() + ce
    got = build_loss("dice_ce", include_background=False, softmax=True)(logits, label)
    torch.testing.assert_close(got, no_bg)


def test_generalized_dice_is_zero_for_a_perfect_prediction() -> None:
    label = torch.randint(0, 3, (1, 1, 6, 6, 6), generator=torch.Generator().manual_seed(1))
    perfect = F.one_hot(label[:, 0], 3).movedim(-1, 1).float() * 40 - 20
    loss = build_loss("generalized_dice", softmax=True)
    assert loss(perfect, label.float()) < 1e-4
    assert loss(-perfect, label.float()) > 0.9


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "dice"}, "dice"),
    ({"loss": "dice_ce", "sigmoid": True, "softmax": True}, "exactly one"),
    ({"loss": "dice_ce", "sigmoid": False, "softmax": False}, "exactly one"),
], ids=["unknown-loss", "both", "neither"])
def test_bad_loss_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_loss(**kwargs)


def test_label_maps_from_softmax_and_sigmoid_logits() -> None:
    # voxels: background wins / class 2 wins / class 1 wins (softmax ranks, sigmoid thresholds)
    logits = torch.tensor([[[3.0, -1.0, 0.5], [-2.0, 1.0, 2.0], [-3.0, 2.0, 1.0]]])  # (1,3,3)
    assert to_labels(logits, sigmoid=False).tolist() == [[0, 2, 1]]
    assert to_labels(logits, sigmoid=True).tolist() == [[0, 2, 1]]
    below = torch.tensor([[[5.0], [-0.1], [-0.2]]])  # no foreground probability above 0.5
    assert to_labels(below, sigmoid=True).tolist() == [[0]]


# ----- metrics ------------------------------------------------------------------------------
def test_case_metrics_against_hand_counts() -> None:
    pred = torch.zeros(2, 6, 6, 8, dtype=torch.long)
    label = torch.zeros(2, 1, 6, 6, 8)
    pred[0, 1:3, 1:3, 1:5] = 1  # 16 voxels
    label[0, 0, 1:3, 1:3, 3:7] = 1  # 16 voxels, 8 shared -> Dice 0.5
    pred[0, 2, 2, 2] = 2  # one voxel of class 2 ...
    label[0, 0, 2, 2, 5] = 2  # ... and its reference 3 voxels further along the last axis
    pred[1, 0, 0, 0] = 1  # case 2: class 1 predicted where the reference has none
    spacing = torch.tensor([[1.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
    m = case_metrics(pred, label, num_classes=3, spacing=spacing, hd95=True)
    dice_1 = 2 * 8 / (15 + 15)  # the class-2 voxels replace an unshared voxel of each box
    torch.testing.assert_close(m["dice"][0], torch.tensor([dice_1, 0.0]))
    assert m["dice"][1].isnan().all()  # no reference foreground in case 2
    torch.testing.assert_close(m["hd95"][0, 1], torch.tensor(9.0))  # 3 voxels * 3 mm
    assert m["hd95"][1].isnan().all()
    torch.testing.assert_close(m["pred_ml"], torch.tensor([[15 * 3e-3, 3e-3], [8e-3, 0.0]]))
    torch.testing.assert_close(m["ref_ml"], torch.tensor([[15 * 3e-3, 3e-3], [0.0, 0.0]]))
    no_hd = case_metrics(pred, label, num_classes=3, spacing=spacing, hd95=False)
    assert no_hd["hd95"].isnan().all()


def test_overlay_grid_colours_the_labels() -> None:
    image = torch.rand(1, 10, 12, 14)
    label = torch.zeros(10, 12, 14, dtype=torch.long)
    label[4, 2:6, 2:6] = 2
    grid = overlay_grid(image, label, torch.zeros_like(label), 3, axis=0, n_slices=2)
    assert grid.shape == (3, 2 * 12 + 3 * 2, 3 * 14 + 4 * 2)
    # rows are slices 0 and 4 (the most foreground first, shown in order); tiles padded by 2
    gray = grid[:, 16:28, 2:16]
    reference, prediction = grid[:, 16:28, 18:32], grid[:, 16:28, 34:48]
    torch.testing.assert_close(gray[0], gray[1])
    torch.testing.assert_close(prediction, gray)  # nothing predicted
    torch.testing.assert_close(reference[:, 6:, :], gray[:, 6:, :])
    assert not torch.allclose(reference[0, 2:6, 2:6], reference[1, 2:6, 2:6])  # coloured


# ----- inference ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_equals_whole_volume_when_roi_covers_it(mode: str) -> None:
    module = _module(patch_size=[8, 16, 16], sw_mode=mode).eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(module.infer(x), module(x), atol=1e-5, rtol=1e-5)


def test_sliding_window_pads_a_smaller_volume_and_crops_back() -> None:
    module = _module(patch_size=[8, 16, 16]).eval()
    x = torch.randn(1, 1, 6, 16, 16)
    with torch.no_grad():
        out = module.infer(x)
        padded = module(F.pad(x, (0, 0, 0, 0, 1, 1)))[:, :, 1:7]
    assert out.shape == (1, 3, 6, 16, 16)
    torch.testing.assert_close(out, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slice_dim", [0, 1, 2])
def test_2d_network_runs_slice_by_slice_over_a_volume(slice_dim: int) -> None:
    module = _module(backbone_config=VIT2D, patch_size=[8, 8]).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        out = module.infer(x, slice_dim)
        planes = [module(x.select(slice_dim + 2, k)) for k in range(8)]
    torch.testing.assert_close(out, torch.stack(planes, dim=slice_dim + 2), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="cannot segment"):
        module.infer(x)


# ----- training schedule: encoder freezing and learning-rate scale --------------------------
def _patches(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        label = torch.zeros(1, 8, 16, 16)
        label[0, 2:6, 4:12, 4:12] = torch.randint(1, 3, (1,), generator=g).float()
        items.append({"image": label / 2 + 0.1 * torch.randn(1, 8, 16, 16, generator=g),
                      "label": label})
    return items


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if v.dtype.is_floating_point and "running" not in k}


def test_frozen_encoder_moves_only_after_its_epochs(tmp_path: object) -> None:
    L.seed_everything(0)
    module = _module(freeze_encoder_epochs=1, lr=1e-2)
    snapshots = [(_snapshot(module.network.encoder), _snapshot(module.network.decoder))]

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            snapshots.append((_snapshot(module.network.encoder),
                              _snapshot(module.network.decoder)))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[Snapshot()],
                        enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(_patches(), batch_size=2))

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    (enc0, dec0), (enc1, dec1), (enc2, dec2) = snapshots
    assert same(enc0, enc1) and not same(dec0, dec1)  # epoch 0: decoder only
    assert not same(enc1, enc2) and not same(dec1, dec2)  # epoch 1: both


def test_learning_rates_follow_the_cosine_and_the_encoder_scale(tmp_path: object) -> None:
    module = _module(lr=1e-2, encoder_lr_scale=0.1)
    seen: list[tuple[float, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            groups = trainer.optimizers[0].param_groups
            seen.append((max(g["lr"] for g in groups if not g["encoder"]),
                         max(g["lr"] for g in groups if g["encoder"])))

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(_patches(), batch_size=2))
    want = [0.5 * 1e-2 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    assert [d for d, _ in seen] == pytest.approx(want)
    assert [e for _, e in seen] == pytest.approx([0.1 * w for w in want])


# ----- arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, "num_classes"),
    ({"patch_size": [16, 16]}, "patch_size"),
    ({"patch_size": [8, 12, 16]}, "patch_size"),
    ({"decoder": {"features": 8}}, "features"),
    ({"sw_overlap": 1.0}, "sw_overlap"),
    ({"sw_mode": "mean"}, "mean"),
    ({"lr": 0.0}, "lr"),
], ids=["classes", "dims", "divisor", "decoder", "overlap", "blend", "lr"])
def test_bad_module_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)
