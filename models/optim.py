"""AdamW with the fastest implementation the parameters and precision allow.

``fused=True`` (one kernel for all parameters) is only fast on CUDA: there it replaces the
per-tensor loops that took 9-11% of a demo DINO step (issue 11; on this CPU the fused
kernel was 3-13x faster than foreach, but it is not torch's CPU default and we have not
measured it end to end). Elsewhere the ``foreach`` implementation is used.

Fused AdamW unscales fp16 gradients inside ``step``, so under ``16-mixed`` (a GradScaler)
gradients would be clipped while still scaled: that precision keeps ``foreach``. Lightning
2.6.6's ``clip_gradients`` refuses any fused optimizer under mixed precision, bf16 included
(``MixedPrecision.clip_gradients`` checks the optimizer, not the scaler), so modules clip
with ``clip_grad_norm`` below, which is correct without a scaler (32-true, bf16-mixed) and
after Lightning has unscaled (16-mixed with foreach).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# The one precision whose GradScaler cannot be combined with clipping and a fused step.
SCALED_PRECISION = "16-mixed"


def use_fused(device_types: Iterable[str], precision: str | None) -> bool:
    """Whether AdamW should be fused: every parameter on CUDA, and no fp16 GradScaler."""
    types = set(device_types)
    return bool(types) and types == {"cuda"} and str(precision) != SCALED_PRECISION


def adamw_implementation(params: Iterable[nn.Parameter], precision: str | None) -> dict[str, bool]:
    """``{"fused": True}`` or ``{"foreach": True}`` for ``torch.optim.AdamW``."""
    fused = use_fused((p.device.type for p in params), precision)
    return {"fused": True} if fused else {"foreach": True}


def adamw(module: Any, groups: list[dict], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(groups, **kwargs)`` with ``adamw_implementation`` for the
    LightningModule ``module``'s trainer precision (32-true without a trainer)."""
    trainer = getattr(module, "_trainer", None)
    precision = None if trainer is None else trainer.precision
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, **kwargs, **adamw_implementation(params, precision))


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm of the optimizer's parameters, as Lightning's
    ``clip_gradients(..., "norm")`` does, but also for fused optimizers (see module doc)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
