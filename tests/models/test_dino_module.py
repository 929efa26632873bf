"""The DINO LightningModule on its own: EMA teacher, optimizer groups, schedules, last-layer
freezing, validation and non-finite losses (tiny in-memory crops, CPU trainer)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medssl.models.dino import DINO, clip_per_parameter, teacher_temperature, warmup_cosine

TINY_VIT = {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": [16, 32, 32],
            "patch_size": [4, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 1,
            "num_heads": 2}
GLOBAL, LOCAL = (16, 32, 32), (8, 16, 16)


class _Crops(Dataset):
    """``n`` samples of 2 global and 2 local random crops (fixed per index); ``fill`` replaces
    every voxel of the first global crop (e.g. NaN)."""

    def __init__(self, n: int, global_size: tuple[int, ...] = GLOBAL,
                 local_size: tuple[int, ...] = LOCAL, fill: float | None = None) -> None:
        self.n, self.global_size, self.local_size, self.fill = n, global_size, local_size, fill

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, list[Tensor]]:
        g = torch.Generator().manual_seed(i)
        crops = [torch.randn(1, *self.global_size, generator=g) for _ in range(2)]
        crops += [torch.randn(1, *self.local_size, generator=g) for _ in range(2)]
        if self.fill is not None:
            crops[0].fill_(self.fill)
        return {"crops": crops}


def _loader(n: int = 4, batch_size: int = 2, **kwargs: object) -> DataLoader:
    return DataLoader(_Crops(n, **kwargs), batch_size=batch_size, shuffle=False)


def _module(backbone: dict | None = None, **kwargs: object) -> DINO:
    torch.manual_seed(0)
    # batch_size 256: the scaling rule's factor is 1, so ``lr`` is the peak rate.
    args = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_epochs": 0,
            "batch_size": 256, **kwargs}
    return DINO(backbone or TINY_VIT, **args)


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kwargs)


def _pairs(module: DINO) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, student param, teacher param) for the backbone and the head."""
    out = []
    for part in ("backbone", "head"):
        teacher = dict(getattr(module, f"teacher_{part}").named_parameters())
        for name, param in getattr(module, f"student_{part}").named_parameters():
            out.append((f"{part}.{name}", param, teacher[name]))
    return out


def _clone(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# ----- initial state --------------------------------------------------------------------------
def test_teacher_starts_as_student_and_is_frozen() -> None:
    module = _module()
    pairs = _pairs(module)
    assert len(pairs) == len(list(module.teacher_backbone.parameters())) + len(
        list(module.teacher_head.parameters()))
    for name, student, teacher in pairs:
        assert student is not teacher, name
        assert torch.equal(student, teacher), name
        assert not teacher.requires_grad, name
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("student_") for n in trainable)
    # The only frozen student parameter is the weight-normalised last layer's norm.
    frozen = [n for n, p in module.named_parameters()
              if n.startswith("student_") and not p.requires_grad]
    assert frozen == ["student_head.last_layer.weight_g"]


def test_optimizer_holds_exactly_the_student_parameters() -> None:
    module = _module()
    optimizer = module.configure_optimizers()
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(set(held)), "a parameter is in two groups"
    student = {id(p) for m in (module.student_backbone, module.student_head)
               for p in m.parameters() if p.requires_grad}  # frozen weight_g needs no slot
    teacher = {id(p) for m in (module.teacher_backbone, module.teacher_head)
               for p in m.parameters()}
    assert set(held) == student
    assert not set(held) & teacher
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]


# ----- EMA teacher -----------------------------------------------------------------------------
class _FirstStep(L.Callback):
    """Teacher before the first optimizer step; teacher, student and momentum right after."""

    def on_train_batch_start(self, trainer: L.Trainer, module: DINO, batch: object,
                             batch_idx: int) -> None:
        if batch_idx == 0:
            self.teacher_old = {**_clone(module.teacher_backbone),
                                **{f"h.{k}": v for k, v in _clone(module.teacher_head).items()}}

    def on_train_batch_end(self, trainer: L.Trainer, module: DINO, outputs: object,
                           batch: object, batch_idx: int) -> None:
        if batch_idx == 0:
            self.step, self.ema_updates = trainer.global_step, module.ema_updates
            self.momentum = module._momentum
            self.pairs = [(n, s.detach().clone(), t.detach().clone())
                          for n, s, t in _pairs(module)]


