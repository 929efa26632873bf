"""The classification module: masked loss, heads, frozen and linear modes, optimizer groups."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medssl.models.classifier import Classifier, masked_cross_entropy

VIT = {"name": "vit", "spatial_dims": 3, "in_channels": 1, "img_size": [8, 8, 8],
       "patch_size": [4, 4, 4], "hidden_size": 16, "mlp_dim": 32, "num_layers": 1,
       "num_heads": 2}
CLASSES = {"a": ["lo", "hi"], "b": ["x", "y", "z"]}


def test_masked_cross_entropy_against_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, -1, 2, 1, -1])
    weight = torch.tensor([1.0, 2.0, 0.5])
    loss, n = masked_cross_entropy(logits, labels, weight)
    logp = logits.log_softmax(1)
    rows, cls = torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1])
    w = weight[cls]
    assert n == 3
    assert loss.item() == pytest.approx((-(w * logp[rows, cls]).sum() / w.sum()).item())
    unweighted, _ = masked_cross_entropy(logits, labels)
    assert unweighted.item() == pytest.approx(-logp[rows, cls].mean().item())


def test_all_empty_target_gives_zero_loss_and_gradient() -> None:
    logits = torch.randn(3, 2, requires_grad=True)
    loss, n = masked_cross_entropy(logits, torch.full((3,), -1))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 2))


@pytest.mark.parametrize("kwargs,match", [
    pytest.param({"classes": {}}, "at least one target", id="no-targets"),
    pytest.param({"classes": {"a": ["only"]}}, "at least 2 classes", id="one-class"),
    pytest.param({"class_weights": {"a": [1.0], "b": [1, 1, 1]}}, "one weight per class",
                 id="weights-length"),
    pytest.param({"train_mode": "probe"}, "probe", id="train-mode"),
    pytest.param({"lr": 0.0}, "lr > 0", id="lr"),
    pytest.param({"freeze_backbone_epochs": -1}, "freeze_backbone_epochs", id="freeze"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Classifier(**{"backbone_config": VIT, "classes": CLASSES, **kwargs})


def test_heads_and_shapes() -> None:
    module = Classifier(VIT, CLASSES)
    logits = module(torch.rand(2, 1, 8, 8, 8))
    assert [tuple(x.shape) for x in logits] == [(2, 2), (2, 3)]
    assert module.hparams.classes == CLASSES


def _data(n: int = 12, seed: int = 0) -> list[dict]:
    """Bright volumes are 'hi' (a); b is empty in every second row."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        hi = i % 2
        image = torch.rand(1, 8, 8, 8, generator=g) * 0.5 + 0.5 * hi
        items.append({"image": image, "record_index": i,
                      "targets": {"a": hi, "b": -1 if i % 2 else i % 3}})
    return items


def _trainer(epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks or [])


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _EpochSnapshots(L.Callback):
    def __init__(self) -> None:
        self.backbone, self.heads = [], []

    def on_train_epoch_end(self, trainer: L.Trainer, module: Classifier) -> None:
        self.backbone.append(_params(module.backbone))
        self.heads.append(_params(module.heads))


def test_freeze_backbone_epochs_trains_heads_first() -> None:
    torch.manual_seed(0)
    module = Classifier(VIT, CLASSES, freeze_backbone_epochs=1, lr=1e-2, grad_clip=1.0)
    start_backbone, start_heads = _params(module.backbone), _params(module.heads)
    snaps, modes = _EpochSnapshots(), _Modes()
    _trainer(2, [snaps, modes]).fit(module, DataLoader(_data(), batch_size=4, shuffle=True))
    frozen, unfrozen = snaps.backbone
    assert all(torch.equal(frozen[k], v) for k, v in start_backbone.items())
    assert any(not torch.equal(unfrozen[k], v) for k, v in frozen.items())
    assert any(not torch.equal(snaps.heads[0][k], v) for k, v in start_heads.items())
    # Batch norm and dropout of the backbone: eval while frozen, train mode afterwards.
    assert set(modes.modes) == {(0, False), (1, True)}


def test_linear_mode_computes_features_once_and_learns() -> None:
    torch.manual_seed(0)
    module = Classifier(VIT, CLASSES, train_mode="linear", lr=0.2)
    start = _params(module.backbone)
    calls = []
    module.backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    data = _data(16)
    modes = _Modes()
    trainer = _trainer(8, [modes])
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True),
                DataLoader(data, batch_size=16))
    assert sum(calls) == 16  # every row once, over 8 epochs of training and validation
    assert not any(training for _, training in modes.modes)
    assert all(torch.equal(v, module.backbone.state_dict()[k]) for k, v in start.items())
    # Brightness separates 'a' perfectly; the frozen random features keep enough of it.
    assert trainer.callback_metrics["val/a/auc"] > 0.9


