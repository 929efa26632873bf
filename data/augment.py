"""DINO multi-crop augmentation for volumes: one affine resample per view, intensity ops in torch.

Each view is cut, resized, rotated and flipped by a single ``grid_sample`` straight to the
output size (instead of crop, resize, then a second interpolation to rotate), then jittered in
intensity with plain torch ops. The recipe follows facebookresearch/dino ``main_dino.py``
``DataAugmentationDINO``: two global views that differ (one always blurred; the other rarely
blurred but sometimes inverted, standing in for solarisation) and local views blurred half the
time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers import gaussian_1d
from monai.transforms import MapTransform, Randomizable, Transform

from medssl.errors import InputError, one_of

PADDING_MODES = ("border", "zeros", "reflection")
# torchvision RandomResizedCrop: tries this many random crops before falling back to the whole
# image; kept so the scale/aspect distribution matches DINO's on 2D inputs.
CROP_ATTEMPTS = 10
_GAMMA_EPS = 1e-7  # as MONAI AdjustContrast: keeps constant crops finite


def _pair(name: str, value: Sequence[float], low: float, high: float,
          low_open: bool = False) -> tuple[float, float]:
    """Validate a (min, max) range inside [low, high] (``low`` excluded when ``low_open``)."""
    lo, hi = (float(v) for v in value)
    above = lo > low if low_open else lo >= low
    if not (above and lo <= hi <= high):
        bound = "<" if low_open else "<="
        raise InputError(f"{name} must satisfy {low} {bound} min <= max <= {high}, "
                         f"got {list(value)}")
    return lo, hi


def _prob(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix in voxel-axis order: about axis 0, then 1, then 2 (3D), or in-plane (2D)."""
    if angles.size == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]  # the plane rotated about ``axis``
        step = np.eye(3)
        c, s = math.cos(angle), math.sin(angle)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rot = rot @ step
    return rot


