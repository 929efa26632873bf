"""Tests for medssl.models.segmenters and the segmenter weight loaders (tiny CPU sizes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medssl.models.backbones import BACKBONES, build_backbone
from medssl.models.decoders import unetr_upsampling
from medssl.models.segmenters import DECODER_OPTIONS, build_segmenter
from medssl.models.weights import load_encoder_weights, load_segmenter_weights, save_backbone

VIT_3D = dict(name="vit", img_size=(16, 32, 32), patch_size=(8, 16, 16), hidden_size=32,
              mlp_dim=64, num_layers=2, num_heads=2)
VIT_2D = dict(name="vit", spatial_dims=2, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64,
              num_layers=1, num_heads=2)
SWIN_3D = dict(name="swin_unetr", feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
SWIN_2D = {**SWIN_3D, "spatial_dims": 2}
UNET_3D = dict(name="unet3d")
UNET_2D = dict(name="unet3d", spatial_dims=2)
EFF_2D = dict(name="efficientnet")
EFF_3D = dict(name="efficientnet", spatial_dims=3)

# Swin: 64 along one axis, since SwinUNETR's instance norm at 1/32 needs more than one voxel.
FAMILY_CASES = [
    pytest.param(VIT_3D, {}, (2, 1, 16, 32, 32), id="vit-3d-anisotropic-patch"),
    pytest.param(VIT_2D, {"feature_size": 8, "norm_name": "batch"}, (2, 1, 32, 24), id="vit-2d"),
    pytest.param(SWIN_3D, {}, (1, 1, 64, 32, 32), id="swin-3d"),
    pytest.param(SWIN_2D, {"norm_name": "batch"}, (2, 1, 32, 64), id="swin-2d"),
    pytest.param(UNET_3D, {}, (2, 1, 16, 16, 8), id="unet3d-3d"),
    pytest.param(UNET_2D, {}, (2, 1, 16, 24), id="unet3d-2d"),
    pytest.param(EFF_2D, {"decoder_channels": (32, 16, 16, 8, 8)}, (2, 1, 32, 64),
                 id="efficientnet-2d"),
    pytest.param(EFF_3D, {"decoder_channels": (32, 16, 16, 8, 8), "upsample": "deconv"},
                 (2, 1, 32, 32, 32), id="efficientnet-3d"),
]


@pytest.mark.parametrize(("backbone_config", "options", "input_shape"), FAMILY_CASES)
def test_logits_at_input_size(backbone_config, options, input_shape):
    torch.manual_seed(0)
    seg = build_segmenter(backbone_config, 3, **options).eval()
    with torch.no_grad():
        out = seg(torch.randn(input_shape))
    assert out.shape == (input_shape[0], 3, *input_shape[2:])
    assert torch.isfinite(out).all()


# One per family, 2D where the code path is shared (backward is the expensive part).
TRAIN_CASES = [
    pytest.param(VIT_3D, {}, (2, 1, 16, 32, 32), id="vit-3d-anisotropic-patch"),
    pytest.param(SWIN_2D, {}, (1, 1, 32, 64), id="swin-2d"),
    pytest.param(UNET_2D, {}, (2, 1, 16, 24), id="unet3d-2d"),
    pytest.param(EFF_2D, {"decoder_channels": (32, 16, 16, 8, 8)}, (2, 1, 32, 64),
                 id="efficientnet-2d"),
]


@pytest.mark.parametrize(("backbone_config", "options", "input_shape"), TRAIN_CASES)
def test_every_parameter_gets_a_gradient(backbone_config, options, input_shape):
    torch.manual_seed(0)
    seg = build_segmenter(backbone_config, 3, **options).train()
    seg(torch.randn(input_shape)).square().mean().backward()
    # No parameter unused (DDP fails on those), the encoder's included.
    assert [n for n, p in seg.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in seg.parameters())


@pytest.mark.parametrize(("backbone_config", "options", "input_shape"), FAMILY_CASES)
def test_encoder_is_the_backbone_and_config_rebuilds(backbone_config, options, input_shape):
    seg = build_segmenter(backbone_config, 3, **options)
    reference = build_backbone(**backbone_config)
    assert type(seg.encoder) is BACKBONES[backbone_config["name"]]
    assert seg.encoder.config == reference.config
    assert seg.encoder.state_dict().keys() == reference.state_dict().keys()
    config = json.loads(json.dumps(seg.config))
    assert config == seg.config
    assert set(config) == {"backbone_config", "num_classes",
                           *DECODER_OPTIONS[backbone_config["name"]]}
    rebuilt = build_segmenter(**config)
    shapes = {k: v.shape for k, v in seg.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    encoder_ids = {id(p) for p in seg.encoder_parameters()}
    decoder_ids = {id(p) for p in seg.decoder_parameters()}
    assert not encoder_ids & decoder_ids
    assert encoder_ids | decoder_ids == {id(p) for p in seg.parameters()}
    assert encoder_ids == {id(p) for p in seg.encoder.parameters()}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Shift every float tensor by small noise so copied weights are distinguishable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn(t.shape, generator=gen))
    return model


EXPORT_CASES = [
    pytest.param(VIT_3D, (2, 1, 16, 32, 32), id="vit-3d"),
    pytest.param(VIT_2D, (2, 1, 32, 32), id="vit-2d"),
    pytest.param({**SWIN_3D, "legacy_patch_merging": True}, (1, 1, 32, 32, 32), id="swin-3d"),
    pytest.param(UNET_3D, (2, 1, 16, 16, 16), id="unet3d-3d"),
    pytest.param(UNET_2D, (2, 1, 16, 16), id="unet3d-2d"),
    pytest.param(EFF_2D, (2, 1, 32, 32), id="efficientnet-2d"),
]


@pytest.mark.parametrize(("backbone_config", "input_shape"), EXPORT_CASES)
def test_pretraining_export_loads_into_the_encoder(tmp_path, backbone_config, input_shape):
    torch.manual_seed(0)
    backbone = _perturbed(build_backbone(**backbone_config), seed=1).eval()
    path = tmp_path / "backbone.pt"
    save_backbone(path, backbone)
    stored = torch.load(path, weights_only=True)["backbone_config"]
    seg = build_segmenter(stored, num_classes=2).eval()
    report = load_encoder_weights(seg, path)
    assert report.complete and report.prefix == ""
    assert len(report.loaded) == len(backbone.state_dict())
    x = torch.randn(input_shape)
    with torch.no_grad():
        for ours, theirs in zip(seg.encoder.forward_features(x), backbone.forward_features(x),
                                strict=True):
            torch.testing.assert_close(ours, theirs)
    # The same file also goes through the whole-network loader: decoder keys are missing.
    full = load_segmenter_weights(build_segmenter(stored, num_classes=2), path)
    assert sorted(full.loaded) == sorted("encoder." + k for k in report.loaded)
    assert full.missing and all(k.startswith("decoder.") for k in full.missing)
    if backbone_config["name"] == "vit":  # a network that would compute something else
        other = dict(stored, input_norm="none" if stored.get("input_norm") == "instance"
                     else "instance")
        with pytest.raises(ValueError, match="input_norm"):
            load_segmenter_weights(build_segmenter(other, num_classes=2), path)


def test_encoder_loader_takes_the_teacher_of_a_lightning_checkpoint(tmp_path):
    teacher = _perturbed(build_backbone(**UNET_2D), seed=1)
    student = _perturbed(build_backbone(**UNET_2D), seed=2)
    state = {"teacher_backbone." + k: v for k, v in teacher.state_dict().items()}
    state |= {"student_backbone." + k: v for k, v in student.state_dict().items()}
    state["teacher_head.last_layer.weight"] = torch.zeros(4, 8)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6"}, path)
    seg = build_segmenter(UNET_2D, 2)
    report = load_encoder_weights(seg, path)
    assert report.complete and report.prefix == "teacher_backbone."
    for key, value in teacher.state_dict().items():
        assert torch.equal(seg.encoder.state_dict()[key], value)


def test_encoder_loader_refuses_a_partial_match_and_loads_nothing():
    source = build_backbone(**UNET_2D).state_dict()
    del source["down_tr512.ops.1.conv1.weight"]
    seg = build_segmenter(UNET_2D, 2)
    before = seg.encoder.down_tr64.ops[0].conv1.weight.clone()
    with pytest.raises(ValueError, match=r"not every encoder key.*down_tr512\.ops\.1\.conv1"):
        load_encoder_weights(seg, source)
    assert torch.equal(seg.encoder.down_tr64.ops[0].conv1.weight, before)
    assert load_encoder_weights(seg, source, strict=False).missing == [
        "down_tr512.ops.1.conv1.weight"]


def test_segmentation_checkpoint_round_trips_through_a_lightning_prefix():
    source = _perturbed(build_segmenter(SWIN_2D, 3), seed=3)
    state = {"model." + k: v for k, v in source.state_dict().items()}
    state["model_ema.unused"] = torch.zeros(1)
    seg = build_segmenter(SWIN_2D, 3)
    report = load_segmenter_weights(seg, state, strict=True)
    assert report.prefix == "encoder 'model.encoder.', decoder 'model.decoder.'"
    assert report.ignored == ["model_ema.unused"]
    for key, value in source.state_dict().items():
        assert torch.equal(seg.state_dict()[key], value)


# ----- published full networks ------------------------------------------------------------

def _suprem_unet3d_file(path, n_class: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SuPreM UNet3D checkpoint written from the documented layout (weight_formats.md), not
    from our modules: ``{"net": {"module.backbone." + name: tensor}}``. Returns the bare dict."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def uniform(*shape: int, bound: float) -> torch.Tensor:
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound

    def unit(prefix: str, cin: int, cout: int) -> None:
        sd[prefix + "conv1.weight"] = uniform(cout, cin, 3, 3, 3, bound=math.sqrt(6 / (27 * cin)))
        sd[prefix + "conv1.bias"] = uniform(cout, bound=0.1)
        sd[prefix + "bn1.weight"] = 1 + uniform(cout, bound=0.1)
        sd[prefix + "bn1.bias"] = uniform(cout, bound=0.1)
        sd[prefix + "bn1.running_mean"] = uniform(cout, bound=0.1)
        sd[prefix + "bn1.running_var"] = 1 + uniform(cout, bound=0.1)
        sd[prefix + "bn1.num_batches_tracked"] = torch.tensor(7)

    for depth, (name, cin) in enumerate(zip(["down_tr64", "down_tr128", "down_tr256",
                                             "down_tr512"], [1, 64, 128, 256], strict=True)):
        width = 32 * 2**depth
        unit(f"{name}.ops.0.", cin, width)
        unit(f"{name}.ops.1.", width, 2 * width)
    for depth, name, ch in [(2, "up_tr256", 512), (1, "up_tr128", 256), (0, "up_tr64", 128)]:
        sd[f"{name}.up_conv.weight"] = uniform(ch, ch, 2, 2, 2, bound=math.sqrt(6 / (8 * ch)))
        sd[f"{name}.up_conv.bias"] = uniform(ch, bound=0.1)
        width = 32 * 2 ** (depth + 1)
        unit(f"{name}.ops.0.", ch + ch // 2, width)
        unit(f"{name}.ops.1.", width, width)
    sd["out_tr.final_conv.weight"] = uniform(n_class, 64, 1, 1, 1, bound=0.3)
    sd["out_tr.final_conv.bias"] = uniform(n_class, bound=0.1)
    torch.save({"net": {"module.backbone." + k: v for k, v in sd.items()}}, path)
    return sd


def _suprem_unet3d_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The SuPreM UNet3D forward from its state dict; batch norm in training mode, as there."""

    def ops(prefix: str, x: torch.Tensor) -> torch.Tensor:
        for unit in ("ops.0.", "ops.1."):
            p = prefix + unit
            x = F.conv3d(x, sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
            x = F.relu(F.batch_norm(x, None, None, sd[p + "bn1.weight"], sd[p + "bn1.bias"],
                                    training=True))
        return x

    skips = []
    for i, name in enumerate(["down_tr64", "down_tr128", "down_tr256", "down_tr512"]):
        x = ops(name + ".", x)
        skips.append(x)
        x = F.max_pool3d(x, 2) if i < 3 else x
    for name, skip in zip(["up_tr256", "up_tr128", "up_tr64"], skips[2::-1], strict=True):
        x = F.conv_transpose3d(x, sd[name + ".up_conv.weight"], sd[name + ".up_conv.bias"],
                               stride=2)
        x = ops(name + ".", torch.cat([x, skip], dim=1))
    return F.conv3d(x, sd["out_tr.final_conv.weight"], sd["out_tr.final_conv.bias"])


def test_full_suprem_unet3d_checkpoint_loads_and_reproduces_its_forward(tmp_path):
    path = tmp_path / "supervised_suprem_unet_2100.pth"
    sd = _suprem_unet3d_file(path, n_class=4)
    seg = build_segmenter(UNET_3D, 4)
    report = load_segmenter_weights(seg, path, strict=True)
    assert report.source.startswith("suprem file")
    assert report.prefix == "encoder 'module.backbone.', decoder 'module.backbone.'"
    assert len(report.loaded) == len(sd) == len(seg.state_dict())
    x = torch.randn(2, 1, 8, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(seg.train()(x), _suprem_unet3d_forward(sd, x),
                                   rtol=1e-4, atol=1e-4)


def test_suprem_unet3d_with_another_class_count_skips_only_the_output_layer(tmp_path):
    path = tmp_path / "supervised_suprem_unet_2100.pth"
    sd = _suprem_unet3d_file(path, n_class=32)
    seg = build_segmenter(UNET_3D, 3)
    before = seg.decoder.out_tr.final_conv.weight.clone()
    report = load_segmenter_weights(seg, path, strict=True)
    assert report.complete and report.unexpected == []
    assert sorted(report.skipped) == ["decoder.out_tr.final_conv.bias",
                                      "decoder.out_tr.final_conv.weight"]
    assert len(report.loaded) == len(sd) - 2
    assert torch.equal(seg.decoder.out_tr.final_conv.weight, before)
    assert torch.equal(seg.decoder.up_tr64.up_conv.weight, sd["up_tr64.up_conv.weight"])
    assert torch.equal(seg.encoder.down_tr64.ops[0].bn1.running_var,
                       sd["down_tr64.ops.0.bn1.running_var"])

    encoder_only = load_encoder_weights(build_segmenter(UNET_3D, 3), path)
    assert encoder_only.missing == [] and encoder_only.mismatched == []
    assert {k.split(".")[0] for k in encoder_only.unexpected} == {
        "up_tr256", "up_tr128", "up_tr64", "out_tr"}


def test_full_suprem_swinunetr_checkpoint_matches_monai_swinunetr(tmp_path):
    from monai.networks.nets import SwinUNETR

    from medssl.models.swin import LegacyPatchMerging

    torch.manual_seed(0)
    # SuPreM checkpoints were trained with the MONAI < 1.5 merging order.
    reference = _perturbed(SwinUNETR(1, 4, feature_size=12, depths=(1, 1, 1, 1),
                                     num_heads=(1, 1, 1, 1), downsample=LegacyPatchMerging),
                           seed=4).eval()
    path = tmp_path / "supervised_suprem_swinunetr_2100.pth"
    torch.save({"net": {"module.backbone." + k: v for k, v in reference.state_dict().items()}},
               path)
    seg = build_segmenter({**SWIN_3D, "legacy_patch_merging": True}, 4).eval()
    report = load_segmenter_weights(seg, path, strict=True)
    assert len(report.loaded) == len(reference.state_dict())
    x = torch.randn(1, 1, 32, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(seg(x), reference(x), rtol=1e-4, atol=1e-5)

    other = build_segmenter({**SWIN_3D, "legacy_patch_merging": True}, 2)
    skipped = load_segmenter_weights(other, path, strict=True)
    assert sorted(skipped.skipped) == ["decoder.out.conv.conv.bias", "decoder.out.conv.conv.weight"]


def test_monai_flexible_unet_state_dict_loads_and_matches():
    from monai.networks.nets import FlexibleUNet

    torch.manual_seed(0)
    reference = FlexibleUNet(1, 3, "efficientnet-b0", pretrained=False).eval()
    seg = build_segmenter(EFF_2D, 3).eval()
    report = load_segmenter_weights(seg, reference.state_dict())
    assert report.prefix == "encoder 'encoder.', decoder ''"
    assert report.missing == [] and report.mismatched == []
    assert len(report.loaded) == len(seg.state_dict())
    # FlexibleUNet's encoder keeps EfficientNet's unused classification head; ours drops it.
    assert {k.split(".")[0] for k in report.unexpected} == {"_conv_head", "_bn1", "_fc"}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(seg(x), reference(x), rtol=1e-4, atol=1e-5)


def test_unetr_decoder_names_and_shapes_match_monai_unetr():
    from monai.networks.nets import UNETR

    reference = UNETR(1, 3, img_size=(32, 32, 32), feature_size=8, hidden_size=32, mlp_dim=64,
                      num_heads=2)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("vit.")}
    seg = build_segmenter({**VIT_3D, "img_size": 32, "patch_size": 16}, 3, feature_size=8)
    assert {k: v.shape for k, v in seg.decoder.state_dict().items()} == expected


@pytest.mark.parametrize(("patch", "inner", "last"), [
    pytest.param([16, 16, 16], (2, 2, 2), (2, 2, 2), id="isotropic-16"),
    pytest.param([8, 16, 16], (2, 2, 2), (1, 2, 2), id="anisotropic-8-16"),
    pytest.param([4, 32], (1, 2), (4, 4), id="4-and-32"),
])
def test_unetr_upsampling_restores_the_patch_size(patch, inner, last):
    assert unetr_upsampling(patch) == (inner, last)
    assert [i**3 * j for i, j in zip(inner, last, strict=True)] == patch


# ----- bad arguments and inputs ------------------------------------------------------------

BAD_ARG_CASES = [
    pytest.param(UNET_2D, 0, {}, "num_classes", id="zero-classes"),
    pytest.param({"spatial_dims": 2}, 2, {}, "'name'", id="config-without-name"),
    pytest.param(dict(name="resnet"), 2, {}, "no segmentation decoder", id="unknown-backbone"),
    pytest.param(UNET_2D, 2, {"norm_name": "batch"}, r"unknown decoder option.*allowed: none",
                 id="unet3d-has-no-options"),
    pytest.param(SWIN_2D, 2, {"feature_size": 24}, r"allowed: \['norm_name'\]",
                 id="swin-unknown-option"),
    pytest.param(SWIN_2D, 2, {"norm_name": "layer"}, "layer", id="swin-norm"),
    pytest.param({**VIT_3D, "img_size": (16, 24, 24), "patch_size": (8, 12, 12)}, 2, {},
                 "multiple of 8", id="vit-patch-12"),
    pytest.param(VIT_3D, 2, {"feature_size": 0}, "feature_size", id="vit-feature-size"),
    pytest.param(EFF_2D, 2, {"decoder_channels": [16, 8]}, "5 entries",
                 id="efficientnet-decoder-channels"),
    pytest.param(EFF_2D, 2, {"upsample": "bilinear"}, "bilinear", id="efficientnet-upsample"),
    pytest.param(EFF_2D, 2, {"dropout": 2.0}, "dropout", id="efficientnet-dropout"),
]


@pytest.mark.parametrize(("backbone_config", "num_classes", "options", "message"),
                         BAD_ARG_CASES)
def test_bad_arguments_raise(backbone_config, num_classes, options, message):
    with pytest.raises(ValueError, match=message):
        build_segmenter(backbone_config, num_classes, **options)


BAD_INPUT_CASES = [
    pytest.param(SWIN_3D, (1, 1, 48, 32, 32), True, "divisible by", id="swin-not-32"),
    pytest.param(SWIN_3D, (2, 1, 32, 32, 32), False, "instance norm", id="swin-single-voxel"),
    pytest.param(UNET_3D, (1, 1, 8, 8, 8), True, "batch size 1", id="unet3d-bn-single-value"),
    pytest.param(VIT_3D, (2, 1, 16, 32, 24), True, r"divisible by \(8, 16, 16\)",
                 id="vit-not-patch"),
    pytest.param(EFF_2D, (2, 2, 32, 32), True, "expects input", id="efficientnet-channels"),
]


@pytest.mark.parametrize(("backbone_config", "input_shape", "training", "message"),
                         BAD_INPUT_CASES)
def test_bad_input_size_raises_naming_the_rule(backbone_config, input_shape, training, message):
    seg = build_segmenter(backbone_config, 2).train(training)
    with pytest.raises(ValueError, match=message):
        seg(torch.randn(input_shape))


def test_batch_norm_rule_only_applies_in_training():
    seg = build_segmenter(UNET_3D, 2).eval()
    with torch.no_grad():
        assert seg(torch.randn(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="patch_size"):
        seg.check_input_size((8, 8), what="patch_size")
