"""Segmentation networks: a backbone from ``build_backbone`` as ``encoder`` plus a decoder.

Families follow the encoder's registry name:

- ``swin_unetr``: MONAI SwinUNETR's convolutional decoder, output layer ``decoder.out``;
- ``unet3d``: the SuPreM UNet3D decoder (``up_tr256`` ...), output layer ``decoder.out_tr``;
- ``vit``: MONAI UNETR's decoder over the ViT hidden states, output layer ``decoder.out``;
- ``efficientnet``: MONAI FlexibleUNet's decoder, output layer ``decoder.segmentation_head``.

Because ``segmenter.encoder`` is exactly the backbone that pre-training exports (DINO, MAE),
an export loads into it key for key (``medssl.models.weights.load_encoder_weights``); a full
published network (SuPreM UNet3D or SwinUNETR, MONAI FlexibleUNet) loads into both parts with
``load_segmenter_weights``, since each part keeps that network's own names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medssl.errors import InputError
from medssl.models.backbone_base import Backbone, check_positive_int
from medssl.models.backbones import build_backbone
from medssl.models.decoders import FlexibleUNetDecoder, SwinUNETRDecoder, UNETRDecoder
from medssl.models.unet3d import UNet3DDecoder

__all__ = ["DECODER_OPTIONS", "Segmenter", "build_segmenter"]


def _swin_unetr(encoder: Backbone, num_classes: int, **options: Any) -> nn.Module:
    return SwinUNETRDecoder(encoder.spatial_dims, encoder.in_channels,
                            encoder.config["feature_size"], num_classes, **options)


def _unet3d(encoder: Backbone, num_classes: int) -> nn.Module:
    return UNet3DDecoder(encoder.spatial_dims, num_classes, act=encoder.config["act"])


def _vit(encoder: Backbone, num_classes: int, **options: Any) -> nn.Module:
    return UNETRDecoder(encoder.spatial_dims, encoder.in_channels, encoder.out_dim,
                        encoder.config["patch_size"], num_classes, **options)


def _efficientnet(encoder: Backbone, num_classes: int, **options: Any) -> nn.Module:
    return FlexibleUNetDecoder(encoder.spatial_dims, encoder.in_channels,
                               encoder.feature_channels, num_classes, **options)


# Encoder name -> (decoder factory, decoder options with their defaults).
DECODERS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "swin_unetr": (_swin_unetr, {"norm_name": "instance"}),
    "unet3d": (_unet3d, {}),
    "vit": (_vit, {"feature_size": 16, "norm_name": "instance", "conv_block": True,
                   "res_block": True}),
    "efficientnet": (_efficientnet, {"decoder_channels": [256, 128, 64, 32, 16],
                                     "upsample": "nontrainable", "interp_mode": "nearest",
                                     "dropout": 0.0}),
}
DECODER_OPTIONS: dict[str, dict[str, Any]] = {k: dict(v[1]) for k, v in DECODERS.items()}


class Segmenter(nn.Module):
    """``encoder`` (a Backbone) + ``decoder``: logits (B, num_classes, *spatial) at input size.

    Build with ``build_segmenter``. Parameter groups for ``encoder_lr_scale`` or freezing:
    ``encoder_parameters()`` and ``decoder_parameters()`` (together: all parameters).

    Attributes:
        encoder: the backbone, as ``build_backbone(**config["backbone_config"])`` builds it.
        decoder: the family's decoder; its output layer is ``decoder.<decoder.head_name>``.
        num_classes: output channels (counting the background).
        config: ``build_segmenter`` arguments (plain JSON types) that rebuild this network.
        head_prefix: state-dict prefix of the output layer (class-count specific).
    """

    def __init__(self, encoder: Backbone, decoder: nn.Module, num_classes: int,
                 decoder_options: Mapping[str, Any]) -> None:
        super().__init__()
        self.encoder, self.decoder, self.num_classes = encoder, decoder, num_classes
        self.spatial_dims, self.in_channels = encoder.spatial_dims, encoder.in_channels
        self.config = {"backbone_config": dict(encoder.config), "num_classes": num_classes,
                       **decoder_options}
        self.head_prefix = f"decoder.{decoder.head_name}."

    @property
    def family(self) -> str:
        """The encoder's registry name, which picks the decoder."""
        return self.encoder.name

    @property
    def input_divisors(self) -> tuple[int, ...]:
        """Every input spatial size must be divisible by these (the encoder's), per axis."""
        return self.encoder.input_divisors

    def check_input_size(self, size: Sequence[int], what: str = "input",
                         batch_size: int | None = None) -> None:
        """Raise ValueError, naming ``what`` and the rule, if ``size`` cannot be segmented.

        Besides the encoder's divisibility, a normalisation over the deepest level needs more
        than one value per channel: always for instance norm; for batch norm only in training,
        when ``batch_size`` (given then) is 1.
        """
        self.encoder.check_input_size(size, what)
        strides = self.encoder.feature_strides[-1]
        deepest = [s // f for s, f in zip(size, strides, strict=True)]
        norm = self._deepest_norm()
        too_small = math.prod(deepest) == 1 and (
            norm == "instance" or (norm == "batch" and batch_size == 1))
        if too_small:
            raise InputError(
                f"{what} {list(size)} is too small for the {self.family} segmenter: {norm} norm "
                f"at its deepest level (1/{list(strides)} of the input) needs more than one value "
                f"per channel, but gets {deepest}"
                f"{' with batch size 1 in training' if norm == 'batch' else ''}; enlarge an "
                f"axis to {2 * strides[0]} or more"
                f"{' or train with batches of 2 or more' if norm == 'batch' else ''}."
            )

    def _deepest_norm(self) -> str | None:
        """Normalisation applied to the encoder's deepest map (None when there is none)."""
        if self.family == "swin_unetr":
            return self.decoder.norm_name  # encoder10
        if self.family in ("unet3d", "efficientnet"):
            return "batch"
        return None  # UNETR normalises only after upsampling the patch grid

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the pre-trained part (e.g. for ``encoder_lr_scale`` or freezing)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained from scratch: decoder and output layer."""
        return self.decoder.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, *spatial) of x (B, in_channels, *spatial)."""
        self.encoder._check_input(x)
        # In eval, batch norm uses running statistics: the batch size does not matter.
        self.check_input_size(x.shape[2:], batch_size=x.shape[0] if self.training else None)
        return self.decoder(x, self.encoder.forward_features(x))


def build_segmenter(backbone_config: Mapping[str, Any], num_classes: int,
                    **decoder_options: Any) -> Segmenter:
    """Build a segmentation network around ``build_backbone(**backbone_config)``.

    Args:
        backbone_config: ``build_backbone`` arguments with ``"name"`` (e.g. the
            ``backbone_config`` stored in a DINO/MAE export); the name picks the decoder.
        num_classes: output channels, counting the background.
        **decoder_options: family-specific settings, defaults in ``DECODER_OPTIONS``:
            swin_unetr: ``norm_name`` ("instance" or "batch").
            unet3d: none.
            vit (UNETR): ``feature_size``, ``norm_name``, ``conv_block``, ``res_block``.
            efficientnet (FlexibleUNet): ``decoder_channels`` (5 ints), ``upsample``,
            ``interp_mode``, ``dropout``.

    Returns:
        The segmenter; ``build_segmenter(**segmenter.config)`` rebuilds it.

    Raises:
        ValueError: unknown backbone name or decoder option, or an invalid value.
    """
    check_positive_int("num_classes", num_classes)
    if not isinstance(backbone_config, Mapping) or "name" not in backbone_config:
        raise InputError(f"backbone_config must be a mapping with a 'name' (one of "
                         f"{sorted(DECODERS)}), got {backbone_config!r}.")
    name = backbone_config["name"]
    if name not in DECODERS:
        raise InputError(f"no segmentation decoder for backbone {name!r}; available: "
                         f"{sorted(DECODERS)}.")
    factory, defaults = DECODERS[name]
    unknown = sorted(set(decoder_options) - set(defaults))
    if unknown:
        raise InputError(f"unknown decoder option(s) {unknown} for backbone {name!r}; allowed: "
                         f"{sorted(defaults) or 'none'}.")
    options = {**defaults, **decoder_options}
    encoder = build_backbone(**backbone_config)
    decoder = factory(encoder, num_classes, **options)
    # Keep the config JSON-plain (tuples from callers become lists, as a JSON round trip would).
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return Segmenter(encoder, decoder, num_classes, plain)
