"""Masked autoencoding for volumes (B, C, D, H, W) and slices (B, C, H, W).

Two ways to pre-train an encoder by reconstructing hidden parts of the input:

- ViT: a true masked autoencoder (He et al., "Masked Autoencoders Are Scalable Vision
  Learners", CVPR 2022; facebookresearch/mae ``models_mae.py``). The encoder sees only the
  visible patches, a light transformer decoder (MONAI blocks, fixed sin-cos positions as in
  MONAI's ``MaskedAutoEncoderViT``) fills in mask tokens, and the loss is the mean squared error
  on the masked patches only, optionally against per-patch normalised targets.
- CNN backbones: masked-cuboid inpainting (Models Genesis style). Cuboids are blanked (set to
  0), a segmentation network with as many outputs as input channels reconstructs the input,
  and the loss counts only the masked voxels.

Masking is the same for both: the input is tiled by cuboids of ``cuboid_size`` voxels and a
random ``mask_percentage`` of the tiles is hidden, exactly (no overlaps, unlike cuboids dropped
at random positions), so the masked fraction is what the config says.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.layers import trunc_normal_
from torch import Tensor, nn
from torchvision.utils import make_grid

from medssl.errors import InputError
from medssl.models.backbones import build_backbone
from medssl.models.dino import warmup_cosine
from medssl.models.gather import batch_index, mean_once
from medssl.models.optim import adamw
from medssl.models.segmenters import build_segmenter
from medssl.models.vit import patchify, unpatchify

__all__ = ["MAEDecoder", "MaskedAutoencoder", "cuboid_grid", "expand_mask", "masked_mse",
           "preview_panel", "random_cuboid_mask"]

IMAGE = "image"  # the batch key of the input images (the data module's)


def cuboid_grid(input_size: Sequence[int], cuboid_size: Sequence[int]) -> tuple[int, ...]:
    """The grid of cuboids that tiles an input: input_size // cuboid_size per axis.

    Raises:
        ValueError: ``cuboid_size`` has not one value per spatial axis of the input, or does
            not divide it.
    """
    dims = len(input_size)
    if len(cuboid_size) != dims:
        raise InputError(
            f"mae_cfg.cuboid_size must have {dims} values for {dims}D input {list(input_size)} "
            f"(one per spatial axis), got {list(cuboid_size)}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in cuboid_size):
        raise InputError(f"mae_cfg.cuboid_size must be positive ints, got {list(cuboid_size)}")
    if any(s % c for s, c in zip(input_size, cuboid_size, strict=True)):
        raise InputError(
            f"mae_cfg.cuboid_size {list(cuboid_size)} must divide the input size "
            f"{list(input_size)} on every axis (the cuboids tile the input)")
    return tuple(s // c for s, c in zip(input_size, cuboid_size, strict=True))


def n_masked(n_cuboids: int, mask_percentage: float) -> int:
    """Cuboids hidden per sample: ``round(mask_percentage * n_cuboids)``, at least one hidden
    and one visible.

    Raises:
        ValueError: the fraction is outside (0, 1) or rounds to none or all cuboids.
    """
    if not 0.0 < mask_percentage < 1.0:
        raise InputError(
            f"mae_cfg.mask_percentage is the masked fraction in (0, 1) (0.75 hides 75%), got "
            f"{mask_percentage}")
    n = round(mask_percentage * n_cuboids)
    if not 1 <= n <= n_cuboids - 1:
        raise InputError(
            f"mae_cfg.mask_percentage {mask_percentage} of {n_cuboids} cuboids hides {n}: "
            "at least one cuboid must be hidden and one visible; use smaller cuboids")
    return n


def random_cuboid_mask(batch_size: int, grid: Sequence[int], mask_percentage: float,
                       generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """Which cuboids to hide: bool (B, *grid), True = masked, the same count in every sample.

    As MAE's ``random_masking``: rank uniform noise per sample and hide the lowest ranks.
    """
    n = math.prod(grid)
    hide = n_masked(n, mask_percentage)
    noise = torch.rand(batch_size, n, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < hide).view(batch_size, *grid)


def expand_mask(mask: Tensor, factor: Sequence[int]) -> Tensor:
    """Repeat each cell of a mask (B, *grid) ``factor`` times per axis: (B, *(grid * factor))."""
    for axis, f in enumerate(factor, start=1):
        mask = mask.repeat_interleave(f, dim=axis)
    return mask


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor, norm_target: bool = False,
               eps: float = 1e-6, per_sample: bool = False) -> Tensor:
    """Mean squared error over the masked patches only (facebookresearch/mae ``forward_loss``).

    Args:
        pred: predictions (B, N, P) of N patches of P values.
        target: the true patches (B, N, P).
        mask: bool or 0/1 (B, N), 1 = masked (scored).
        norm_target: normalise each target patch to zero mean and unit variance first (MAE's
            ``norm_pix_loss``: sharper reconstructions, better features in the paper).
        eps: added to the variance before the square root.
        per_sample: one value per sample (B,) instead of the mean over all masked patches
            (equal when every sample hides as many patches, as ``random_cuboid_mask`` does).
    """
    target = target.float()
    if norm_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    if per_sample:
        return (per_patch * mask).sum(dim=-1) / mask.sum(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


@torch.no_grad()
def preview_panel(images: Sequence[Tensor], size: int = 128) -> Tensor:
    """One image (3, H, W): the middle slice along axis 0 of each (1, C, *S) tensor, first
    channel, side by side with its longer side ``size``, on the intensity scale of the first
    (so a reconstruction's errors show as they are, not stretched to its own range)."""
    planes = []
    for image in images:
        x = image[0, :1].float()
        planes.append(x[:, x.shape[1] // 2] if x.ndim == 4 else x)
    lo, hi = planes[0].min(), planes[0].max()
    scale = size / max(planes[0].shape[-2:])
    shape = [max(round(s * scale), 1) for s in planes[0].shape[-2:]]
    mode = "nearest" if scale >= 1 else "area"
    tiles = [F.interpolate(p[None], size=shape, mode=mode)[0] for p in planes]
    tiles = [((t - lo) / (hi - lo + 1e-8)).clamp(0, 1).expand(3, -1, -1) for t in tiles]
    return make_grid(tiles, nrow=len(tiles), padding=2)


class MAEDecoder(nn.Module):
    """MAE's light decoder: encoded visible tokens plus mask tokens -> patch values.

    Layout of MONAI's ``MaskedAutoEncoderViT`` decoder (embedding, learnt mask token, fixed
    sin-cos positions, transformer blocks, LayerNorm, linear prediction), over the token subset
    our ``ViTBackbone.forward_tokens(x, keep)`` returns.

    Args:
        spatial_dims: 3 or 2.
        grid: patch grid of the training inputs (the sin-cos positions are laid out for it).
        in_dim: encoder token width.
        patch_values: values per patch to predict, prod(patch_size) * channels.
        hidden_size: decoder width; divisible by 6 in 3D, 4 in 2D (sin-cos positions).
        mlp_dim: decoder MLP width.
        num_layers: decoder transformer blocks (MAE: 8 for ImageNet; 1 already works).
        num_heads: decoder attention heads; must divide ``hidden_size``.
    """

    def __init__(self, spatial_dims: int, grid: Sequence[int], in_dim: int, patch_values: int,
                 hidden_size: int = 96, mlp_dim: int = 384, num_layers: int = 1,
                 num_heads: int = 3) -> None:
        per_axis = 2 * spatial_dims
        if hidden_size % per_axis:
            raise InputError(f"decoder_hidden_size must be divisible by {per_axis} for "
                             f"{spatial_dims}D sin-cos positions, got {hidden_size}")
        if hidden_size % num_heads:
            raise InputError(f"decoder_hidden_size {hidden_size} must be divisible by "
                             f"decoder_num_heads {num_heads}")
        if num_layers < 1:
            raise InputError(f"decoder_num_layers must be at least 1, got {num_layers}")
        super().__init__()
        self.grid = tuple(grid)
        self.embed = nn.Linear(in_dim, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        with warnings.catch_warnings():  # MONAI calls torch.meshgrid without indexing=
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            pos = build_sincos_position_embedding(list(self.grid), hidden_size, spatial_dims)
        # A buffer, not MONAI's frozen Parameter: nothing for the optimizer or DDP to skip.
        self.register_buffer("pos_embed", pos.data, persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, qkv_bias=True,
                             use_flash_attention=True) for _ in range(num_layers))
        for block in self.blocks:
            block.norm_cross_attn = nn.Identity()  # never used; unused parameters break DDP
        self.norm = nn.LayerNorm(hidden_size)
        self.pred = nn.Linear(hidden_size, patch_values)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # as facebookresearch/mae (xavier for Linear layers)
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, keep: Tensor) -> Tensor:
        """Predicted patches (B, N, patch_values) for all N = prod(grid) patches.

        Args:
            tokens: encoder output (B, 1 + K, in_dim), the CLS token first, then the K visible
                patches in the order of ``keep``.
            keep: indices (B, K) of the visible patches in the patch grid (row-major).
        """
        x = self.embed(tokens)
        b, n = x.shape[0], self.pos_embed.shape[1]
        full = self.mask_token.to(x.dtype).expand(b, n, -1)
        index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = full.scatter(1, index, x[:, 1:])  # visible tokens back in their grid places
        x = torch.cat([x[:, :1], full + self.pos_embed.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MaskedAutoencoder(L.LightningModule):
    """Masked-autoencoder pre-training of a backbone (ViT: MAE; CNNs: cuboid inpainting).

    ``encoder`` is the backbone built from ``backbone_config``: it is what gets exported and
    what downstream scripts load. The state dict holds it under ``encoder.`` (for CNNs also
    inside ``segmenter.``, the same tensors), so any of our loaders finds it by that prefix.

    Args:
        backbone_config: ``build_backbone`` kwargs (including ``name``).
        input_size: spatial size of every input (the cuboid grid and, for the ViT, the
            decoder's position grid are laid out for it).
        mask_percentage: fraction of the cuboids hidden in each sample, in (0, 1).
        cuboid_size: masking unit in voxels per axis; must divide ``input_size``; for the ViT
            a multiple of its patch size (``patch_size`` itself is MAE's patch masking).
        norm_target: score against per-patch normalised targets (per cuboid for CNNs).
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: the ViT's
            MAE decoder (unused by CNNs, whose segmentation decoder reconstructs).
        lr: peak learning rate after warm-up (MAE: 1.5e-4 * effective batch / 256).
        min_lr: learning rate at the end of the cosine decay.
        warmup_epochs: linear learning-rate warm-up.
        weight_decay: AdamW weight decay (none on norms and biases).
        betas: AdamW betas (MAE: 0.9, 0.95).
        mask_seed: masks are drawn from generators seeded by this and (epoch, batch, rank) in
            training, (batch) in validation: training masks repeat exactly after a resume
            whatever else consumed random numbers, and the validation loss is measured on the
            same masks every epoch.
    """

    def __init__(self, backbone_config: dict, input_size: Sequence[int],
                 mask_percentage: float = 0.75, cuboid_size: Sequence[int] = (8, 16, 16),
                 norm_target: bool = False, decoder_hidden_size: int = 96,
                 decoder_mlp_dim: int = 384, decoder_num_layers: int = 1,
                 decoder_num_heads: int = 3, lr: float = 1.5e-4, min_lr: float = 1e-6,
                 warmup_epochs: int = 1, weight_decay: float = 0.05,
                 betas: Sequence[float] = (0.9, 0.95), mask_seed: int = 0) -> None:
        super().__init__()
        if lr <= 0 or min_lr < 0:
            raise InputError(f"need lr > 0 and min_lr >= 0, got lr={lr}, min_lr={min_lr}")
        self.save_hyperparameters()
        self.input_size, self.cuboid_size = tuple(input_size), tuple(cuboid_size)
        self.grid = cuboid_grid(self.input_size, self.cuboid_size)
        n_masked(math.prod(self.grid), mask_percentage)
        backbone_config = dict(backbone_config)
        channels = backbone_config.get("in_channels", 1)
        if backbone_config["name"] == "vit":
            self.encoder = build_backbone(**backbone_config)
            self.encoder.check_input_size(self.input_size, "input_size")
            patch = self.encoder.patch_size
            if any(c % p for c, p in zip(self.cuboid_size, patch, strict=True)):
                raise InputError(
                    f"mae_cfg.cuboid_size {list(self.cuboid_size)} must be a multiple of the "
                    f"ViT patch_size {list(patch)} per axis (masking hides whole patches)")
            self.decoder = MAEDecoder(
                self.encoder.spatial_dims, self.encoder.grid(self.input_size),
                self.encoder.out_dim, math.prod(patch) * channels, decoder_hidden_size,
                decoder_mlp_dim, decoder_num_layers, decoder_num_heads)
        else:
            self.segmenter = build_segmenter(backbone_config, num_classes=channels)
            self.encoder = self.segmenter.encoder
            self.segmenter.check_input_size(self.input_size, "input_size")
        self._preview: tuple[str, list[Tensor]] | None = None
        self._val_losses: list[tuple[Tensor, Tensor]] = []  # (per-item loss, item number)

    @property
    def is_vit(self) -> bool:
        return hasattr(self, "decoder")

    # ----- masking and reconstruction ---------------------------------------------------
    def reconstruct(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple]:
        """Reconstruct x (B, C, *input_size) with the cuboids in ``mask`` (B, *grid) hidden.

        Returns:
            (predicted patches (B, N, P), true patches (B, N, P), patch mask (B, N) with
            True = hidden, patch size in voxels): ViT patches, or cuboids for CNNs.
        """
        if tuple(x.shape[2:]) != self.input_size:
            raise InputError(f"input spatial size {tuple(x.shape[2:])} differs from the "
                             f"input_size {list(self.input_size)} the masking is laid out for")
        if self.is_vit:
            patch = self.encoder.patch_size
            factor = [c // p for c, p in zip(self.cuboid_size, patch, strict=True)]
            hidden = expand_mask(mask, factor).flatten(1)
            # Every sample hides the same number of patches, so the visible ones form a
            # (B, K) index table; ascending order, which attention does not care about.
            keep = (~hidden).nonzero()[:, 1].view(x.shape[0], -1)
            pred = self.decoder(self.encoder.forward_tokens(x, keep=keep), keep)
            return pred, patchify(x, patch), hidden, patch
        voxels = expand_mask(mask, self.cuboid_size).unsqueeze(1)
        out = self.segmenter(x.masked_fill(voxels, 0.0))
        return (patchify(out, self.cuboid_size), patchify(x, self.cuboid_size),
                mask.flatten(1), self.cuboid_size)

    def loss(self, x: Tensor, mask: Tensor) -> tuple[Tensor, tuple]:
        """Masked-only MSE of x's reconstruction, and the ``reconstruct`` outputs."""
        out = self.reconstruct(x, mask)
        return masked_mse(*out[:3], norm_target=self.hparams.norm_target), out

    @torch.no_grad()
    def preview(self, x: Tensor, out: tuple) -> list[Tensor]:
        """Original, masked input and reconstruction (visible voxels kept) of sample 0."""
        pred, target, hidden, unit = (t[:1] if isinstance(t, Tensor) else t for t in out)
        pred = pred.float()
        if self.hparams.norm_target:  # back to intensities with each true patch's statistics
            target = target.float()
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(
                -1, keepdim=True)
        grid = [s // u for s, u in zip(self.input_size, unit, strict=True)]
        voxels = expand_mask(hidden.view(1, *grid), unit).unsqueeze(1)
        original = x[:1].float()
        recon = torch.where(voxels, unpatchify(pred, unit, self.input_size), original)
        return [t.detach().cpu() for t in (original, original.masked_fill(voxels, 0.0), recon)]

    # ----- training ---------------------------------------------------------------------
    def _steps(self) -> tuple[int, int]:
        """Optimizer steps in the whole run and in one epoch."""
        trainer = self.trainer
        total = max(int(trainer.estimated_stepping_batches), 1)
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return total, max(min(per_epoch, total), 1)

    def current_lr(self) -> float:
        """Linear warm-up then cosine decay, a pure function of the optimizer step."""
        total, per_epoch = self._steps()
        hp = self.hparams
        return warmup_cosine(self.global_step, total, hp.warmup_epochs * per_epoch, hp.lr,
                             hp.min_lr)

    def _generator(self, *parts: int) -> torch.Generator:
        """A CPU generator seeded by ``mask_seed`` and ``parts`` (masks are small: drawing
        them on the CPU costs nothing and gives the same masks on every device)."""
        seed = self.hparams.mask_seed
        for part in parts:
            seed = (seed * 1_000_003 + part + 1) % 2**62
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def _images(batch: dict) -> Tensor:
        # Plain tensors: a MONAI MetaTensor would make the loss (and the checkpoint callback's
        # scores) MetaTensors, which torch.load(weights_only=True) cannot read back.
        return batch[IMAGE].as_subclass(Tensor)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x = self._images(batch)
        lr = self.current_lr()
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = lr
        generator = self._generator(0, self.current_epoch, batch_idx, self.global_rank)
        mask = random_cuboid_mask(x.shape[0], self.grid, self.hparams.mask_percentage,
                                  generator=generator).to(x.device)
        loss, out = self.loss(x, mask)
        bs = x.shape[0]
        self.log_dict({"train/mae_loss": loss, "train/lr": lr}, batch_size=bs, sync_dist=True)
        self.log("mae_loss", loss, batch_size=bs, prog_bar=True, logger=False)
        if batch_idx == 0:
            self._preview = ("train", self.preview(x, out))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self._images(batch)
        n = x.shape[0]
        index = batch_index(batch, n)
        # Each item's mask is seeded by its number in the split, so that its loss is the same
        # whatever the batch size or device count (items without a number: by position).
        masks = [random_cuboid_mask(1, self.grid, self.hparams.mask_percentage,
                                    generator=self._generator(1, i) if i >= 0 else
                                    self._generator(2, batch_idx, b))
                 for b, i in enumerate(index.tolist())]
        out = self.reconstruct(x, torch.cat(masks).to(x.device))
        self._val_losses.append((masked_mse(*out[:3], norm_target=self.hparams.norm_target,
                                            per_sample=True), index))
        if batch_idx == 0:
            self._preview = ("val", self.preview(x, out))

    def on_validation_epoch_end(self) -> None:
        """``val/mae_loss``: the mean over the validation items, each counted once on any
        number of devices (``mean_once``)."""
        loss, self._val_losses = mean_once(self, self._val_losses), []
        if loss is not None:  # the same on every device; sync_dist only averages equal values
            self.log("val/mae_loss", loss, sync_dist=True, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        """Original / masked / reconstructed middle slices, of validation sample 0 when there
        is validation (fixed mask), else of the epoch's first training sample."""
        experiment = getattr(self.logger, "experiment", None)
        if self._preview is not None and hasattr(experiment, "add_image"):
            stage, images = self._preview
            experiment.add_image(f"{stage}/reconstruction", preview_panel(images),
                                 self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # As MAE (timm param_groups_weight_decay): no decay on biases and 1-D parameters.
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
        return adamw(self, [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ], lr=self.hparams.lr, betas=tuple(self.hparams.betas))