def test_teacher_is_ema_of_student_after_one_step(tmp_path: Path) -> None:
    m0, max_steps = 0.9, 3
    module, probe = _module(momentum_teacher=m0, lr=1e-2, min_lr=1e-2), _FirstStep()
    _trainer(tmp_path, max_steps=max_steps, callbacks=[probe]).fit(module, _loader(6))
    assert probe.step == 1 and probe.ema_updates == 1
    expected_m = cosine_schedule(0, max_steps, m0, 1.0)
    assert probe.momentum == pytest.approx(expected_m) and expected_m == pytest.approx(m0)
    moved = 0
    for name, student_new, teacher_new in probe.pairs:
        part, key = name.split(".", 1)
        teacher_old = probe.teacher_old[key if part == "backbone" else f"h.{key}"]
        expected = expected_m * teacher_old + (1 - expected_m) * student_new
        assert torch.allclose(teacher_new, expected, atol=1e-6), name
        moved += not torch.equal(teacher_new, teacher_old)
    assert moved > len(probe.pairs) // 2, "the teacher barely moved: the check is vacuous"


def test_one_ema_update_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    module = _module()
    trainer = _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, _loader(8, batch_size=2))  # 4 batches -> 2 optimizer steps
    assert module.ema_updates == trainer.global_step == 2


