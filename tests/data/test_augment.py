"""DINO multi-crop augmentation: geometry against independent torch ops, the DINO view recipe,
seeding and argument checks (tiny CPU volumes)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.transforms import AdjustContrast
from scipy import stats

from medssl.data.augment import MultiCropd, RandCropView

GLOBAL_SIZE = (16, 32, 32)
LOCAL_SIZE = (8, 16, 16)
# Every random step off: a view is then pure geometry.
GEOMETRY_ONLY = dict(rotate_prob=0.0, flip_prob=0.0, intensity_scale_prob=0.0, gamma_prob=0.0,
                     noise_prob=0.0, blur_prob=0.0)


def _volume(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 16, 32, 32): a ramp along every axis plus a bright off-centre cube."""
    d, h, w = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 32),
                             torch.linspace(0, 1, 32), indexing="ij")
    x = (0.2 * d + 0.3 * h + 0.5 * w)[None]
    x[:, 3:9, 6:18, 10:22] += 1.0
    return x.to(dtype)


def _multicrop(n_crops: int = 4, seed: int | None = 0, **options: object) -> MultiCropd:
    t = MultiCropd("image", global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE,
                   global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), n_crops=n_crops, **options)
    return t.set_random_state(seed=seed) if seed is not None else t


def _view(size: tuple[int, ...], scale: tuple[float, float] = (1.0, 1.0), seed: int = 0,
          **options: object) -> RandCropView:
    view = RandCropView(size, scale, **{**GEOMETRY_ONLY, **options})
    view.set_random_state(seed=seed)
    return view


# ----- multi-crop output and seeding -----------------------------------------------------
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


def test_metatensor_input_gives_plain_tensors() -> None:
    image = MetaTensor(_volume(), affine=torch.eye(4))
    crops = _multicrop()({"image": image})["crops"]
    assert all(type(c) is torch.Tensor for c in crops)


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


def test_fixed_seed_repeats_per_row() -> None:
    """Validation crops depend only on fixed_seed and the row, not on earlier calls."""
    t = _multicrop(seed=None, fixed_seed=7)
    a1 = t({"image": _volume(), "row": "a.csv line 2"})["crops"]
    b = t({"image": _volume(), "row": "a.csv line 3"})["crops"]
    a2 = t({"image": _volume(), "row": "a.csv line 2"})["crops"]
    other = _multicrop(seed=123, fixed_seed=7)({"image": _volume(), "row": "a.csv line 2"})
    for i in range(4):
        assert torch.equal(a1[i], a2[i]) and torch.equal(a1[i], other["crops"][i])
        assert not torch.equal(a1[i], b[i])


# ----- geometry against independent computations ------------------------------------------
def test_full_scale_view_is_the_volume() -> None:
    x = _volume()
    assert torch.allclose(_view(GLOBAL_SIZE)(x), x, atol=1e-6)


@pytest.mark.parametrize(
    ("sides", "centre", "box"),
    [
        pytest.param([8, 16, 16], [4, 8, 8], np.s_[:, 0:8, 0:16, 0:16], id="corner"),
        pytest.param([8, 16, 16], [12, 24, 16], np.s_[:, 8:16, 16:32, 8:24], id="far-corner"),
        pytest.param([8, 16, 16], [9, 13, 21], np.s_[:, 5:13, 5:21, 13:29], id="inside"),
    ],
)
def test_integer_crop_equals_slicing(sides: list[int], centre: list[int],
                                     box: tuple[slice, ...]) -> None:
    x = torch.rand(2, *GLOBAL_SIZE, generator=torch.Generator().manual_seed(0))
    view = _view(LOCAL_SIZE)
    view.randomize(GLOBAL_SIZE)
    view._draw.update(sides=np.array(sides, float), centre=np.array(centre, float))
    assert torch.allclose(view(x, randomize=False), x[box], atol=1e-6)