class RandCropView(Randomizable, Transform):
    """One random view of a channel-first volume (C, *spatial) -> float32 (C, *size).

    Geometry (DINO's RandomResizedCrop and flip, plus a small rotation), in one resample:
    the crop holds a volume fraction drawn uniformly from ``scale``; its side lengths, relative
    to the volume's shape, keep every pairwise aspect ratio within
    [1/``max_aspect_ratio``, ``max_aspect_ratio``] (log-uniform; on 2D inputs exactly
    torchvision's rule); it lies inside the volume, drawn with torchvision's 10 attempts and
    whole-volume fallback. Rotation is about the crop centre, in voxel units (on anisotropic
    grids that is stronger across thick slices: lower that axis pair's angle).

    Then, in this order: Gaussian blur (one sigma for all axes, in output voxels; folded into
    the resampling when there is no rotation), brightness scale, gamma contrast (MONAI
    ``RandAdjustContrast``'s formula), Gaussian noise (std drawn in [0, ``noise_std``] as MONAI
    ``RandGaussianNoise``; after the blur, as acquisition noise would be), and an inversion
    ``min + max - x`` per channel (DINO's solarisation stand-in).

    Every call draws the same number of random values whatever the probabilities, so two views
    that differ only in a probability, seeded alike, share all other draws.

    Args:
        size: output spatial size (2 or 3 axes).
        scale: (min, max) fraction of the volume covered by the crop, in (0, 1].
        max_aspect_ratio: largest ratio between two crop sides (relative to the volume's
            shape); DINO: 4/3. 1 keeps the volume's proportions.
        flip_axes: spatial axes that may be flipped (RAS: 0 is left-right). Flipping
            anterior-posterior or up-down makes features blind to those directions.
        flip_prob: probability of flipping, per axis in ``flip_axes``.
        rotate_deg: largest rotation (degrees) about each axis (one value, or one per axis in
            3D; one angle in 2D). 0 disables.
        rotate_prob: probability of rotating.
        intensity_scale: brightness factor drawn in [1 - s, 1 + s].
        intensity_scale_prob: probability of the brightness change.
        gamma: (min, max) gamma of the contrast change; 1 is identity.
        gamma_prob: probability of the contrast change.
        noise_std: largest Gaussian noise std (images scaled to [0, 1]).
        noise_prob: probability of adding noise.
        blur_sigma: (min, max) Gaussian blur sigma in output voxels.
        blur_prob: probability of blurring.
        invert_prob: probability of the intensity inversion.
        padding_mode: ``grid_sample`` padding where a rotated crop leaves the volume.
    """

    def __init__(self, size: Sequence[int], scale: Sequence[float],
                 max_aspect_ratio: float = 4 / 3, flip_axes: Sequence[int] = (0,),
                 flip_prob: float = 0.5, rotate_deg: float | Sequence[float] = 10.0,
                 rotate_prob: float = 0.5, intensity_scale: float = 0.2,
                 intensity_scale_prob: float = 0.8, gamma: Sequence[float] = (0.7, 1.5),
                 gamma_prob: float = 0.5, noise_std: float = 0.03, noise_prob: float = 0.5,
                 blur_sigma: Sequence[float] = (0.25, 1.0), blur_prob: float = 0.5,
                 invert_prob: float = 0.0, padding_mode: str = "border") -> None:
        self.size = tuple(int(s) for s in size)
        ndim = len(self.size)
        if ndim not in (2, 3) or min(self.size) < 1:
            raise InputError(f"size must be 2 or 3 positive sizes, got {list(size)}")
        self.scale = _pair("crop scale", scale, 0.0, 1.0, low_open=True)
        if not max_aspect_ratio >= 1.0:
            raise InputError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
        self.log_aspect = math.log(max_aspect_ratio)
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if len(set(self.flip_axes)) != len(self.flip_axes) or any(
                not 0 <= a < ndim for a in self.flip_axes):
            raise InputError(f"flip_axes must be distinct spatial axes in [0, {ndim - 1}], "
                             f"got {list(flip_axes)}")
        n_angles = 3 if ndim == 3 else 1
        angles = np.atleast_1d(np.asarray(rotate_deg, dtype=float))
        if angles.size == 1:
            angles = np.repeat(angles, n_angles)
        if angles.size != n_angles or (angles < 0).any() or (angles > 180).any():
            raise InputError(f"rotate_deg must be one angle or {n_angles} angles in [0, 180] "
                             f"for {ndim}D views, got {rotate_deg}")
        self.rotate_rad = np.deg2rad(angles)
        if not 0.0 <= intensity_scale < 1.0:
            raise InputError(f"intensity_scale must be in [0, 1), got {intensity_scale}")
        if noise_std < 0:
            raise InputError(f"noise_std must be >= 0, got {noise_std}")
        self.intensity_scale, self.noise_std = float(intensity_scale), float(noise_std)
        self.gamma = _pair("gamma", gamma, 0.0, math.inf, low_open=True)
        self.blur_sigma = _pair("blur_sigma", blur_sigma, 0.0, math.inf, low_open=True)
        self.probs = {name: _prob(name, p) for name, p in (
            ("flip_prob", flip_prob), ("rotate_prob", rotate_prob),
            ("intensity_scale_prob", intensity_scale_prob), ("gamma_prob", gamma_prob),
            ("noise_prob", noise_prob), ("blur_prob", blur_prob), ("invert_prob", invert_prob))}
        self.padding_mode = one_of("padding_mode", padding_mode, PADDING_MODES)
        self._draw: dict = {}

    # ----- randomness: a fixed number of draws per call ----------------------------------
    def randomize(self, shape: Sequence[int]) -> None:
        """Draw the crop for a volume of spatial ``shape`` and every other random value."""
        ndim, R = len(self.size), self.R
        fractions = R.uniform(*self.scale, size=CROP_ATTEMPTS)
        # Log side lengths relative to axis 0, uniform over the shapes whose pairwise ratios
        # all stay within the bound (rejection below); in 2D that is torchvision's log-uniform
        # aspect ratio.
        logs = R.uniform(-self.log_aspect, self.log_aspect, size=(CROP_ATTEMPTS, ndim - 1))
        position = R.uniform(size=ndim)
        n = np.asarray(shape, dtype=float)
        sides = n  # fallback: the whole volume
        for fraction, rel in zip(fractions, logs, strict=True):
            log_sides = np.concatenate([[0.0], rel])
            if np.ptp(log_sides) > self.log_aspect + 1e-12:
                continue
            log_sides -= log_sides.mean()  # the sides' product stays the volume fraction
            candidate = n * fraction ** (1 / ndim) * np.exp(log_sides)
            if (candidate <= n).all():
                sides = candidate
                break
        centre = sides / 2 + position * (n - sides)
        flip_draws = R.uniform(size=ndim) < self.probs["flip_prob"]
        angles = R.uniform(-1.0, 1.0, size=self.rotate_rad.size) * self.rotate_rad
        values = {
            "intensity": 1.0 + R.uniform(-self.intensity_scale, self.intensity_scale),
            "gamma": R.uniform(*self.gamma),
            "noise_std": R.uniform(0.0, self.noise_std),
            "sigma": R.uniform(*self.blur_sigma),
        }
        noise_seed = int(R.randint(0, 2**31 - 1))
        names = ("rotate", "intensity", "gamma", "noise_std", "sigma", "invert")
        probs = ("rotate_prob", "intensity_scale_prob", "gamma_prob", "noise_prob", "blur_prob",
                 "invert_prob")
        apply = dict(zip(names, R.uniform(size=len(names)) < [self.probs[p] for p in probs],
                         strict=True))
        self._draw = {
            "sides": sides, "centre": centre, "noise_seed": noise_seed,
            "flips": np.array([bool(flip_draws[a]) and a in self.flip_axes for a in range(ndim)]),
            "angles": angles if apply["rotate"] else np.zeros_like(angles),
            "invert": bool(apply["invert"]),
        }
        self._draw |= {k: (v if apply[k] else None) for k, v in values.items()}

    def affine(self, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The drawn view as a map from output to input normalised coordinates, v = A u + b.

        Output voxel q (from the output centre) samples input voxel
        p = centre + R @ diag(sides / size) @ flip @ q; with ``align_corners=False`` both
        grids' edges sit at -1 and 1, so A = diag(1/n) R diag(sides * flip) and
        b = 2 centre / n - 1 (tensor-axis order, not grid_sample's reversed one).
        """
        d = self._draw
        n = np.asarray(shape, dtype=float)
        signs = np.where(d["flips"], -1.0, 1.0)
        linear = np.diag(1 / n) @ _rotation(d["angles"]) @ np.diag(d["sides"] * signs)
        return linear, 2 * d["centre"] / n - 1

    def _sampling_grid(self, shape: Sequence[int]) -> torch.Tensor:
        """``grid_sample`` grid (1, *size, ndim) of the drawn view, built by broadcasting
        (several times faster than ``affine_grid``'s batched matmul on CPU)."""
        linear, offset = (torch.as_tensor(a, dtype=torch.float32) for a in self.affine(shape))
        coords = [(torch.arange(m, dtype=torch.float32) * 2 + 1) / m - 1 for m in self.size]
        ndim = len(self.size)
        grid = torch.empty(*self.size, ndim)
        for k in range(ndim):  # grid channel k is tensor axis ndim - 1 - k
            row = ndim - 1 - k
            terms = [linear[row, j] * coords[j].view([-1 if i == j else 1 for i in range(ndim)])
                     for j in range(ndim)]
            grid[..., k] = sum(terms[1:], terms[0]) + offset[row]
        return grid[None]

    def _axis_matrices(self, shape: Sequence[int]) -> list[torch.Tensor]:
        """Per-axis (size_k, shape_k) matrices doing the drawn crop, flip and linear
        interpolation without rotation: trilinear sampling is separable, so three small
        matrix products replace ``grid_sample`` (same values, several times faster)."""
        d = self._draw
        mats = []
        for k, (m, n) in enumerate(zip(self.size, shape, strict=True)):
            u = (np.arange(m) * 2 + 1) / m - 1
            if d["flips"][k]:
                u = -u
            p = d["centre"][k] + u * d["sides"][k] / 2 - 0.5  # input voxel index
            lo = np.floor(p).astype(int)
            w = p - lo
            mat = np.zeros((m, n))
            for idx, weight in ((lo, 1 - w), (lo + 1, w)):
                inside = (idx >= 0) & (idx < n)
                if self.padding_mode == "zeros":  # out-of-range neighbours count as 0
                    np.add.at(mat, (np.arange(m)[inside], idx[inside]), weight[inside])
                else:  # within half a voxel of the edge, border and reflection both clamp
                    np.add.at(mat, (np.arange(m), idx.clip(0, n - 1)), weight)
            mats.append(mat)
        return mats

    def _blur_matrices(self) -> list[np.ndarray]:
        """Per-axis (size_k, size_k) Gaussian blur matrices, replicating the edges."""
        # erf: the kernel integrates the Gaussian over each voxel, so small sigmas still blur
        kernel = gaussian_1d(torch.tensor(self._draw["sigma"]), approx="erf",
                             normalize=True).double().numpy()
        radius = kernel.size // 2
        mats = []
        for m in self.size:
            mat = np.zeros((m, m))
            rows = np.arange(m)
            for t, weight in enumerate(kernel):
                np.add.at(mat, (rows, (rows + t - radius).clip(0, m - 1)), weight)
            mats.append(mat)
        return mats

    # ----- the view ----------------------------------------------------------------------
    def __call__(self, image: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """A view of ``image`` (C, *spatial), as a plain contiguous float32 tensor (C, *size)."""
        x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        x = x.float()
        shape = tuple(x.shape[1:])
        if len(shape) != len(self.size):
            raise InputError(f"expected a (C, {len(self.size)} spatial axes) volume for view "
                             f"size {list(self.size)}, got shape {tuple(x.shape)}")
        if randomize:
            self.randomize(shape)
        d = self._draw
        blur = self._blur_matrices() if d["sigma"] is not None else None
        if d["angles"].any():
            # Channels become the batch so each is sampled alike; one resample to the output.
            grid = self._sampling_grid(shape).to(x.device)
            x = F.grid_sample(x[:, None], grid.expand(x.shape[0], *[-1] * (len(shape) + 1)),
                              mode="bilinear", padding_mode=self.padding_mode,
                              align_corners=False)[:, 0]
            mats = blur
        else:
            mats = self._axis_matrices(shape)
            if blur is not None:  # blur folds into the resampling: still one pass
                mats = [b @ m for b, m in zip(blur, mats, strict=True)]
        if mats is not None:
            x = _apply_along_axes(x, mats)
        if d["intensity"] is not None:
            x = x * d["intensity"]
        dims = tuple(range(1, x.ndim))
        if d["gamma"] is not None:
            lo = x.amin(dim=dims, keepdim=True)
            span = x.amax(dim=dims, keepdim=True) - lo
            x = ((x - lo) / (span + _GAMMA_EPS)).pow(d["gamma"]) * span + lo
        if d["noise_std"] is not None:
            gen = torch.Generator().manual_seed(d["noise_seed"])
            x = x + d["noise_std"] * torch.randn(x.shape, generator=gen).to(x.device)
        if d["invert"]:
            x = x.amin(dim=dims, keepdim=True) + x.amax(dim=dims, keepdim=True) - x
        return x.contiguous()


def _apply_along_axes(x: torch.Tensor, mats: Sequence[np.ndarray]) -> torch.Tensor:
    """Multiply x (C, *S) along each spatial axis k by mats[k] (m_k, S_k) -> (C, *m), on
    x's device (the matrices are found on the host: no device syncs)."""
    # Only the input columns a matrix uses are read: local crops touch a fraction of the volume.
    narrowed = []
    for k, mat in enumerate(mats):
        used = np.flatnonzero(np.abs(mat).sum(0))
        lo, hi = int(used.min()), int(used.max()) + 1
        x = x.narrow(k + 1, lo, hi - lo)
        narrowed.append(torch.as_tensor(mat[:, lo:hi], dtype=torch.float32, device=x.device))
    mats = narrowed
    for k, mat in enumerate(mats):
        dim = k + 1
        if dim == x.ndim - 1:
            x = x @ mat.T
        else:
            shape = x.shape
            x = (mat @ x.reshape(*shape[:dim + 1], -1)).reshape(
                *shape[:dim], mat.shape[0], *shape[dim + 1:])
    return x


class MultiCropd(Randomizable, MapTransform):
    """Replace ``image`` (C, *spatial) with ``crops``: ``n_global`` global then local views.

    Every view has its own ``RandCropView`` and random state, so views of one volume are
    independent draws. Global view i is blurred with ``global_blur_prob[i]`` and inverted with
    ``global_invert_prob[i]`` (DINO: 1.0/0.0 and 0.1/0.2); local views with ``local_blur_prob``
    and ``local_invert_prob``. With ``fixed_seed`` the views of a sample are re-seeded from it
    and the sample's ``row`` on every call: validation then sees the same crops each epoch, so
    ``val_dino_loss`` is comparable across epochs.

    Args:
        keys: the image key (replaced by ``out_key``).
        global_size, local_size: output spatial sizes of the views.
        global_scale, local_scale: (min, max) volume fraction of each crop (DINO: 0.4-1 and
            0.05-0.4; its convnet recipe: 0.14-1 and 0.05-0.14).
        n_crops: views per sample, globals included.
        n_global: global views (the first ones).
        out_key: key of the list of views.
        fixed_seed: re-seed per sample (validation); None draws freely.
        global_blur_prob, global_invert_prob: one probability per global view.
        local_blur_prob, local_invert_prob: probabilities for every local view.
        **view_options: shared ``RandCropView`` arguments (flip, rotation, intensity, noise,
            blur sigma, aspect ratio, padding).
    """

    def __init__(self, keys: KeysCollection, global_size: Sequence[int],
                 local_size: Sequence[int], global_scale: Sequence[float],
                 local_scale: Sequence[float], n_crops: int, n_global: int = 2,
                 out_key: str = "crops", fixed_seed: int | None = None,
                 global_blur_prob: Sequence[float] = (1.0, 0.1),
                 global_invert_prob: Sequence[float] = (0.0, 0.2),
                 local_blur_prob: float = 0.5, local_invert_prob: float = 0.0,
                 **view_options: object) -> None:
        MapTransform.__init__(self, keys)
        if n_crops < n_global:
            raise InputError(f"n_crops ({n_crops}) must be at least the {n_global} global crops")
        for name, probs in (("global_blur_prob", global_blur_prob),
                            ("global_invert_prob", global_invert_prob)):
            if len(probs) != n_global:
                raise InputError(f"{name} needs one probability per global view ({n_global}), "
                                 f"got {list(probs)}")
        self.out_key, self.fixed_seed = out_key, fixed_seed
        self.views = [
            RandCropView(global_size, global_scale, blur_prob=blur, invert_prob=invert,
                         **view_options)
            for blur, invert in zip(global_blur_prob, global_invert_prob, strict=True)
        ]
        self.views += [
            RandCropView(local_size, local_scale, blur_prob=local_blur_prob,
                         invert_prob=local_invert_prob, **view_options)
            for _ in range(n_crops - n_global)
        ]

    def set_random_state(self, seed: int | None = None,
                         state: np.random.RandomState | None = None) -> MultiCropd:
        super().set_random_state(seed, state)
        for view in self.views:
            view.set_random_state(seed=int(self.R.randint(0, 2**31 - 1)))
        return self

    def randomize(self, data: object = None) -> None:  # each view draws its own randomness
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.fixed_seed is not None:
            base = self.fixed_seed + zlib.crc32(str(d.get("row", "")).encode())
            for i, view in enumerate(self.views):
                view.set_random_state(seed=(base + i) % 2**31)
        for key in self.key_iterator(d):
            image = d.pop(key)
            d[self.out_key] = [view(image) for view in self.views]
        return d
