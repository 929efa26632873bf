"""Per-item evaluation values from every device, each item counted once.

Under DDP, Lightning's ``DistributedSampler`` (and the data module's sharded memory cache)
pads every device's share to the same length by repeating items, so a plain mean over the
devices' batches counts those items twice. The data module numbers each evaluation item
(``ITEM_INDEX``, its position in the split); ``gather_once`` gathers the values and keeps the
first of each index.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from torch import Tensor

ITEM_INDEX = "item_index"  # the batch key the data module numbers evaluation items with


def batch_index(batch: Mapping, n: int) -> Tensor:
    """The batch's item numbers (n,), or -1s when it has none (a batch not from our data
    module: its values are then kept as they are)."""
    index = batch.get(ITEM_INDEX)
    return torch.full((n,), -1) if index is None else torch.as_tensor(index).reshape(n)


def gather_once(module: L.LightningModule, values: Mapping[str, Tensor],
                index: Tensor) -> dict[str, Tensor]:
    """``values`` (each (N, ...), per item) from every device, one row per distinct ``index``
    in index order; all rows when some index is -1 (unnumbered items). One device: the same
    values, de-duplicated. Every device returns the same result."""
    values = {k: module.all_gather(v).reshape(-1, *v.shape[1:]) for k, v in values.items()}
    index = module.all_gather(index.to(module.device)).reshape(-1).cpu().numpy()
    if (index < 0).any():
        return values
    first = torch.as_tensor(np.unique(index, return_index=True)[1], dtype=torch.long)
    return {k: v[first.to(v.device)] for k, v in values.items()}


def mean_once(module: L.LightningModule, parts: list[tuple[Tensor, Tensor]]) -> Tensor | None:
    """The mean over every device's items of per-item values, each item once: ``parts`` holds
    (values (B,), ``batch_index`` (B,)) per batch; None when there are none."""
    if not parts:
        return None
    values, index = (torch.cat(p) for p in zip(*parts, strict=True))
    return gather_once(module, {"v": values.float()}, index)["v"].mean()
