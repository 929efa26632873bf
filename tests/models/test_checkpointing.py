"""Activation checkpointing (``use_checkpoint``) in every backbone: same numbers, less memory.

Each case trains one step's forward and backward twice from the same weights and RNG seed,
with and without checkpointing, in training mode (drop path, drop connect and batch norm
active), and compares outputs, every gradient and the batch-norm running statistics. Memory
is measured as the bytes autograd keeps for backward (``saved_tensors_hooks``), which does
not depend on the allocator or on other processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from medssl.models.backbones import BACKBONES, build_backbone

CASES = [
    pytest.param("vit", dict(spatial_dims=3, img_size=(16, 32, 32), patch_size=8, hidden_size=32,
                             mlp_dim=64, num_layers=2, num_heads=2, drop_path_rate=0.5),
                 (2, 1, 16, 32, 32), id="vit-3d-drop-path"),
    pytest.param("vit", dict(spatial_dims=2, img_size=32, patch_size=8, hidden_size=32,
                             mlp_dim=64, num_layers=2, num_heads=2, dropout_rate=0.3),
                 (2, 1, 32, 32), id="vit-2d-dropout"),
    pytest.param("unet3d", {}, (2, 1, 16, 16, 16), id="unet3d-3d-batchnorm"),
    pytest.param("unet3d", {"spatial_dims": 2, "act": "prelu"}, (2, 1, 16, 16),
                 id="unet3d-2d-prelu"),
    pytest.param("swin_unetr", dict(feature_size=12, depths=(1, 1, 1, 1),
                                    num_heads=(1, 1, 1, 1), drop_path_rate=0.3),
                 (1, 1, 32, 32, 32), id="swin-3d-drop-path"),
    pytest.param("efficientnet", {}, (2, 1, 32, 32), id="efficientnet-2d-b0"),
]


def _pair(name: str, kwargs: dict) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = build_backbone(name, **kwargs)
    ckpt = build_backbone(name, **kwargs, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def _step(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """forward_features + backward of a loss touching every map; bytes saved for backward."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(1)  # the same drop-path / dropout / drop-connect draws for both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        maps = net.forward_features(x)
    # Fixed random weights per map, so every output element reaches the gradients.
    gen = torch.Generator().manual_seed(2)
    loss = sum((m * torch.randn(m.shape, generator=gen)).sum() for m in maps)
    loss.backward()
    return [m.detach() for m in maps], sum(saved.values())


@pytest.fixture
def deterministic() -> Iterator[None]:
    """Deterministic kernels: on several CPU threads the gradient of Swin's relative-position
    bias table (an indexed gather, whose backward adds into the table with atomic adds) sums
    in a different order each run, ~1e-7 apart, with or without checkpointing (seen on CI)."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES)
def test_checkpointing_same_outputs_gradients_statistics(name, kwargs, shape):
    plain, ckpt = _pair(name, kwargs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    maps_plain, _ = _step(plain, x)
    maps_ckpt, _ = _step(ckpt, x)
    for a, b in zip(maps_plain, maps_ckpt, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    grads = {n: p.grad for n, p in plain.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    for n, p in ckpt.named_parameters():
        if grads[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0, msg=n)
    # Batch norms moved their running statistics exactly once (the recomputation is undone).
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES)
def test_checkpointing_keeps_less_for_backward(name, kwargs, shape):
    plain, ckpt = _pair(name, kwargs)
    x = torch.randn(shape)
    _, saved_plain = _step(plain, x)
    _, saved_ckpt = _step(ckpt, x)
    # Measured fractions at these sizes: MONAI's Swin checkpoints only the two halves of each
    # block (patch merging and stage norms keep theirs): 0.65; the tiny 2-block ViTs keep the
    # patch embedding's and final norm's: 0.13-0.47; UNet3D and EfficientNet: ~0.01.
    limit = {"swin_unetr": 0.75, "vit": 0.6}.get(name, 0.1)
    assert saved_ckpt < limit * saved_plain, (saved_plain, saved_ckpt)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_use_checkpoint_in_config_and_rebuilt(name):
    kwargs = {"swin_unetr": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
              "vit": dict(num_layers=1, hidden_size=32, mlp_dim=64, num_heads=2)}.get(name, {})
    default = build_backbone(name, **kwargs)
    assert default.config["use_checkpoint"] is False and default.use_checkpoint is False
    net = build_backbone(name, **kwargs, use_checkpoint=True)
    rebuilt = build_backbone(**net.config)
    assert rebuilt.use_checkpoint is True and rebuilt.config == net.config


def test_no_checkpointing_without_gradients():
    """Under no_grad (the DINO teacher, evaluation) blocks run directly: nothing is saved."""
    _, ckpt = _pair("unet3d", {})
    with torch.no_grad():
        out = ckpt(torch.randn(1, 1, 16, 16, 16))
    assert out.grad_fn is None and out.shape == (1, 512)
