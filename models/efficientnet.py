"""MONAI's EfficientNet feature extractor (FlexibleUNet's encoder) as a backbone."""

from __future__ import annotations

from typing import ClassVar

import torch
from monai.networks.nets import EfficientNetBNFeatures, EfficientNetEncoder

from medssl.errors import one_of
from medssl.models.backbone_base import (
    Backbone,
    check_positive_int,
    check_spatial_dims,
    checkpointed,
)

__all__ = ["EfficientNetBackbone"]


class EfficientNetBackbone(EfficientNetBNFeatures, Backbone):
    """EfficientNet-B0..B8/L2 features, the encoder of MONAI's ``FlexibleUNet``; never downloads.

    A subclass rather than a wrapper, so parameter names are MONAI's (``_conv_stem.weight``,
    ``_blocks.0.0._depthwise_conv.weight``, ...): the same as under ``FlexibleUNet.encoder`` and in
    the lukemelas/EfficientNet-PyTorch ImageNet files. The classification head (``_conv_head``,
    ``_bn1``, ``_fc``) is removed: the feature path never uses it, and unused parameters fail DDP.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: input channels.
        model_name: one of ``EfficientNetEncoder.backbone_names`` ("efficientnet-b0" .. "-b8",
            "efficientnet-l2").
        use_checkpoint: activation checkpointing per stage (the blocks between two feature
            maps) when gradients are on; the stem is not checkpointed.
    """

    name = "efficientnet"
    divisor: ClassVar[int] = 32  # stem and 4 more stride-2 stages

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1,
                 model_name: str = "efficientnet-b0", use_checkpoint: bool = False) -> None:
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        model_name = one_of("model_name", model_name, EfficientNetEncoder.backbone_names)
        # Same norm as FlexibleUNet's encoder (EfficientNetEncoder.get_encoder_parameters).
        super().__init__(model_name=model_name, pretrained=False, spatial_dims=spatial_dims,
                         in_channels=in_channels,
                         norm=("batch", {"eps": 1e-3, "momentum": 0.01}))
        for head in ("_conv_head", "_conv_head_padding", "_bn1", "_avg_pooling", "_dropout",
                     "_fc"):
            delattr(self, head)
        del self.num_classes
        self.config = {"name": self.name, "spatial_dims": spatial_dims,
                       "in_channels": in_channels, "model_name": model_name,
                       "use_checkpoint": bool(use_checkpoint)}
        self.use_checkpoint = bool(use_checkpoint)
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        index = EfficientNetEncoder.backbone_names.index(model_name)
        self.feature_channels = tuple(EfficientNetEncoder.num_channels_per_output()[index])
        self.feature_strides = tuple((2 ** (i + 1),) * spatial_dims for i in range(5))
        self.out_dim = self.feature_channels[-1]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five maps with ``feature_channels`` channels at 1/2 .. 1/32 of the input size."""
        self._check_input(x)
        if not self.use_checkpoint:
            return EfficientNetBNFeatures.forward(self, x)
        # EfficientNetBNFeatures.forward, with each stage's blocks checkpointed together.
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(x))))
        features = [x] if 0 in self.extract_stacks else []
        bounds = sorted(i for i in self.extract_stacks if i > 0)
        start = 0
        for end in bounds:
            stage = self._blocks[start:end]
            x = checkpointed(stage, stage, x)
            features.append(x)
            start = end
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally averaged deepest features (B, out_dim)."""
        return self.forward_features(x)[-1].flatten(2).mean(dim=2)
