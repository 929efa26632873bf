"""The SuPreM / Models-Genesis UNet3D with its published parameter names: encoder and decoder.

Layout (see weight_formats.md): encoder ``down_tr64`` .. ``down_tr512``, decoder ``up_tr256``,
``up_tr128``, ``up_tr64`` (each ``up_conv`` + ``ops``) and the head ``out_tr.final_conv``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from monai.networks.layers import Conv, Norm, Pool
from torch import nn

from medssl.errors import one_of
from medssl.models.backbone_base import (
    Backbone,
    check_positive_int,
    check_spatial_dims,
    checkpointed,
)

__all__ = ["DownTransition", "LUConv", "UNet3DDecoder", "UNet3DEncoder", "UpTransition"]

ACTIVATIONS = ("relu", "prelu", "elu")


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
        use_checkpoint: activation checkpointing per ``down_tr`` block when gradients are on
            (batch-norm running statistics still move once per forward).
    """

    name = "unet3d"
    divisor: ClassVar[int] = 8  # three 2x max-pools
    activations: ClassVar[tuple[str, ...]] = ACTIVATIONS

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, act: str = "relu",
                 use_checkpoint: bool = False) -> None:
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        act = one_of("act", act, self.activations)
        super().__init__()
        self.config = {"name": self.name, "spatial_dims": spatial_dims,
                       "in_channels": in_channels, "act": act,
                       "use_checkpoint": bool(use_checkpoint)}
        self.use_checkpoint = bool(use_checkpoint)
        self.spatial_dims, self.in_channels, self.out_dim = spatial_dims, in_channels, 512
        self.feature_channels = (64, 128, 256, 512)
        self.feature_strides = tuple((2**i,) * spatial_dims for i in range(4))
        self.down_tr64 = DownTransition(spatial_dims, in_channels, 0, act, pool=True)
        self.down_tr128 = DownTransition(spatial_dims, 64, 1, act, pool=True)
        self.down_tr256 = DownTransition(spatial_dims, 128, 2, act, pool=True)
        self.down_tr512 = DownTransition(spatial_dims, 256, 3, act, pool=False)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Skip features of x (B, C, *spatial): 64/128/256/512 channels at 1, 1/2, 1/4, 1/8 size."""
        self._check_input(x)
        skips = []
        for block in (self.down_tr64, self.down_tr128, self.down_tr256, self.down_tr512):
            x, skip = checkpointed(block, block, x) if self.use_checkpoint else block(x)
            skips.append(skip)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally averaged deepest features (B, 512)."""
        return self.forward_features(x)[-1].flatten(2).mean(dim=2)


class UpTransition(nn.Module):
    """``up_conv`` (transposed conv k2 s2, in=out channels), concatenate the skip, two LUConv.

    Both units output ``32 * 2**(depth + 1)`` channels (SuPreM's ``_make_nConv`` with
    ``double_chnnel=True``).
    """

    def __init__(self, spatial_dims: int, channels: int, depth: int, act: str) -> None:
        super().__init__()
        width = 32 * 2 ** (depth + 1)
        self.up_conv = Conv[Conv.CONVTRANS, spatial_dims](channels, channels, kernel_size=2,
                                                          stride=2)
        self.ops = nn.Sequential(
            LUConv(spatial_dims, channels + channels // 2, width, act),
            LUConv(spatial_dims, width, width, act),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class OutputTransition(nn.Module):
    """``final_conv`` (kernel 1) to class logits; SuPreM's sigmoid is left to the loss."""

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.final_conv = Conv[Conv.CONV, spatial_dims](in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


class UNet3DDecoder(nn.Module):
    """The SuPreM UNet3D decoder over ``UNet3DEncoder.forward_features``; about 12.1M parameters.

    Args:
        spatial_dims: 3 or 2, as the encoder.
        num_classes: output channels (logits).
        act: activation, as the encoder.
    """

    head_name = "out_tr"

    def __init__(self, spatial_dims: int, num_classes: int, act: str = "relu") -> None:
        super().__init__()
        self.up_tr256 = UpTransition(spatial_dims, 512, 2, act)
        self.up_tr128 = UpTransition(spatial_dims, 256, 1, act)
        self.up_tr64 = UpTransition(spatial_dims, 128, 0, act)
        self.out_tr = OutputTransition(spatial_dims, 64, num_classes)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_classes, *spatial) from the 4 encoder maps (``x`` is not used)."""
        skip64, skip128, skip256, out = features
        out = self.up_tr256(out, skip256)
        out = self.up_tr128(out, skip128)
        return self.out_tr(self.up_tr64(out, skip64))