def test_empty_target_trains_only_the_other_head() -> None:
    module = Classifier(VIT, CLASSES)
    batch = {"image": torch.rand(4, 1, 8, 8, 8), "record_index": torch.arange(4),
             "targets": {"a": torch.tensor([0, 1, 0, 1]), "b": torch.full((4,), -1)}}
    loss = module._loss(module(batch["image"]), batch["targets"])
    loss.backward()
    assert module.heads[0].weight.grad.abs().sum() > 0
    assert torch.equal(module.heads[1].weight.grad, torch.zeros_like(module.heads[1].weight))


def test_optimizer_groups_scale_backbone_lr_and_skip_decay_on_biases() -> None:
    module = Classifier(VIT, CLASSES, lr=1e-3, min_lr=1e-4, backbone_lr_scale=0.1,
                        weight_decay=0.05, warmup_epochs=0)
    _trainer(1).fit(module, DataLoader(_data(8), batch_size=4))
    groups = {g["name"]: g for g in module.optimizers().optimizer.param_groups}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    for name, param in module.named_parameters():
        group = next(n for n, s in ids.items() if id(param) in s)
        assert group.startswith("backbone" if name.startswith("backbone.") else "heads"), name
        assert group.endswith("no_decay") == (name.endswith(".bias") or param.ndim <= 1), name
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    # The cosine ends at min_lr on the last of the 2 steps; the backbone runs at 0.1 of it.
    assert groups["heads"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone"]["lr"] == pytest.approx(1e-5)


def test_gathered_keeps_each_row_once() -> None:
    module = Classifier(VIT, {"a": ["lo", "hi"]})
    store = module.collected["val"]
    # A distributed sampler pads the last batch with repeats of the first rows.
    for index, label, p in [([2, 0], [1, 0], [0.9, 0.2]), ([1, 2], [1, 1], [0.6, 0.9])]:
        store["index"].update(torch.tensor(index))
        store["labels_0"].update(torch.tensor(label))
        p = torch.tensor(p)
        store["probs_0"].update(torch.stack([1 - p, p], 1))
    out = module.gathered("val")
    assert out["index"].tolist() == [0, 1, 2]
    assert out["labels"]["a"].tolist() == [0, 1, 1]
    assert out["probs"]["a"][:, 1] == pytest.approx([0.2, 0.6, 0.9])


class _Modes(L.Callback):
    def __init__(self) -> None:
        self.modes: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: Classifier, *args: object) -> None:
        self.modes.append((trainer.current_epoch, module.backbone.training))


@pytest.mark.parametrize("train_mode", ["finetune", "linear"])
def test_mean_pooling_feeds_the_heads_the_mean_patch_token(train_mode: str) -> None:
    torch.manual_seed(0)
    model = Classifier(backbone_config=VIT, classes=CLASSES, pooling="mean",
                       train_mode=train_mode).eval()
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        tokens = model.backbone.forward_tokens(x)  # (B, 1 + patches, D): CLS first
        expected = tokens[:, 1:].mean(1)
        assert torch.allclose(model.features(x), expected, atol=1e-6)
        assert not torch.allclose(expected, tokens[:, 0])
    with pytest.raises(ValueError, match="'max'"):
        Classifier(backbone_config=VIT, classes=CLASSES, pooling="max")


@pytest.mark.parametrize("weighted", [False, True])
def test_head_bias_starts_at_the_constant_predictors_optimum(weighted: bool) -> None:
    # With features that carry nothing, the best constant prediction under (weighted)
    # cross-entropy is q_c ∝ share_c * weight_c; its loss is the weighted entropy
    # -sum(share_c w_c log q_c) / sum(share_c w_c). The heads start there.
    shares = {"a": [0.8, 0.2], "b": [0.5, 0.3, 0.2]}
    weights = {t: [1 / (len(p) * s) for s in p] for t, p in shares.items()} if weighted else None
    module = Classifier(VIT, CLASSES, class_weights=weights, class_priors=shares)
    for i, (target, p) in enumerate(shares.items()):
        torch.nn.init.zeros_(module.heads[i].weight)  # features say nothing
        q = module.heads[i](torch.zeros(1, module.heads[i].in_features)).softmax(1)[0]
        expected = torch.full((len(p),), 1 / len(p)) if weighted else torch.tensor(p)
        torch.testing.assert_close(q, expected)
        # Rows in exact proportion: the loss equals the (weighted) entropy of the shares.
        n = 10 * torch.tensor(p)
        labels = torch.repeat_interleave(torch.arange(len(p)), n.round().long())
        logits = module.heads[i](torch.zeros(len(labels), module.heads[i].in_features))
        w = None if weights is None else torch.tensor(weights[target])
        loss, _ = masked_cross_entropy(logits, labels, w)
        pw = torch.tensor(p) * (w if w is not None else 1)
        entropy = -(pw * expected.log()).sum() / pw.sum()
        torch.testing.assert_close(loss, entropy)


def test_class_priors_are_checked() -> None:
    with pytest.raises(ValueError, match="one positive share per class"):
        Classifier(VIT, CLASSES, class_priors={"a": [0.5, 0.5], "b": [1.0, 0.0, 0.0]})
    with pytest.raises(ValueError, match="one positive share per class"):
        Classifier(VIT, CLASSES, class_priors={"a": [0.5, 0.5]})
