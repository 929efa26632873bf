"""Backbones mapping a volume (B, C, D, H, W) or slice (B, C, H, W) to features (B, out_dim).

Every backbone keeps its constructor arguments in ``config`` (plain JSON types plus ``"name"``), so
``build_backbone(**backbone.config)`` rebuilds the same architecture; the weight files in
``medssl.models.weights`` store this dict beside the state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.layers import Conv, Norm, Pool, trunc_normal_
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformer
from monai.utils import look_up_option
from torch import nn

__all__ = ["BACKBONES", "Backbone", "SwinEncoder", "UNet3DEncoder", "ViTBackbone", "build_backbone"]


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _as_size(name: str, value: int | Sequence[int], spatial_dims: int) -> list[int]:
    """Expand an int to ``spatial_dims`` entries; check a sequence has that many positive ints."""
    size = [value] * spatial_dims if isinstance(value, int) else list(value)
    if len(size) != spatial_dims or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(
            f"{name} must be a positive int or {spatial_dims} positive ints, got {value!r}."
        )
    return size


class Backbone(nn.Module):
    """Base class: shared input checks and the ``config`` contract."""

    name: ClassVar[str]
    spatial_dims: int
    in_channels: int
    out_dim: int
    config: dict[str, Any]

    @property
    def input_divisors(self) -> tuple[int, ...]:
        """Every input spatial size must be divisible by these, per axis."""
        return (getattr(self, "divisor", 1),) * self.spatial_dims

    def check_input_size(self, size: Sequence[int], what: str = "input") -> None:
        """Raise ValueError, naming ``what``, if ``size`` cannot go through this backbone."""
        divisors = self.input_divisors
        if len(size) != len(divisors) or any(s % d for s, d in zip(size, divisors, strict=True)):
            raise ValueError(f"{what} {list(size)} does not fit {type(self).__name__}: every "
                             f"size must be divisible by {list(divisors)} per axis")

    def _check_input(self, x: torch.Tensor, divisors: Sequence[int]) -> None:
        """Fail loudly instead of letting strided convolutions floor (e.g. 40 slices / patch 16)."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, "
                f"{'D, H, W' if self.spatial_dims == 3 else 'H, W'}), got shape {tuple(x.shape)}."
            )
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, divisors, strict=True)):
            raise ValueError(
                f"{type(self).__name__}: input spatial size {spatial} must be divisible by "
                f"{tuple(divisors)} per axis."
            )


class ViTBackbone(Backbone):
    """ViT from MONAI transformer blocks with a CLS token and resizable position embeddings.

    Differs from ``monai.networks.nets.ViT`` on purpose: no Tanh classification head, and the
    position embeddings are interpolated to the patch grid of each input, so DINO local crops of
    another size share the network with the global crops.

    Args:
        spatial_dims: 3 for volumes, 2 for slices.
        in_channels: input channels.
        img_size: input size the position embeddings are laid out for.
        patch_size: patch size; must divide ``img_size`` and every input size per axis.
        hidden_size: token width, also ``out_dim``.
        mlp_dim: hidden width of each transformer MLP.
        num_layers: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        dropout_rate: dropout inside the transformer blocks, in [0, 1].
        qkv_bias: learn a bias for the query/key/value projection.
    """

    name = "vit"

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        img_size: int | Sequence[int] = (32, 64, 64),
        patch_size: int | Sequence[int] = (8, 16, 16),
        hidden_size: int = 384,
        mlp_dim: int = 1536,
        num_layers: int = 6,
        num_heads: int = 6,
        dropout_rate: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        _check_spatial_dims(spatial_dims)
        for arg, value in [("in_channels", in_channels), ("hidden_size", hidden_size),
                           ("mlp_dim", mlp_dim), ("num_layers", num_layers),
                           ("num_heads", num_heads)]:
            _check_positive_int(arg, value)
        img = _as_size("img_size", img_size, spatial_dims)
        patch = _as_size("patch_size", patch_size, spatial_dims)
        if any(i % p for i, p in zip(img, patch, strict=True)):
            raise ValueError(f"img_size {img} must be divisible by patch_size {patch} per axis.")
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}."
            )
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1], got {dropout_rate!r}.")
        super().__init__()
        self.config = {
            "name": self.name, "spatial_dims": spatial_dims, "in_channels": in_channels,
            "img_size": img, "patch_size": patch, "hidden_size": hidden_size, "mlp_dim": mlp_dim,
            "num_layers": num_layers, "num_heads": num_heads,
            "dropout_rate": float(dropout_rate), "qkv_bias": bool(qkv_bias),
        }
        self.spatial_dims, self.in_channels, self.out_dim = spatial_dims, in_channels, hidden_size
        self.patch_size = tuple(patch)
        self.grid_size = tuple(i // p for i, p in zip(img, patch, strict=True))
        # A bare patch convolution rather than MONAI's PatchEmbeddingBlock: that block always adds
        # its own fixed-grid position parameter (even with pos_embed_type="none"), which would
        # break other input sizes and sit unused under DDP.
        self.patch_embed = Conv[Conv.CONV, spatial_dims](
            in_channels, hidden_size, kernel_size=patch, stride=patch
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        n_patches = math.prod(self.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, hidden_size))
        self.pos_drop = nn.Dropout(dropout_rate)
        # Fused attention has the same parameters, just faster; but MONAI passes dropout_p to it
        # even in eval mode, so with dropout we keep the explicit attention path.
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=qkv_bias,
                             use_flash_attention=dropout_rate == 0.0)
            for _ in range(num_layers)
        )
        for block in self.blocks:
            # MONAI builds this LayerNorm even without cross-attention; left in place its
            # never-used parameters make DDP fail ("parameters that were not used").
            block.norm_cross_attn = nn.Identity()
        self.norm = nn.LayerNorm(hidden_size)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.blocks.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Standard ViT/DINO init; MONAI leaves transformer Linear layers at PyTorch defaults.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embeddings (1, 1 + prod(grid), hidden) resized to a patch ``grid``."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.transpose(1, 2).reshape(1, self.out_dim, *self.grid_size)
        mode = "trilinear" if self.spatial_dims == 3 else "bicubic"
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode=mode, align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    @property
    def input_divisors(self) -> tuple[int, ...]:
        return self.patch_size

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All normalised tokens (B, 1 + n_patches, hidden_size); index 0 is the CLS token."""
        self._check_input(x, self.patch_size)
        x = self.patch_embed(x)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.interpolate_pos_embed(grid))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features (B, hidden_size) of x (B, C, *spatial)."""
        return self.forward_tokens(x)[:, 0]