# ----- optimizer groups and schedules ----------------------------------------------------------
class _Groups(L.Callback):
    """Per optimizer step: global step and (weight decay, lr) of each named group."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, tuple[float, float]]]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, module: DINO,
                                 optimizer: torch.optim.Optimizer) -> None:
        groups = {g["name"]: (g["weight_decay"], g["lr"]) for g in optimizer.param_groups}
        self.steps.append((trainer.global_step, groups))


def test_weight_decay_groups_and_schedules(tmp_path: Path) -> None:
    hp = {"lr": 2e-3, "min_lr": 1e-5, "warmup_epochs": 1, "weight_decay": 0.04,
          "weight_decay_end": 0.4}
    module, probe = _module(**hp), _Groups()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[probe])
    trainer.fit(module, _loader(8))  # 4 steps per epoch, 8 in all
    total, per_epoch = 8, 4
    assert [s for s, _ in probe.steps] == list(range(total))

    # Which parameters decay: never a bias, a norm parameter or any other 1-d parameter.
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    decay = {id(p) for p in groups["decay"]["params"]}
    norm_params = {id(p) for m in module.modules() if isinstance(m, nn.LayerNorm | nn.GroupNorm
                                                                 | nn.modules.batchnorm._NormBase)
                   for p in m.parameters(recurse=False)}
    for name, param in module.named_parameters():
        if not name.startswith("student_") or not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("bias") or id(param) in norm_params:
            assert id(param) in no_decay, f"{name} is decayed"
        else:
            assert id(param) in decay, f"{name} is not decayed"
    assert any(n.endswith("norm.weight") and id(p) in no_decay
               for n, p in module.named_parameters())

    # Weight decay: 0 for no_decay at every step; cosine from 0.04 to 0.4 for decay.
    for step, g in probe.steps:
        assert g["no_decay"][0] == 0.0, f"step {step}"
        wd = cosine_schedule(step, total, hp["weight_decay"], hp["weight_decay_end"])
        assert g["decay"][0] == pytest.approx(wd), f"step {step}"
        lr = warmup_cosine(step, total, hp["warmup_epochs"] * per_epoch, hp["lr"], hp["min_lr"])
        assert g["decay"][1] == g["no_decay"][1] == pytest.approx(lr), f"step {step}"
    wds = [g["decay"][0] for _, g in probe.steps]
    assert wds[0] == pytest.approx(0.04) and wds[-1] == pytest.approx(0.4)
    assert wds == sorted(wds) and len(set(wds)) == total
    lrs = [g["decay"][1] for _, g in probe.steps]
    assert lrs[per_epoch - 1] == pytest.approx(hp["lr"]) == lrs[per_epoch]
    assert lrs[:per_epoch] == sorted(lrs[:per_epoch])
    assert lrs[per_epoch:] == sorted(lrs[per_epoch:], reverse=True)
    assert lrs[-1] == pytest.approx(hp["min_lr"])


@pytest.mark.parametrize(
    ("total", "warmup", "peak", "end"),
    [
        pytest.param(100, 10, 1e-3, 1e-6, id="warmup-10-of-100"),
        pytest.param(50, 1, 5e-4, 0.0, id="warmup-1-min-zero"),
        pytest.param(20, 5, 1.0, 0.5, id="warmup-5-of-20"),
    ],
)
def test_warmup_cosine(total: int, warmup: int, peak: float, end: float) -> None:
    values = [warmup_cosine(s, total, warmup, peak, end) for s in range(total)]
    assert values[0] == pytest.approx(peak / warmup) and values[0] > 0
    assert values[warmup - 1] == pytest.approx(peak)  # last warm-up step reaches the peak
    assert values[warmup] == pytest.approx(peak)  # the cosine starts at the peak
    assert values[-1] == pytest.approx(end)
    for s in range(warmup):  # linear warm-up
        assert values[s] == pytest.approx(peak * (s + 1) / warmup)
    assert values[:warmup] == sorted(values[:warmup])
    assert values[warmup:] == sorted(values[warmup:], reverse=True)
    assert max(values) == pytest.approx(peak) and min(values[warmup:]) == pytest.approx(end)
    mid = warmup + (total - warmup - 1) / 2
    if mid == int(mid):  # halfway through the cosine: halfway between peak and end
        assert values[int(mid)] == pytest.approx((peak + end) / 2)


def test_warmup_cosine_without_warmup_starts_at_peak() -> None:
    assert warmup_cosine(0, 10, 0, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert warmup_cosine(9, 10, 0, 1e-3, 1e-6) == pytest.approx(1e-6)


# ----- last layer frozen in the first epoch ------------------------------------------------------
class _AfterEpoch0(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, module: DINO) -> None:
        if trainer.current_epoch == 0:
            self.head = _clone(module.student_head)


def test_last_layer_frozen_during_first_epoch(tmp_path: Path) -> None:
    module, probe = _module(freeze_last_layer=1, lr=1e-2, min_lr=1e-2), _AfterEpoch0()
    start = _clone(module.student_head)
    _trainer(tmp_path, max_epochs=2, callbacks=[probe]).fit(module, _loader(4))
    end = _clone(module.student_head)
    last = "last_layer.weight_v"
    assert torch.equal(probe.head[last], start[last]), "last layer moved in epoch 0"
    assert not torch.equal(end[last], probe.head[last]), "last layer did not move in epoch 1"
    # The rest of the head trains from the first epoch on.
    assert not torch.equal(probe.head["layers.0.weight"], start["layers.0.weight"])
    # norm_last_layer keeps the weight-norm gain at 1 throughout.
    assert torch.equal(end["last_layer.weight_g"], torch.ones_like(end["last_layer.weight_g"]))


# ----- validation and failures -------------------------------------------------------------------
def test_validation_does_not_move_the_center(tmp_path: Path) -> None:
    module = _module()
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, _loader(4))
    center = module.center.clone()
    assert not torch.equal(center, torch.zeros_like(center)), "training should move the centre"
    trainer.validate(module, dataloaders=_loader(4), verbose=False)
    assert torch.equal(module.center, center)
    assert torch.isfinite(trainer.callback_metrics["val/dino_loss"])


class _Numbered(_Crops):
    """Crops of the items in ``order`` (repeats allowed, as a DDP sampler pads a device's
    share), numbered as the data module numbers evaluation items."""

    def __init__(self, order: list[int]) -> None:
        super().__init__(max(order) + 1)
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(self.order[i]), "item_index": self.order[i]}


def test_validation_loss_counts_each_item_once(tmp_path: Path) -> None:
    """val/dino_loss is the mean of the items' own losses, whatever the batching, and a
    padded repeat of an item is not counted twice."""
    module = _module()

    def val_loss(order: list[int], batch_size: int) -> float:
        loader = DataLoader(_Numbered(order), batch_size=batch_size)
        return _trainer(tmp_path).validate(module, loader, verbose=False)[0]["val/dino_loss"]

    reference = val_loss([0, 1, 2], 3)
    assert val_loss([0, 1, 2], 1) == pytest.approx(reference, rel=1e-6)
    assert val_loss([0, 1, 2, 0], 2) == pytest.approx(reference, rel=1e-6)
    singles = [val_loss([i], 1) for i in range(3)]
    assert reference == pytest.approx(sum(singles) / 3, rel=1e-6)
    # Counting the repeat would have moved the mean: the check above can tell.
    assert (2 * singles[0] + singles[1] + singles[2]) / 4 != pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize(
    "fill",
    [pytest.param(float("nan"), id="nan-crop"), pytest.param(float("inf"), id="inf-crop")],
)
def test_non_finite_loss_raises(tmp_path: Path, fill: float) -> None:
    """The run layer's guard (one check for every method, DDP-safe) stops before any update."""
    from medssl.run.guards import FiniteLossCheck, NonFiniteLossError

    module = _module()
    with pytest.raises(NonFiniteLossError, match="non-finite training loss .* at epoch 0, step 0"):
        _trainer(tmp_path, max_steps=1, callbacks=[FiniteLossCheck()]).fit(
            module, _loader(2, fill=fill))
    assert module.ema_updates == 0


