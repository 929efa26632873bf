"""Collapse and representation monitors: k-NN accuracy, entropy, embedding spread, crop grid."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.models.monitors import crop_grid, embedding_std, knn_accuracy, softmax_entropy


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
