"""DINO self-distillation (Caron et al., ICCV 2021) for 3D volumes, on lightly's parts.

Follows facebookresearch/dino ``main_dino.py`` and lightly's
``examples/pytorch_lightning/dino.py``: student and EMA teacher (backbone + projection
head), multi-crop where only the global views reach the teacher, DINO loss with centring
and teacher-temperature warm-up, the learning rate scaled by the total batch / 256, cosine
schedules for learning rate, weight decay and teacher momentum, last layer frozen for the
first epochs, per-parameter gradient clipping, stochastic depth in the student only.

Against the uniform collapse of small cohorts (a fresh network's features barely differ
between samples, so centring flattens the teacher's output; see ``bench/results/dino.md``),
two DINOv2 options: Sinkhorn-Knopp centring of the teacher and the KoLeo regulariser.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightly.loss import KoLeoLoss
from lightly.loss.capi_loss import sinkhorn_knopp
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.nn import functional as F

from medssl.errors import InputError
from medssl.models.backbone_base import POOLINGS, pooled_features
from medssl.models.backbones import build_backbone
from medssl.models.gather import batch_index, mean_once
from medssl.models.monitors import (
    crop_grid,
    embedding_spread,
    entropy_fraction,
    prototype_information,
    view_agreement,
)
from medssl.models.optim import adamw

CENTERINGS = ("mean", "sinkhorn_knopp")


def warmup_cosine(step: int, total: int, warmup: int, start: float, end: float) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine to ``end``."""
    if step < warmup:
        return start * (step + 1) / warmup
    return cosine_schedule(step - warmup, max(total - warmup, 1), start, end)