class LegacyPatchMerging(PatchMerging):
    """MONAI < 1.5 3D patch merging, kept to reproduce published SwinUNETR/SuPreM weights.

    Those checkpoints were trained with this slice order, which repeats two of the eight
    2x2x2 neighbours (MONAI issues #4757, #8284; fixed in MONAI 1.5). Same parameters as
    ``PatchMerging``, so the weights load either way; only the features differ.
    """

    # (depth, height, width) offsets in concatenation order; (0,1,0) and (0,0,1) twice.
    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1),
               (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            return super().forward(x)  # 2D merging was never affected
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [x[:, i::2, j::2, k::2, :] for i, j, k in self.OFFSETS]
        return self.reduction(self.norm(torch.cat(parts, -1)))


class SwinEncoder(Backbone):
    """The Swin transformer encoder of MONAI's SwinUNETR, globally pooled.

    The submodule is named ``swinViT`` so parameter names equal SwinUNETR's
    (``swinViT.layers1.0...``), the names SuPreM and Swin UNETR checkpoints use. MONAI >= 1.5
    changed the patch-merging slice order; ``legacy_patch_merging=True`` keeps the old one,
    which published checkpoints were trained with (see weight_formats.md).

    Args:
        spatial_dims: 3 for volumes, 2 for slices.
        in_channels: input channels.
        feature_size: stage-1 width, divisible by 12; ``out_dim`` is ``16 * feature_size``.
        depths: transformer blocks in each of the 4 stages.
        num_heads: attention heads in each of the 4 stages.
        use_checkpoint: gradient checkpointing (less memory, more compute).
        use_v2: SwinUNETR-v2 residual convolution at the start of each stage.
        legacy_patch_merging: use the MONAI < 1.5 merging order (for published weights).
    """

    name = "swin_unetr"
    divisor: ClassVar[int] = 32  # patch size 2, then 4 patch mergings

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        use_checkpoint: bool = False,
        use_v2: bool = False,
        legacy_patch_merging: bool = False,
    ) -> None:
        _check_spatial_dims(spatial_dims)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("feature_size", feature_size)
        if feature_size % 12:
            raise ValueError(f"feature_size must be divisible by 12, got {feature_size}.")
        depths, num_heads = list(depths), list(num_heads)
        for arg, values in [("depths", depths), ("num_heads", num_heads)]:
            if len(values) != 4:
                raise ValueError(f"{arg} must have 4 entries (one per stage), got {values}.")
            for v in values:
                _check_positive_int(f"each entry of {arg}", v)
        for stage, heads in enumerate(num_heads):
            if (feature_size * 2**stage) % heads:
                raise ValueError(
                    f"stage {stage} width {feature_size * 2**stage} must be divisible by "
                    f"num_heads[{stage}]={heads}."
                )
        super().__init__()
        self.config = {
            "name": self.name, "spatial_dims": spatial_dims, "in_channels": in_channels,
            "feature_size": feature_size, "depths": depths, "num_heads": num_heads,
            "use_checkpoint": bool(use_checkpoint), "use_v2": bool(use_v2),
            "legacy_patch_merging": bool(legacy_patch_merging),
        }
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.out_dim = 16 * feature_size
        # Same arguments SwinUNETR passes with its defaults (window 7, patch 2, "merging").
        self.swinViT = SwinTransformer(
            in_chans=in_channels, embed_dim=feature_size, window_size=(7,) * spatial_dims,
            patch_size=(2,) * spatial_dims, depths=depths, num_heads=num_heads, mlp_ratio=4.0,
            qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
            norm_layer=nn.LayerNorm, patch_norm=False, use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims, use_v2=use_v2,
            downsample=LegacyPatchMerging if legacy_patch_merging else "merging",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled last-stage features (B, 16 * feature_size) of x (B, C, *spatial)."""
        self._check_input(x, (self.divisor,) * self.spatial_dims)
        # normalize=True as in SwinUNETR.forward: each stage output is layer-normed.
        last = self.swinViT(x, normalize=True)[-1]
        return last.flatten(2).mean(dim=2)


class LUConv(nn.Module):
    """conv1 (kernel 3, padding 1) + bn1 + activation, named as in the SuPreM UNet3D."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act: str) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        # The original SuPreM code keeps batch norm in training mode always
        # (F.batch_norm(..., training=True)); we use standard BN with running statistics.
        self.bn1 = Norm[Norm.BATCH, spatial_dims](out_channels)
        self.activation: nn.Module
        if act == "prelu":
            self.activation = nn.PReLU(out_channels)
        elif act == "elu":
            self.activation = nn.ELU(inplace=True)
        else:
            self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Two LUConv units (``ops``), then a 2x max-pool unless it is the deepest block."""

    def __init__(
        self, spatial_dims: int, in_channels: int, depth: int, act: str, pool: bool
    ) -> None:
        super().__init__()
        width = 32 * 2**depth
        self.ops = nn.Sequential(
            LUConv(spatial_dims, in_channels, width, act),
            LUConv(spatial_dims, width, 2 * width, act),
        )
        self.maxpool = Pool[Pool.MAX, spatial_dims](2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pooled output for the next block, pre-pool skip features)."""
        skip = self.ops(x)
        return self.maxpool(skip), skip


class UNet3DEncoder(Backbone):
    """Encoder of the SuPreM / Models-Genesis UNet3D with its exact parameter names.

    ``down_tr64`` .. ``down_tr512`` output 64, 128, 256, 512 channels; about 7.0M parameters.

    Args:
        spatial_dims: 3 for volumes (Conv3d/BatchNorm3d), 2 for slices (Conv2d/BatchNorm2d).
        in_channels: input channels (1 for the published checkpoints).
        act: activation, one of "relu", "prelu", "elu".
    """

    name = "unet3d"
    divisor: ClassVar[int] = 8  # three 2x max-pools
    activations: ClassVar[tuple[str, ...]] = ("relu", "prelu", "elu")

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, act: str = "relu") -> None:
        _check_spatial_dims(spatial_dims)
        _check_positive_int("in_channels", in_channels)
        act = look_up_option(act, self.activations)
        super().__init__()
        self.config = {"name": self.name, "spatial_dims": spatial_dims,
                       "in_channels": in_channels, "act": act}
        self.spatial_dims, self.in_channels, self.out_dim = spatial_dims, in_channels, 512
        self.down_tr64 = DownTransition(spatial_dims, in_channels, 0, act, pool=True)
        self.down_tr128 = DownTransition(spatial_dims, 64, 1, act, pool=True)
        self.down_tr256 = DownTransition(spatial_dims, 128, 2, act, pool=True)
        self.down_tr512 = DownTransition(spatial_dims, 256, 3, act, pool=False)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skip features of x (B, C, *spatial): 64/128/256/512 channels at 1, 1/2, 1/4, 1/8 size."""
        self._check_input(x, (self.divisor,) * self.spatial_dims)
        skips = []
        for block in (self.down_tr64, self.down_tr128, self.down_tr256, self.down_tr512):
            x, skip = block(x)
            skips.append(skip)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally averaged deepest features (B, 512)."""
        return self.forward_features(x)[-1].flatten(2).mean(dim=2)


BACKBONES: dict[str, type[Backbone]] = {
    "vit": ViTBackbone,
    "swin_unetr": SwinEncoder,
    "unet3d": UNet3DEncoder,
}


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a backbone by registry name; ``build_backbone(**backbone.config)`` rebuilds one.

    Args:
        name: one of ``BACKBONES``.
        **kwargs: constructor arguments of that backbone.

    Raises:
        ValueError: unknown name or invalid arguments.
    """
    return look_up_option(name, BACKBONES)(**kwargs)
