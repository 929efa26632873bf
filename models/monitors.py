"""Collapse and representation monitors for self-supervised training (cheap, no gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid


@torch.no_grad()
def embedding_std(features: Tensor) -> Tensor:
    """Mean per-dimension std of L2-normalised features (B, D).

    About 1/sqrt(D) for well-spread embeddings; near 0 means collapse to one point.
    """
    return F.normalize(features.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def softmax_entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of softmax(logits) over the last axis.

    Near 0: every sample picks one prototype (collapse to a one-hot); near log(K): uniform
    outputs (collapse to uniform). DINO's centring and sharpening keep it between.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@torch.no_grad()
def knn_accuracy(bank: Tensor, bank_labels: Tensor, query: Tensor, query_labels: Tensor,
                 k: int = 20, temperature: float = 0.07) -> Tensor:
    """Weighted k-NN accuracy on L2-normalised features (facebookresearch/dino
    ``eval_knn.py``: votes weighted by exp(cosine / temperature)).

    Args:
        bank: (N, D) reference features with ``bank_labels`` (N,).
        query: (M, D) features to classify, with ``query_labels`` (M,).
    """
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, idx = (query @ bank.T).topk(k, dim=1)
    n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(query.shape[0], n_classes, device=query.device)
    votes.scatter_add_(1, bank_labels.long()[idx], (sims / temperature).exp())
    return (votes.argmax(1) == query_labels.long()).float().mean()


@torch.no_grad()
def crop_grid(crops: list[Tensor], size: int = 64) -> Tensor:
    """One image (3, H, W) showing the middle slice along axis 0 of each crop (1, C, *S)."""
    tiles = []
    for crop in crops:
        x = crop[0, :1].float()
        plane = x[:, x.shape[1] // 2] if x.ndim == 4 else x
        plane = F.interpolate(plane[None], size=(size, size), mode="bilinear")[0]
        lo, hi = plane.min(), plane.max()
        tiles.append(((plane - lo) / (hi - lo + 1e-8)).expand(3, -1, -1))
    return make_grid(tiles, nrow=len(tiles), padding=2)
