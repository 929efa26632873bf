"""Tests for medssl.models.weights with small files in each published key layout."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from medssl.models.backbones import SwinEncoder, UNet3DEncoder, ViTBackbone, build_backbone
from medssl.models.weights import (
    LoadReport,
    load_backbone,
    load_weights,
    read_state_dict,
    save_backbone,
)

TINY_VIT = dict(img_size=(16, 32, 32), patch_size=8, hidden_size=32, mlp_dim=64, num_layers=1,
                num_heads=2)
TINY_SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Fill every float tensor (BN statistics included) so copies are distinguishable."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5)
    return model


ROUND_TRIP_CASES = [
    pytest.param(dict(name="vit", **TINY_VIT), (2, 1, 16, 32, 32), id="vit"),
    pytest.param(dict(name="swin_unetr", **TINY_SWIN), (1, 1, 32, 32, 32), id="swin"),
    pytest.param(dict(name="unet3d", spatial_dims=2), (2, 1, 16, 16), id="unet3d-2d"),
]


@pytest.mark.parametrize(("config", "input_shape"), ROUND_TRIP_CASES)
def test_save_then_load_backbone_round_trip(tmp_path, config, input_shape):
    net = _randomized(build_backbone(**config)).eval()
    path = tmp_path / "sub" / "backbone.pt"
    save_backbone(path, net, extra={"epoch": 3})

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "medssl-backbone" and raw["epoch"] == 3
    assert raw["backbone_config"] == net.config
    assert read_state_dict(path)[1] == "medssl-backbone"

    rebuilt, report = load_backbone(path)
    assert report.complete and len(report.loaded) == len(net.state_dict())
    x = torch.randn(input_shape)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), net(x))


def test_save_backbone_rejects_reserved_extra(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_backbone(tmp_path / "b.pt", UNet3DEncoder(spatial_dims=2), extra={"state_dict": {}})


def test_suprem_unet_file_loads_encoder_and_reports_output_layer(tmp_path, caplog):
    source = _randomized(UNet3DEncoder())
    net = {"module.backbone." + k: v for k, v in source.state_dict().items()}
    net["module.backbone.out_tr.final_conv.weight"] = torch.zeros(32, 64, 1, 1, 1)
    path = tmp_path / "supervised_suprem_unet_2100.pth"
    torch.save({"net": net}, path)

    model = UNet3DEncoder()
    with caplog.at_level(logging.INFO, logger="medssl.models.weights"):
        report = load_weights(model, path)
    assert report.source.startswith("suprem file")
    assert report.prefix == "module.backbone."
    assert len(report.loaded) == len(model.state_dict())
    assert report.missing == [] and report.mismatched == []
    assert report.unexpected == ["out_tr.final_conv.weight"]
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert "prefix 'module.backbone.'" in caplog.text
    assert "out_tr.final_conv.weight" in str(report)

    skipped = load_weights(UNet3DEncoder(), path, skip=[r"^out_tr\."], strict=True)
    assert skipped.unexpected == [] and skipped.skipped == ["out_tr.final_conv.weight"]


def test_lightning_checkpoint_loads_teacher_not_student(tmp_path):
    teacher, student = _randomized(ViTBackbone(**TINY_VIT)), _randomized(ViTBackbone(**TINY_VIT))
    state = {"teacher_backbone." + k: v for k, v in teacher.state_dict().items()}
    state |= {"student_backbone." + k: v for k, v in student.state_dict().items()}
    state["teacher_head.layer.weight"] = torch.ones(8, 32)
    path = tmp_path / "last.ckpt"
    torch.save({
        "state_dict": state, "pytorch-lightning_version": "2.6.6", "epoch": 1,
        "hyper_parameters": {"backbone_config": teacher.config, "lr": 1e-3},
    }, path)

    model = ViTBackbone(**TINY_VIT)
    report = load_weights(model, path)
    assert report.source.startswith("lightning file")
    assert report.prefix == "teacher_backbone." and report.complete
    assert "teacher_head.layer.weight" in report.ignored
    assert torch.equal(model.pos_embed, teacher.pos_embed)
    assert not torch.equal(model.pos_embed, student.pos_embed)

    rebuilt, rebuilt_report = load_backbone(path)
    assert rebuilt_report.complete
    for key, value in teacher.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_ddp_and_compile_prefixes_are_unwrapped():
    source = _randomized(SwinEncoder(**TINY_SWIN))
    state = {"module._orig_mod." + k: v for k, v in source.state_dict().items()}
    model = SwinEncoder(**TINY_SWIN)
    report = load_weights(model, state, strict=True)
    assert report.prefix == "module._orig_mod." and report.complete
    assert torch.equal(model.state_dict()["swinViT.patch_embed.proj.weight"],
                       source.state_dict()["swinViT.patch_embed.proj.weight"])


def test_nothing_in_common_raises_with_key_listing():
    state = {"encoder.conv.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"no checkpoint key matched.*fc\.bias.*down_tr64"):
        load_weights(UNet3DEncoder(spatial_dims=2), state)


def test_shape_mismatch_is_reported_and_not_loaded():
    source = _randomized(UNet3DEncoder(spatial_dims=2, in_channels=2))
    model = UNet3DEncoder(spatial_dims=2, in_channels=1)
    before = model.down_tr64.ops[0].conv1.weight.clone()
    report = load_weights(model, source.state_dict())
    assert report.mismatched == [
        ("down_tr64.ops.0.conv1.weight", (32, 2, 3, 3), (32, 1, 3, 3))
    ]
    assert len(report.loaded) == len(model.state_dict()) - 1
    assert torch.equal(model.down_tr64.ops[0].conv1.weight, before)
    assert "shape mismatches: [down_tr64.ops.0.conv1.weight" in str(report)
    with pytest.raises(ValueError, match="strict"):
        load_weights(UNet3DEncoder(spatial_dims=2), source.state_dict(), strict=True)


def test_strict_raises_on_missing_keys_and_loads_nothing():
    source = _randomized(UNet3DEncoder(spatial_dims=2))
    state = source.state_dict()
    del state["down_tr512.ops.1.bn1.running_var"]
    model = UNet3DEncoder(spatial_dims=2)
    before = model.down_tr64.ops[0].conv1.weight.clone()
    with pytest.raises(ValueError, match="down_tr512.ops.1.bn1.running_var"):
        load_weights(model, state, strict=True)
    assert torch.equal(model.down_tr64.ops[0].conv1.weight, before)
    assert load_weights(model, state).missing == ["down_tr512.ops.1.bn1.running_var"]


def test_pickled_objects_are_refused_with_weights_only_message(tmp_path):
    path = tmp_path / "dino_checkpoint.pth"
    torch.save({"teacher": {"backbone.w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    with pytest.raises(ValueError, match="weights_only"):
        load_weights(UNet3DEncoder(spatial_dims=2), path)


def test_load_backbone_needs_a_config(tmp_path):
    path = tmp_path / "flat.pt"
    torch.save(UNet3DEncoder(spatial_dims=2).state_dict(), path)
    assert read_state_dict(path)[1] == "flat"
    with pytest.raises(ValueError, match="load_weights"):
        load_backbone(path)


def test_report_truncates_long_lists():
    report = LoadReport([], [f"k{i}" for i in range(25)], [], [], "", "test")
    text = str(report)
    assert "loaded 0/25 keys from test" in text and "(+15 more)" in text


def test_input_norm_standardises_each_input_and_must_match_the_file(tmp_path):
    """``input_norm=instance``: a volume and any affine intensity change of it (a*x + b, a > 0)
    give the same features; an export trained with it refuses a network without it."""
    net = ViTBackbone(**TINY_VIT, input_norm="instance").eval()
    x = torch.rand(2, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), net(3.0 * x + 0.7), atol=1e-4)
        plain = ViTBackbone(**TINY_VIT)
        plain.load_state_dict(net.state_dict())
        assert not torch.allclose(plain.eval()(x), net(x), atol=1e-3)
    path = tmp_path / "backbone.pt"
    save_backbone(path, net)
    assert load_weights(ViTBackbone(**TINY_VIT, input_norm="instance"), path, strict=True).complete
    with pytest.raises(ValueError, match="backbone.input_norm=instance, but this network has "
                                         "backbone.input_norm=none"):
        load_weights(ViTBackbone(**TINY_VIT), path)
    # A file that does not record input_norm was trained without it.
    old = torch.load(path, weights_only=True)
    del old["backbone_config"]["input_norm"]
    torch.save(old, path)
    assert load_weights(ViTBackbone(**TINY_VIT), path, strict=True).complete
    with pytest.raises(ValueError, match="input_norm=none, but"):
        load_weights(ViTBackbone(**TINY_VIT, input_norm="instance"), path)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        ViTBackbone(**TINY_VIT, input_norm="batch")


def test_a_file_without_a_state_dict_names_what_it_holds(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "epoch": 3, "note": "x"}, path)
    with pytest.raises(ValueError, match=r"mixed.pt holds no recognisable state dict .*top "
                       r"level: \['w', 'epoch', 'note'\]; not tensors: \['epoch \(int\)', "
                       r"'note \(str\)'\]"):
        read_state_dict(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=r"top level: Tensor\.$"):
        read_state_dict(path)


def test_keys_that_fit_by_name_only_say_the_sizes_differ(tmp_path):
    """An export of a wider ViT: every name fits, no shape does."""
    path = tmp_path / "wide.pt"
    save_backbone(path, ViTBackbone(**dict(TINY_VIT, hidden_size=64, mlp_dim=128)))
    with pytest.raises(ValueError, match=r"keys match by name but differ in shape \(e.g. .*"
                       r"in the file, .* in the model.*configure the backbone it was trained"):
        load_weights(ViTBackbone(**TINY_VIT), read_state_dict(path)[0])
