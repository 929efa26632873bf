"""Backbones mapping a volume (B, C, D, H, W) or slice (B, C, H, W) to features.

Every backbone gives pooled features ``forward(x) -> (B, out_dim)`` and multi-scale maps
``forward_features(x) -> list[Tensor]`` (shallow to deep, channels ``feature_channels``) for
decoders, and keeps its constructor arguments in ``config`` (plain JSON types plus ``"name"``),
so ``build_backbone(**backbone.config)`` rebuilds the same architecture; the weight files in
``medssl.models.weights`` store this dict beside the state dict.

Adding a backbone: subclass ``Backbone`` in its own file of ``models/`` (constructor checks
first, ``config``, ``out_dim``, ``feature_channels``, ``feature_strides``, ``forward_features``,
``forward``) and add it to ``BACKBONES`` below; ``models/segmenters.py`` then needs a decoder
for it.
"""

from __future__ import annotations

from typing import Any

from medssl.errors import InputError, one_of
from medssl.models.backbone_base import (
    Backbone,
    as_size,
    check_positive_int,
    check_spatial_dims,
)
from medssl.models.efficientnet import EfficientNetBackbone
from medssl.models.swin import LegacyPatchMerging, SwinEncoder
from medssl.models.unet3d import UNet3DEncoder
from medssl.models.vit import ViTBackbone

__all__ = [
    "BACKBONES", "Backbone", "EfficientNetBackbone", "LegacyPatchMerging", "SwinEncoder",
    "UNet3DEncoder", "ViTBackbone", "as_size", "build_backbone", "check_positive_int",
    "check_spatial_dims",
]

BACKBONES: dict[str, type[Backbone]] = {
    "vit": ViTBackbone,
    "swin_unetr": SwinEncoder,
    "unet3d": UNet3DEncoder,
    "efficientnet": EfficientNetBackbone,
}


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Build a backbone by registry name; ``build_backbone(**backbone.config)`` rebuilds one.

    Args:
        name: one of ``BACKBONES``.
        **kwargs: constructor arguments of that backbone.

    Raises:
        InputError: unknown name or invalid arguments, the message starting "backbone <name>:".
    """
    cls = one_of("backbone name", name, BACKBONES)
    try:
        return cls(**kwargs)
    except InputError as exc:  # name the group: "patch_size" alone could be any script's
        raise InputError(f"backbone {name}: {exc}") from exc
