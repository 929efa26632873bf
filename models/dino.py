"""DINO self-distillation (Caron et al., ICCV 2021) for 3D volumes, on lightly's parts.

Follows facebookresearch/dino ``main_dino.py`` and lightly's
``examples/pytorch_lightning/dino.py``: student and EMA teacher (backbone + projection
head), multi-crop where only the global views reach the teacher, DINO loss with centring
and teacher-temperature warm-up, cosine schedules for learning rate, weight decay and
teacher momentum, last layer frozen for the first epochs, gradient clipping.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from medssl.models.backbones import build_backbone
from medssl.models.monitors import crop_grid, embedding_std, softmax_entropy


def warmup_cosine(step: int, total: int, warmup: int, start: float, end: float) -> float:
    """Linear warm-up from 0 to ``start`` over ``warmup`` steps, then cosine to ``end``."""
    if step < warmup:
        return start * (step + 1) / warmup
    return cosine_schedule(step - warmup, max(total - warmup, 1), start, end)


class DINO(L.LightningModule):
    """DINO pre-training module.

    Args:
        backbone_config: ``build_backbone`` kwargs (including ``name``).
        out_dim: prototypes of the projection head (65536 in the paper; smaller is cheaper).
        hidden_dim, bottleneck_dim: projection head MLP sizes.
        head_batch_norm: batch norm in the head MLP (DINO's ``use_bn_in_head``); amplifies
            the small sample-to-sample differences of a freshly initialised backbone.
        lr: peak learning rate (reached after warm-up).
        min_lr: final learning rate of the cosine decay.
        warmup_epochs: linear learning-rate warm-up.
        weight_decay, weight_decay_end: cosine weight-decay schedule (norms/biases get none).
        momentum_teacher: starting EMA momentum, raised to 1 by a cosine over all steps.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs: teacher temperature,
            linearly warmed up from ``warmup_teacher_temp``.
        student_temp: student temperature.
        norm_last_layer: weight-normalise the head's last layer (True is more stable).
        freeze_last_layer: epochs during which the last layer gets no gradient.
        clip_grad: maximum gradient norm (0 disables clipping).
        n_global: number of global crops (the first crops of each batch).
    """

    def __init__(self, backbone_config: dict, out_dim: int = 4096, hidden_dim: int = 512,
                 bottleneck_dim: int = 128, head_batch_norm: bool = False, lr: float = 5e-4,
                 min_lr: float = 1e-6, warmup_epochs: int = 10, weight_decay: float = 0.04,
                 weight_decay_end: float = 0.4, momentum_teacher: float = 0.996,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, student_temp: float = 0.1,
                 norm_last_layer: bool = True, freeze_last_layer: int = 1,
                 clip_grad: float = 3.0, n_global: int = 2) -> None:
        super().__init__()
        if not 0 <= momentum_teacher <= 1:
            raise ValueError(f"momentum_teacher must be in [0, 1], got {momentum_teacher}")
        if lr <= 0 or min_lr < 0:
            raise ValueError(f"need lr > 0 and min_lr >= 0, got lr={lr}, min_lr={min_lr}")
        self.save_hyperparameters()
        self.student_backbone = build_backbone(**backbone_config)
        self.teacher_backbone = build_backbone(**backbone_config)
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
        self.criterion = DINOLoss(output_dim=out_dim, teacher_temp=teacher_temp,
                                  warmup_teacher_temp=warmup_teacher_temp,
                                  warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
                                  student_temp=student_temp)
        self._grid_batch: list[Tensor] | None = None
        self._momentum = momentum_teacher
        self.ema_updates = 0  # teacher updates in this process (one per optimizer step)

    # ----- forward passes -------------------------------------------------------------
    def _backbone_multicrop(self, backbone: nn.Module, crops: list[Tensor]) -> Tensor:
        """Run the backbone once per group of equally shaped crops (facebookresearch/dino
        ``MultiCropWrapper``); returns (n_crops * B, D) in crop order."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape == crops[start].shape:
                end += 1
            feats.append(backbone(torch.cat(crops[start:end])))
            start = end
        return torch.cat(feats)

    def forward(self, crops: list[Tensor]) -> list[Tensor]:
        """Student outputs, one (B, out_dim) tensor per crop."""
        out = self.student_head(self._backbone_multicrop(self.student_backbone, crops))
        return list(out.chunk(len(crops)))

    @torch.no_grad()
    def forward_teacher(self, crops: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Teacher outputs for the global crops, and its backbone features (nB, D)."""
        feats = self._backbone_multicrop(self.teacher_backbone, crops)
        return list(self.teacher_head(feats).chunk(len(crops))), feats

    # ----- schedules (pure functions of the optimizer step) ----------------------------
    def _steps(self) -> tuple[int, int]:
        """Optimizer steps in the whole run and in one epoch."""
        trainer = self.trainer
        total = max(int(trainer.estimated_stepping_batches), 1)
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return total, max(min(per_epoch, total), 1)

    def schedules(self) -> dict[str, float]:
        hp, step = self.hparams, self.global_step
        total, per_epoch = self._steps()
        epoch = step / per_epoch
        warm = hp.warmup_teacher_temp_epochs
        return {
            "lr": warmup_cosine(step, total, hp.warmup_epochs * per_epoch, hp.lr, hp.min_lr),
            "weight_decay": cosine_schedule(step, total, hp.weight_decay, hp.weight_decay_end),
            "momentum": cosine_schedule(step, total, hp.momentum_teacher, 1.0),
            "teacher_temp": hp.teacher_temp if epoch >= warm else hp.warmup_teacher_temp
            + (hp.teacher_temp - hp.warmup_teacher_temp) * math.floor(epoch) / warm,
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
        student_out = self.forward(crops)
        loss = self.criterion(teacher_out, student_out, teacher_temp=sched["teacher_temp"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {self.global_step}; "
                                     "lower lr or raise warmup_epochs")
        bs = crops[0].shape[0]
        log = {f"train/{k}": v for k, v in sched.items()}
        log |= {"train/dino_loss": loss,
                "train/embedding_std": embedding_std(teacher_feats),
                "train/teacher_entropy": softmax_entropy(
                    (torch.stack(teacher_out) - self.criterion.center) / sched["teacher_temp"])}
        self.log_dict(log, batch_size=bs, sync_dist=True, prog_bar=False)
        self.log("dino_loss", loss, batch_size=bs, prog_bar=True, logger=False)
        if batch_idx == 0:
            self._grid_batch = [c[:1].detach().cpu() for c in crops]
        return loss

    def optimizer_step(self, *args: object, **kwargs: object) -> None:
        """Step, then move the teacher: once per optimizer step, also with accumulation."""
        super().optimizer_step(*args, **kwargs)
        update_momentum(self.student_backbone, self.teacher_backbone, m=self._momentum)
        update_momentum(self.student_head, self.teacher_head, m=self._momentum)
        self.ema_updates += 1

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.hparams.clip_grad > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.clip_grad,
                                gradient_clip_algorithm="norm")
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
        return torch.optim.AdamW([
            {"name": "decay", "params": decay, "weight_decay": self.hparams.weight_decay,
             "decay": True},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "decay": False},
        ], lr=self.hparams.lr)

    # ----- validation: DINO loss on fixed crops ----------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        crops, n_global = batch["crops"], self.hparams.n_global
        teacher_out, _ = self.forward_teacher(crops[:n_global])
        center = self.criterion.center.clone()  # validation must not move the centre
        loss = self.criterion(teacher_out, self.forward(crops),
                              teacher_temp=self.hparams.teacher_temp)
        self.criterion.center.copy_(center)
        self.log("val/dino_loss", loss, batch_size=crops[0].shape[0], sync_dist=True,
                 prog_bar=True)
