"""The ``Backbone`` base class and the argument checks every backbone shares.

Kept apart from ``medssl.models.backbones`` (which re-exports all of it) because that module
imports every network for its registry: the networks importing the base from there would be
an import cycle that breaks whenever a network module is imported first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medssl.errors import InputError

__all__ = ["POOLINGS", "Backbone", "as_size", "check_positive_int", "check_spatial_dims",
           "checkpointed", "pooled_features"]


# Feature pooling of token backbones: ``cls`` (the ViT's CLS token, what DINO's head trains) or
# ``mean`` (mean of the patch tokens). Convnets always pool globally.
POOLINGS = ("cls", "mean")


def pooled_features(backbone: nn.Module, x: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
    """(B, out_dim) features of ``x``: ``backbone(x)``, or for token backbones with
    ``pooling="mean"`` the mean of the patch tokens (``forward_tokens`` without the CLS)."""
    if pooling == "mean" and hasattr(backbone, "forward_tokens"):
        return backbone.forward_tokens(x)[:, 1:].mean(1)
    return backbone(x)


def check_spatial_dims(spatial_dims: int) -> None:
    """Raise ValueError unless ``spatial_dims`` is 2 or 3."""
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ValueError, naming ``name``, unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}.")


def as_size(name: str, value: int | Sequence[int], spatial_dims: int) -> list[int]:
    """Expand an int to ``spatial_dims`` entries; check a sequence has that many positive ints."""
    size = [value] * spatial_dims if isinstance(value, int) else list(value)
    if len(size) != spatial_dims or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size
    ):
        raise InputError(
            f"{name} must be a positive int or {spatial_dims} positive ints, got {value!r}."
        )
    return size


@contextmanager
def _keep_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Undo the running-statistics update batch norms make while a checkpoint recomputes.

    The recomputation in backward runs the forward again in training mode, so without this
    every batch norm would move its running mean/variance twice per step.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training
             and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)
              if b is not None] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                        if b is not None]
                for b, old in zip(live, buffers, strict=True):
                    b.copy_(old)


def checkpointed(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under activation checkpointing (torch.utils.checkpoint, non-reentrant).

    Activations inside ``fn`` are dropped after the forward and recomputed in backward: less
    memory for about one more forward of compute. The RNG state is replayed (drop path and
    dropout give the same masks) and batch-norm running statistics in ``module`` are updated
    once, as without checkpointing. Without gradients (teacher, evaluation) ``fn`` just runs.

    Args:
        module: the module whose parameters and batch norms ``fn`` uses.
        fn: the function to run, usually ``module`` itself or its ``forward``.
        *args: its arguments (tensors needing gradients among them).
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False,
        context_fn=lambda: (nullcontext(), _keep_norm_statistics(module)))


class Backbone(nn.Module):
    """Base class: shared input checks and the contract every backbone keeps.

    Subclasses set, in their constructor:
        config: constructor arguments (plain JSON types) plus ``"name"``, so
            ``build_backbone(**backbone.config)`` rebuilds the architecture.
        spatial_dims, in_channels: expected input (B, in_channels, *spatial).
        out_dim: width of the pooled ``forward`` output (B, out_dim).
        feature_channels: channels of each ``forward_features`` map, shallow to deep.
        feature_strides: per map, its downsampling factor per spatial axis.
        use_checkpoint: activation checkpointing (also a ``config`` key, default False):
            blocks run through ``checkpointed`` in training, trading about one extra
            forward pass for the memory of their activations.
    and implement ``forward_features(x) -> list[Tensor]`` (maps (B, C_i, *spatial_i), shallow
    to deep, for decoders) and ``forward(x) -> (B, out_dim)``.
    """

    name: ClassVar[str]
    spatial_dims: int
    in_channels: int
    out_dim: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[tuple[int, ...], ...]
    config: dict[str, Any]
    use_checkpoint: bool = False

    @property
    def input_divisors(self) -> tuple[int, ...]:
        """Every input spatial size must be divisible by these, per axis."""
        return (getattr(self, "divisor", 1),) * self.spatial_dims

    def check_input_size(self, size: Sequence[int], what: str = "input") -> None:
        """Raise ValueError, naming ``what``, if ``size`` cannot go through this backbone."""
        divisors = self.input_divisors
        if len(size) != len(divisors) or any(s % d for s, d in zip(size, divisors, strict=True)):
            raise InputError(f"{what} {list(size)} does not fit {type(self).__name__}: every "
                             f"size must be divisible by {list(divisors)} per axis")

    def _check_input(self, x: torch.Tensor, divisors: Sequence[int] | None = None) -> None:
        """Fail loudly instead of letting strided convolutions floor (e.g. 40 slices / patch 16)."""
        if divisors is None:
            divisors = self.input_divisors
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise InputError(
                f"{type(self).__name__} expects input (B, {self.in_channels}, "
                f"{'D, H, W' if self.spatial_dims == 3 else 'H, W'}), got shape {tuple(x.shape)}."
            )
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, divisors, strict=True)):
            raise InputError(
                f"{type(self).__name__}: input spatial size {spatial} must be divisible by "
                f"{tuple(divisors)} per axis."
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, feature_channels[i], *spatial / feature_strides[i]), shallow to deep."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_features")