# ----- every backbone trains ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backbone", "global_size", "local_size"),
    [
        pytest.param(TINY_VIT, GLOBAL, LOCAL, id="vit"),
        pytest.param({"name": "swin_unetr", "feature_size": 12, "depths": [1, 1, 1, 1],
                      "num_heads": [1, 1, 1, 1]}, (32, 32, 32), (32, 32, 32), id="swin_unetr"),
        pytest.param({"name": "unet3d"}, GLOBAL, LOCAL, id="unet3d"),
    ],
)
def test_one_training_step_per_backbone(tmp_path: Path, backbone: dict,
                                        global_size: tuple[int, ...],
                                        local_size: tuple[int, ...]) -> None:
    module = _module(backbone, lr=1e-3, min_lr=1e-3)
    before = _clone(module.student_backbone)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, _loader(2, global_size=global_size, local_size=local_size))
    assert module.ema_updates == trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["dino_loss"])
    after = _clone(module.student_backbone)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > len(before) // 2, "the student backbone barely trained"


class _LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: DINO, outputs: dict,
                           batch: object, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_falls_on_demo_crops(demo, tmp_path: Path) -> None:
    """30 steps on a fixed set of demo crops (re-seeded per volume, as for validation): the
    DINO objective must go down. With fresh random crops every step the per-step loss of so
    small a run is dominated by augmentation noise, so that would test the seed, not DINO."""
    from medssl.data.augment import MultiCropd
    from medssl.data.pipeline import Preprocessing, make_datasets

    crops = MultiCropd("image", global_size=GLOBAL, local_size=LOCAL, global_scale=(0.4, 1.0),
                       local_scale=(0.05, 0.4), n_crops=4, fixed_seed=0)
    datasets, _ = make_datasets(demo.ssl_csv, "ssl", {"train": [0, 1]},
                                Preprocessing(resize_to=GLOBAL), augment={"train": [crops]},
                                cache="memory")
    log = _LossLog()
    trainer = _trainer(tmp_path, max_epochs=15, callbacks=[log])
    module = _module(lr=1e-3, freeze_last_layer=0, head_batch_norm=True)
    trainer.fit(module, DataLoader(datasets["train"], batch_size=2, shuffle=False))
    assert len(log.losses) == 30
    # Mean over an epoch (the same two batches each time): first vs last.
    first, last = sum(log.losses[:2]) / 2, sum(log.losses[-2:]) / 2
    assert last < 0.8 * first, str([round(x, 2) for x in log.losses])


# ----- the recipe against DINO's numbers (shared/docs/dino_reference.md) -------------------
@pytest.mark.parametrize(("batch_size", "accumulate", "expected"),
                         [(2, 1, 5e-4 * 2 / 256), (2, 2, 5e-4 * 4 / 256),
                          (64, 1, 1.25e-4), (256, 1, 5e-4)],
                         ids=["batch-2", "batch-2-accumulate-2", "batch-64", "batch-256"])
