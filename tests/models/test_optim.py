"""AdamW implementation choice (fused on CUDA, foreach elsewhere) and clipping with it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from medssl.models import optim
from medssl.models.classifier import Classifier
from medssl.models.optim import adamw_implementation, clip_grad_norm, use_fused

VIT = {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": [8, 8, 8],
       "patch_size": [4, 4, 4], "hidden_size": 16, "mlp_dim": 32, "num_layers": 1,
       "num_heads": 2}


@pytest.mark.parametrize("devices,precision,fused", [
    ({"cuda"}, "32-true", True),
    ({"cuda"}, "bf16-mixed", True),   # no scaler: clipping before the fused step is correct
    ({"cuda"}, None, True),           # no trainer yet
    ({"cuda"}, "16-mixed", False),    # the GradScaler unscales inside a fused step
    ({"cpu"}, "32-true", False),      # fused only pays on CUDA
    ({"cuda", "cpu"}, "32-true", False),
    (set(), "32-true", False),
])
def test_fused_only_with_every_parameter_on_cuda_and_no_grad_scaler(
        devices: set[str], precision: str | None, fused: bool) -> None:
    assert use_fused(devices, precision) is fused


def test_cpu_parameters_get_foreach() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_implementation(params, "bf16-mixed") == {"foreach": True}
    module = Classifier(VIT, {"a": ["x", "y"]})
    opt = module.configure_optimizers()  # no trainer: 32-true
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_lightning_refuses_fused_clipping_under_bf16_and_ours_clips() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # total norm 5
    fused = torch.optim.AdamW([a, b], fused=True)
    # Lightning 2.6.6 checks the optimizer, not the scaler: bf16 (no scaler) refuses too.
    with pytest.raises(RuntimeError, match="fused"):
        MixedPrecision("bf16-mixed", "cpu").clip_gradients(fused, 1.0)
    assert float(clip_grad_norm(fused, 1.0)) == pytest.approx(5.0)
    assert a.grad.item() == pytest.approx(0.6, rel=1e-5)
    assert b.grad.item() == pytest.approx(0.8, rel=1e-5)


def test_fused_adamw_trains_with_clipping_under_bf16_mixed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Fused AdamW also runs on CPU in torch 2.14: force it to exercise the CUDA path's logic.
    monkeypatch.setattr(optim, "use_fused", lambda devices, precision: True)
    module = Classifier(VIT, {"a": ["lo", "hi"]}, grad_clip=0.01)
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(1, 8, 8, 8, generator=g), "record_index": i,
             "targets": {"a": i % 2}} for i in range(4)]
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="bf16-mixed",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert any(not torch.equal(p0, p) for p0, p in zip(before, module.parameters(),
                                                       strict=True))