def teacher_temperature(epoch: int, start: float, end: float, warmup_epochs: int) -> float:
    """DINO's schedule: ``linspace(start, end, warmup_epochs)`` over the first epochs, so the
    target is reached at epoch ``warmup_epochs - 1``, then constant."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:  # linspace(start, end, 1) == [start]
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


def clip_per_parameter(parameters: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip each parameter's gradient to norm ``max_norm`` on its own (DINO
    ``utils.clip_gradients``: ``clip_coef = clip / (norm + 1e-6)`` where below 1).

    A global norm would let one large gradient (e.g. the discarded last-layer gradient of
    the frozen epochs) shrink every other one. Unlike the reference, no per-parameter
    ``.item()``: the norms and factors stay on the device (one fused kernel per step on GPU,
    no host syncs). Returns the gradient norms before clipping (a tensor).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads, 2)
    coefs = torch._foreach_add(norms, 1e-6)
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, max_norm)
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)
    return torch.stack(norms)


def dino_cross_entropy(teacher_probs: Tensor, student_out: Tensor, student_temp: float,
                       per_sample: bool = False) -> Tensor:
    """DINO's loss: mean cross-entropy of every teacher view (T, B, K) probabilities against
    every student view (S, B, K) logits, the same view index excluded. Computed in fp32 under
    any autocast, as in DINO's code (autocast would run the einsum in bf16 and round the loss
    by ~0.03 near ln K). ``per_sample``: one value per sample (B,), whose mean is the loss."""
    t, s = teacher_probs.shape[0], student_out.shape[0]
    mask = torch.ones(t, s, device=student_out.device)  # pairs of different views
    mask[range(min(t, s)), range(min(t, s))] = 0
    if not mask.any():
        raise InputError("the DINO loss needs at least two views")
    with torch.autocast(student_out.device.type, enabled=False):
        s_logp = F.log_softmax(student_out.float() / student_temp, dim=-1)
        terms = -torch.einsum("tbk,sbk->tsb", teacher_probs.float(), s_logp)
        per_item = torch.einsum("tsb,ts->b", terms, mask) / mask.sum()
    return per_item if per_sample else per_item.mean()


class DINO(L.LightningModule):
    """DINO pre-training module.

    Args:
        backbone_config: ``build_backbone`` kwargs (including ``name``); the teacher gets it
            with ``drop_path_rate`` 0.
        out_dim: prototypes of the projection head (65536 in the paper; smaller is cheaper).
        hidden_dim, bottleneck_dim: projection head MLP sizes.
        head_batch_norm: batch norm in the head MLP (DINO's ``use_bn_in_head``, off for ViTs).
        lr: base learning rate at a total batch of 256; the peak rate after warm-up is
            ``lr * batch_size * devices * num_nodes * accumulate_grad_batches / 256`` (DINO's
            linear scaling rule), logged as ``train/lr``.
        batch_size: samples per device and step (for the scaling rule).
        optimizer: ``adamw`` (DINO's ViT recipe) or ``sgd`` (momentum 0.9, its convnet recipe).
        min_lr: final learning rate of the cosine decay (not scaled, as in DINO).
        warmup_epochs: linear learning-rate warm-up.
        weight_decay, weight_decay_end: cosine weight-decay schedule (norms/biases get none);
            equal values give DINO's constant convnet weight decay.
        momentum_teacher: starting EMA momentum, raised to 1 by a cosine over all steps.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: teacher temperature,
            ``linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)`` per epoch.
        student_temp: student temperature.
        norm_last_layer: weight-normalise the head's last layer (True is more stable).
        freeze_last_layer: epochs during which the last layer gets no gradient.
        clip_grad: maximum gradient norm of each parameter tensor (0 disables clipping).
        drop_path_rate: stochastic depth of the student ViT (DINO: 0.1); ignored by backbones
            without it.
        centering: ``mean`` (DINO: running mean of the teacher outputs, momentum
            ``center_momentum``) or ``sinkhorn_knopp`` (DINOv2: 3 iterations per batch,
            balancing the prototypes over the batch).
        center_momentum: EMA momentum of the mean centre (DINO: 0.9).
        koleo_weight: weight of the KoLeo loss on the student's global-view features
            (DINOv2: 0.1); 0 disables it.
        pooling: features fed to the head from token backbones (ViT): ``cls`` (DINO) or
            ``mean`` of the patch tokens. The exported backbone still returns CLS features.
        n_global: number of global crops (the first crops of each batch).
    """

    def __init__(self, backbone_config: dict, out_dim: int = 4096, hidden_dim: int = 512,
                 bottleneck_dim: int = 128, head_batch_norm: bool = False, lr: float = 5e-4,
                 batch_size: int = 256, optimizer: str = "adamw", min_lr: float = 1e-6,
                 warmup_epochs: int = 10, weight_decay: float = 0.04,
                 weight_decay_end: float = 0.4, momentum_teacher: float = 0.996,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1,
                 norm_last_layer: bool = True, freeze_last_layer: int = 1,
                 clip_grad: float = 3.0, drop_path_rate: float = 0.1,
                 centering: str = "mean", center_momentum: float = 0.9,
                 koleo_weight: float = 0.0, pooling: str = "cls", n_global: int = 2) -> None:
        super().__init__()
        if not 0 <= momentum_teacher <= 1:
            raise InputError(f"momentum_teacher must be in [0, 1], got {momentum_teacher}")
        if lr <= 0 or min_lr < 0:
            raise InputError(f"need lr > 0 and min_lr >= 0, got lr={lr}, min_lr={min_lr}")
        if batch_size < 1:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        for name, value, options in (("optimizer", optimizer, ("adamw", "sgd")),
                                     ("centering", centering, CENTERINGS),
                                     ("pooling", pooling, POOLINGS)):
            if value not in options:
                raise InputError(f"{name} must be one of {options}, got {value!r}")
        if koleo_weight < 0:
            raise InputError(f"koleo_weight must be >= 0, got {koleo_weight}")
        self.save_hyperparameters()
        student_config, teacher_config = dict(backbone_config), dict(backbone_config)
        if backbone_config.get("name") == "vit":
            # Stochastic depth in the student only; the teacher (the export) has none, so its
            # stored config rebuilds a deterministic network.
            student_config["drop_path_rate"] = drop_path_rate
            teacher_config["drop_path_rate"] = 0.0
        self.student_backbone = build_backbone(**student_config)
        self.teacher_backbone = build_backbone(**teacher_config)
        self.teacher_backbone.load_state_dict(self.student_backbone.state_dict())
        head_args = dict(input_dim=self.student_backbone.out_dim, hidden_dim=hidden_dim,
                         bottleneck_dim=bottleneck_dim, output_dim=out_dim,
                         batch_norm=head_batch_norm)
        self.student_head = DINOProjectionHead(**head_args, freeze_last_layer=freeze_last_layer,
                                               norm_last_layer=norm_last_layer)
        # lightly's head cannot be deep-copied: build the teacher's and copy the state.
        self.teacher_head = DINOProjectionHead(**head_args, norm_last_layer=norm_last_layer)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.koleo = KoLeoLoss()
        self._pending_centers: list[Tensor] = []  # batch means since the last optimizer step
        self._val_losses: list[tuple[Tensor, Tensor]] = []  # (per-item loss, item number)
        self._grid_batch: list[Tensor] | None = None
        self._momentum = momentum_teacher
        self.ema_updates = 0  # teacher updates in this process (one per optimizer step)

    # ----- forward passes -------------------------------------------------------------
    def _features(self, backbone: nn.Module, x: Tensor) -> Tensor:
        return pooled_features(backbone, x, self.hparams.pooling)

    def _backbone_multicrop(self, backbone: nn.Module, crops: list[Tensor]) -> Tensor:
        """Run the backbone once per group of equally shaped crops (facebookresearch/dino
        ``MultiCropWrapper``); returns (n_crops * B, D) in crop order."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape == crops[start].shape:
                end += 1
            feats.append(self._features(backbone, torch.cat(crops[start:end])))
            start = end
        return torch.cat(feats)

    def forward(self, crops: list[Tensor]) -> list[Tensor]:
        """Student outputs, one (B, out_dim) tensor per crop."""
        return self._student(crops)[0]

    def _student(self, crops: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        feats = self._backbone_multicrop(self.student_backbone, crops)
        return list(self.student_head(feats).chunk(len(crops))), feats

    @torch.no_grad()
    def forward_teacher(self, crops: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Teacher outputs for the global crops, and its backbone features (nB, D)."""
        feats = self._backbone_multicrop(self.teacher_backbone, crops)
        return list(self.teacher_head(feats).chunk(len(crops))), feats

    @torch.no_grad()
    def teacher_probs(self, teacher_out: Tensor, temp: float) -> Tensor:
        """Targets (T, B, K) from teacher logits (T, B, K): centred and sharpened softmax, or
        Sinkhorn-Knopp assignments balanced over the batch (all global views together)."""
        if self.hparams.centering == "sinkhorn_knopp":
            t, b, k = teacher_out.shape
            q = sinkhorn_knopp((teacher_out.float() / temp).reshape(1, t * b, k).transpose(0, 1),
                               iterations=3, gather_distributed=True)
            return q.transpose(0, 1).reshape(t, b, k)
        return F.softmax((teacher_out - self.center) / temp, dim=-1)

    # ----- schedules (pure functions of the optimizer step) ----------------------------
    def _steps(self) -> tuple[int, int]:
        """Optimizer steps in the whole run and in one epoch."""
        trainer = self.trainer
        total = max(int(trainer.estimated_stepping_batches), 1)
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return total, max(min(per_epoch, total), 1)

    def peak_lr(self) -> float:
        """DINO's linear scaling rule: base lr x total batch / 256, the total batch being
        batch_size x devices x num_nodes (``world_size``) x accumulated batches."""
        trainer = self.trainer
        total_batch = (self.hparams.batch_size * trainer.world_size
                       * trainer.accumulate_grad_batches)
        return self.hparams.lr * total_batch / 256

    def schedules(self) -> dict[str, float]:
        hp, step = self.hparams, self.global_step
        total, per_epoch = self._steps()
        return {
            "lr": warmup_cosine(step, total, hp.warmup_epochs * per_epoch, self.peak_lr(),
                                hp.min_lr),
            "weight_decay": cosine_schedule(step, total, hp.weight_decay, hp.weight_decay_end),
            "momentum": cosine_schedule(step, total, hp.momentum_teacher, 1.0),
            "teacher_temp": teacher_temperature(step // per_epoch, hp.warmup_teacher_temp,
                                                hp.teacher_temp, hp.warmup_teacher_temp_epochs),
        }

    # ----- training ---------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        crops, n_global = batch["crops"], self.hparams.n_global
        sched = self.schedules()
        self._momentum = sched["momentum"]  # applied after this step's optimizer update
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = sched["lr"]
            if group["decay"]:
                group["weight_decay"] = sched["weight_decay"]
        teacher_out, teacher_feats = self.forward_teacher(crops[:n_global])
        teacher_out = torch.stack(teacher_out)
        student_out, student_feats = self._student(crops)
        targets = self.teacher_probs(teacher_out, sched["teacher_temp"])
        dino_loss = dino_cross_entropy(targets, torch.stack(student_out),
                                       self.hparams.student_temp)
        loss = dino_loss
        # The centre moves once per optimizer step (after it), from the micro-batches' means.
        self._pending_centers.append(teacher_out.detach().float().mean((0, 1)))
        log = {}
        if self.hparams.koleo_weight > 0:
            # DINOv2: KoLeo on each global view's student features, within the batch.
            bs = crops[0].shape[0]
            koleo = sum(self.koleo(f) for f in student_feats[:n_global * bs].chunk(n_global))
            log["train/koleo_loss"] = koleo / n_global
            loss = loss + self.hparams.koleo_weight * koleo / n_global
        bs = crops[0].shape[0]
        sharpened = (teacher_out - self.center) / sched["teacher_temp"]
        log |= {f"train/{k}": v for k, v in sched.items()}
        log |= {"train/dino_loss": dino_loss,  # the DINO term alone, as val/dino_loss
                "train/embedding_spread": embedding_spread(teacher_feats),
                "train/teacher_entropy_fraction": entropy_fraction(sharpened),
                "train/prototype_information": prototype_information(sharpened)}
        if n_global >= 2 and bs >= 2:  # the teacher's two global views of each volume
            views = view_agreement(*teacher_feats.chunk(n_global)[:2])
            log |= {"train/view_top1": views["top1"], "train/view_cosine": views["same"]}
        self.log_dict(log, batch_size=bs, sync_dist=True, prog_bar=False)
        self.log("dino_loss", dino_loss, batch_size=bs, prog_bar=True, logger=False)
        if batch_idx == 0:
            self._grid_batch = [c[:1].detach().cpu() for c in crops]
        return loss

    @torch.no_grad()
    def update_center(self) -> None:
        """DINO's centre EMA, once per optimizer step: the mean of the step's micro-batch
        means (all-reduced over devices), momentum ``center_momentum``."""
        if not self._pending_centers:
            return
        batch_center = torch.stack(self._pending_centers).mean(0, keepdim=True)
        self._pending_centers = []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        m = self.hparams.center_momentum
        self.center.mul_(m).add_(batch_center.to(self.center.dtype), alpha=1 - m)

    def optimizer_step(self, *args: object, **kwargs: object) -> None:
        """Step, then move the teacher and the centre: once per optimizer step, also with
        accumulation."""
        super().optimizer_step(*args, **kwargs)
        update_momentum(self.student_backbone, self.teacher_backbone, m=self._momentum)
        update_momentum(self.student_head, self.teacher_head, m=self._momentum)
        self.update_center()
        self.ema_updates += 1

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # DINO order: clip each parameter, then drop the last layer's gradient while frozen.
        if self.hparams.clip_grad > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            clip_per_parameter(params, self.hparams.clip_grad)
        self.student_head.cancel_last_layer_gradients(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if self._grid_batch is not None and hasattr(experiment, "add_image"):
            experiment.add_image("train/crops", crop_grid(self._grid_batch), self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # facebookresearch/dino utils.get_params_groups: biases and every 1-D parameter
        # (norm scales, PReLU slopes) are not regularised.
        decay, no_decay = [], []
        for module in (self.student_backbone, self.student_head):
            for name, param in module.named_parameters():
                if param.requires_grad:
                    (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
        groups = [
            {"name": "decay", "params": decay, "weight_decay": self.hparams.weight_decay,
             "decay": True},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "decay": False},
        ]
        if self.hparams.optimizer == "sgd":  # DINO's convnet recipe: SGD, momentum 0.9
            return torch.optim.SGD(groups, lr=self.hparams.lr, momentum=0.9)
        return adamw(self, groups, lr=self.hparams.lr)

    # ----- validation: DINO loss on fixed crops ----------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        crops, n_global = batch["crops"], self.hparams.n_global
        teacher_out, _ = self.forward_teacher(crops[:n_global])
        targets = self.teacher_probs(torch.stack(teacher_out), self.hparams.teacher_temp)
        losses = dino_cross_entropy(targets, torch.stack(self.forward(crops)),
                                    self.hparams.student_temp, per_sample=True)
        self._val_losses.append((losses, batch_index(batch, len(losses))))

    def on_validation_epoch_end(self) -> None:
        """``val/dino_loss``: the mean over the validation items, each counted once on any
        number of devices (``mean_once``)."""
        loss, self._val_losses = mean_once(self, self._val_losses), []
        if loss is not None:  # the same on every device; sync_dist only averages equal values
            self.log("val/dino_loss", loss, sync_dist=True, prog_bar=True)