def test_lr_follows_the_linear_scaling_rule(tmp_path: Path, batch_size: int, accumulate: int,
                                            expected: float) -> None:
    """DINO: lr = 0.0005 x batch_size x GPUs / 256 (batch 64 -> 1.25e-4); accumulated
    micro-batches count towards the batch."""
    module, probe = _module(lr=5e-4, min_lr=0.0, batch_size=batch_size), _Groups()
    trainer = _trainer(tmp_path, max_steps=2, accumulate_grad_batches=accumulate,
                       callbacks=[probe])
    trainer.fit(module, _loader(8, batch_size=2))
    assert probe.steps[0][1]["decay"][1] == pytest.approx(expected)  # no warm-up: the peak


def test_head_has_no_batch_norm_by_default() -> None:
    """DINO: ``use_bn_in_head`` False for ViTs."""
    module = DINO(TINY_VIT, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase)
                   for m in module.student_head.modules())


def test_teacher_temperature_reaches_its_target() -> None:
    """DINO: np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07)); the target
    at epoch warmup - 1 (29)."""
    import numpy as np
    reference = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    ours = [teacher_temperature(e, 0.04, 0.07, 30) for e in range(100)]
    assert ours == pytest.approx(reference.tolist())
    assert ours[29] == pytest.approx(0.07) and ours[28] < 0.07
    assert [teacher_temperature(e, 0.04, 0.07, 0) for e in range(3)] == [0.07] * 3
    assert teacher_temperature(0, 0.04, 0.07, 1) == 0.04  # linspace(a, b, 1) == [a]


def test_gradients_are_clipped_per_parameter() -> None:
    """DINO utils.clip_gradients: each tensor scaled by clip / (norm + 1e-6) when above clip;
    one huge gradient leaves the others alone (a global norm would shrink them)."""
    big, small = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50
    small.grad = torch.tensor([2.0, 1.0, 0.0])  # norm 2.24 < 3: untouched
    norms = clip_per_parameter([big, small], 3.0)
    assert norms.tolist() == pytest.approx([50.0, 5**0.5])
    assert torch.allclose(big.grad, torch.tensor([30.0, 40.0, 0.0, 0.0]) * 3.0 / (50 + 1e-6))
    assert small.grad.tolist() == [2.0, 1.0, 0.0]


class _Teacher(L.Callback):
    """The teacher's head outputs for each micro-batch, computed independently of the loss."""

    def __init__(self) -> None:
        self.means: list[Tensor] = []
        self.centers: list[Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: DINO, batch: dict,
                             batch_idx: int) -> None:
        with torch.no_grad():
            outs = [module.teacher_head(module.teacher_backbone(c)) for c in batch["crops"][:2]]
        self.means.append(torch.cat(outs).mean(0))
        self.centers.append(module.center.clone())


def test_centre_moves_once_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    """DINO: centre = 0.9 centre + 0.1 batch mean, once per step; with 2 accumulated
    micro-batches the step's batch is both (the mean of their means, equal sizes)."""
    module, probe = _module(drop_path_rate=0.0), _Teacher()
    _trainer(tmp_path, max_steps=2, accumulate_grad_batches=2,
             callbacks=[probe]).fit(module, _loader(8, batch_size=2))
    m = probe.means
    step1 = 0.1 * (m[0] + m[1]) / 2
    step2 = 0.9 * step1 + 0.1 * (m[2] + m[3]) / 2
    assert torch.equal(probe.centers[1], probe.centers[0])  # not moved after micro-batch 1
    assert torch.allclose(probe.centers[2][0], step1, atol=1e-6)
    assert torch.allclose(module.center[0], step2, atol=1e-6)


def test_stochastic_depth_in_the_student_only() -> None:
    """DINO: drop_path_rate 0.1 in the student; the teacher (exported) has none."""
    from medssl.models.backbones import build_backbone
    module = _module({**TINY_VIT, "num_layers": 2})
    student_rates = [b.drop_path.drop_prob for b in module.student_backbone.blocks
                     if hasattr(b.drop_path, "drop_prob")]
    assert student_rates == pytest.approx([0.1])  # linear 0 -> 0.1 over 2 blocks
    assert all(isinstance(b.drop_path, nn.Identity) for b in module.teacher_backbone.blocks)
    config = module.teacher_backbone.config
    assert config["drop_path_rate"] == 0.0
    rebuilt = build_backbone(**config)
    rebuilt.load_state_dict(module.teacher_backbone.state_dict())
    x = torch.randn(2, 1, *GLOBAL)
    assert torch.equal(rebuilt.train()(x), module.teacher_backbone.train()(x))


