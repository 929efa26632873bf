"""DINO multi-crop augmentation: shapes, types, seeding and argument checks (tiny CPU volumes)."""

from __future__ import annotations

import pytest
import torch

from medssl.data.augment import MultiCropd, crop_views

GLOBAL_SIZE = (16, 32, 32)
LOCAL_SIZE = (8, 16, 16)


def _volume(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 16, 32, 32): a ramp along every axis plus a bright off-centre cube."""
    d, h, w = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 32),
                             torch.linspace(0, 1, 32), indexing="ij")
    x = (0.2 * d + 0.3 * h + 0.5 * w)[None]
    x[:, 3:9, 6:18, 10:22] += 1.0
    return x.to(dtype)


def _multicrop(n_crops: int = 4, seed: int | None = 0) -> MultiCropd:
    t = MultiCropd("image", global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE,
                   global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), n_crops=n_crops)
    return t.set_random_state(seed=seed) if seed is not None else t


@pytest.mark.parametrize(
    ("n_crops", "dtype"),
    [
        pytest.param(2, torch.float32, id="globals-only"),
        pytest.param(4, torch.float32, id="two-locals"),
        pytest.param(6, torch.float64, id="four-locals-float64-input"),
    ],
)
def test_output_crops(n_crops: int, dtype: torch.dtype) -> None:
    out = _multicrop(n_crops)({"image": _volume(dtype), "label": 3})
    assert "image" not in out
    assert out["label"] == 3
    crops = out["crops"]
    assert isinstance(crops, list) and len(crops) == n_crops
    for i, crop in enumerate(crops):
        assert type(crop) is torch.Tensor, f"crop {i} is {type(crop).__name__}"
        assert crop.dtype == torch.float32
        assert crop.is_contiguous()
        expected = GLOBAL_SIZE if i < 2 else LOCAL_SIZE
        assert tuple(crop.shape) == (1, *expected), f"crop {i}"
        assert torch.isfinite(crop).all()
        assert crop.std() > 0, f"crop {i} is constant"


def test_same_seed_gives_identical_crops() -> None:
    first = _multicrop(seed=0)({"image": _volume()})["crops"]
    second = _multicrop(seed=0)({"image": _volume()})["crops"]
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"crop {i} differs under the same seed"


def test_different_seed_gives_different_crops() -> None:
    first = _multicrop(seed=0)({"image": _volume()})["crops"]
    second = _multicrop(seed=1)({"image": _volume()})["crops"]
    assert all(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_seeded_stream_continues_across_calls() -> None:
    """A seeded instance draws new views on each call, reproducibly."""
    t = _multicrop(seed=0)
    call_1, call_2 = t({"image": _volume()})["crops"], t({"image": _volume()})["crops"]
    assert not torch.equal(call_1[0], call_2[0])
    again = _multicrop(seed=0)
    again({"image": _volume()})
    assert torch.equal(again({"image": _volume()})["crops"][0], call_2[0])


def test_views_of_one_call_are_independent() -> None:
    crops = _multicrop(n_crops=4, seed=0)({"image": _volume()})["crops"]
    assert not torch.equal(crops[0], crops[1])
    assert not torch.equal(crops[2], crops[3])


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param((0.5, 0.2), id="min-above-max"),
        pytest.param((0.0, 1.0), id="zero-min"),
        pytest.param((-0.1, 0.5), id="negative-min"),
        pytest.param((0.2, 1.5), id="max-above-one"),
    ],
)
def test_crop_views_rejects_bad_scale(scale: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="crop scale"):
        crop_views(LOCAL_SIZE, scale)


def test_crop_views_full_scale_keeps_size() -> None:
    view = crop_views(GLOBAL_SIZE, (1.0, 1.0))
    view.set_random_state(seed=0)
    assert tuple(view(_volume()).shape) == (1, *GLOBAL_SIZE)


@pytest.mark.parametrize(
    "n_crops",
    [pytest.param(1, id="one-crop"), pytest.param(0, id="no-crops")],
)
def test_fewer_crops_than_globals_rejected(n_crops: int) -> None:
    with pytest.raises(ValueError, match="n_crops"):
        _multicrop(n_crops=n_crops, seed=None)