@pytest.mark.parametrize("padding_mode", ["border", "zeros", "reflection"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separable_path_equals_grid_sample_then_blur(padding_mode: str, seed: int) -> None:
    """Without rotation, views are built by per-axis matrices; the reference is torch's
    affine_grid + grid_sample followed by MONAI's separable Gaussian filter."""
    x = torch.rand(2, 9, 12, 16, generator=torch.Generator().manual_seed(seed))
    view = _view((8, 10, 12), (0.1, 1.0), seed, flip_prob=0.5, flip_axes=(0, 1, 2),
                 blur_prob=1.0, padding_mode=padding_mode)
    out = view(x)
    linear, offset = view.affine(x.shape[1:])
    theta = np.concatenate([linear[::-1, ::-1], offset[::-1, None]], axis=1)
    grid = F.affine_grid(torch.tensor(theta.copy(), dtype=torch.float32)[None].expand(2, -1, -1),
                         [2, 1, 8, 10, 12], align_corners=False)
    ref = F.grid_sample(x[:, None], grid, padding_mode=padding_mode, align_corners=False)[:, 0]
    kernel = gaussian_1d(torch.tensor(view._draw["sigma"]), approx="erf", normalize=True)
    ref = separable_filtering(ref[None], [kernel] * 3, mode="replicate")[0]
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_quarter_turn_equals_rot90(axis: int) -> None:
    x = torch.rand(1, 6, 6, 6, generator=torch.Generator().manual_seed(axis))
    view = _view((6, 6, 6), rotate_prob=1.0, rotate_deg=90.0)
    view.randomize((6, 6, 6))
    view._draw["angles"] = np.where(np.arange(3) == axis, math.pi / 2, 0.0)
    plane = tuple(d + 1 for d in range(3) if d != axis)
    assert torch.allclose(view(x, randomize=False), torch.rot90(x, -1, plane), atol=1e-5)


@pytest.mark.parametrize(
    ("flip_axes", "allowed"),
    [
        pytest.param((0,), [(), (1,)], id="left-right-only-default"),
        pytest.param((1, 2), [(), (2,), (3,), (2, 3)], id="axes-1-2"),
        pytest.param((), [()], id="no-flips"),
    ],
)
def test_flips_only_along_configured_axes(flip_axes: tuple[int, ...],
                                          allowed: list[tuple[int, ...]]) -> None:
    x = _volume()
    seen = set()
    for seed in range(40):
        out = _view(GLOBAL_SIZE, seed=seed, flip_prob=0.5, flip_axes=flip_axes)(x)
        match = [dims for dims in allowed if torch.allclose(out, x.flip(dims), atol=1e-6)]
        assert len(match) == 1, f"seed {seed}: a flip outside {flip_axes}"
        seen.add(match[0])
    assert seen == set(allowed)


def test_default_flip_is_left_right() -> None:
    assert RandCropView(GLOBAL_SIZE, (0.4, 1.0)).flip_axes == (0,)


@pytest.mark.parametrize(
    ("shape", "scale", "max_ratio"),
    [
        pytest.param((32, 64, 64), (0.05, 0.4), 4 / 3, id="3d-local"),
        pytest.param((40, 224, 224), (0.4, 1.0), 4 / 3, id="3d-global-anisotropic"),
        pytest.param((32, 32, 32), (0.1, 0.5), 2.0, id="3d-ratio-2"),
        pytest.param((64, 96), (0.05, 0.4), 4 / 3, id="2d"),
    ],
)
def test_crop_aspect_ratio_and_fraction_bounds(shape: tuple[int, ...],
                                               scale: tuple[float, float],
                                               max_ratio: float) -> None:
    view = _view(tuple(s // 2 for s in shape), scale, max_aspect_ratio=max_ratio)
    n = np.asarray(shape, float)
    ratios, fractions = [], []
    for _ in range(2000):
        view.randomize(shape)
        sides, centre = view._draw["sides"], view._draw["centre"]
        rel = sides / n  # aspect relative to the volume's proportions
        ratios.append(rel.max() / rel.min())
        fractions.append(np.prod(rel))
        assert (centre - sides / 2 >= -1e-9).all() and (centre + sides / 2 <= n + 1e-9).all()
    ratios, fractions = np.array(ratios), np.array(fractions)
    fallback = np.isclose(fractions, 1.0)
    assert ratios.max() <= max_ratio + 1e-9
    assert ratios.max() > 1 + 0.9 * (max_ratio - 1)  # the whole range is used
    assert (fractions[~fallback] >= scale[0] - 1e-9).all()
    assert (fractions[~fallback] <= scale[1] + 1e-9).all()


def test_2d_aspect_ratio_is_log_uniform_as_torchvision() -> None:
    """Small crops always fit, so the log ratio of the two sides is U(ln 3/4, ln 4/3)."""
    view = _view((8, 8), (0.05, 0.1))
    logs = []
    for _ in range(2000):
        view.randomize((100, 100))
        logs.append(math.log(view._draw["sides"][1] / view._draw["sides"][0]))
    bound = math.log(4 / 3)
    assert stats.kstest(logs, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3


def test_full_scale_falls_back_to_whole_volume() -> None:
    view = _view(LOCAL_SIZE, (1.0, 1.0))
    view.randomize(GLOBAL_SIZE)
    assert np.allclose(view._draw["sides"], GLOBAL_SIZE)


# ----- intensity against independent computations ----------------------------------------
def test_gamma_matches_monai_adjust_contrast() -> None:
    x = _volume()
    view = _view(GLOBAL_SIZE, gamma_prob=1.0)
    out = view(x)
    assert torch.allclose(out, AdjustContrast(gamma=view._draw["gamma"])(x), atol=1e-5)


def test_brightness_is_one_factor_in_range() -> None:
    x = _volume() + 0.5
    factors = []
    for seed in range(30):
        ratio = _view(GLOBAL_SIZE, seed=seed, intensity_scale_prob=1.0)(x) / x
        assert ratio.max() - ratio.min() < 1e-5
        factors.append(ratio.mean().item())
    assert 0.8 - 1e-6 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.2 + 1e-6


def test_noise_std_within_bound() -> None:
    x = _volume()
    stds = [(_view(GLOBAL_SIZE, seed=s, noise_prob=1.0, noise_std=0.1)(x) - x).std().item()
            for s in range(30)]
    assert max(stds) < 0.1 * 1.05 and min(stds) < 0.03  # std drawn in [0, noise_std]


# ----- the DINO view recipe ---------------------------------------------------------------
def _high_frequency_energy(x: torch.Tensor) -> float:
    """Sum of squared finite differences along every spatial axis."""
    return sum(x.diff(dim=d).pow(2).sum().item() for d in range(1, x.ndim))


def _small_multicrop(n_crops: int, **options: object) -> MultiCropd:
    """Equally seeded multi-crop on an (8, 16, 16) grid, noise off so views compare exactly."""
    t = MultiCropd("image", global_size=(8, 16, 16), local_size=(4, 8, 8),
                   global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), n_crops=n_crops,
                   noise_prob=0.0, **options)
    return t.set_random_state(seed=0)


def _twin_crops(n_draws: int, n_crops: int,
                **twin_options: object) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Pairs of views from two multi-crops that differ only in ``twin_options``.

    Views draw the same random values whatever the probabilities, so equally seeded twins
    share everything except the switched augmentation.
    """
    a, b = _small_multicrop(n_crops), _small_multicrop(n_crops, **twin_options)
    x = _volume()[:, ::2, ::2, ::2]
    for _ in range(n_draws):
        yield zip(a({"image": x})["crops"], b({"image": x})["crops"], strict=True)


def test_global_view_1_always_blurred_with_high_frequency_drop() -> None:
    for draw, pairs in enumerate(_twin_crops(40, 2, global_blur_prob=(0.0, 0.1))):
        blurred, sharp = next(pairs)
        assert _high_frequency_energy(blurred) < 0.95 * _high_frequency_energy(sharp), draw


def test_blur_rates_per_view() -> None:
    """DINO: global 1 always, global 2 with 0.1, local views with 0.5."""
    n = 200
    differs = np.array([[not torch.allclose(a, b, atol=1e-6) for a, b in pairs]
                        for pairs in _twin_crops(n, 3, global_blur_prob=(0.0, 0.0),
                                                 local_blur_prob=0.0)])
    rates = differs.mean(0)
    assert rates[0] == 1.0
    # binomial: 3.5 standard deviations either side
    for rate, p in ((rates[1], 0.1), (rates[2], 0.5)):
        assert abs(rate - p) < 3.5 * math.sqrt(p * (1 - p) / n), (rate, p)


def test_inversion_only_in_global_view_2_at_its_rate() -> None:
    n = 200
    inverted = np.zeros((n, 3), bool)
    for draw, pairs in enumerate(_twin_crops(n, 3, global_invert_prob=(0.0, 0.0))):
        for i, (a, b) in enumerate(pairs):
            inverted[draw, i] = torch.allclose(a, b.min() + b.max() - b, atol=1e-5)
            assert inverted[draw, i] or torch.allclose(a, b, atol=1e-6)
    assert not inverted[:, 0].any() and not inverted[:, 2].any()
    assert abs(inverted[:, 1].mean() - 0.2) < 3.5 * math.sqrt(0.2 * 0.8 / n)


# ----- argument checks --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param(dict(scale=(0.5, 0.2)), "crop scale", id="min-above-max"),
        pytest.param(dict(scale=(0.0, 1.0)), "crop scale", id="zero-min"),
        pytest.param(dict(scale=(-0.1, 0.5)), "crop scale", id="negative-min"),
        pytest.param(dict(scale=(0.2, 1.5)), "crop scale", id="max-above-one"),
        pytest.param(dict(max_aspect_ratio=0.75), "max_aspect_ratio", id="ratio-below-1"),
        pytest.param(dict(flip_axes=(3,)), "flip_axes", id="flip-axis-out-of-range"),
        pytest.param(dict(flip_axes=(0, 0)), "flip_axes", id="flip-axis-twice"),
        pytest.param(dict(rotate_deg=(10, 10)), "rotate_deg", id="two-angles-3d"),
        pytest.param(dict(rotate_deg=-5), "rotate_deg", id="negative-angle"),
        pytest.param(dict(blur_prob=1.5), "blur_prob", id="probability-above-1"),
        pytest.param(dict(gamma=(0.0, 1.5)), "gamma", id="zero-gamma"),
        pytest.param(dict(blur_sigma=(1.0, 0.5)), "blur_sigma", id="sigma-min-above-max"),
        pytest.param(dict(intensity_scale=1.0), "intensity_scale", id="scale-1"),
        pytest.param(dict(noise_std=-0.1), "noise_std", id="negative-noise"),
        pytest.param(dict(padding_mode="wrap"), "wrap", id="unknown-padding"),
        pytest.param(dict(size=(8, 8, 8, 8)), "size", id="4d-size"),
    ],
)
def test_view_rejects_bad_arguments(options: dict, match: str) -> None:
    kwargs = {"size": LOCAL_SIZE, "scale": (0.05, 0.4), **options}
    with pytest.raises(ValueError, match=match):
        RandCropView(**kwargs)


def test_view_rejects_wrong_input_rank() -> None:
    with pytest.raises(ValueError, match="spatial axes"):
        _view(LOCAL_SIZE)(torch.zeros(1, 8, 8))


@pytest.mark.parametrize(
    "n_crops",
    [pytest.param(1, id="one-crop"), pytest.param(0, id="no-crops")],
)
def test_fewer_crops_than_globals_rejected(n_crops: int) -> None:
    with pytest.raises(ValueError, match="n_crops"):
        _multicrop(n_crops=n_crops, seed=None)


def test_one_blur_probability_per_global_view() -> None:
    with pytest.raises(ValueError, match="global_blur_prob"):
        _multicrop(seed=None, global_blur_prob=(1.0,))


def test_2d_views() -> None:
    t = MultiCropd("image", global_size=(16, 16), local_size=(8, 8), global_scale=(0.4, 1.0),
                   local_scale=(0.05, 0.4), n_crops=4).set_random_state(seed=0)
    crops = t({"image": _volume()[:, 0]})["crops"]
    assert [tuple(c.shape) for c in crops] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 2
