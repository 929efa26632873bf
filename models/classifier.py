"""Subject-level classification: a backbone with one linear head per target.

Batches are dicts with ``image`` (B, C, D, H, W), ``targets`` (target -> (B,) category
indices, -1 where the row has no value) and ``record_index`` (B,), a unique row id used to
cache frozen features and to merge predictions across devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import CatMetric

from medssl.errors import InputError, one_of
from medssl.models.backbone_base import POOLINGS, pooled_features
from medssl.models.backbones import build_backbone
from medssl.models.dino import warmup_cosine
from medssl.models.metrics import mean_metrics, target_metrics
from medssl.models.optim import adamw, clip_grad_norm

__all__ = ["TRAIN_MODES", "Classifier", "masked_cross_entropy"]

TRAIN_MODES = ("finetune", "linear")


def masked_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None
                         ) -> tuple[Tensor, int]:
    """Cross-entropy over the rows that have a label (label >= 0).

    Args:
        logits: (B, C).
        labels: (B,) category indices, -1 for rows without this target.
        weight: (C,) class weights, or None.

    Returns:
        (mean loss over labelled rows (weighted as ``F.cross_entropy`` does), their count);
        a zero that keeps the graph connected when no row is labelled, so every device
        still reduces the same gradients under DDP.
    """
    keep = labels >= 0
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[keep], labels[keep], weight=weight), n


class Classifier(L.LightningModule):
    """Backbone + one linear head per target, masked cross-entropy, AUC/accuracy metrics.

    Args:
        backbone_config: ``build_backbone`` kwargs (including ``name``).
        classes: target -> category names in encoding order (index i is ``classes[t][i]``);
            stored in the checkpoint so predictions can be decoded.
        class_weights: target -> (C,) cross-entropy class weights, or None for unweighted.
        train_mode: ``finetune`` trains the backbone; ``linear`` keeps it frozen (eval mode)
            and computes each row's features once (the linear-probe protocol).
        lr: peak learning rate of the heads (after warm-up; cosine decay to ``min_lr``).
        min_lr: learning rate at the end.
        warmup_epochs: linear warm-up epochs.
        weight_decay: AdamW weight decay (none on biases and 1-D parameters).
        backbone_lr_scale: the backbone's learning rate as a fraction of ``lr`` (finetune).
        freeze_backbone_epochs: the first epochs train the heads only (finetune): the
            backbone stays in eval mode and its gradients are dropped before clipping.
        grad_clip: maximum global gradient norm; 0 disables clipping.
        pooling: features of token backbones (ViT): ``cls`` token or ``mean`` of the patch
            tokens (``pooled_features``); convnets always pool globally.
        feature_norm: standardise the features by a batch norm without affine parameters
            before the heads (always on in linear mode).
        class_priors: target -> (C,) class shares of the training rows. Each head's bias
            then starts at the log of the class distribution its loss is minimised by when the
            features say nothing: the shares times ``class_weights``, normalised (uniform
            under balanced weights). Without it the biases start near 0 (PyTorch's default) and,
            moving about the learning rate per AdamW step at most, may never reach a rare
            class's prior (RetinaNet's prior initialisation, Lin et al. 2017).
    """

    def __init__(self, backbone_config: Mapping, classes: Mapping[str, Sequence[str]],
                 class_weights: Mapping[str, Sequence[float]] | None = None,
                 train_mode: str = "finetune", lr: float = 1e-3, min_lr: float = 0.0,
                 warmup_epochs: int = 0, weight_decay: float = 0.05,
                 backbone_lr_scale: float = 1.0, freeze_backbone_epochs: int = 0,
                 grad_clip: float = 0.0, pooling: str = "cls",
                 feature_norm: bool = False,
                 class_priors: Mapping[str, Sequence[float]] | None = None) -> None:
        super().__init__()
        one_of("train_mode", train_mode, TRAIN_MODES)
        one_of("pooling", pooling, POOLINGS)
        if not classes:
            raise InputError("classes must name at least one target")
        few = {t: list(c) for t, c in classes.items() if len(c) < 2}
        if few:
            raise InputError(f"every target needs at least 2 classes in the training rows, "
                             f"got {few}")
        if class_weights is not None and {t: len(w) for t, w in class_weights.items()} != {
                t: len(c) for t, c in classes.items()}:
            raise InputError("class_weights must give one weight per class of every target")
        if class_priors is not None and ({t: len(p) for t, p in class_priors.items()} != {
                t: len(c) for t, c in classes.items()} or any(
                min(p) <= 0 for p in class_priors.values())):
            raise InputError("class_priors must give one positive share per class of every "
                             "target")
        if lr <= 0 or min_lr < 0 or backbone_lr_scale < 0 or grad_clip < 0:
            raise InputError(f"need lr > 0 and min_lr, backbone_lr_scale, grad_clip >= 0, got "
                             f"{lr}, {min_lr}, {backbone_lr_scale}, {grad_clip}")
        if warmup_epochs < 0 or freeze_backbone_epochs < 0:
            raise InputError("warmup_epochs and freeze_backbone_epochs must be >= 0")
        self.save_hyperparameters()
        self.targets = list(classes)
        self.backbone = build_backbone(**backbone_config)
        dim = self.backbone.out_dim
        self.linear = train_mode == "linear"
        # Features standardised by a batch norm without affine parameters (MAE's linear probe),
        # so one learning rate suits backbones of any feature scale; always in linear mode.
        norm = self.linear or feature_norm
        self.feature_norm = nn.BatchNorm1d(dim, affine=False) if norm else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(dim, len(c)) for c in classes.values())
        if class_priors is not None:
            for head, target in zip(self.heads, classes, strict=True):
                shares = torch.tensor(class_priors[target], dtype=torch.float64)
                if class_weights is not None:
                    shares = shares * torch.tensor(class_weights[target], dtype=torch.float64)
                with torch.no_grad():
                    head.bias.copy_((shares / shares.sum()).log())
        for i, target in enumerate(self.targets):
            weight = None if class_weights is None else torch.tensor(
                class_weights[target], dtype=torch.float32)
            # Not saved: derived from the training rows and the config, so a checkpoint tests
            # under either class_weights setting.
            self.register_buffer(f"class_weight_{i}", weight, persistent=False)
        if self.linear:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self._features: dict[int, Tensor] = {}  # linear mode: row -> frozen features
        stages = ("val", "test")
        self.collected = nn.ModuleDict({s: self._collectors() for s in stages})
        self.test_results: dict | None = None

    def _collectors(self) -> nn.ModuleDict:
        # CatMetric gathers rows from every device (uneven counts included) at compute().
        return nn.ModuleDict({"index": CatMetric(nan_strategy="disable"), **{
            f"{kind}_{i}": CatMetric(nan_strategy="disable")
            for i in range(len(self.targets)) for kind in ("labels", "probs")}})

    # ----- forward ----------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """No backbone update in this epoch (linear mode, or a head-only first epoch)."""
        return self.linear or self.current_epoch < self.hparams.freeze_backbone_epochs

    def train(self, mode: bool = True) -> Classifier:
        """Train mode, except for a frozen backbone (its batch-norm statistics and dropout
        stay as in evaluation)."""
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning leaves train/eval modes alone between epochs: set the backbone's here,
        # so it unfreezes after freeze_backbone_epochs.
        self.backbone.train(not self.backbone_frozen)

    def features(self, image: Tensor, record_index: Tensor | None = None) -> Tensor:
        """Backbone features (B, out_dim); in linear mode computed once per row and reused."""
        pooling = self.hparams.pooling
        if not self.linear:
            return pooled_features(self.backbone, image, pooling)
        if record_index is None:
            with torch.no_grad():
                return pooled_features(self.backbone, image, pooling).float()
        rows = record_index.tolist()
        todo = [i for i, r in enumerate(rows) if r not in self._features]
        if todo:
            with torch.no_grad():
                new = pooled_features(self.backbone, image[todo], pooling).float()
            self._features.update({rows[i]: f for i, f in zip(todo, new, strict=True)})
        return torch.stack([self._features[r] for r in rows])

    def forward(self, image: Tensor, record_index: Tensor | None = None) -> list[Tensor]:
        """Logits per target, each (B, n_classes)."""
        feats = self.feature_norm(self.features(image, record_index))
        return [head(feats) for head in self.heads]

    def _loss(self, logits: list[Tensor], targets: Mapping[str, Tensor]) -> Tensor:
        """The training loss: per target masked cross-entropy, summed (validation and test
        losses come from the gathered rows: ``gathered_losses``)."""
        total = logits[0].sum() * 0.0
        bs = logits[0].shape[0]
        for i, target in enumerate(self.targets):
            loss, n = masked_cross_entropy(logits[i], targets[target],
                                           getattr(self, f"class_weight_{i}"))
            total = total + loss
            if n:
                self.log(f"train/{target}/loss", loss, batch_size=n, sync_dist=True)
        self.log("train/loss", total, batch_size=bs, sync_dist=True, prog_bar=True)
        return total

    # ----- training ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Head learning rate at an optimizer step: linear warm-up, then cosine."""
        trainer = self.trainer
        total = max(int(trainer.estimated_stepping_batches), 1)
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        warmup = min(self.hparams.warmup_epochs * per_epoch, total)
        return warmup_cosine(step, total, warmup, self.hparams.lr, self.hparams.min_lr)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        lr = self.lr_at(self.global_step)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        logits = self(batch["image"], batch["record_index"])
        loss = self._loss(logits, batch["targets"])
        self.log("train/lr", lr, batch_size=len(batch["image"]))
        return loss

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.backbone_frozen:
            # Dropped (not zeroed) so AdamW skips the backbone entirely and the clip norm
            # measures the heads alone; the backward pass still ran, so DDP stays in step.
            for param in self.backbone.parameters():
                param.grad = None
        if self.hparams.grad_clip > 0:
            clip_grad_norm(optimizer, self.hparams.grad_clip)  # also with fused AdamW

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Biases and 1-D parameters (norm scales) get no weight decay (facebookresearch/dino
        # utils.get_params_groups); the backbone's rate is scaled by backbone_lr_scale.
        parts = [("heads", self.heads, 1.0)]
        if not self.linear:
            parts.append(("backbone", self.backbone, self.hparams.backbone_lr_scale))
        groups = []
        for name, module, scale in parts:
            decay, no_decay = [], []
            for pname, param in module.named_parameters():
                (no_decay if pname.endswith(".bias") or param.ndim <= 1 else decay).append(param)
            groups += [
                {"name": f"{name}", "params": decay, "weight_decay": self.hparams.weight_decay,
                 "lr_scale": scale},
                {"name": f"{name}_no_decay", "params": no_decay, "weight_decay": 0.0,
                 "lr_scale": scale}]
        return adamw(self, [g for g in groups if g["params"]], lr=self.hparams.lr)

    # ----- validation and test ----------------------------------------------------------
    def _collect(self, batch: dict, stage: str) -> None:
        logits = self(batch["image"], batch["record_index"])
        store = self.collected[stage]
        store["index"].update(batch["record_index"])
        for i, target in enumerate(self.targets):
            store[f"labels_{i}"].update(batch["targets"][target])
            store[f"probs_{i}"].update(logits[i].float().softmax(1))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch, "test")

    def gathered(self, stage: str) -> dict:
        """Every device's rows of ``stage``, once each (DDP samplers pad with repeats).

        Returns:
            ``{"index": (N,), "labels": {target: (N,)}, "probs": {target: (N, C)}}`` as
            numpy arrays, ordered by row index.
        """
        store = self.collected[stage]
        # reshape: CatMetric returns a single row's values without the row axis.
        index = store["index"].compute().long().cpu().numpy().reshape(-1)
        index, first = np.unique(index, return_index=True)
        out = {"index": index, "labels": {}, "probs": {}}
        for i, target in enumerate(self.targets):
            labels = store[f"labels_{i}"].compute().long().cpu().numpy().reshape(-1)
            probs = store[f"probs_{i}"].compute().float().cpu().numpy()
            out["labels"][target] = labels[first]
            out["probs"][target] = probs.reshape(len(labels), -1)[first]
        for metric in store.values():
            metric.reset()
        return out

    def gathered_losses(self, results: dict, stage: str) -> dict[str, float]:
        """``<stage>/<target>/loss`` and their sum ``<stage>/loss``: the cross-entropy of the
        gathered rows (each once, whatever the DDP padding), class-weighted as in training."""
        values, total = {}, 0.0
        for i, target in enumerate(self.targets):
            labels, probs = results["labels"][target], results["probs"][target]
            keep = labels >= 0
            if not keep.any():
                continue
            y = labels[keep]
            p = probs[keep][np.arange(len(y)), y].astype(np.float64)
            weight = getattr(self, f"class_weight_{i}")
            w = np.ones(len(y)) if weight is None else weight.cpu().double().numpy()[y]
            # F.cross_entropy's weighted mean; probabilities that underflowed count as 1e-45.
            loss = float((w * -np.log(np.maximum(p, 1e-45))).sum() / w.sum())
            values[f"{stage}/{target}/loss"] = loss
            total += loss
        return {**values, f"{stage}/loss": total}

    def _log_metrics(self, stage: str) -> dict:
        results = self.gathered(stage)
        per_target = {t: target_metrics(results["labels"][t], results["probs"][t])
                      for t in self.targets}
        values = {f"{stage}/{name}": value for name, value in mean_metrics(per_target).items()}
        values |= self.gathered_losses(results, stage)
        for target, metrics in per_target.items():
            values |= {f"{stage}/{target}/{k}": metrics[k] for k in ("auc", "acc", "bacc")}
        # Already identical on every device (gathered above), so no sync_dist.
        self.log_dict(values)
        self.log(f"{stage}_auc", values[f"{stage}/auc"], prog_bar=True, logger=False)
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._log_metrics("test")
