"""The masked-autoencoder module on its own: cuboid masking, the masked-only loss, the ViT
encoder seeing only visible patches, CNN inpainting, training and the encoder's weights
(tiny in-memory volumes, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from medssl.models.backbones import build_backbone
from medssl.models.mae import (
    MAEDecoder,
    MaskedAutoencoder,
    cuboid_grid,
    expand_mask,
    masked_mse,
    random_cuboid_mask,
)
from medssl.models.vit import patchify
from medssl.models.weights import load_weights

SIZE = (16, 32, 32)
CNN_SIZE, CNN_CUBOID = (8, 16, 16), (4, 4, 4)  # the full UNet3D costs ~1 s per step even here
TINY_VIT = {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": list(SIZE),
            "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 1,
            "num_heads": 2}
UNET3D = {"name": "unet3d", "spatial_dims": 3, "in_channels": 1, "act": "relu"}
DECODER = {"decoder_hidden_size": 24, "decoder_mlp_dim": 48, "decoder_num_heads": 2}


def _module(backbone: dict | None = None, cuboid_size: tuple = (4, 8, 8),
            mask_percentage: float = 0.75, input_size: tuple = SIZE,
            **kwargs: object) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(backbone or TINY_VIT, input_size, mask_percentage, cuboid_size,
                             **(DECODER | kwargs))


def _volumes(n: int, size: tuple = SIZE) -> Tensor:
    """Smooth, structured volumes (sums of blobs) that a network can learn to inpaint."""
    g = torch.Generator().manual_seed(1)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    out = torch.zeros(n, 1, *size)
    for i in range(n):
        for _ in range(3):
            centre = torch.rand(len(size), generator=g) * 1.4 - 0.7
            dist = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
            out[i, 0] += torch.exp(-dist / 0.1)
    # A background level, so that predicting zeros is no good reconstruction.
    return 0.3 + 0.7 * out / out.amax(dim=tuple(range(1, out.ndim)), keepdim=True)


# ----- masking ------------------------------------------------------------------------------
@pytest.mark.parametrize(("input_size", "cuboid_size", "message"), [
    pytest.param((16, 32, 32), (4, 8), r"must have 3 values for 3D input", id="2-for-3d"),
    pytest.param((32, 32), (4, 8, 8), r"must have 2 values for 2D input", id="3-for-2d"),
    pytest.param((16, 32, 32), (4, 8, 12), r"\[4, 8, 12\] must divide the input size",
                 id="not-dividing"),
    pytest.param((16, 32, 32), (4, 0, 8), r"must be positive ints", id="zero"),
])
def test_cuboid_size_errors(input_size: tuple, cuboid_size: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=r"mae_cfg\.cuboid_size " + message):
        cuboid_grid(input_size, cuboid_size)


def test_cuboid_grid() -> None:
    assert cuboid_grid((40, 224, 224), (4, 16, 16)) == (10, 14, 14)
    assert cuboid_grid((64, 48), (16, 8)) == (4, 6)


@pytest.mark.parametrize("mask_percentage", [0.0, 1.0, -0.1, 75.0, 0.001, 0.999])
def test_mask_percentage_errors(mask_percentage: float) -> None:
    with pytest.raises(ValueError, match=r"mae_cfg\.mask_percentage"):
        random_cuboid_mask(2, (4, 4, 4), mask_percentage)


def test_random_mask_hides_the_fraction_uniformly() -> None:
    grid, p = (4, 4, 4), 0.3
    masks = random_cuboid_mask(2000, grid, p, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (2000, *grid) and masks.dtype == torch.bool
    # Exactly round(0.3 * 64) = 19 cuboids in every sample.
    assert (masks.flatten(1).sum(1) == 19).all()
    # Every cuboid equally likely: 19/64 each, binomial sd over 2000 draws ~ 0.010.
    assert torch.allclose(masks.float().mean(0), torch.full(grid, 19 / 64), atol=0.04)
    # Samples draw independently.
    assert len({tuple(m.flatten().tolist()) for m in masks[:50]}) == 50


def test_expand_mask() -> None:
    mask = torch.tensor([[[True, False], [False, True]]])
    out = expand_mask(mask, (2, 3))
    assert out.shape == (1, 4, 6)
    assert out[0, :2, :3].all() and not out[0, :2, 3:].any() and out[0, 2:, 3:].all()


@pytest.mark.parametrize("mask_percentage", [0.4, 0.75])
def test_cnn_blanks_the_masked_fraction_of_voxels(mask_percentage: float) -> None:
    module = _module(UNET3D, CNN_CUBOID, mask_percentage, CNN_SIZE)
    seen = {}
    module.segmenter.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.ones(3, 1, *CNN_SIZE)
    module.loss(x, random_cuboid_mask(3, module.grid, mask_percentage))
    n = math.prod(module.grid)  # 2 x 4 x 4 cuboids of 4 x 4 x 4 voxels
    blanked = (seen["x"] == 0).flatten(1).float().mean(1)
    assert torch.allclose(blanked, torch.full((3,), mask_percentage), atol=0.5 / n)


@pytest.mark.parametrize("cuboid_size", [(4, 8, 8), (8, 16, 16)], ids=["patch", "2x2x2-patches"])
def test_vit_encodes_only_the_visible_fraction(cuboid_size: tuple) -> None:
    module = _module(cuboid_size=cuboid_size, mask_percentage=0.6)
    seen = {}
    forward_tokens = module.encoder.forward_tokens

    def spy(x: Tensor, keep: Tensor | None = None) -> Tensor:
        seen["keep"] = keep
        return forward_tokens(x, keep=keep)

    module.encoder.forward_tokens = spy
    mask = random_cuboid_mask(2, module.grid, 0.6, generator=torch.Generator().manual_seed(3))
    _, _, hidden, _ = module.reconstruct(_volumes(2), mask)
    n_patches = 4 * 4 * 4
    keep = seen["keep"]
    assert keep.shape[1] == n_patches - hidden[0].sum()
    assert abs(hidden.float().mean().item() - 0.6) <= 0.5 / math.prod(module.grid)
    for b in range(2):  # the kept tokens are exactly the visible patches
        assert set(keep[b].tolist()) == set((~hidden[b]).nonzero()[:, 0].tolist())
    # Whole cuboids: patches of one cuboid are hidden together.
    factor = [c // p for c, p in zip(cuboid_size, (4, 8, 8), strict=True)]
    assert torch.equal(hidden.view(2, 4, 4, 4), expand_mask(mask, factor))


@pytest.mark.parametrize("backbone", [
    pytest.param({"name": "swin_unetr", "spatial_dims": 2, "in_channels": 1, "feature_size": 12},
                 id="swin_unetr"),
    pytest.param({"name": "efficientnet", "spatial_dims": 2, "in_channels": 1,
                  "model_name": "efficientnet-b0"}, id="efficientnet"),
    pytest.param({"name": "unet3d", "spatial_dims": 2, "in_channels": 1}, id="unet"),
])
def test_every_cnn_family_inpaints_2d_slices(backbone: dict) -> None:
    """Each segmentation family reconstructs the whole input; gradients reach its encoder."""
    size = (32, 64)  # Swin's instance norm needs more than one value at 1/32 of the input
    module = _module(backbone, (8, 8), 0.5, size)
    seen = {}
    module.segmenter.register_forward_hook(lambda m, args, out: seen.update(out=out))
    loss, (pred, _, hidden, _) = module.loss(_volumes(2, size), random_cuboid_mask(
        2, module.grid, 0.5, generator=torch.Generator().manual_seed(0)))
    loss.backward()
    assert seen["out"].shape == (2, 1, *size) and pred.shape == (2, 4 * 8, 64)
    assert torch.isfinite(loss) and hidden.sum() == 2 * 16
    assert all(p.grad is not None for p in module.encoder.parameters() if p.requires_grad)


def test_cnn_input_size_checked_against_the_segmenter() -> None:
    swin = {"name": "swin_unetr", "spatial_dims": 2, "in_channels": 1, "feature_size": 12}
    with pytest.raises(ValueError, match=r"input_size \[32, 32\] is too small for the "
                       "swin_unetr segmenter"):
        _module(swin, (8, 8), 0.5, (32, 32))


# ----- loss -----------------------------------------------------------------------------
def _reference_forward_loss(target: Tensor, pred: Tensor, mask: Tensor,
                            norm_pix_loss: bool) -> Tensor:
    """Frozen copy of facebookresearch/mae ``models_mae.py`` ``forward_loss`` (commit
    efb2a80), with ``target = self.patchify(imgs)`` done by the caller."""
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
    loss = (loss * mask).sum() / mask.sum()  # mean loss on removed patches
    return loss


@pytest.mark.parametrize("norm_target", [False, True])
def test_masked_mse_matches_mae_reference(norm_target: bool) -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 20, 12, generator=g), torch.rand(3, 20, 12, generator=g)
    mask = torch.rand(3, 20, generator=g) < 0.7
    expected = _reference_forward_loss(target, pred, mask.float(), norm_target)
    assert masked_mse(pred, target, mask, norm_target) == pytest.approx(expected.item(),
                                                                        rel=1e-6)


def test_masked_mse_by_hand() -> None:
    pred = torch.tensor([[[1.0, 1.0], [5.0, 5.0], [0.0, 2.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 2) / 2)


@pytest.mark.parametrize("backbone", [TINY_VIT, UNET3D], ids=["vit", "unet3d"])
@pytest.mark.parametrize("norm_target", [False, True])
def test_unmasked_outputs_do_not_change_the_loss(backbone: dict, norm_target: bool) -> None:
    """Perturb every prediction of a visible patch/voxel: the loss stays equal."""
    if backbone["name"] == "vit":
        module = _module(backbone, mask_percentage=0.5, norm_target=norm_target).eval()
        x = _volumes(2)
    else:
        module = _module(backbone, CNN_CUBOID, 0.5, CNN_SIZE, norm_target=norm_target).eval()
        x = _volumes(2, CNN_SIZE)
    mask = random_cuboid_mask(2, module.grid, 0.5, generator=torch.Generator().manual_seed(0))
    net = module.decoder if "decoder" in module._modules else module.segmenter
    with torch.no_grad():
        base, (_, _, hidden, unit) = module.loss(x, mask)
        visible = ~expand_mask(mask, module.cuboid_size).unsqueeze(1)

        def perturb(m: object, args: object, out: Tensor) -> Tensor:
            if out.ndim == 3:  # ViT decoder: patches (B, N, P)
                return out + 100.0 * (~hidden).unsqueeze(-1)
            return out + 100.0 * visible  # CNN: voxels (B, C, *S)

        handle = net.register_forward_hook(perturb)
        perturbed, _ = module.loss(x, mask)
        handle.remove()
        # Perturbing a masked position does change it (the check can fail).
        changed, _ = module.loss(x.masked_fill(~visible, 0.5), mask)
    assert perturbed.item() == pytest.approx(base.item(), rel=1e-6)
    assert changed.item() != pytest.approx(base.item(), rel=1e-3)


def test_vit_prediction_ignores_masked_input() -> None:
    """A true MAE: changing the hidden patches of the input leaves every prediction equal."""
    module = _module(mask_percentage=0.5).eval()
    x = _volumes(2)
    mask = random_cuboid_mask(2, module.grid, 0.5, generator=torch.Generator().manual_seed(0))
    hidden_voxels = expand_mask(mask, module.cuboid_size).unsqueeze(1)
    with torch.no_grad():
        pred, *_ = module.reconstruct(x, mask)
        noisy = x + hidden_voxels * torch.randn_like(x)
        pred_noisy, *_ = module.reconstruct(noisy, mask)
        pred_visible_changed, *_ = module.reconstruct(x + (~hidden_voxels) * 0.3, mask)
    assert torch.allclose(pred, pred_noisy, atol=1e-6)
    assert not torch.allclose(pred, pred_visible_changed, atol=1e-3)


# ----- construction errors ----------------------------------------------------------------
def test_vit_cuboid_must_cover_whole_patches() -> None:
    with pytest.raises(ValueError, match=r"cuboid_size \[4, 4, 8\] must be a multiple of the "
                       r"ViT patch_size \[4, 8, 8\]"):
        _module(cuboid_size=(4, 4, 8))


def test_input_size_checked_against_the_backbone() -> None:
    with pytest.raises(ValueError, match=r"input_size \[12, 16, 16\] does not fit"):
        _module(UNET3D, input_size=(12, 16, 16), cuboid_size=(4, 4, 4))


def test_decoder_width_checked() -> None:
    with pytest.raises(ValueError, match="divisible by 6 for 3D sin-cos"):
        MAEDecoder(3, (2, 2, 2), 32, 8, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="divisible by decoder_num_heads"):
        MAEDecoder(2, (2, 2), 32, 8, hidden_size=24, num_heads=5)


def test_decoder_output_and_2d() -> None:
    vit2d = TINY_VIT | {"spatial_dims": 2, "img_size": [32, 32], "patch_size": [8, 8]}
    module = _module(vit2d, cuboid_size=(8, 8), input_size=(32, 32))
    x = _volumes(2, (32, 32))
    mask = random_cuboid_mask(2, module.grid, 0.75)
    pred, target, hidden, unit = module.reconstruct(x, mask)
    assert pred.shape == target.shape == (2, 16, 64) and hidden.sum() == 2 * 12
    assert torch.equal(target, patchify(x, (8, 8)))


def test_wrong_input_size_at_run_time() -> None:
    module = _module()
    with pytest.raises(ValueError, match=r"differs from the input_size \[16, 32, 32\]"):
        module.reconstruct(torch.rand(1, 1, 16, 32, 64), torch.zeros(1, 4, 4, 4, dtype=bool))


# ----- training ---------------------------------------------------------------------------
class _Fixed(Dataset):
    """The same volumes, ``repeats`` times over (many steps in one epoch: Lightning's
    per-epoch overhead would dominate a tiny test)."""

    def __init__(self, volumes: Tensor, repeats: int = 1) -> None:
        self.volumes, self.repeats = volumes, repeats

    def __len__(self) -> int:
        return len(self.volumes) * self.repeats

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.volumes[i % len(self.volumes)]}


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kwargs)


def test_training_lowers_the_validation_loss(tmp_path: Path) -> None:
    """Lightning training (schedule, masks per step) on fixed volumes lowers the loss on
    fixed validation masks. (CNNs: tests/scripts/test_mae.py, on demo volumes.)"""
    steps, volumes = 40, _volumes(4)
    module = _module(mask_percentage=0.5, lr=3e-3, warmup_epochs=0)
    val = DataLoader(_Fixed(volumes), batch_size=4)

    def val_loss() -> float:
        return _trainer(tmp_path).validate(module, val, verbose=False)[0]["val/mae_loss"]

    before = val_loss()
    train = DataLoader(_Fixed(volumes, repeats=steps // 2), batch_size=2)
    _trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, train)
    after = val_loss()
    assert after < 0.7 * before, (before, after)


class _Numbered(Dataset):
    """Volumes numbered as the data module numbers evaluation items (``item_index``);
    ``order`` picks them, repeats allowed (as a DDP sampler pads a device's share)."""

    def __init__(self, volumes: Tensor, order: list[int]) -> None:
        self.volumes, self.order = volumes, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        return {"image": self.volumes[self.order[i]], "item_index": self.order[i]}


def test_validation_loss_is_per_item_whatever_the_batching(tmp_path: Path) -> None:
    """Each item's mask is seeded by its number, and a repeated item counts once: the loss is
    the same for any batch size, on a repeat of the run, and with a padded repeat."""
    module = _module().eval()
    volumes = _volumes(3)

    def val_loss(order: list[int], batch_size: int) -> float:
        loader = DataLoader(_Numbered(volumes, order), batch_size=batch_size)
        return _trainer(tmp_path).validate(module, loader, verbose=False)[0]["val/mae_loss"]

    reference = val_loss([0, 1, 2], 3)
    assert val_loss([0, 1, 2], 1) == pytest.approx(reference, rel=1e-6)
    assert val_loss([0, 1, 2], 3) == reference
    assert val_loss([0, 1, 2, 0], 2) == pytest.approx(reference, rel=1e-6)
    # The mean of the three items' own losses, each under its own mask.
    singles = [val_loss([i], 1) for i in range(3)]
    assert reference == pytest.approx(sum(singles) / 3, rel=1e-6)
    assert len({round(v, 8) for v in singles}) == 3
    # Without numbers (a plain loader) masks are fixed per batch position.
    plain = DataLoader(_Fixed(volumes), batch_size=3)
    first, second = (_trainer(tmp_path).validate(module, plain, verbose=False)[0]["val/mae_loss"]
                     for _ in range(2))
    assert first == second


def test_optimizer_groups_exclude_norms_and_biases() -> None:
    module = _module()
    decay, no_decay = module.configure_optimizers().param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert "encoder.patch_embed.weight" in [names[id(p)] for p in decay["params"]]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


@pytest.mark.parametrize("norm_target", [False, True])
def test_preview_keeps_visible_voxels(norm_target: bool) -> None:
    module = _module(norm_target=norm_target).eval()
    x = _volumes(2)
    mask = random_cuboid_mask(2, module.grid, 0.75)
    with torch.no_grad():
        _, out = module.loss(x, mask)
        original, masked, recon = module.preview(x, out)
    hidden = expand_mask(mask[:1], module.cuboid_size).unsqueeze(1)
    assert torch.equal(original, x[:1]) and torch.equal(masked, x[:1].masked_fill(hidden, 0))
    assert torch.equal(recon[~hidden], x[:1][~hidden])
    assert not torch.allclose(recon[hidden], x[:1][hidden])


# ----- the encoder's weights ----------------------------------------------------------------
@pytest.mark.parametrize("backbone", [TINY_VIT, UNET3D], ids=["vit", "unet3d"])
def test_encoder_keys_load_into_a_fresh_backbone(backbone: dict) -> None:
    module = _module(backbone) if backbone is TINY_VIT else _module(backbone, CNN_CUBOID,
                                                                     input_size=CNN_SIZE)
    with torch.no_grad():
        for p in module.encoder.parameters():
            p.add_(1.0)
    fresh = build_backbone(**module.encoder.config)
    report = load_weights(fresh, module.state_dict())  # as from the Lightning checkpoint
    assert report.complete and report.prefix == "encoder."
    assert len(report.loaded) == len(fresh.state_dict())
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, module.encoder.state_dict()[name])
