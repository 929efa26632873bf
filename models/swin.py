"""The Swin transformer encoder of MONAI's SwinUNETR as a backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformer
from torch import nn

from medssl.errors import InputError
from medssl.models.backbone_base import Backbone, check_positive_int, check_spatial_dims

__all__ = ["LegacyPatchMerging", "SwinEncoder"]


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
        use_checkpoint: activation checkpointing of each Swin block's two halves (MONAI's own
            switch; less memory, more compute).
        use_v2: SwinUNETR-v2 residual convolution at the start of each stage.
        legacy_patch_merging: use the MONAI < 1.5 merging order (for published weights).
        drop_path_rate: stochastic depth, rising linearly to this over all blocks, in [0, 1).
        use_flash_attention: torch scaled_dot_product_attention in window attention; MONAI uses it
            only without gradients (inference), so training is unaffected.
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
        drop_path_rate: float = 0.0,
        use_flash_attention: bool = False,
    ) -> None:
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("feature_size", feature_size)
        if feature_size % 12:
            raise InputError(f"feature_size must be divisible by 12, got {feature_size}.")
        depths, num_heads = list(depths), list(num_heads)
        for arg, values in [("depths", depths), ("num_heads", num_heads)]:
            if len(values) != 4:
                raise InputError(f"{arg} must have 4 entries (one per stage), got {values}.")
            for v in values:
                check_positive_int(f"each entry of {arg}", v)
        for stage, heads in enumerate(num_heads):
            if (feature_size * 2**stage) % heads:
                raise InputError(
                    f"stage {stage} width {feature_size * 2**stage} must be divisible by "
                    f"num_heads[{stage}]={heads}."
                )
        if not 0.0 <= drop_path_rate < 1.0:
            raise InputError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
        super().__init__()
        self.config = {
            "name": self.name, "spatial_dims": spatial_dims, "in_channels": in_channels,
            "feature_size": feature_size, "depths": depths, "num_heads": num_heads,
            "use_checkpoint": bool(use_checkpoint), "use_v2": bool(use_v2),
            "legacy_patch_merging": bool(legacy_patch_merging),
            "drop_path_rate": float(drop_path_rate),
            "use_flash_attention": bool(use_flash_attention),
        }
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.use_checkpoint = bool(use_checkpoint)
        self.out_dim = 16 * feature_size
        # SwinTransformer's outputs: patch embedding (1/2), then the 4 stages (1/4 .. 1/32).
        self.feature_channels = tuple(feature_size * 2**i for i in range(5))
        self.feature_strides = tuple((2 ** (i + 1),) * spatial_dims for i in range(5))
        # Same arguments SwinUNETR passes with its defaults (window 7, patch 2, "merging").
        self.swinViT = SwinTransformer(
            in_chans=in_channels, embed_dim=feature_size, window_size=(7,) * spatial_dims,
            patch_size=(2,) * spatial_dims, depths=depths, num_heads=num_heads, mlp_ratio=4.0,
            qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=drop_path_rate,
            norm_layer=nn.LayerNorm, patch_norm=False, use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims, use_v2=use_v2,
            downsample=LegacyPatchMerging if legacy_patch_merging else "merging",
            use_flash_attention=use_flash_attention,
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five maps, as SwinUNETR's ``hidden_states_out``: ``feature_size * 2**i`` channels at
        1/2**(i+1) of the input size, i = 0..4, each layer-normed."""
        self._check_input(x)
        # normalize=True as in SwinUNETR.forward: each stage output is layer-normed.
        return self.swinViT(x, normalize=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled last-stage features (B, 16 * feature_size) of x (B, C, *spatial)."""
        return self.forward_features(x)[-1].flatten(2).mean(dim=2)
