"""ViT backbone with a CLS token, resizable position embeddings, token subsets and drop path.

Also the patch helpers a masked autoencoder needs: ``patchify``/``unpatchify`` in the token order
of ``ViTBackbone`` and ``random_keep`` for choosing visible patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.layers import Conv, DropPath, trunc_normal_
from torch import nn

from medssl.errors import InputError
from medssl.models.backbone_base import (
    Backbone,
    as_size,
    check_positive_int,
    check_spatial_dims,
    checkpointed,
)

__all__ = ["INPUT_NORMS", "ViTBackbone", "ViTBlock", "patchify", "random_keep", "unpatchify"]


# Input standardisations a ViT can apply (``input_norm``).
INPUT_NORMS = ("none", "instance")


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut x (B, C, *spatial) into patches (B, n_patches, prod(patch_size) * C).

    Patches follow the token order of ``ViTBackbone`` (row-major over the patch grid); values
    inside a patch are ordered (*patch offsets, channel), as in the MAE reference
    (facebookresearch/mae ``models_mae.py`` ``patchify``).
    """
    n = len(patch_size)
    b, c, *spatial = x.shape
    if len(spatial) != n or any(s % p for s, p in zip(spatial, patch_size, strict=True)):
        raise InputError(f"patchify: spatial size {tuple(spatial)} must be divisible by "
                         f"patch_size {tuple(patch_size)} per axis.")
    grid = [s // p for s, p in zip(spatial, patch_size, strict=True)]
    # (B, C, g1, p1, g2, p2, ...) -> (B, g1, g2, ..., p1, p2, ..., C)
    x = x.reshape(b, c, *[v for g, p in zip(grid, patch_size, strict=True) for v in (g, p)])
    order = [0, *range(2, 2 + 2 * n, 2), *range(3, 3 + 2 * n, 2), 1]
    return x.permute(order).reshape(b, math.prod(grid), math.prod(patch_size) * c)


def unpatchify(
    patches: torch.Tensor, patch_size: Sequence[int], spatial_size: Sequence[int]
) -> torch.Tensor:
    """Inverse of ``patchify``: (B, n_patches, prod(patch_size) * C) -> (B, C, *spatial_size)."""
    n = len(patch_size)
    if len(spatial_size) != n or any(s % p for s, p in zip(spatial_size, patch_size, strict=True)):
        raise InputError(f"unpatchify: spatial_size {tuple(spatial_size)} must be divisible by "
                         f"patch_size {tuple(patch_size)} per axis.")
    grid = [s // p for s, p in zip(spatial_size, patch_size, strict=True)]
    b, n_patches, width = patches.shape
    if n_patches != math.prod(grid) or width % math.prod(patch_size):
        raise InputError(f"unpatchify: patches {tuple(patches.shape)} do not fit grid {grid} "
                         f"of patch_size {tuple(patch_size)}.")
    c = width // math.prod(patch_size)
    x = patches.reshape(b, *grid, *patch_size, c)
    # (B, g1, ..., gn, p1, ..., pn, C) -> (B, C, g1, p1, ..., gn, pn)
    order = [0, 2 * n + 1, *[v for i in range(n) for v in (1 + i, 1 + n + i)]]
    return x.permute(order).reshape(b, c, *spatial_size)


def random_keep(
    batch_size: int, n_patches: int, n_keep: int, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices (batch_size, n_keep) of patches to keep, uniformly at random per sample.

    Each row holds distinct indices in [0, n_patches), in random order (MAE's shuffle).
    """
    if not 1 <= n_keep <= n_patches:
        raise InputError(f"n_keep must be in [1, n_patches={n_patches}], got {n_keep}.")
    noise = torch.rand(batch_size, n_patches, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :n_keep]


class ViTBlock(TransformerBlock):
    """MONAI ``TransformerBlock`` with stochastic depth (drop path) on both residual branches.

    MONAI's block has no drop path, which the DINO and MAE ViTs use (facebookresearch/dino
    ``vision_transformer.py`` ``Block``; timm). Only ``forward`` differs, so the parameter names
    stay MONAI's and weights load either way. The cross-attention norm MONAI always builds is
    dropped: left in place, its never-used parameters make DDP fail.

    Args:
        hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, use_flash_attention: as for
            ``TransformerBlock``.
        drop_path_rate: probability of dropping each residual branch per sample in training.
    """

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int, dropout_rate: float,
                 qkv_bias: bool, use_flash_attention: bool, drop_path_rate: float = 0.0) -> None:
        super().__init__(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias=qkv_bias,
                         use_flash_attention=use_flash_attention)
        self.norm_cross_attn = nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTBackbone(Backbone):
    """ViT from MONAI transformer blocks with a CLS token and resizable position embeddings.

    Differs from ``monai.networks.nets.ViT`` on purpose: no Tanh classification head, the
    position embeddings are interpolated to the patch grid of each input (so DINO local crops of
    another size share the network with the global crops), a subset of patch tokens can be
    encoded (MAE), and blocks have stochastic depth.

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
        drop_path_rate: stochastic depth of the last block, in [0, 1); block i gets
            ``drop_path_rate * i / (num_layers - 1)`` (linear, as DINO/timm). DINO's student: 0.1.
        use_checkpoint: activation checkpointing per transformer block when gradients are
            on: keeps only each block's input, recomputes the rest in backward.
        input_norm: ``instance`` standardises each input (per sample and channel: zero mean,
            unit variance) before the patch embedding; ``none`` feeds it as given. Volumes
            scaled to [0, 1] with much shared background give a fresh ViT features that are
            ~99% the same for every input (the common intensity level and the empty patches
            dominate the pooled tokens); DINO's centred teacher is then uniform from its first
            step and training collapses (issue 7). Standardising raises that spread (0.09 ->
            0.15 of the feature norm on AdrenalMNIST3D), as normalising natural images with
            dataset statistics does for DINO's ImageNet ViTs.
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
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        input_norm: str = "none",
    ) -> None:
        check_spatial_dims(spatial_dims)
        for arg, value in [("in_channels", in_channels), ("hidden_size", hidden_size),
                           ("mlp_dim", mlp_dim), ("num_layers", num_layers),
                           ("num_heads", num_heads)]:
            check_positive_int(arg, value)
        img = as_size("img_size", img_size, spatial_dims)
        patch = as_size("patch_size", patch_size, spatial_dims)
        if any(i % p for i, p in zip(img, patch, strict=True)):
            raise InputError(f"img_size {img} must be divisible by patch_size {patch} per axis.")
        if hidden_size % num_heads:
            raise InputError(
                f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}."
            )
        if not 0.0 <= dropout_rate <= 1.0:
            raise InputError(f"dropout_rate must be in [0, 1], got {dropout_rate!r}.")
        if input_norm not in INPUT_NORMS:
            raise InputError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise InputError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
        super().__init__()
        self.config = {
            "name": self.name, "spatial_dims": spatial_dims, "in_channels": in_channels,
            "img_size": img, "patch_size": patch, "hidden_size": hidden_size, "mlp_dim": mlp_dim,
            "num_layers": num_layers, "num_heads": num_heads,
            "dropout_rate": float(dropout_rate), "qkv_bias": bool(qkv_bias),
            "drop_path_rate": float(drop_path_rate), "use_checkpoint": bool(use_checkpoint),
            "input_norm": input_norm,
        }
        self.input_norm = input_norm
        self.use_checkpoint = bool(use_checkpoint)
        self.spatial_dims, self.in_channels, self.out_dim = spatial_dims, in_channels, hidden_size
        self.patch_size = tuple(patch)
        self.grid_size = tuple(i // p for i, p in zip(img, patch, strict=True))
        # UNETR's taps for 12 blocks (MONAI UNETR: hidden states 3, 6, 9), scaled to the depth;
        # forward_features adds the normalised output of the last block.
        self.feature_layers = tuple(k * num_layers // 4 for k in (1, 2, 3))
        self.feature_channels = (hidden_size,) * 4
        self.feature_strides = (self.patch_size,) * 4
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
        rates = torch.linspace(0, drop_path_rate, num_layers, dtype=torch.float64).tolist()
        # Fused attention (torch scaled_dot_product_attention) has the same parameters, just
        # faster; but MONAI passes dropout_p to it even in eval mode, so with dropout we keep the
        # explicit attention path.
        self.blocks = nn.ModuleList(
            ViTBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias,
                     use_flash_attention=dropout_rate == 0.0, drop_path_rate=rate)
            for rate in rates
        )
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

    @property
    def input_divisors(self) -> tuple[int, ...]:
        return self.patch_size

    def grid(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """Patch grid of an input of ``spatial_size`` (ValueError unless the patch divides it)."""
        self.check_input_size(spatial_size)
        return tuple(s // p for s, p in zip(spatial_size, self.patch_size, strict=True))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *spatial) as patches (B, n_patches, prod(patch_size) * C), in token order."""
        return patchify(x, self.patch_size)

    def unpatchify(self, patches: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
        """Inverse of ``patchify`` for an input of ``spatial_size``."""
        return unpatchify(patches, self.patch_size, spatial_size)

    def interpolate_pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embeddings (1, 1 + prod(grid), hidden) resized to a patch ``grid``."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.transpose(1, 2).reshape(1, self.out_dim, *self.grid_size)
        mode = "trilinear" if self.spatial_dims == 3 else "bicubic"
        patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode=mode, align_corners=False)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def _embed(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """CLS + patch tokens with position embeddings, patches reduced to ``keep``."""
        self._check_input(x, self.patch_size)
        if self.input_norm == "instance":
            x = F.instance_norm(x, eps=1e-5)  # per sample and channel, no affine
        x = self.patch_embed(x)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        pos = self.interpolate_pos_embed(grid)
        # Position embeddings go on before selection, so a kept token knows where it came from.
        x = x + pos[:, 1:]
        if keep is not None:
            self._check_keep(keep, x.shape[0], x.shape[1])
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1))

    @staticmethod
    def _check_keep(keep: torch.Tensor, batch_size: int, n_patches: int) -> None:
        if keep.ndim != 2 or keep.shape[0] != batch_size or keep.dtype != torch.long:
            raise InputError(f"keep must be a long tensor (B={batch_size}, n_keep), got "
                             f"{keep.dtype} {tuple(keep.shape)}.")
        if keep.numel() and (keep.min() < 0 or keep.max() >= n_patches):
            raise InputError(f"keep indices must be in [0, {n_patches}) (patches of this input), "
                             f"got [{int(keep.min())}, {int(keep.max())}].")

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpointed(block, block, x) if self.use_checkpoint else block(x)

    def forward_hidden_states(
        self, x: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised final tokens and every block's output, as MONAI's ViT returns them.

        Args:
            x: input (B, C, *spatial), every size divisible by the patch size.
            keep: optional indices (B, n_keep) of patch tokens to encode (see ``forward_tokens``).

        Returns:
            (tokens (B, 1 + n, hidden_size) after the final LayerNorm, list of num_layers block
            outputs (B, 1 + n, hidden_size) before it); index 0 of each is the CLS token.
        """
        x = self._embed(x, keep)
        hidden = []
        for block in self.blocks:
            x = self._block(block, x)
            hidden.append(x)
        return self.norm(x), hidden

    def forward_tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised tokens (B, 1 + n, hidden_size); index 0 is the CLS token.

        Args:
            x: input (B, C, *spatial), every size divisible by the patch size.
            keep: indices (B, n_keep) into the patch tokens (row-major over the patch grid, as
                ``patchify``) to encode, e.g. MAE's visible patches; the CLS token is always kept.
                None encodes all n = prod(grid) patches. Tokens follow the order of ``keep``.
        """
        x = self._embed(x, keep)
        for block in self.blocks:
            x = self._block(block, x)
        return self.norm(x)

    def tokens_to_map(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Patch tokens (B, 1 + prod(grid), hidden) without CLS as a map (B, hidden, *grid)."""
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], self.out_dim, *grid)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four maps (B, hidden_size, *grid): blocks ``feature_layers`` and the normalised output.

        Hidden states at a quarter, half and three quarters of the depth (0-based block indices
        ``feature_layers``; 3, 6, 9 of 12 as in MONAI's UNETR), then the final LayerNorm output.
        """
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size, strict=False))
        last, hidden = self.forward_hidden_states(x)
        taps = [hidden[i] for i in self.feature_layers] + [last]
        return [self.tokens_to_map(t, grid) for t in taps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features (B, hidden_size) of x (B, C, *spatial)."""
        return self.forward_tokens(x)[:, 0]
