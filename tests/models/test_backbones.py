"""Shape, argument and naming tests for medssl.models.backbones (tiny CPU sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from medssl.models.backbones import (
    BACKBONES,
    SwinEncoder,
    UNet3DEncoder,
    ViTBackbone,
    build_backbone,
)

TINY_VIT_3D = dict(
    spatial_dims=3, img_size=(16, 32, 32), patch_size=8, hidden_size=32, mlp_dim=64,
    num_layers=1, num_heads=2,
)
TINY_VIT_2D = dict(
    spatial_dims=2, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=1,
    num_heads=2,
)
TINY_SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))

SHAPE_CASES = [
    pytest.param("vit", TINY_VIT_3D, (2, 1, 16, 32, 32), 32, id="vit-3d-global"),
    pytest.param("vit", TINY_VIT_3D, (2, 1, 8, 16, 16), 32, id="vit-3d-local-interpolated"),
    pytest.param("vit", TINY_VIT_3D, (1, 1, 24, 40, 48), 32, id="vit-3d-larger-interpolated"),
    pytest.param("vit", TINY_VIT_2D, (2, 1, 32, 32), 32, id="vit-2d-global"),
    pytest.param("vit", TINY_VIT_2D, (2, 1, 16, 24), 32, id="vit-2d-local-interpolated"),
    pytest.param("vit", {**TINY_VIT_3D, "in_channels": 2}, (1, 2, 16, 32, 32), 32, id="vit-2ch"),
    pytest.param("swin_unetr", TINY_SWIN, (2, 1, 32, 32, 32), 192, id="swin-3d"),
    pytest.param("swin_unetr", {**TINY_SWIN, "spatial_dims": 2}, (2, 1, 32, 64), 192,
                 id="swin-2d"),
    pytest.param("swin_unetr", {**TINY_SWIN, "use_v2": True}, (1, 1, 32, 32, 32), 192,
                 id="swin-3d-v2"),
    pytest.param("unet3d", {}, (2, 1, 16, 16, 16), 512, id="unet3d-3d"),
    pytest.param("unet3d", {"spatial_dims": 2, "act": "prelu"}, (2, 1, 16, 24), 512,
                 id="unet3d-2d-prelu"),
]


@pytest.mark.parametrize(("name", "kwargs", "input_shape", "out_dim"), SHAPE_CASES)
def test_output_shape(name, kwargs, input_shape, out_dim):
    net = build_backbone(name, **kwargs).eval()
    assert net.out_dim == out_dim
    with torch.no_grad():
        out = net(torch.randn(input_shape))
    assert out.shape == (input_shape[0], out_dim)
    assert torch.isfinite(out).all()


BAD_INPUT_CASES = [
    pytest.param("vit", {**TINY_VIT_3D, "img_size": 32, "patch_size": 16}, (1, 1, 40, 32, 32),
                 id="vit-40-slices-patch-16"),
    pytest.param("vit", TINY_VIT_2D, (1, 1, 32, 30), id="vit-2d-not-divisible"),
    pytest.param("vit", TINY_VIT_3D, (1, 1, 32, 32), id="vit-wrong-ndim"),
    pytest.param("vit", TINY_VIT_3D, (1, 3, 16, 32, 32), id="vit-wrong-channels"),
    pytest.param("swin_unetr", TINY_SWIN, (1, 1, 48, 32, 32), id="swin-48-not-divisible-by-32"),
    pytest.param("unet3d", {}, (1, 1, 12, 16, 16), id="unet3d-12-not-divisible-by-8"),
]


@pytest.mark.parametrize(("name", "kwargs", "input_shape"), BAD_INPUT_CASES)
def test_bad_input_size_raises(name, kwargs, input_shape):
    net = build_backbone(name, **kwargs)
    with pytest.raises(ValueError, match="divisible|expects input"):
        net(torch.randn(input_shape))


BAD_ARG_CASES = [
    pytest.param("vit", {**TINY_VIT_3D, "img_size": (16, 30, 32)}, "divisible", id="vit-img-patch"),
    pytest.param("vit", {**TINY_VIT_3D, "hidden_size": 30, "num_heads": 4}, "num_heads",
                 id="vit-heads"),
    pytest.param("vit", {**TINY_VIT_3D, "patch_size": (8, 8)}, "patch_size", id="vit-patch-len"),
    pytest.param("vit", {**TINY_VIT_3D, "dropout_rate": 1.5}, "dropout_rate", id="vit-dropout"),
    pytest.param("vit", {**TINY_VIT_3D, "spatial_dims": 4}, "spatial_dims", id="vit-dims"),
    pytest.param("vit", {**TINY_VIT_3D, "num_layers": 0}, "num_layers", id="vit-layers"),
    pytest.param("swin_unetr", {**TINY_SWIN, "feature_size": 18}, "12", id="swin-feature"),
    pytest.param("swin_unetr", {**TINY_SWIN, "depths": (1, 1, 1)}, "depths", id="swin-depths"),
    pytest.param("swin_unetr", {"feature_size": 12, "num_heads": (5, 1, 1, 1)}, "num_heads",
                 id="swin-heads"),
    pytest.param("unet3d", {"act": "gelu"}, "gelu", id="unet3d-act"),
    pytest.param("unet3d", {"in_channels": 0}, "in_channels", id="unet3d-channels"),
    pytest.param("resnet", {}, "resnet", id="unknown-name"),
]


@pytest.mark.parametrize(("name", "kwargs", "message"), BAD_ARG_CASES)
def test_bad_arguments_raise(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(name, **kwargs)


REBUILD_CASES = [
    pytest.param("vit", TINY_VIT_3D, id="vit"),
    pytest.param("vit", TINY_VIT_2D, id="vit-2d"),
    pytest.param("swin_unetr", {**TINY_SWIN, "use_v2": True}, id="swin"),
    pytest.param("unet3d", {"spatial_dims": 2}, id="unet3d-2d"),
]


@pytest.mark.parametrize(("name", "kwargs"), REBUILD_CASES)
def test_config_rebuilds_same_architecture(name, kwargs):
    net = build_backbone(name, **kwargs)
    config = json.loads(json.dumps(net.config))  # must survive a JSON round trip unchanged
    assert config == net.config
    assert config["name"] == name
    rebuilt = build_backbone(**config)
    assert type(rebuilt) is BACKBONES[name]
    assert rebuilt.config == net.config
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_unet3d_parameter_names_follow_suprem():
    names = set(UNet3DEncoder().state_dict())
    for expected in [
        "down_tr64.ops.0.conv1.weight",
        "down_tr64.ops.0.bn1.num_batches_tracked",
        "down_tr128.ops.1.conv1.bias",
        "down_tr512.ops.1.bn1.running_var",
    ]:
        assert expected in names
    assert all(n.startswith(("down_tr64.", "down_tr128.", "down_tr256.", "down_tr512."))
               for n in names)


def test_unet3d_full_size_parameter_count():
    n_params = sum(p.numel() for p in UNet3DEncoder().parameters())
    assert 6.9e6 <= n_params <= 7.1e6


def test_unet3d_forward_features_shapes():
    feats = UNet3DEncoder().eval().forward_features(torch.randn(1, 1, 16, 16, 8))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 16, 8), (1, 128, 8, 8, 4), (1, 256, 4, 4, 2), (1, 512, 2, 2, 1)
    ]


def test_swin_parameter_names_match_swinunetr():
    names = list(SwinEncoder(**TINY_SWIN).state_dict())
    assert all(n.startswith("swinViT.") for n in names)
    assert "swinViT.patch_embed.proj.weight" in names
    assert any(n.startswith("swinViT.layers4.0.") for n in names)


def test_vit_pos_embed_interpolation_keeps_native_grid():
    vit = ViTBackbone(**TINY_VIT_3D)
    assert vit.interpolate_pos_embed((2, 4, 4)) is vit.pos_embed
    assert vit.interpolate_pos_embed((1, 2, 2)).shape == (1, 1 + 4, 32)
    assert vit.pos_embed.shape == (1, 1 + 2 * 4 * 4, 32)


def test_vit_with_dropout_is_deterministic_in_eval():
    vit = ViTBackbone(**{**TINY_VIT_3D, "dropout_rate": 0.5}).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit(x), vit(x))


def test_legacy_patch_merging_reproduces_the_old_order() -> None:
    """MONAI < 1.5 concatenated neighbours (0,1,0) and (0,0,1) twice; published weights
    expect that. Same parameters either way, different features."""
    from monai.networks.nets.swin_unetr import PatchMerging

    from medssl.models.backbones import LegacyPatchMerging

    torch.manual_seed(0)
    new, old = PatchMerging(dim=4, spatial_dims=3), LegacyPatchMerging(dim=4, spatial_dims=3)
    old.load_state_dict(new.state_dict())
    x = torch.randn(1, 4, 6, 4, 4)  # (B, D, H, W, C), odd channel mixing visible
    expected_parts = [x[:, i::2, j::2, k::2, :] for i, j, k in
                      [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0),
                       (0, 0, 1), (1, 1, 1)]]
    expected = old.reduction(old.norm(torch.cat(expected_parts, -1)))
    torch.testing.assert_close(old(x), expected)
    assert not torch.allclose(old(x), new(x))
    legacy = build_backbone("swin_unetr", feature_size=12, depths=(1, 1, 1, 1),
                            legacy_patch_merging=True)
    current = build_backbone("swin_unetr", feature_size=12, depths=(1, 1, 1, 1))
    assert legacy.state_dict().keys() == current.state_dict().keys()
    assert legacy.config["legacy_patch_merging"] is True
    current.load_state_dict(legacy.state_dict())
    volume = torch.randn(1, 1, 32, 32, 32)
    assert not torch.allclose(legacy(volume), current(volume))
