"""PreciseBN: batch-norm statistics re-estimated with the current weights."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medssl.models.batchnorm import PreciseBatchNorm, recompute_bn_statistics
from medssl.models.classifier import Classifier

VIT = {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": [8, 8, 8],
       "patch_size": [4, 4, 4], "hidden_size": 16, "mlp_dim": 32, "num_layers": 1,
       "num_heads": 2}


def _call(module: nn.Module, batch: torch.Tensor) -> None:
    module(batch)


def test_statistics_are_the_average_over_the_batches() -> None:
    # PreciseBN's estimate (Wu & Johnson 2021): the mean of the per-batch means and of the
    # per-batch unbiased variances, here computed with numpy from the data.
    g = torch.Generator().manual_seed(0)
    data = torch.randn(40, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + 3.0
    norm = nn.BatchNorm1d(3)
    norm.running_mean.fill_(-7.0)  # stale values that must not leak in
    batches = list(data.split(8))
    n = recompute_bn_statistics(norm.eval(), batches, _call)
    x = data.numpy().reshape(5, 8, 3)
    assert n == 5 and not norm.training and norm.momentum == 0.1
    np.testing.assert_allclose(norm.running_mean.numpy(), x.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.running_var.numpy(), x.var(1, ddof=1).mean(0), rtol=1e-5)


def test_max_batches_and_no_batches() -> None:
    norm = nn.BatchNorm1d(2)
    data = [torch.zeros(4, 2), torch.ones(4, 2) * 10]
    assert recompute_bn_statistics(norm, data, _call, max_batches=1) == 1
    assert torch.equal(norm.running_mean, torch.zeros(2))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    assert recompute_bn_statistics(norm, [], _call) == 0
    assert all(torch.equal(before[k], v) for k, v in norm.state_dict().items())


def test_a_frozen_backbone_keeps_its_statistics_and_parameters() -> None:
    # A UNet3D-style backbone with batch norm, frozen (eval) by the classifier's head-only
    # epochs: only feature_norm is re-estimated.
    module = Classifier({"name": "unet3d", "spatial_dims": 3, "in_channels": 1},
                        {"a": ["0", "1"]}, freeze_backbone_epochs=1, feature_norm=True)
    assert any(isinstance(m, nn.BatchNorm3d) for m in module.backbone.modules())
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    heads = {k: v.clone() for k, v in module.heads.state_dict().items()}
    images = [torch.rand(2, 1, 16, 16, 16) for _ in range(3)]
    module.eval()
    recompute_bn_statistics(module, images, _call)
    assert not module.training
    assert all(torch.equal(before[k], v) for k, v in module.backbone.state_dict().items())
    assert all(torch.equal(heads[k], v) for k, v in module.heads.state_dict().items())
    with torch.no_grad():
        feats = torch.stack([module.eval().features(x) for x in images])  # (3, 2, D)
    torch.testing.assert_close(module.feature_norm.running_mean, feats.mean((0, 1)))


def _items(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(1, 8, 8, 8, generator=g) + 0.5 * (i % 2), "record_index": i,
             "targets": {"a": i % 2}} for i in range(n)]


class _SeenByValidation(L.Callback):
    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: Classifier) -> None:
        self.means.append(module.feature_norm.running_mean.clone())


def test_callback_leaves_the_statistics_of_the_final_weights() -> None:
    # Fine-tuning at a high rate: the running average lags the moving backbone; with the
    # callback, validation and the module after fit see the statistics of the final weights
    # on the training set.
    def fit(callbacks: list) -> tuple[Classifier, torch.Tensor]:
        torch.manual_seed(0)
        module = Classifier(VIT, {"a": ["0", "1"]}, lr=0.05, feature_norm=True)
        data = _items()
        L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0,
                  callbacks=callbacks).fit(module, DataLoader(data, batch_size=4),
                                           DataLoader(data, batch_size=16))
        with torch.no_grad():
            module.train()
            feats = torch.cat([module.features(torch.stack([d["image"] for d in data[i:i + 4]]))
                               for i in range(0, 16, 4)])
        module.eval()
        return module, feats.mean(0)

    seen = _SeenByValidation()
    precise, exact = fit([PreciseBatchNorm(lambda m, b: m(b["image"], b["record_index"])),
                          seen])
    torch.testing.assert_close(precise.feature_norm.running_mean, exact)
    assert len(seen.means) == 3  # one validation per epoch, the last with the final weights
    torch.testing.assert_close(seen.means[-1], exact)
    lagging, exact = fit([])
    assert (lagging.feature_norm.running_mean - exact).abs().max() > 1e-3
