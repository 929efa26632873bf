"""k-NN monitor of frozen features: a callback any self-supervised module can use."""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

import lightning as L
import torch
from torch import Tensor, nn

from medssl.errors import InputError
from medssl.models.monitors import knn_metrics


def unshard(gathered: Tensor, n: int) -> Tensor:
    """Items gathered from interleaved rank shares, (world_size, n_per_rank, ...), back in
    their original order: rank ``r``'s ``j``-th item is item ``j * world_size + r``; the
    padding at the end is dropped, leaving ``n``."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:n]


class KNNMonitor(L.Callback):
    """Weighted k-NN classification on a feature extractor's outputs after each validation
    (facebookresearch/dino ``eval_knn.py``); logs ``val/knn_accuracy`` and, because accuracy
    carries no signal on unbalanced targets, ``val/knn_auc`` (two classes) or
    ``val/knn_balanced_accuracy`` (more), the metrics to pick exports by.

    Without ``sizes`` every rank embeds the full bank and query sets. With ``sizes`` (under
    DDP) each rank holds and embeds only its interleaved share of them (DistributedSampler's
    split: item ``i`` of the padded order on rank ``i % world_size``, equal counts); the
    features are gathered and put back in order, padding dropped, so every rank scores the
    same full sets.

    Args:
        bank: batches (dicts) of labelled reference samples (e.g. training volumes).
        query: batches of samples to classify (e.g. validation volumes).
        target: the batch key holding integer class labels.
        backbone_attr: the module attribute to embed with (e.g. ``teacher_backbone``).
        k: neighbours (DINO: 20; small cohorts need fewer).
        temperature: vote weight exp(cosine / temperature) (DINO: 0.07).
        image_key: the batch key of the input images.
        n_classes: number of classes (labels are 0..n_classes-1); default: the largest label
            seen + 1. Set it, so a class missing from the query set cannot change the metric.
        sizes: full (bank, query) sizes when each rank holds its share only.
    """

    def __init__(self, bank: Iterable[dict], query: Iterable[dict], target: str,
                 backbone_attr: str, k: int = 20, temperature: float = 0.07,
                 image_key: str = "image", n_classes: int | None = None,
                 sizes: tuple[int, int] | None = None) -> None:
        if k < 1:
            raise InputError(f"k must be a positive int, got {k}")
        if n_classes is not None and n_classes < 2:
            raise InputError(f"n_classes must be at least 2, got {n_classes}")
        self.bank, self.query, self.target = bank, query, target
        self.backbone_attr, self.k, self.temperature = backbone_attr, k, temperature
        self.image_key, self.n_classes, self.sizes = image_key, n_classes, sizes

    @torch.no_grad()
    def embed(self, backbone: nn.Module, batches: Iterable[dict],
              device: torch.device) -> tuple[Tensor, Tensor]:
        """Features (N, D) and labels (N,) of every sample in ``batches``."""
        feats, labels = [], []
        for batch in batches:
            image = batch[self.image_key]
            image = image.as_tensor() if hasattr(image, "as_tensor") else image  # MONAI meta
            feats.append(backbone(image.to(device)).float())
            labels.append(torch.as_tensor(batch[self.target]).to(device))
        return torch.cat(feats), torch.cat(labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        backbone = attrgetter(self.backbone_attr)(pl_module)
        was_training = backbone.training
        backbone.eval()
        try:
            with trainer.precision_plugin.forward_context():
                bank, bank_y = self.embed(backbone, self.bank, pl_module.device)
                query, query_y = self.embed(backbone, self.query, pl_module.device)
        finally:
            backbone.train(was_training)
        if self.sizes is not None and trainer.world_size > 1:
            n_bank, n_query = self.sizes
            bank, bank_y = (unshard(pl_module.all_gather(t), n_bank) for t in (bank, bank_y))
            query, query_y = (unshard(pl_module.all_gather(t), n_query)
                              for t in (query, query_y))
        metrics = knn_metrics(bank, bank_y, query, query_y, n_classes=self.n_classes, k=self.k,
                              temperature=self.temperature)
        pl_module.log("val/knn_accuracy", metrics["accuracy"], sync_dist=True, prog_bar=True)
        n_classes = self.n_classes or int(max(bank_y.max(), query_y.max())) + 1
        if n_classes == 2:
            # NaN when the query holds one class only: no checkpoint is then picked by it.
            auc = metrics.get("auc", torch.tensor(float("nan")))
            pl_module.log("val/knn_auc", auc, sync_dist=True, prog_bar=True)
        else:
            pl_module.log("val/knn_balanced_accuracy", metrics["balanced_accuracy"],
                          sync_dist=True, prog_bar=True)
