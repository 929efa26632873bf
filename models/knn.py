"""k-NN monitor of frozen features: a callback any self-supervised module can use."""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

import lightning as L
import torch
from torch import Tensor, nn

from medssl.models.monitors import knn_accuracy


class KNNMonitor(L.Callback):
    """Weighted k-NN classification on a feature extractor's outputs after each validation
    (facebookresearch/dino ``eval_knn.py``); logs ``val/knn_accuracy``.

    Every rank scores the full bank and query sets (small, un-augmented monitor sets), so the
    value is the same on all ranks without gathering.

    Args:
        bank: batches (dicts) of labelled reference samples (e.g. training volumes).
        query: batches of samples to classify (e.g. validation volumes).
        target: the batch key holding integer class labels.
        backbone_attr: the module attribute to embed with (e.g. ``teacher_backbone``).
        k: neighbours (DINO: 20; small cohorts need fewer).
        temperature: vote weight exp(cosine / temperature) (DINO: 0.07).
        image_key: the batch key of the input images.
    """

    def __init__(self, bank: Iterable[dict], query: Iterable[dict], target: str,
                 backbone_attr: str, k: int = 20, temperature: float = 0.07,
                 image_key: str = "image") -> None:
        if k < 1:
            raise ValueError(f"k must be a positive int, got {k}")
        self.bank, self.query, self.target = bank, query, target
        self.backbone_attr, self.k, self.temperature = backbone_attr, k, temperature
        self.image_key = image_key

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
        acc = knn_accuracy(bank, bank_y, query, query_y, k=self.k, temperature=self.temperature)
        pl_module.log("val/knn_accuracy", acc, sync_dist=True, prog_bar=True)
