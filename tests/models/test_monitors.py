"""Collapse and representation monitors: k-NN metrics, entropy, embedding spread, crop grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medssl.models.monitors import (
    balanced_accuracy,
    crop_grid,
    embedding_spread,
    embedding_std,
    entropy_fraction,
    knn_accuracy,
    knn_metrics,
    knn_votes,
    prototype_information,
    roc_auc,
    softmax_entropy,
    view_agreement,
)


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tight clusters around opposite directions e0 and -e0 in 8 dims; labels 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.zeros(8)
    centre[0] = 1.0
    feats = torch.cat([centre + 0.05 * torch.randn(n, 8, generator=g),
                       -centre + 0.05 * torch.randn(n, 8, generator=g)])
    return feats, torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])


@pytest.mark.parametrize(
    "k",
    [pytest.param(1, id="k1"), pytest.param(5, id="k5"),
     pytest.param(100, id="k-above-bank-size")],
)
def test_knn_perfect_on_separated_clusters(k: int) -> None:
    bank, bank_labels = _clusters(10, seed=0)
    query, query_labels = _clusters(6, seed=1)
    acc = knn_accuracy(bank, bank_labels, query, query_labels, k=k)
    assert acc.item() == 1.0


def test_knn_zero_when_query_labels_swapped() -> None:
    bank, bank_labels = _clusters(10, seed=0)
    query, query_labels = _clusters(6, seed=1)
    assert knn_accuracy(bank, bank_labels, query, 1 - query_labels, k=5).item() == 0.0


def _angles(*radians: float) -> torch.Tensor:
    t = torch.tensor(radians)
    return torch.stack([t.cos(), t.sin()], dim=1)


@pytest.mark.parametrize(
    ("k", "expected"),
    [pytest.param(1, 1.0, id="k1-nearest-is-class-0"),
     pytest.param(5, 0.0, id="k5-outvoted-by-class-1")],
)
def test_knn_respects_k(k: int, expected: float) -> None:
    # The query (angle 0, class 0) has one class-0 neighbour right next to it, then four
    # class-1 neighbours slightly further; the other class-0 points are on the far side.
    bank = _angles(0.01, 0.2, -0.2, 0.25, -0.25, math.pi, math.pi - 0.1, math.pi + 0.1)
    bank_labels = torch.tensor([0, 1, 1, 1, 1, 0, 0, 0])
    query, query_labels = _angles(0.0), torch.tensor([0])
    acc = knn_accuracy(bank, bank_labels, query, query_labels, k=k, temperature=1.0)
    assert acc.item() == expected


def test_knn_accuracy_is_a_fraction() -> None:
    bank, bank_labels = _clusters(10, seed=0)
    query, query_labels = _clusters(4, seed=1)
    query_labels[:2] = 1 - query_labels[:2]  # 2 of the 8 queries get the wrong label
    assert knn_accuracy(bank, bank_labels, query, query_labels, k=3).item() == pytest.approx(0.75)


@pytest.mark.parametrize(
    "n_classes",
    [pytest.param(2, id="K2"), pytest.param(64, id="K64"), pytest.param(4096, id="K4096")],
)
def test_entropy_of_constant_logits_is_log_k(n_classes: int) -> None:
    logits = torch.full((3, 5, n_classes), 7.0)
    assert softmax_entropy(logits).item() == pytest.approx(math.log(n_classes), rel=1e-5)


def test_entropy_of_peaked_logits_is_near_zero() -> None:
    logits = 100.0 * torch.eye(16)[torch.tensor([3, 0, 15, 7])]
    entropy = softmax_entropy(logits).item()
    assert 0.0 <= entropy < 1e-6


def test_entropy_between_bounds_for_random_logits() -> None:
    logits = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    assert 0.1 < softmax_entropy(logits).item() < math.log(64)


def test_embedding_std_of_identical_rows_is_zero() -> None:
    row = torch.randn(1, 48, generator=torch.Generator().manual_seed(0))
    assert embedding_std(row.expand(32, -1)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "dim",
    [pytest.param(16, id="D16"), pytest.param(64, id="D64"), pytest.param(256, id="D256")],
)
def test_embedding_std_of_gaussian_rows_is_inverse_sqrt_dim(dim: int) -> None:
    feats = 5.0 * torch.randn(8192, dim, generator=torch.Generator().manual_seed(0))
    assert embedding_std(feats).item() == pytest.approx(1 / math.sqrt(dim), rel=0.03)


def test_embedding_std_ignores_feature_scale() -> None:
    feats = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    assert embedding_std(100.0 * feats).item() == pytest.approx(embedding_std(feats).item(),
                                                                rel=1e-5)


def _knn_reference(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray, k: int,
                   temperature: float, n_classes: int) -> np.ndarray:
    """Brute-force weighted k-NN vote shares, one query at a time (DINO eval_knn.py)."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    out = np.zeros((len(query), n_classes))
    for i, q in enumerate(query):
        sims = bank @ (q / np.linalg.norm(q))
        for j in np.argsort(-sims)[:k]:
            out[i, bank_labels[j]] += np.exp(sims[j] / temperature)
        out[i] /= out[i].sum()
    return out


