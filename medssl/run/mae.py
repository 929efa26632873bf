"""Masked-autoencoder pre-training as a run-layer task, for volumes (mae3d) and slices (mae2d).

One task serves both scripts: ``backbone.spatial_dims`` picks the CSV format (``mae3d`` rows are
volumes, ``mae2d`` rows are slices) and the masking dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning as L
from monai.transforms import RandFlipd, RandScaleCropd, Resized
from omegaconf import MISSING, DictConfig

from medssl.data.datamodule import CohortDataModule
from medssl.data.pipeline import IMAGE
from medssl.errors import InputError
from medssl.models.mae import MaskedAutoencoder, cuboid_grid, n_masked
from medssl.run.config import RunConfig, backbone_config, kwargs_for, plain, schema
from medssl.run.dino import preprocessing
from medssl.run.harness import Task


@dataclass
class MaskingConfig:
    """``mae_cfg``: the masking (values and comments: ``configs/mae3d.yaml``)."""

    mask_percentage: float = MISSING
    cuboid_size: list[int] = MISSING


@schema("mae3d")
@schema("mae2d")
@dataclass
class MaeConfig(RunConfig):
    """MAE keys (values and comments: ``configs/mae3d.yaml``, ``configs/mae2d.yaml``)."""

    mae_cfg: MaskingConfig = field(default_factory=MaskingConfig)
    eval_batch_size: int | None = MISSING
    norm_target: bool = MISSING
    decoder_hidden_size: int = MISSING
    decoder_mlp_dim: int = MISSING
    decoder_num_layers: int = MISSING
    decoder_num_heads: int = MISSING
    min_lr: float = MISSING
    warmup_epochs: int = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    crop_scale: list[float] = MISSING
    flip_axes: list[int] = MISSING


def input_size(cfg: DictConfig) -> tuple[int, ...]:
    """The size every input is resized to (``resize_to``), checked against the masking keys.

    Raises:
        ValueError: no ``resize_to``, a size of the wrong dimension, or masking keys that do not
            fit it (before any data is read).
    """
    dims = cfg.backbone.spatial_dims
    if cfg.resize_to is None or len(cfg.resize_to) != dims:
        raise InputError(f"resize_to must give {dims} sizes for {dims}D MAE (the masking grid "
                         f"is laid out for a fixed input size), got {cfg.resize_to}")
    size = tuple(cfg.resize_to)
    n_masked(math.prod(cuboid_grid(size, plain(cfg.mae_cfg.cuboid_size))),
             cfg.mae_cfg.mask_percentage)
    return size


def augmentations(size: Sequence[int], crop_scale: Sequence[float],
                  flip_axes: Sequence[int]) -> list[Callable]:
    """Training views as in MAE: a random crop (each side ``crop_scale`` of the input) resized
    back to ``size``, and random flips along ``flip_axes``."""
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise InputError(f"crop_scale must satisfy 0 < min <= max <= 1, got {list(crop_scale)}")
    bad = [a for a in flip_axes if not 0 <= a < len(size)]
    if bad:
        raise InputError(f"flip_axes {list(flip_axes)}: axes must be in 0..{len(size) - 1}")
    steps: list[Callable] = []
    if low < 1:
        steps += [RandScaleCropd(IMAGE, roi_scale=low, max_roi_scale=high, random_size=True),
                  Resized(IMAGE, spatial_size=list(size), mode="area")]
    steps += [RandFlipd(IMAGE, prob=0.5, spatial_axis=axis) for axis in flip_axes]
    return steps


class MaeTask(Task):
    name = "mae"
    export_attr = "encoder"
    init_attr = "encoder"

    def build_data(self, cfg: DictConfig) -> CohortDataModule:
        size = input_size(cfg)
        return CohortDataModule(**kwargs_for(
            CohortDataModule, cfg, task=f"mae{len(size)}d", settings=preprocessing(cfg),
            splits={"train": plain(cfg.train_folds), "val": plain(cfg.val_folds) or None},
            augment={"train": augmentations(size, plain(cfg.crop_scale),
                                            plain(cfg.flip_axes))}))

    def build_module(self, cfg: DictConfig, data: L.LightningDataModule) -> MaskedAutoencoder:
        return MaskedAutoencoder(**kwargs_for(
            MaskedAutoencoder, cfg, backbone_config=backbone_config(cfg),
            input_size=input_size(cfg),
            mask_seed=0 if cfg.seed is None else cfg.seed, **plain(cfg.mae_cfg)))


TASK = MaeTask()
