"""Segmentation fine-tuning (3D volumes or 2D slices) as a LightningModule, on MONAI parts.

Loss: Dice + cross-entropy (MONAI ``DiceCELoss``) or generalized Dice. Validation and test run
on whole volumes with MONAI ``sliding_window_inference`` (ROI = the training patch); a 2D
network runs slice by slice over the volume and is scored in 3D. Metrics per class and mean:
Dice and the 95% Hausdorff distance (mm), plus predicted and reference volumes (mL) in test.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, GeneralizedDiceLoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import Tensor, nn
from torchvision.utils import make_grid

from medssl.errors import InputError, one_of
from medssl.models.gather import batch_index, gather_once
from medssl.models.optim import adamw, clip_grad_norm
from medssl.models.segmenters import build_segmenter

__all__ = ["LOSSES", "SegmentationModule", "build_loss", "case_metrics", "to_labels"]

LOSSES = ("dice_ce", "generalized_dice")
BLEND_MODES = ("gaussian", "constant")
METRICS = ("dice", "hd95", "pred_ml", "ref_ml")


def build_loss(loss: str, include_background: bool = True, sigmoid: bool = False,
               softmax: bool = True) -> nn.Module:
    """The training loss on logits (B, K, *S) and label maps (B, 1, *S).

    Args:
        loss: ``dice_ce`` (MONAI ``DiceCELoss``) or ``generalized_dice``.
        include_background: the Dice term also scores class 0 (MONAI's meaning).
        sigmoid: per-class sigmoid on the logits (MONAI's meaning).
        softmax: softmax over classes on the logits (MONAI's meaning).
    """
    one_of("loss", loss, LOSSES)
    if sigmoid == softmax:
        raise InputError(f"exactly one of sigmoid and softmax must be true, got sigmoid={sigmoid}"
                         f", softmax={softmax}")
    args = {"include_background": include_background, "to_onehot_y": True, "sigmoid": sigmoid,
            "softmax": softmax}
    return DiceCELoss(**args) if loss == "dice_ce" else GeneralizedDiceLoss(**args)


def to_labels(logits: Tensor, sigmoid: bool) -> Tensor:
    """Label map (B, *S) from logits (B, K, *S).

    Softmax: the most likely class. Sigmoid (independent per-class probabilities): the most
    likely foreground class where its probability exceeds 0.5, else background.
    """
    if not sigmoid:
        return logits.argmax(1)
    fg_logit, fg = logits[:, 1:].max(1)
    return torch.where(fg_logit > 0, fg + 1, torch.zeros_like(fg))


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B, *S) integer labels -> (B, K, *S) float one-hot."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def case_metrics(pred: Tensor, label: Tensor, num_classes: int,
                 spacing: Tensor | None = None, hd95: bool = True) -> dict[str, Tensor]:
    """Per case and foreground class: Dice, HD95 (mm) and volumes (mL).

    Args:
        pred: predicted label map (B, *S).
        label: reference label map (B, *S) or (B, 1, *S).
        num_classes: K, including the background.
        spacing: (B, len(S)) voxel sizes in mm; None: 1 mm.
        hd95: False skips the (slow) Hausdorff distance; it is NaN then.

    Returns:
        ``dice``, ``hd95``, ``pred_ml``, ``ref_ml``: each (B, K - 1), column c - 1 for class c.
        Dice and HD95 are NaN where the reference lacks the class; HD95 also where the
        prediction lacks it.
    """
    label = label.reshape(pred.shape)
    p, y = _one_hot(pred, num_classes), _one_hot(label, num_classes)
    dice = compute_dice(p, y, include_background=False, ignore_empty=True)
    n_spatial = pred.ndim - 1
    if spacing is None:
        spacing = torch.ones(pred.shape[0], n_spatial, dtype=torch.float64)
    voxel_ml = spacing.double().prod(dim=1, keepdim=True).to(pred.device) / 1000
    pred_ml = p[:, 1:].flatten(2).sum(-1).double() * voxel_ml
    ref_ml = y[:, 1:].flatten(2).sum(-1).double() * voxel_ml
    hd = torch.full_like(dice, float("nan"))
    if hd95:
        for b, c in ((pred_ml > 0) & (ref_ml > 0)).nonzero().tolist():
            with warnings.catch_warnings():
                # MONAI 1.6 warns about its own deprecated internal argument on every call.
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*",
                                        category=FutureWarning)
                hd[b, c] = compute_hausdorff_distance(
                    p[b:b + 1, c + 1:c + 2], y[b:b + 1, c + 1:c + 2], include_background=True,
                    percentile=95, spacing=spacing[b].tolist())[0, 0]
    return {"dice": dice, "hd95": hd, "pred_ml": pred_ml.float(), "ref_ml": ref_ml.float()}


def _palette(num_classes: int) -> Tensor:
    """(K, 3) RGB colours in [0, 1]: black background, then evenly spaced hues."""
    hue = torch.arange(num_classes, dtype=torch.float32) / max(num_classes - 1, 1)
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    rgb = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    rgb[0] = 0
    return rgb


@torch.no_grad()
def overlay_grid(image: Tensor, label: Tensor, pred: Tensor, num_classes: int, axis: int,
                 n_slices: int) -> Tensor:
    """(3, H, W) grid: per row one slice as image, image + reference, image + prediction.

    Args:
        image: (C, *S) (channel 0 is shown); label, pred: (*S) label maps; S 2D or 3D.
        axis: spatial axis to cut 3D volumes along.
        n_slices: rows; the slices with the most reference foreground, in order.
    """
    img = image[0].float().cpu()
    label, pred = label.reshape(img.shape).long().cpu(), pred.long().cpu()
    if img.ndim == 3:
        fg = (label > 0).movedim(axis, 0).flatten(1).sum(1)
        picks = fg.argsort(descending=True, stable=True)[:n_slices].sort().values
        planes = [(img.select(axis, k), label.select(axis, k), pred.select(axis, k))
                  for k in picks.tolist()]
    else:
        planes = [(img, label, pred)]
    colours = _palette(num_classes)
    tiles = []
    for plane, ref, out in planes:
        lo, hi = plane.min(), plane.max()
        gray = ((plane - lo) / (hi - lo + 1e-8)).expand(3, -1, -1)
        for labels in (None, ref, out):
            if labels is None:
                tiles.append(gray)
                continue
            colour = colours[labels].movedim(-1, 0)
            tiles.append(torch.where(labels > 0, 0.5 * gray + 0.5 * colour, gray))
    return make_grid(tiles, nrow=3, padding=2)


def _plain(x: Tensor) -> Tensor:
    """A MONAI MetaTensor as a plain tensor: logged values become the checkpoint callback's
    scores, and a MetaTensor there keeps ``torch.load(weights_only=True)`` from reading the
    checkpoint without MONAI imported."""
    return x.as_subclass(Tensor)


class SegmentationModule(L.LightningModule):
    """Encoder-decoder segmentation with sliding-window evaluation on whole volumes.

    Args:
        backbone_config: ``build_backbone`` kwargs of the encoder (``name``, ``spatial_dims``..).
        num_classes: output classes, counting the background.
        decoder: decoder options of the family (``build_segmenter``'s ``decoder_options``).
        loss, include_background, sigmoid, softmax: see ``build_loss``.
        lr: peak learning rate of the decoder (cosine decay to 0 over all steps).
        weight_decay: AdamW weight decay (norm weights and biases get none).
        encoder_lr_scale: encoder learning rate = ``lr * encoder_lr_scale``.
        freeze_encoder_epochs: the encoder's learning rate is 0 for this many first epochs
            (its gradients are still computed, which keeps DDP's bookkeeping unchanged).
        grad_clip: maximum gradient norm; 0 disables clipping.
        patch_size: training patch, also the sliding-window ROI (2 sizes for 2D networks).
        sw_batch_size: windows per forward pass in sliding-window inference.
        sw_overlap: overlap of neighbouring windows, in [0, 1).
        sw_mode: ``gaussian`` (down-weight window borders) or ``constant`` blending.
        hd95: compute the 95% Hausdorff distance in validation and test (slow on big volumes).
        n_overlay_slices: slices per epoch shown in the TensorBoard overlay (0: none).
    """

    def __init__(self, backbone_config: dict, num_classes: int,
                 decoder: dict[str, Any] | None = None, loss: str = "dice_ce",
                 include_background: bool = True, sigmoid: bool = False, softmax: bool = True,
                 lr: float = 1e-3, weight_decay: float = 1e-5, encoder_lr_scale: float = 1.0,
                 freeze_encoder_epochs: int = 0, grad_clip: float = 0.0,
                 patch_size: Sequence[int] = (32, 64, 64), sw_batch_size: int = 2,
                 sw_overlap: float = 0.25, sw_mode: str = "gaussian", hd95: bool = True,
                 n_overlay_slices: int = 3) -> None:
        super().__init__()
        if num_classes < 2:
            raise InputError(f"num_classes counts the background and must be >= 2, got "
                             f"{num_classes}")
        if lr <= 0 or weight_decay < 0 or encoder_lr_scale < 0:
            raise InputError(f"need lr > 0, weight_decay >= 0 and encoder_lr_scale >= 0, got "
                             f"{lr}, {weight_decay}, {encoder_lr_scale}")
        if freeze_encoder_epochs < 0 or grad_clip < 0 or sw_batch_size < 1:
            raise InputError("freeze_encoder_epochs and grad_clip must be >= 0 and "
                             f"sw_batch_size >= 1, got {freeze_encoder_epochs}, {grad_clip}, "
                             f"{sw_batch_size}")
        if not 0 <= sw_overlap < 1:
            raise InputError(f"sw_overlap must be in [0, 1), got {sw_overlap}")
        one_of("sw_mode", sw_mode, BLEND_MODES)
        self.save_hyperparameters()
        self.criterion = build_loss(loss, include_background, sigmoid, softmax)
        self.network = build_segmenter(backbone_config, num_classes, **(decoder or {}))
        self.spatial_dims = int(backbone_config.get("spatial_dims", 3))
        if len(patch_size) != self.spatial_dims:
            raise InputError(f"patch_size {list(patch_size)} needs {self.spatial_dims} sizes for "
                             f"a {self.spatial_dims}D network")
        self.network.check_input_size(list(patch_size), "patch_size")
        self._cases: dict[str, list[Tensor]] = {}
        self._overlay: tuple[Tensor, Tensor, Tensor, int] | None = None

    # ----- forward and whole-volume inference ------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K, *S) of a batch of patches (B, C, *S)."""
        return self.network(x)

    def infer(self, image: Tensor, slice_dim: int | None = None) -> Tensor:
        """Logits (1, K, *S) of one whole item (1, C, *S) by sliding-window inference.

        A 2D network given a volume (1, C, X, Y, Z) runs on its planes along spatial axis
        ``slice_dim`` (each plane is one batch entry of the 2D sliding window).
        """
        hp = self.hparams

        def window(x: Tensor) -> Tensor:
            return sliding_window_inference(x, list(hp.patch_size), hp.sw_batch_size, self,
                                            overlap=hp.sw_overlap, mode=hp.sw_mode)

        if image.ndim == self.spatial_dims + 2:
            return window(image)
        if self.spatial_dims != 2 or image.ndim != 5 or slice_dim is None:
            raise InputError(f"a {self.spatial_dims}D network cannot segment an input of shape "
                             f"{tuple(image.shape)} (slice_dim {slice_dim})")
        planes = image[0].movedim(slice_dim + 1, 0)  # (n, C, U, V)
        return window(planes).movedim(0, slice_dim + 1)[None]

    def _predict(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Logits (B, K, *S) and label maps (B, *S) of every whole item of an eval batch."""
        dims = batch.get("slice_dim")
        logits = torch.cat([
            self.infer(batch["image"][b:b + 1], None if dims is None else int(dims[b]))
            for b in range(batch["image"].shape[0])])
        return logits, to_labels(logits, self.hparams.sigmoid)

    @staticmethod
    def _spacing(batch: dict, n_spatial: int) -> Tensor | None:
        """(B, n_spatial) voxel sizes of the preprocessed grids, from the items' geometry."""
        geometry = batch.get("geometry")
        if geometry is None:
            return None
        return geometry["affine"][:, :3, :n_spatial].double().norm(dim=1).cpu()

    # ----- training ---------------------------------------------------------------------
    def _learning_rates(self) -> tuple[float, float]:
        """(decoder, encoder) learning rates at this step: cosine from ``lr`` to 0."""
        hp = self.hparams
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        lr = 0.5 * hp.lr * (1 + math.cos(math.pi * min(self.global_step / total, 1.0)))
        frozen = self.current_epoch < hp.freeze_encoder_epochs
        return lr, 0.0 if frozen else lr * hp.encoder_lr_scale

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        lr, encoder_lr = self._learning_rates()
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = encoder_lr if group["encoder"] else lr
        loss = _plain(self.criterion(self(batch["image"]), batch["label"]))
        bs = batch["image"].shape[0]
        self.log_dict({"train/loss": loss, "train/lr": lr, "train/encoder_lr": encoder_lr},
                      batch_size=bs, sync_dist=True)
        self.log("loss", loss, batch_size=bs, prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # No weight decay on biases and 1-D parameters (norm scales), as in DINO's recipe.
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        encoder = {id(p) for p in self.network.encoder.parameters()}
        for name, param in self.network.named_parameters():
            decay = not (name.endswith(".bias") or param.ndim <= 1)
            groups.setdefault((id(param) in encoder, decay), []).append(param)
        return adamw(self, [
            {"params": params, "encoder": enc,
             "weight_decay": self.hparams.weight_decay if decay else 0.0}
            for (enc, decay), params in sorted(groups.items())], lr=self.hparams.lr)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.hparams.grad_clip > 0:
            clip_grad_norm(optimizer, self.hparams.grad_clip)  # also with fused AdamW

    # ----- validation and test: whole volumes ------------------------------------------
    def _evaluate(self, batch: dict, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        logits, pred = self._predict(batch)
        label = batch["label"]
        metrics = case_metrics(pred, label, self.hparams.num_classes,
                               self._spacing(batch, pred.ndim - 1), self.hparams.hd95)
        metrics = {key: _plain(value) for key, value in metrics.items()}
        n = label.shape[0]
        per_case = {"loss": torch.stack([_plain(self.criterion(logits[b:b + 1], label[b:b + 1]))
                                         for b in range(n)]),
                    "index": batch_index(batch, n)}
        for key, value in (metrics | per_case).items():
            self._cases.setdefault(key, []).append(
                value.long() if key == "index" else value.float())
        return pred, metrics

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pred, _ = self._evaluate(batch, "val")
        if batch_idx == 0 and self.hparams.n_overlay_slices > 0:
            dims = batch.get("slice_dim")
            axis = int(dims[0]) if dims is not None else int(torch.tensor(pred.shape[1:]).argmin())
            self._overlay = (batch["image"][0], batch["label"][0], pred[0], axis)

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Returns the label maps (B, *S) on the preprocessed grid and the per-case metrics,
        for callbacks that write them to files."""
        pred, metrics = self._evaluate(batch, "test")
        return {"prediction": pred.to(torch.int16).cpu(),
                "metrics": {k: v.cpu() for k, v in metrics.items()}}

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Label maps (B, *S) on the preprocessed grid."""
        return self._predict(batch)[1].to(torch.int16).cpu()

    def _log_cases(self, stage: str) -> None:
        """Means over cases (all devices) of the loss and, per class and over classes, of the
        Dice (and HD95 unless ``hd95=false``); NaNs are skipped. Under DDP each case is
        counted once (``gather_once``)."""
        if not self._cases:
            return
        cases = {k: torch.cat(v) for k, v in self._cases.items()}
        self._cases = {}
        index = cases.pop("index")
        cases = gather_once(self, cases, index)
        log = {f"{stage}/loss": cases["loss"].mean()}
        for key in ("dice", "hd95") if self.hparams.hd95 else ("dice",):
            per_class = cases[key].nanmean(0)
            log[f"{stage}/{key}"] = per_class.nanmean()
            log |= {f"{stage}/{key}_{c + 1}": v for c, v in enumerate(per_class)}
        # Every device holds the same gathered values; sync_dist only averages equal numbers.
        self.log_dict(log, prog_bar=False, sync_dist=True)
        self.log(f"{stage}_dice", log[f"{stage}/dice"], prog_bar=True, logger=False,
                 sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_cases("val")
        experiment = getattr(self.logger, "experiment", None)
        if self._overlay is not None and hasattr(experiment, "add_image"):
            image, label, pred, axis = self._overlay
            experiment.add_image("val/overlay", overlay_grid(
                image, label, pred, self.hparams.num_classes, axis,
                self.hparams.n_overlay_slices), self.current_epoch)
        self._overlay = None

    def on_test_epoch_end(self) -> None:
        self._log_cases("test")