def _noisy_task(n_bank: int, n_query: int, n_classes: int, seed: int):
    """Overlapping class clusters in 16 dims, so k-NN is informative but imperfect."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, 16, generator=g)
    yb = torch.randint(0, n_classes, (n_bank,), generator=g)
    yq = torch.randint(0, n_classes, (n_query,), generator=g)
    bank = centres[yb] + 4.0 * torch.randn(n_bank, 16, generator=g)
    query = centres[yq] + 4.0 * torch.randn(n_query, 16, generator=g)
    return bank, yb, query, yq


@pytest.mark.parametrize(
    ("n_classes", "k", "temperature"),
    [pytest.param(2, 20, 0.07, id="binary-dino-defaults"),
     pytest.param(4, 5, 0.5, id="four-classes"),
     pytest.param(3, 500, 0.07, id="k-above-bank")],
)
def test_knn_votes_match_brute_force(n_classes: int, k: int, temperature: float) -> None:
    bank, yb, query, _ = _noisy_task(200, 50, n_classes, seed=n_classes)
    shares = knn_votes(bank, yb, query, n_classes, k=k, temperature=temperature)
    ref = _knn_reference(bank.double().numpy(), yb.numpy(), query.double().numpy(), k,
                         temperature, n_classes)
    np.testing.assert_allclose(shares.numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_auc_equals_sklearn_on_vote_shares(seed: int) -> None:
    bank, yb, query, yq = _noisy_task(300, 120, 2, seed)
    metrics = knn_metrics(bank, yb, query, yq)
    shares = knn_votes(bank, yb, query, 2)[:, 1].numpy()
    expected = roc_auc_score(yq.numpy(), shares)
    assert 0.55 < expected < 0.99  # informative but imperfect: the test can fail
    assert metrics["auc"].item() == pytest.approx(expected, abs=1e-6)
    predictions = shares > 0.5
    assert metrics["accuracy"].item() == pytest.approx((predictions == yq.numpy()).mean())
    assert metrics["balanced_accuracy"].item() == pytest.approx(
        balanced_accuracy_score(yq.numpy(), predictions), abs=1e-6)


def test_knn_metrics_multiclass_reports_balanced_accuracy_without_auc() -> None:
    bank, yb, query, yq = _noisy_task(300, 90, 3, seed=5)
    metrics = knn_metrics(bank, yb, query, yq, k=10)
    assert set(metrics) == {"accuracy", "balanced_accuracy"}
    predictions = knn_votes(bank, yb, query, 3, k=10).argmax(1).numpy()
    assert metrics["balanced_accuracy"].item() == pytest.approx(
        balanced_accuracy_score(yq.numpy(), predictions), abs=1e-6)


def test_knn_metrics_no_auc_when_query_has_one_class() -> None:
    bank, bank_labels = _clusters(10, seed=0)
    query = _clusters(4, seed=1)[0][:4]
    assert "auc" not in knn_metrics(bank, bank_labels, query, torch.zeros(4), n_classes=2)


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        pytest.param([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], id="sklearn-doc-example"),
        pytest.param([0.5, 0.5, 0.5, 0.2, 0.9, 0.5], [1, 0, 1, 0, 1, 0], id="ties"),
        pytest.param([3.0, 2.0, 1.0], [0, 1, 1], id="inverted"),
    ],
)
def test_roc_auc_equals_sklearn(scores: list[float], labels: list[int]) -> None:
    got = roc_auc(torch.tensor(scores), torch.tensor(labels)).item()
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-7)


def test_roc_auc_equals_sklearn_on_many_tied_scores() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (500,), generator=g)
    scores = (labels + 2 * torch.randn(500, generator=g)).round()  # about 15 distinct values
    assert roc_auc(scores, labels).item() == pytest.approx(
        roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)


def test_roc_auc_single_class_is_nan() -> None:
    assert math.isnan(roc_auc(torch.rand(5), torch.ones(5)).item())


def test_balanced_accuracy_equals_sklearn() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 40 + [1] * 8 + [2] * 3)
    predictions = torch.where(torch.rand(51, generator=g) < 0.7, labels,
                              torch.randint(0, 4, (51,), generator=g))  # includes a 4th class
    with pytest.warns(UserWarning, match="classes not in y_true"):
        expected = balanced_accuracy_score(labels.numpy(), predictions.numpy())
    assert balanced_accuracy(predictions, labels).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n_classes", [2, 1024, 65536])
def test_entropy_fraction_uniform_is_one_and_one_hot_is_zero(n_classes: int) -> None:
    assert entropy_fraction(torch.zeros(4, n_classes)).item() == pytest.approx(1.0, abs=1e-5)
    one_hot = torch.full((4, n_classes), -1e4)
    one_hot[torch.arange(4), torch.tensor([0, 1, 1, n_classes - 1])] = 0.0
    assert entropy_fraction(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_fraction_of_two_equal_prototypes() -> None:
    """Mass split evenly over 2 of 16 prototypes: ln 2 / ln 16 = 1/4."""
    logits = torch.full((3, 16), -1e4)
    logits[:, :2] = 0.0
    assert entropy_fraction(logits).item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize(
    ("logits", "expected"),
    [
        pytest.param(torch.zeros(8, 32), 0.0, id="uniform-collapse"),
        pytest.param(1e4 * torch.eye(32)[torch.full((8,), 5)], 0.0, id="one-hot-collapse"),
        pytest.param(1e4 * torch.eye(8), 1.0, id="distinct-one-hots-N-equals-K"),
        pytest.param(1e4 * torch.eye(32)[:8], 1.0, id="distinct-one-hots-N-below-K"),
        pytest.param(1e4 * torch.eye(4)[torch.tensor([0, 0, 1, 1])], math.log(2) / math.log(4),
                     id="two-groups"),
    ],
)
def test_prototype_information(logits: torch.Tensor, expected: float) -> None:
    assert prototype_information(logits).item() == pytest.approx(expected, abs=1e-6)


def test_prototype_information_equals_entropy_of_mean_minus_mean_entropy() -> None:
    logits = 3 * torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.reshape(-1, 64).double(), -1).numpy()
    mean = p.mean(0)
    expected = (-(mean * np.log(mean)).sum() + (p * np.log(p)).sum(1).mean()) / math.log(32)
    assert prototype_information(logits).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("dim", [16, 192, 768])
def test_embedding_spread_is_one_for_isotropic_features(dim: int) -> None:
    feats = 3.0 * torch.randn(8192, dim, generator=torch.Generator().manual_seed(0))
    assert embedding_spread(feats).item() == pytest.approx(1.0, rel=0.03)


def test_embedding_spread_of_shared_direction_plus_small_variation() -> None:
    """Features = common vector + noise 10x smaller: spread ~ 0.1 (norm ratio), not 1."""
    g = torch.Generator().manual_seed(0)
    dim = 256
    common = torch.randn(dim, generator=g)
    common = common / common.norm() * math.sqrt(dim)  # same norm as a noise row
    feats = common + 0.1 * torch.randn(4096, dim, generator=g)
    assert embedding_spread(feats).item() == pytest.approx(0.1, rel=0.05)
    assert embedding_spread(feats[:1].expand(64, -1)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("shapes", "size"),
    [
        pytest.param([(1, 1, 16, 32, 32), (1, 1, 16, 32, 32), (1, 1, 8, 16, 16)], 64,
                     id="3d-global-and-local"),
        pytest.param([(2, 2, 8, 16, 16)], 32, id="3d-batch-2-channels-2"),
        pytest.param([(1, 1, 32, 32), (1, 1, 16, 16)], 48, id="2d-slices"),
    ],
)
def test_crop_grid_shape_and_range(shapes: list[tuple[int, ...]], size: int) -> None:
    g = torch.Generator().manual_seed(0)
    crops = [10.0 * torch.randn(shape, generator=g) - 3.0 for shape in shapes]
    grid = crop_grid(crops, size=size)
    # make_grid pads 2 pixels around tiles, but returns a single tile as it is
    pad = 2 if len(crops) > 1 else 0
    assert grid.shape == (3, size + 2 * pad, len(crops) * (size + pad) + pad)
    assert grid.min().item() >= 0.0 and grid.max().item() <= 1.0
    assert grid.max().item() > 0.99  # every tile is min-max scaled


def test_crop_grid_shows_middle_slice() -> None:
    crop = torch.zeros(1, 1, 9, 16, 16)
    crop[0, 0, 4] = torch.linspace(0, 1, 16)  # only the middle slice has a left-right ramp
    tile = crop_grid([crop], size=16)[0]
    assert tile.shape == (16, 16)
    assert torch.allclose(tile, torch.linspace(0, 1, 16).expand(16, -1), atol=1e-5)


def test_crop_grid_constant_crop_stays_in_range() -> None:
    grid = crop_grid([torch.full((1, 1, 4, 8, 8), 3.0)], size=8)
    assert torch.isfinite(grid).all() and grid.min() >= 0 and grid.max() <= 1


@pytest.mark.parametrize(("n", "world"), [(7, 2), (9, 4), (3, 4)])
def test_unshard_restores_the_order_of_rank_shares(n: int, world: int) -> None:
    """What all_gather returns from ``rank_share``'s interleaved shares (padded to equal
    counts) goes back to the original items, each once."""
    from medssl.data.pipeline import rank_share
    from medssl.models.knn import unshard

    items = [{"i": i} for i in range(n)]
    gathered = torch.tensor([[float(it["i"]) for it in rank_share(items, r, world)]
                             for r in range(world)])[..., None].expand(-1, -1, 3)
    restored = unshard(gathered, n)
    assert restored.shape == (n, 3)
    assert restored[:, 0].tolist() == list(range(n))


def test_view_agreement_of_identical_swapped_and_shifted_views() -> None:
    a = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    same = view_agreement(a, a)
    assert same["same"].item() == pytest.approx(1.0)
    assert same["top1"].item() == 1.0
    # Pair every volume with another one's view: its own view is never the nearest.
    swapped = view_agreement(a, a.roll(1, dims=0))
    assert swapped["top1"].item() == 0.0
    assert swapped["same"].item() < 0.5
    # A component every volume shares (most of a fresh ViT's output) is centred away.
    shifted = view_agreement(a + 10.0, a.roll(1, dims=0) - 3.0)
    for key in ("same", "other", "top1"):
        assert shifted[key].item() == pytest.approx(swapped[key].item(), abs=1e-5)
    with pytest.raises(ValueError, match="B >= 2"):
        view_agreement(a[:1], a[:1])


def test_view_agreement_by_hand() -> None:
    """Four volumes along the axes of 4-D space; volumes 2 and 3 swap their second views.
    Centred over the batch, e_i - 1/4 has squared norm 3/4 and dot product -1/4 with any
    other e_j - 1/4: cosine 1 with itself and -1/3 with the others (uncentred: 0)."""
    a = torch.eye(4)
    got = view_agreement(a, a[[0, 1, 3, 2]])
    assert got["top1"].item() == pytest.approx(0.5)  # volumes 0 and 1 find their own view
    assert got["same"].item() == pytest.approx((1 + 1 - 1 / 3 - 1 / 3) / 4)
    # The 12 other-volume pairs: 2 at cosine 1 (the swapped views), 10 at -1/3.
    assert got["other"].item() == pytest.approx((2 - 10 / 3) / 12)
