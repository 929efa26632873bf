"""Collapse and representation monitors for self-supervised training (cheap, no gradients)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

from medssl.errors import InputError


@torch.no_grad()
def embedding_std(features: Tensor) -> Tensor:
    """Mean per-dimension std of L2-normalised features (B, D).

    About 1/sqrt(D) for uniformly spread embeddings and 0 for a collapse to one point; see
    ``embedding_spread`` for the same number on a 0-1 scale.
    """
    return F.normalize(features.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def embedding_spread(features: Tensor) -> Tensor:
    """``embedding_std`` relative to that of uniformly spread features, 1/sqrt(D).

    Calibration: 1 for isotropic features (uniform on the sphere), 0 when every sample maps
    to the same direction. Measured on AdrenalMNIST3D (train split, 32^3): raw voxels 0.24, a
    freshly initialised demo ViT (patch 8, hidden 192, 2 layers) only 0.05-0.07, because all
    its outputs share one dominant direction. Healthy training raises it well above the
    random-init value (roughly 0.2 or more); a value falling towards 0 is a collapse.

    Args:
        features: (B, D) embeddings, B >= 2.
    """
    return embedding_std(features) * math.sqrt(features.shape[1])


@torch.no_grad()
def softmax_entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of softmax(logits) over the last axis.

    Near 0: every sample picks one prototype (collapse to a one-hot); near log(K): uniform
    outputs (collapse to uniform). DINO's centring and sharpening keep it between.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@torch.no_grad()
def entropy_fraction(logits: Tensor) -> Tensor:
    """``softmax_entropy`` as a fraction of its maximum ln(K), K = ``logits.shape[-1]``.

    Pass the teacher's centred, sharpened logits ((teacher - centre) / teacher_temp).
    1: uniform output, DINO's collapse when centring wins (the issue-7 run sat at 0.96);
    0: one-hot outputs. Healthy DINO stays clearly below 1 and, with a sharp teacher
    (temperature 0.04), often below 0.5; read it with ``prototype_information``, which tells
    confident-and-diverse (healthy) from confident-and-identical (collapse).
    """
    return softmax_entropy(logits) / math.log(logits.shape[-1])


@torch.no_grad()
def prototype_information(logits: Tensor) -> Tensor:
    """Mean KL(p_i || mean_j p_j) of softmax(logits) rows, as a fraction of its maximum.

    The KL between each output and the batch-mean output, DINO's second collapse signal
    (paper section 5.3): it equals H(mean p) - mean H(p_i), the information the prototype
    choice carries about the sample. 0 in both collapses (all outputs uniform, or all the same
    one-hot); the maximum ln(min(N, K)) when every sample picks its own prototype. Healthy
    training keeps it clearly above 0 and usually rising.

    Args:
        logits: (..., K); every leading axis counts as samples (N = their product), N >= 2.
    """
    logp = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    mean_p = logp.exp().mean(0)
    kl = (logp.exp() * (logp - mean_p.clamp_min(1e-30).log())).sum(-1).mean()
    return kl / math.log(min(logp.shape[0], logp.shape[1]))


@torch.no_grad()
def view_agreement(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """How well features tell a volume's two views from other volumes' views: the signal
    DINO's self-distillation bootstraps from.

    Row i of ``a`` and of ``b`` (each (B, D), B >= 2) are two views of volume i. Each set is
    centred over the batch (a component every volume shares says nothing about which is
    which), then L2-normalised. Returns ``same`` / ``other``: mean cosine of same-volume and
    of other-volume pairs, and ``top1``: how often a volume's own other view is the nearest
    of the B (chance 1 / B). Measured at random init with DINO's views at batch 64
    (``bench/results/dino.md``): brain-MRI blocks top-1 0.31, where DINO trains without head
    batch norm; AdrenalMNIST3D 0.03 (chance 0.016), where it drifts to uniform output.
    """
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 2:
        raise InputError(f"need two (B, D) feature sets with B >= 2, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    with torch.autocast(a.device.type, enabled=False):  # fp32 under bf16 training too
        a = F.normalize(a.float() - a.float().mean(0), dim=-1)
        b = F.normalize(b.float() - b.float().mean(0), dim=-1)
        sim = a @ b.T
    other = ~torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    hits = sim.argmax(1) == torch.arange(len(sim), device=sim.device)
    return {"same": sim.diag().mean(), "other": sim[other].mean(), "top1": hits.float().mean()}


@torch.no_grad()
def knn_votes(bank: Tensor, bank_labels: Tensor, query: Tensor, n_classes: int | None = None,
              k: int = 20, temperature: float = 0.07) -> Tensor:
    """Weighted k-NN class scores on cosine similarity (facebookresearch/dino ``eval_knn.py``
    ``knn_classifier``: each of the k nearest votes exp(cosine / temperature)).

    Args:
        bank: (N, D) reference features with integer ``bank_labels`` (N,).
        query: (M, D) features to score.
        n_classes: number of classes; default: the largest bank label + 1.
        k: neighbours (capped at N); DINO uses 20.
        temperature: vote weighting; DINO uses 0.07.

    Returns:
        (M, n_classes) vote shares (each row sums to 1): the argmax is DINO's prediction, and
        a class's share is a score for ROC curves.
    """
    bank, query = F.normalize(bank.float(), dim=1), F.normalize(query.float(), dim=1)
    bank_labels = bank_labels.long().to(bank.device)
    n_classes = int(bank_labels.max()) + 1 if n_classes is None else n_classes
    sims, idx = (query @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    # Subtracting the top similarity keeps exp() finite at small temperatures; shares unchanged.
    weights = ((sims - sims[:, :1]) / temperature).exp()
    votes = torch.zeros(query.shape[0], n_classes, device=query.device)
    votes.scatter_add_(1, bank_labels[idx], weights)
    return votes / votes.sum(1, keepdim=True)


@torch.no_grad()
def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """Binary ROC AUC: the probability that a random positive outscores a random negative
    (ties count half), from average ranks (Mann-Whitney U). NaN when a class is absent.

    Args:
        scores: (M,) higher means more likely positive.
        labels: (M,) 1 for positive, 0 for negative.
    """
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"))
    values, inverse, counts = scores.unique(return_inverse=True, return_counts=True)
    # Rank of each distinct value: the mean of the 1-based positions its ties occupy.
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


@torch.no_grad()
def balanced_accuracy(predictions: Tensor, labels: Tensor) -> Tensor:
    """Mean per-class recall over the classes present in ``labels`` (as scikit-learn's
    ``balanced_accuracy_score``); chance level is 1/classes whatever the class balance."""
    predictions, labels = predictions.flatten(), labels.flatten().long()
    recalls = [(predictions[labels == c] == c).double().mean() for c in labels.unique()]
    return torch.stack(recalls).mean().float()


@torch.no_grad()
def knn_metrics(bank: Tensor, bank_labels: Tensor, query: Tensor, query_labels: Tensor,
                n_classes: int | None = None, k: int = 20,
                temperature: float = 0.07) -> dict[str, Tensor]:
    """k-NN accuracy, balanced accuracy and, for two classes, ROC AUC of the query set.

    Accuracy alone carries no signal on unbalanced targets (at a 23/77 split it wanders around
    the majority rate); balanced accuracy has chance level 1/classes and AUC 0.5. On
    AdrenalMNIST3D (28^3 -> 32^3, k=20, bank = train, query = test) raw voxels reach an AUC
    of 0.72 and a random-init demo ViT 0.64-0.68 (``bench/probe.py``): a pre-trained
    backbone should clearly beat both.

    Args:
        bank, bank_labels, query, query_labels: as ``knn_votes``; labels are class indices.
        n_classes: number of classes; default: the largest label in bank or query + 1.
        k, temperature: see ``knn_votes``.

    Returns:
        ``accuracy`` and ``balanced_accuracy``; ``auc`` (vote share of class 1) when there are
        two classes and the query holds both.
    """
    query_labels = query_labels.long().to(query.device)
    if n_classes is None:
        n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    shares = knn_votes(bank, bank_labels, query, n_classes, k, temperature)
    predictions = shares.argmax(1)
    out = {"accuracy": (predictions == query_labels).float().mean(),
           "balanced_accuracy": balanced_accuracy(predictions, query_labels)}
    if n_classes == 2 and query_labels.unique().numel() == 2:
        out["auc"] = roc_auc(shares[:, 1], query_labels)
    return out


@torch.no_grad()
def knn_accuracy(bank: Tensor, bank_labels: Tensor, query: Tensor, query_labels: Tensor,
                 k: int = 20, temperature: float = 0.07) -> Tensor:
    """Weighted k-NN accuracy (``knn_metrics``' ``accuracy``).

    Args:
        bank: (N, D) reference features with ``bank_labels`` (N,).
        query: (M, D) features to classify, with ``query_labels`` (M,).
    """
    return knn_metrics(bank, bank_labels, query, query_labels, k=k,
                       temperature=temperature)["accuracy"]


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