def test_sgd_recipe_for_convnets() -> None:
    """DINO's convnet recipe: SGD with momentum 0.9."""
    module = _module({"name": "unet3d"}, optimizer="sgd", lr=0.03, weight_decay=1e-4,
                     weight_decay_end=1e-4)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4


def test_sinkhorn_knopp_targets_balance_the_prototypes() -> None:
    """DINOv2's centring: every prototype gets the same share of the batch, each row sums to 1
    (a direct 3-iteration Sinkhorn on exp(logits / temp) as reference)."""
    module = _module(centering="sinkhorn_knopp")
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 64) * 0.1
    targets = module.teacher_probs(logits, 0.04)
    q = torch.exp(logits.reshape(16, 64) / 0.04)
    for _ in range(3):
        q = q / q.sum(0, keepdim=True)
        q = q / q.sum(1, keepdim=True)
    assert torch.allclose(targets.reshape(16, 64), q, atol=1e-5)
    assert torch.allclose(targets.sum(-1), torch.ones(2, 8), atol=1e-5)
    column = targets.reshape(16, 64).sum(0)
    assert column.std() / column.mean() < 0.05  # near-equal mass per prototype


class _SameGlobals(_Crops):
    """Both global crops of a sample are one picture (identical views)."""

    def __getitem__(self, i: int) -> dict[str, list[Tensor]]:
        crops = super().__getitem__(i)["crops"]
        return {"crops": [crops[0], crops[0].clone(), *crops[2:]]}


def test_view_monitor_reads_the_teachers_two_global_views(tmp_path: Path) -> None:
    """Identical global views: the teacher retrieves every volume's own view (top-1 1, cosine
    1); independent noise views carry nothing of each other."""
    module = _module(lr=1e-3, min_lr=1e-3)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, DataLoader(_SameGlobals(4), batch_size=4))
    assert trainer.callback_metrics["train/view_top1"].item() == 1.0
    assert trainer.callback_metrics["train/view_cosine"].item() == pytest.approx(1.0, abs=1e-5)
    module = _module(lr=1e-3, min_lr=1e-3)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, _loader(4, batch_size=4))
    assert trainer.callback_metrics["train/view_cosine"].item() < 0.9


def test_dino_loss_is_fp32_under_bf16_autocast() -> None:
    """DINO's loss as facebookresearch/dino's DINOLoss.forward writes it (a loop over view
    pairs, fp64 here), against ours inside the bf16 autocast that GPU training uses."""
    from medssl.models.dino import dino_cross_entropy

    torch.manual_seed(0)
    teacher = torch.randn(2, 8, 1024).softmax(-1)
    student = torch.randn(6, 8, 1024)
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher.double()):
        for v, s in enumerate(student.double()):
            if v != iq:
                total += torch.sum(-q * torch.log_softmax(s / 0.1, dim=-1), dim=-1).mean()
                n_terms += 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_cross_entropy(teacher, student.bfloat16(), 0.1)
    assert loss.dtype == torch.float32
    # bf16 inputs hold ~3 significant digits; the reduction itself must add no rounding.
    expected = dino_cross_entropy(teacher, student.bfloat16().float(), 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert dino_cross_entropy(teacher, student, 0.1).item() == pytest.approx(
        (total / n_terms).item(), rel=1e-6)


def test_logged_dino_loss_leaves_koleo_out(tmp_path: Path) -> None:
    """train/dino_loss is the DINO term alone, comparable with val/dino_loss and ln(out_dim);
    KoLeo is logged as its own term."""
    metrics = {}
    for weight in (0.0, 0.5):
        module = _module(lr=1e-3, min_lr=1e-3, koleo_weight=weight)
        trainer = _trainer(tmp_path, max_steps=1)
        trainer.fit(module, _loader(4, batch_size=4))
        metrics[weight] = dict(trainer.callback_metrics)
    assert metrics[0.5]["train/koleo_loss"].abs() > 0.1
    assert metrics[0.5]["train/dino_loss"].item() == pytest.approx(
        metrics[0.0]["train/dino_loss"].item(), rel=1e-6)  # the same first step, KoLeo aside
