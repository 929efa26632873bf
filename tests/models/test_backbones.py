"""Shape, argument, naming and numerical tests for medssl.models.backbones (tiny CPU sizes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medssl.models.backbones import (
    BACKBONES,
    EfficientNetBackbone,
    SwinEncoder,
    UNet3DEncoder,
    ViTBackbone,
    build_backbone,
)
from medssl.models.vit import patchify, random_keep, unpatchify

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
    pytest.param("efficientnet", {}, (2, 1, 32, 64), 320, id="efficientnet-2d-b0"),
    pytest.param("efficientnet", {"spatial_dims": 3, "in_channels": 2}, (2, 2, 32, 32, 32), 320,
                 id="efficientnet-3d-2ch"),
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
    pytest.param("efficientnet", {}, (1, 1, 32, 48), id="efficientnet-48-not-divisible-by-32"),
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
    pytest.param("vit", {**TINY_VIT_3D, "drop_path_rate": 1.0}, "drop_path_rate",
                 id="vit-drop-path"),
    pytest.param("swin_unetr", {**TINY_SWIN, "drop_path_rate": -0.1}, "drop_path_rate",
                 id="swin-drop-path"),
    pytest.param("efficientnet", {"model_name": "efficientnet-b9"}, "efficientnet-b9",
                 id="efficientnet-model-name"),
    pytest.param("efficientnet", {"spatial_dims": 1}, "spatial_dims", id="efficientnet-dims"),
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
    pytest.param("efficientnet", {"model_name": "efficientnet-b1"}, id="efficientnet"),
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


# ----- pooled outputs frozen before backbones.py was split into one file per network ---------

def _fill_deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """Set every float tensor from a generator seeded by its sorted name index.

    Independent of construction order and of torch's global seed, so the values depend only
    on parameter names and shapes, which the split had to keep.
    """
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(model.state_dict().items())):
            if not t.is_floating_point():
                continue
            gen = torch.Generator().manual_seed(1000 + i)
            wave = torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1
            if name.endswith("running_var") or (t.ndim == 1 and name.endswith(".weight")):
                value = 1 + 0.1 * wave
            elif t.ndim == 1:
                value = 0.1 * wave
            else:
                value = wave * math.sqrt(3 / (t.numel() // t.shape[0]))
            t.copy_(value.to(t.dtype))
    return model


def _deterministic_input(shape: tuple[int, ...]) -> torch.Tensor:
    idx = torch.arange(math.prod(shape[1:]), dtype=torch.float64)
    return torch.stack([torch.cos(0.11 * (b + 1) * idx + b) for b in range(shape[0])]
                       ).reshape(shape).float()


TWO_LAYER_VIT_3D = {**TINY_VIT_3D, "num_layers": 2}
# Recorded from the single-file implementation (commit 955b3b7) with the fill above: per sample,
# (sum of out * cos(k), sum of out * sin(k / 2 + 1)) over output channels k, and out[:, :2].
FROZEN_CASES = [
    pytest.param(dict(name="vit", **TWO_LAYER_VIT_3D), (2, 1, 16, 32, 32),
                 [[4.54348, 3.4345], [-3.45592, 2.75683]],
                 [[1.36855, 2.3711], [-0.136441, -0.139895]], id="vit-3d"),
    pytest.param(dict(name="vit", **TWO_LAYER_VIT_3D), (2, 1, 8, 16, 24),
                 [[-1.9603, 2.75657], [-3.39115, 5.49602]],
                 [[0.0435364, -0.28007], [0.417707, -0.211377]], id="vit-3d-interpolated"),
    pytest.param(dict(name="vit", **{**TINY_VIT_2D, "num_layers": 2}), (2, 1, 32, 32),
                 [[-8.6647, 5.88168], [4.24359, 5.52002]],
                 [[-0.599645, 0.447575], [0.599657, -0.358068]], id="vit-2d"),
    pytest.param(dict(name="swin_unetr", **TINY_SWIN), (2, 1, 32, 32, 32),
                 [[9.76704, -4.56851], [-0.873785, -10.4634]],
                 [[0.295728, 0.09891], [-0.812641, -0.438562]], id="swin-3d"),
    pytest.param(dict(name="swin_unetr", legacy_patch_merging=True, use_v2=True, **TINY_SWIN),
                 (2, 1, 32, 32, 32), [[14.814, -3.29899], [5.59854, 7.71451]],
                 [[-1.33362, 1.1865], [-1.24056, 0.301707]], id="swin-3d-legacy-v2"),
    pytest.param(dict(name="swin_unetr", spatial_dims=2, **TINY_SWIN), (2, 1, 32, 64),
                 [[0.331701, 3.82504], [-5.68785, 16.5971]],
                 [[-0.939179, -0.00809672], [-1.68659, 0.500966]], id="swin-2d"),
    pytest.param(dict(name="unet3d"), (2, 1, 16, 16, 16),
                 [[0.757534, -0.194088], [0.769783, -0.190663]],
                 [[0.0630523, 0.0567549], [0.0676926, 0.0582248]], id="unet3d-3d"),
    pytest.param(dict(name="unet3d", spatial_dims=2, act="prelu"), (2, 1, 16, 24),
                 [[0.568159, 2.77214], [0.0771166, 5.5717]],
                 [[-0.0321472, 0.419555], [0.0365273, 0.406629]], id="unet3d-2d-prelu"),
]


@pytest.mark.parametrize(("config", "input_shape", "projections", "first"), FROZEN_CASES)
def test_pooled_forward_unchanged_by_the_split(config, input_shape, projections, first):
    net = _fill_deterministic(build_backbone(**config)).eval()
    with torch.no_grad():
        out = net(_deterministic_input(input_shape)).double()
    k = torch.arange(out.shape[1], dtype=torch.float64)
    proj = torch.stack([(out * torch.cos(k)).sum(1), (out * torch.sin(0.5 * k + 1)).sum(1)], 1)
    torch.testing.assert_close(proj, torch.tensor(projections, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, :2], torch.tensor(first, dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)


# ----- multi-scale features --------------------------------------------------------------

FEATURE_CASES = [
    pytest.param("vit", TINY_VIT_3D, (2, 1, 16, 32, 40), [32] * 4, [(8, 8, 8)] * 4, id="vit-3d"),
    pytest.param("vit", {**TINY_VIT_2D, "patch_size": (4, 8)}, (2, 1, 16, 24), [32] * 4,
                 [(4, 8)] * 4, id="vit-2d-anisotropic"),
    pytest.param("swin_unetr", TINY_SWIN, (1, 1, 32, 32, 64), [12, 24, 48, 96, 192],
                 [(2,) * 3, (4,) * 3, (8,) * 3, (16,) * 3, (32,) * 3], id="swin-3d"),
    pytest.param("swin_unetr", {**TINY_SWIN, "spatial_dims": 2}, (1, 1, 32, 64),
                 [12, 24, 48, 96, 192], [(2,) * 2, (4,) * 2, (8,) * 2, (16,) * 2, (32,) * 2],
                 id="swin-2d"),
    pytest.param("unet3d", {}, (1, 1, 16, 16, 8), [64, 128, 256, 512],
                 [(1,) * 3, (2,) * 3, (4,) * 3, (8,) * 3], id="unet3d-3d"),
    pytest.param("unet3d", {"spatial_dims": 2}, (1, 1, 16, 24), [64, 128, 256, 512],
                 [(1,) * 2, (2,) * 2, (4,) * 2, (8,) * 2], id="unet3d-2d"),
    pytest.param("efficientnet", {}, (2, 1, 32, 64), [16, 24, 40, 112, 320],
                 [(2,) * 2, (4,) * 2, (8,) * 2, (16,) * 2, (32,) * 2], id="efficientnet-2d"),
    pytest.param("efficientnet", {"spatial_dims": 3}, (2, 1, 32, 32, 32),
                 [16, 24, 40, 112, 320], [(2,) * 3, (4,) * 3, (8,) * 3, (16,) * 3, (32,) * 3],
                 id="efficientnet-3d"),
]


@pytest.mark.parametrize(("name", "kwargs", "input_shape", "channels", "strides"),
                         FEATURE_CASES)
def test_forward_features_shapes_and_channels(name, kwargs, input_shape, channels, strides):
    net = build_backbone(name, **kwargs).eval()
    assert list(net.feature_channels) == channels
    assert [tuple(s) for s in net.feature_strides] == strides
    with torch.no_grad():
        feats = net.forward_features(torch.randn(input_shape))
    expected = [(input_shape[0], c, *(n // s for n, s in zip(input_shape[2:], st, strict=True)))
                for c, st in zip(channels, strides, strict=True)]
    assert [tuple(f.shape) for f in feats] == expected


def test_vit_features_are_the_hidden_states_on_the_patch_grid():
    vit = ViTBackbone(**{**TINY_VIT_3D, "num_layers": 4}).eval()
    x = torch.randn(2, 1, 16, 32, 40)
    with torch.no_grad():
        feats = vit.forward_features(x)
        last, hidden = vit.forward_hidden_states(x)
        tokens = vit.forward_tokens(x)
    assert vit.feature_layers == (1, 2, 3) and len(hidden) == 4
    torch.testing.assert_close(last, tokens)
    grid = (2, 4, 5)
    for fmap, tok in zip(feats, [hidden[1], hidden[2], hidden[3], last], strict=True):
        for flat in (0, 7, 39):  # token 1 + flat sits at grid position unravel(flat)
            d, rest = divmod(flat, grid[1] * grid[2])
            h, w = divmod(rest, grid[2])
            torch.testing.assert_close(fmap[:, :, d, h, w], tok[:, 1 + flat])


def test_vit_feature_layers_follow_monai_unetr_for_twelve_blocks():
    vit = ViTBackbone(spatial_dims=2, img_size=16, patch_size=8, hidden_size=8, mlp_dim=8,
                      num_layers=12, num_heads=1)
    assert vit.feature_layers == (3, 6, 9)


# ----- ViT token subsets (MAE) -----------------------------------------------------------

def _tiny_vit() -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(**{**TINY_VIT_3D, "num_layers": 2}).eval()


def test_vit_keep_all_equals_full_forward_and_order_follows_keep():
    vit, x = _tiny_vit(), torch.randn(2, 1, 16, 32, 32)
    n = 2 * 4 * 4
    with torch.no_grad():
        full = vit.forward_tokens(x)
        kept_all = vit.forward_tokens(x, keep=torch.arange(n).expand(2, n))
        perm = torch.stack([torch.randperm(n), torch.randperm(n)])
        permuted = vit.forward_tokens(x, keep=perm)
    torch.testing.assert_close(kept_all, full)
    torch.testing.assert_close(permuted[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)
    for b in range(2):
        torch.testing.assert_close(permuted[b, 1:], full[b, 1 + perm[b]], rtol=1e-5, atol=1e-5)


def test_vit_tokens_not_kept_do_not_influence_the_output():
    vit, x = _tiny_vit(), torch.randn(2, 1, 16, 32, 32)
    keep = torch.tensor([[0, 5, 31], [30, 2, 17]])
    perturbed = x.clone()
    patches = patchify(perturbed, vit.patch_size)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[torch.arange(2).unsqueeze(1), keep] = False
    patches[mask] += 5 * torch.randn_like(patches[mask])
    perturbed = unpatchify(patches, vit.patch_size, x.shape[2:])
    assert not torch.allclose(perturbed, x)
    with torch.no_grad():
        out = vit.forward_tokens(x, keep=keep)
        out_perturbed = vit.forward_tokens(perturbed, keep=keep)
        out_full = vit.forward_tokens(x)
        out_full_perturbed = vit.forward_tokens(perturbed)
    assert out.shape == (2, 1 + 3, 32)
    torch.testing.assert_close(out_perturbed, out)
    assert not torch.allclose(out_full_perturbed[:, 0], out_full[:, 0])  # they did matter


def test_vit_position_embedding_is_added_before_selection():
    vit = _tiny_vit()
    patch = torch.randn(1, 1, 8, 8, 8)
    x = patch.repeat(1, 1, 2, 4, 4)  # every patch has the same content
    with torch.no_grad():
        first = vit.forward_tokens(x, keep=torch.tensor([[0]]))
        other = vit.forward_tokens(x, keep=torch.tensor([[9]]))
        no_pos = ViTBackbone(**{**TINY_VIT_3D, "num_layers": 2}).eval()
        no_pos.load_state_dict(vit.state_dict())
        no_pos.pos_embed.zero_()
        same_a = no_pos.forward_tokens(x, keep=torch.tensor([[0]]))
        same_b = no_pos.forward_tokens(x, keep=torch.tensor([[9]]))
    assert not torch.allclose(first, other)
    torch.testing.assert_close(same_a, same_b)


BAD_KEEP_CASES = [
    pytest.param(torch.tensor([0, 1]), "long tensor", id="1d"),
    pytest.param(torch.tensor([[0, 1]]), "long tensor", id="batch-mismatch"),
    pytest.param(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), "long tensor", id="float"),
    pytest.param(torch.tensor([[0, 32], [0, 1]]), r"\[0, 32\)", id="out-of-range"),
    pytest.param(torch.tensor([[0, -1], [0, 1]]), r"\[0, 32\)", id="negative"),
]


@pytest.mark.parametrize(("keep", "message"), BAD_KEEP_CASES)
def test_vit_bad_keep_raises(keep, message):
    with pytest.raises(ValueError, match=message):
        _tiny_vit().forward_tokens(torch.randn(2, 1, 16, 32, 32), keep=keep)


def test_patchify_matches_the_patch_embedding_token_order():
    """A conv with kernel = stride = patch is a linear map of each patchify row."""
    torch.manual_seed(0)
    vit = ViTBackbone(**{**TINY_VIT_3D, "in_channels": 2, "patch_size": (4, 8, 8)})
    x = torch.randn(2, 2, 8, 16, 24)
    patches = vit.patchify(x)
    assert patches.shape == (2, 2 * 2 * 3, 4 * 8 * 8 * 2)
    weight = vit.patch_embed.weight  # (hidden, C, p1, p2, p3) -> rows ordered (p1, p2, p3, C)
    linear = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)
    expected = vit.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches @ linear.T + vit.patch_embed.bias, expected,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vit.unpatchify(patches, x.shape[2:]), x)
    # Patch 1 (grid position (0, 0, 1)) starts at x[..., 0, 0, 8], channel fastest.
    torch.testing.assert_close(patches[:, 1, :2], x[:, :, 0, 0, 8])


def test_patchify_2d_round_trip_and_bad_sizes():
    x = torch.randn(3, 1, 12, 20)
    p = patchify(x, (4, 5))
    assert p.shape == (3, 12, 20)
    torch.testing.assert_close(p[:, 0], x[:, 0, :4, :5].reshape(3, 20))
    torch.testing.assert_close(unpatchify(p, (4, 5), (12, 20)), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify(x, (5, 5))
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(p, (4, 5), (12, 25))


def test_random_keep_draws_distinct_indices():
    gen = torch.Generator().manual_seed(0)
    keep = random_keep(4, 10, 3, generator=gen)
    assert keep.shape == (4, 3) and keep.dtype == torch.long
    assert all(len(set(row.tolist())) == 3 for row in keep)
    assert keep.min() >= 0 and keep.max() < 10
    with pytest.raises(ValueError, match="n_keep"):
        random_keep(1, 10, 11)


def test_vit_grid_helper_checks_sizes():
    vit = ViTBackbone(**TINY_VIT_3D)
    assert vit.grid((16, 32, 40)) == (2, 4, 5)
    with pytest.raises(ValueError, match="divisible"):
        vit.grid((16, 32, 30))


# ----- stochastic depth -------------------------------------------------------------------

def test_vit_drop_path_rates_rise_linearly_and_are_stored():
    vit = ViTBackbone(**{**TINY_VIT_3D, "num_layers": 3, "drop_path_rate": 0.1})
    assert vit.config["drop_path_rate"] == 0.1
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])
    assert isinstance(vit.blocks[0].drop_path, torch.nn.Identity)
    # Same parameter names as without drop path, so exports load either way.
    assert vit.state_dict().keys() == ViTBackbone(**{**TINY_VIT_3D, "num_layers": 3}
                                                  ).state_dict().keys()


def test_vit_drop_path_acts_only_in_training():
    torch.manual_seed(0)
    dropped = ViTBackbone(**{**TINY_VIT_3D, "num_layers": 2, "drop_path_rate": 0.5})
    plain = ViTBackbone(**{**TINY_VIT_3D, "num_layers": 2})
    plain.load_state_dict(dropped.state_dict())
    x = torch.randn(8, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
        dropped.train()
        torch.manual_seed(1)
        first = dropped(x)
        second = dropped(x)
    assert not torch.allclose(first, second)
    # Per sample, the last block's branches are kept (scaled by 2) or dropped: some rows differ
    # from the deterministic output, and none is NaN.
    assert torch.isfinite(first).all()
    assert not torch.allclose(first, plain(x))


def test_swin_drop_path_changes_training_outputs_only():
    torch.manual_seed(0)
    net = SwinEncoder(**{**TINY_SWIN, "drop_path_rate": 0.5})
    plain = SwinEncoder(**TINY_SWIN)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain.eval()(x))
        net.train()
        assert not torch.allclose(net(x), net(x))


# ----- EfficientNet -----------------------------------------------------------------------

def test_efficientnet_names_match_flexible_unet_encoder():
    from monai.networks.nets import FlexibleUNet

    ours = EfficientNetBackbone(in_channels=1)
    flex = FlexibleUNet(1, 2, "efficientnet-b0", pretrained=False).encoder.state_dict()
    shapes = {k: tuple(v.shape) for k, v in flex.items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()}.items() <= shapes.items()
    # Only the classification head, never used by the feature path, is left out.
    assert {k.split(".")[0] for k in set(flex) - set(ours.state_dict())} == {
        "_conv_head", "_bn1", "_fc"}
