"""Segmentation decoders from MONAI blocks over ``Backbone.forward_features``.

Each decoder is called as ``decoder(x, features) -> logits (B, num_classes, *spatial)``, with the
input ``x`` (for full-resolution skips) and the encoder's feature maps, and names its output
layer in ``head_name``. Submodule names are those of the MONAI network each one comes from, so
that network's state dict (minus its encoder) loads key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from medssl.errors import InputError, one_of
from medssl.models.backbone_base import check_positive_int

__all__ = ["FlexibleUNetDecoder", "NORM_NAMES", "SwinUNETRDecoder", "UNETRDecoder"]

NORM_NAMES = ("instance", "batch")


class SwinUNETRDecoder(nn.Module):
    """MONAI ``SwinUNETR`` without ``swinViT``: its convolutional skips, decoder and ``out``.

    Same blocks and names as ``monai.networks.nets.SwinUNETR`` (``encoder1`` .. ``encoder4``,
    ``encoder10``, ``decoder5`` .. ``decoder1``, ``out``), fed by ``SwinEncoder.forward_features``.

    Args:
        spatial_dims: 3 or 2.
        in_channels: input channels (``encoder1`` runs on the input itself).
        feature_size: the encoder's ``feature_size``.
        num_classes: output channels.
        norm_name: "instance" (SwinUNETR's default) or "batch".
    """

    head_name = "out"

    def __init__(self, spatial_dims: int, in_channels: int, feature_size: int, num_classes: int,
                 norm_name: str = "instance") -> None:
        norm_name = one_of("norm_name", norm_name, NORM_NAMES)
        super().__init__()
        self.norm_name = norm_name
        fs = feature_size

        def basic(channels_in: int, channels_out: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(spatial_dims, channels_in, channels_out, kernel_size=3,
                                   stride=1, norm_name=norm_name, res_block=True)

        def up(channels_in: int, channels_out: int) -> UnetrUpBlock:
            return UnetrUpBlock(spatial_dims, channels_in, channels_out, kernel_size=3,
                                upsample_kernel_size=2, norm_name=norm_name, res_block=True)

        self.encoder1 = basic(in_channels, fs)
        self.encoder2 = basic(fs, fs)
        self.encoder3 = basic(2 * fs, 2 * fs)
        self.encoder4 = basic(4 * fs, 4 * fs)
        self.encoder10 = basic(16 * fs, 16 * fs)
        self.decoder5 = up(16 * fs, 8 * fs)
        self.decoder4 = up(8 * fs, 4 * fs)
        self.decoder3 = up(4 * fs, 2 * fs)
        self.decoder2 = up(2 * fs, fs)
        self.decoder1 = up(fs, fs)
        self.out = UnetOutBlock(spatial_dims, fs, num_classes)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """As ``SwinUNETR.forward`` after its ``swinViT`` call (``features`` = hidden states)."""
        dec4 = self.encoder10(features[4])
        dec3 = self.decoder5(dec4, features[3])
        dec2 = self.decoder4(dec3, self.encoder4(features[2]))
        dec1 = self.decoder3(dec2, self.encoder3(features[1]))
        dec0 = self.decoder2(dec1, self.encoder2(features[0]))
        return self.out(self.decoder1(dec0, self.encoder1(x)))


def unetr_upsampling(patch_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-axis upsampling of UNETR's three inner stages and of its last stage.

    UNETR upsamples the patch grid back to the input in four stages: 2 x 2 x 2 x 2 for patch 16.
    ``UnetrPrUpBlock`` repeats one kernel in all its layers, so the three inner stages share one
    factor per axis: 2 where the patch is a multiple of 8 (the last stage does the rest, e.g.
    1 for patch 8, 2 for 16, 4 for 32), else 1 (the last stage does it all, e.g. 4 for patch 4).
    This is how anisotropic patches like [8, 16, 16] work.

    Raises:
        ValueError: a patch size above 8 that is not a multiple of 8.
    """
    bad = [p for p in patch_size if p > 8 and p % 8]
    if bad:
        raise InputError(f"the UNETR decoder needs every patch size to be a multiple of 8 or at "
                         f"most 8 (three shared 2x upsampling stages, then one free stage); "
                         f"got patch_size {list(patch_size)}.")
    inner = tuple(2 if p % 8 == 0 else 1 for p in patch_size)
    last = tuple(p // 8 if p % 8 == 0 else p for p in patch_size)
    return inner, last


class UNETRDecoder(nn.Module):
    """MONAI ``UNETR``'s decoder (same block names) over ``ViTBackbone.forward_features``.

    Differs from ``monai.networks.nets.UNETR``: upsampling factors per axis from
    ``unetr_upsampling`` (anisotropic patches), and the feature maps come from our ViT, whose
    CLS token is dropped before reshaping to the patch grid.

    Args:
        spatial_dims: 3 or 2.
        in_channels: input channels (``encoder1`` runs on the input itself).
        hidden_size: the ViT's token width.
        patch_size: the ViT's patch size per axis.
        num_classes: output channels.
        feature_size: width of the full-resolution stage (UNETR default 16).
        norm_name: "instance" (UNETR's default) or "batch".
        conv_block: convolution blocks after each projection upsampling (UNETR default True).
        res_block: residual convolution blocks (UNETR default True).
    """

    head_name = "out"

    def __init__(self, spatial_dims: int, in_channels: int, hidden_size: int,
                 patch_size: Sequence[int], num_classes: int, feature_size: int = 16,
                 norm_name: str = "instance", conv_block: bool = True,
                 res_block: bool = True) -> None:
        check_positive_int("feature_size", feature_size)
        norm_name = one_of("norm_name", norm_name, NORM_NAMES)
        inner, last = unetr_upsampling(patch_size)
        super().__init__()
        self.norm_name = norm_name
        fs = feature_size

        def projection(channels_out: int, num_layer: int) -> UnetrPrUpBlock:
            return UnetrPrUpBlock(spatial_dims, hidden_size, channels_out, num_layer=num_layer,
                                  kernel_size=3, stride=1, upsample_kernel_size=inner,
                                  norm_name=norm_name, conv_block=conv_block,
                                  res_block=res_block)

        def up(channels_in: int, channels_out: int, factor: Sequence[int]) -> UnetrUpBlock:
            return UnetrUpBlock(spatial_dims, channels_in, channels_out, kernel_size=3,
                                upsample_kernel_size=factor, norm_name=norm_name,
                                res_block=res_block)

        self.encoder1 = UnetrBasicBlock(spatial_dims, in_channels, fs, kernel_size=3, stride=1,
                                        norm_name=norm_name, res_block=res_block)
        self.encoder2 = projection(2 * fs, 2)
        self.encoder3 = projection(4 * fs, 1)
        self.encoder4 = projection(8 * fs, 0)
        self.decoder5 = up(hidden_size, 8 * fs, inner)
        self.decoder4 = up(8 * fs, 4 * fs, inner)
        self.decoder3 = up(4 * fs, 2 * fs, inner)
        self.decoder2 = up(2 * fs, fs, last)
        self.out = UnetOutBlock(spatial_dims, fs, num_classes)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """As ``UNETR.forward``; ``features`` = 3 hidden-state maps and the final one."""
        x2, x3, x4, last = features
        dec3 = self.decoder5(last, self.encoder4(x4))
        dec2 = self.decoder4(dec3, self.encoder3(x3))
        dec1 = self.decoder3(dec2, self.encoder2(x2))
        return self.out(self.decoder2(dec1, self.encoder1(x)))


class FlexibleUNetDecoder(nn.Module):
    """MONAI ``FlexibleUNet`` without its encoder: ``decoder`` (UNetDecoder) and
    ``segmentation_head``, with FlexibleUNet's defaults.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (FlexibleUNet lists them first among the encoder channels).
        encoder_channels: the encoder's ``feature_channels`` (5 maps at 1/2 .. 1/32).
        num_classes: output channels.
        decoder_channels: output channels of the 5 decoder stages.
        upsample: "nontrainable" (interpolation), "deconv" or "pixelshuffle".
        interp_mode: interpolation of "nontrainable" upsampling.
        dropout: dropout in the decoder blocks, in [0, 1].
    """

    head_name = "segmentation_head"

    def __init__(self, spatial_dims: int, in_channels: int, encoder_channels: Sequence[int],
                 num_classes: int, decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 upsample: str = "nontrainable", interp_mode: str = "nearest",
                 dropout: float = 0.0) -> None:
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) != len(encoder_channels):
            raise InputError(f"decoder_channels needs {len(encoder_channels)} entries (one per "
                             f"encoder map), got {decoder_channels}.")
        for c in decoder_channels:
            check_positive_int("each entry of decoder_channels", c)
        upsample = one_of("upsample", upsample, ("nontrainable", "deconv", "pixelshuffle"))
        interp_mode = one_of("interp_mode", interp_mode,
                             ("nearest", "linear", "bilinear", "bicubic", "trilinear"))
        if not 0.0 <= dropout <= 1.0:
            raise InputError(f"dropout must be in [0, 1], got {dropout!r}.")
        super().__init__()
        self.skip_connect = len(encoder_channels) - 1
        # Arguments as FlexibleUNet passes them with its defaults.
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims, encoder_channels=(in_channels, *encoder_channels),
            decoder_channels=decoder_channels, act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}), dropout=dropout, bias=False,
            upsample=upsample, pre_conv="default", interp_mode=interp_mode, align_corners=None,
            is_pad=True,
        )
        self.segmentation_head = SegmentationHead(spatial_dims, decoder_channels[-1],
                                                  num_classes, kernel_size=3, act=None)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """As ``FlexibleUNet.forward`` after its encoder call (``x`` is not used)."""
        return self.segmentation_head(self.decoder(features, self.skip_connect))
