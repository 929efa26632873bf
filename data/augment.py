"""DINO multi-crop augmentation for volumes, on MONAI array transforms."""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandScaleCrop,
    RandScaleIntensity,
    Resize,
)


def crop_views(size: Sequence[int], scale: Sequence[float], flip: bool = True,
               rotate_deg: float = 10.0, noise_std: float = 0.03,
               blur_prob: float = 0.3) -> Compose:
    """One random view: a crop holding a ``scale`` fraction of the volume, resized to ``size``.

    ``scale`` bounds the cropped *volume* fraction (as in DINO's RandomResizedCrop on area);
    MONAI's RandScaleCrop draws each axis independently between the cube roots of the bounds,
    which also jitters the aspect ratio.

    Args:
        size: output spatial size of the view.
        scale: (min, max) fraction of the volume covered by the crop, in (0, 1].
        flip: random flips along each axis.
        rotate_deg: maximum rotation (degrees) around each axis.
        noise_std: standard deviation of the Gaussian noise (images scaled to [0, 1]).
        blur_prob: probability of a Gaussian blur.
    """
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {list(scale)}")
    ndim = len(size)
    rotate = np.deg2rad(rotate_deg)
    steps = [
        RandScaleCrop(roi_scale=lo ** (1 / ndim), max_roi_scale=hi ** (1 / ndim),
                      random_size=True, random_center=True),
        Resize(tuple(int(s) for s in size), mode="trilinear" if ndim == 3 else "bilinear"),
    ]
    if flip:
        steps += [RandFlip(prob=0.5, spatial_axis=axis) for axis in range(ndim)]
    steps += [
        RandAffine(prob=0.5, rotate_range=[rotate] * ndim if ndim == 3 else rotate,
                   scale_range=0.1, padding_mode="border"),
        RandScaleIntensity(factors=0.2, prob=0.8),
        RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)),
        RandGaussianNoise(prob=0.5, std=noise_std),
        RandGaussianSmooth(prob=blur_prob, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0),
                           sigma_z=(0.25, 1.0)),
    ]
    return Compose(steps)


class MultiCropd(Randomizable, MapTransform):
    """Replace ``image`` (C, *spatial) with ``crops``: ``n_global`` global then local views.

    Every view has its own transform instance and random state, so views of one volume
    are independent draws. With ``fixed_seed`` the views of a sample are re-seeded from it
    and the sample's ``row`` on every call: validation then sees the same crops each epoch,
    so ``val_dino_loss`` is comparable across epochs.
    """

    def __init__(self, keys: KeysCollection, global_size: Sequence[int],
                 local_size: Sequence[int], global_scale: Sequence[float],
                 local_scale: Sequence[float], n_crops: int, n_global: int = 2,
                 out_key: str = "crops", fixed_seed: int | None = None) -> None:
        MapTransform.__init__(self, keys)
        if n_crops < n_global:
            raise ValueError(f"n_crops ({n_crops}) must be at least the {n_global} global crops")
        self.out_key, self.fixed_seed = out_key, fixed_seed
        self.views = [crop_views(global_size, global_scale) for _ in range(n_global)]
        self.views += [crop_views(local_size, local_scale) for _ in range(n_crops - n_global)]

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> MultiCropd:
        super().set_random_state(seed, state)
        for view in self.views:
            view.set_random_state(seed=int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data: object = None) -> None:  # each view draws its own randomness
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.fixed_seed is not None:
            base = self.fixed_seed + zlib.crc32(str(d.get("row", "")).encode())
            for i, view in enumerate(self.views):
                view.set_random_state(seed=(base + i) % 2**31)
        for key in self.key_iterator(d):
            image = d.pop(key)
            d[self.out_key] = [_plain(view(image)) for view in self.views]
        return d


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata: crops are collated by the thousand and need none."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.float().contiguous()
