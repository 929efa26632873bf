"""Where a preprocessed item came from, as plain tensors, and the way back to the file's grid.

Every dataset item carries ``item["geometry"]``, a dict of plain tensors (so it survives
the memory and disk caches, ``weights_only`` loading and default collation):

===================  =====================================================================
key                  meaning
===================  =====================================================================
``file_affine``      (4, 4) float64: voxel-to-RAS-world affine of the input file's grid as
                     stored (NIfTI: the file's affine; DICOM: the loader's (columns, rows,
                     slices) grid)
``file_shape``       (3,) int64: that grid's shape
``slice_axis``       int64: the stored axis a 2D item was cut along; -1 for volumes
``slice_index``      int64: the slice's index along it; -1 for volumes
``oriented_shape``   (3,) or (2,) int64: after reorientation, before resizing (volumes are
                     reoriented to RAS; a slice's two plane axes are ordered and flipped to
                     point along increasing R, A, S)
``shape``            (3,) or (2,) int64: the preprocessed grid (what the network sees,
                     before random augmentation)
``affine``           (4, 4) float64: voxel-to-world affine of the preprocessed grid (for a
                     slice: plane axes 0 and 1; axis 2 steps to the next stored slice)
===================  =====================================================================

``invert_to_file_grid`` maps an array on the preprocessed grid back to the file's grid,
``slices_to_file_grid`` stacks slice predictions into the file's volume, and
``save_on_file_grid`` writes a NIfTI with the input file's shape and affine. A collated
batch's geometry is split per item with ``monai.data.decollate_batch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medssl.errors import InputError, one_of

GEOMETRY = "geometry"
RESIZE_MODES = ("area", "nearest")
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resize_grid(x: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """Resize a channel-first image or label map; voxel centres stay aligned (no corner pinning).

    Args:
        x: (C, *spatial) with 1 to 3 spatial axes.
        size: output spatial size, one value per spatial axis.
        mode: ``area`` for images: axes that shrink are averaged over the input voxels each
            output voxel covers (no full-volume Gaussian pre-blur, which costs 35-65x more
            from 160x384x384 to 40x224x224), axes that grow are interpolated
            (bi/tri)linearly; ``nearest`` for label maps: each output voxel copies the input
            voxel under its centre (torch's ``nearest-exact``), so values are never blended
            and any dtype is kept.

    Returns:
        (C, *size); float32 for ``area``, the input dtype for ``nearest``.
    """
    mode = one_of("resize mode", mode, RESIZE_MODES)
    size = tuple(int(s) for s in size)
    old = tuple(x.shape[1:])
    if len(size) != len(old) or min(size) < 1:
        raise InputError(f"resize to {size} does not fit an input of spatial shape {old}")
    if size == old:
        return x
    if mode == "nearest":
        for axis, (n_in, n_out) in enumerate(zip(old, size, strict=True)):
            if n_in != n_out:
                # Centre of output voxel j sits at input coordinate (j + 0.5) * n_in / n_out - 0.5.
                index = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out).floor()
                x = x.index_select(axis + 1, index.clamp(max=n_in - 1).long().to(x.device))
        return x
    y = x.float()[None]
    shrunk = tuple(min(a, b) for a, b in zip(old, size, strict=True))
    if shrunk != old:
        y = F.interpolate(y, size=shrunk, mode="area")
    if shrunk != size:
        y = F.interpolate(y, size=size, mode=_LINEAR[len(size)], align_corners=False)
    return y[0]


def resized_affine(affine: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> torch.Tensor:
    """Voxel-to-world affine of a grid resized from ``old`` to ``new`` by ``resize_grid``.

    Only the first ``len(old)`` voxel axes are scaled (a slice's plane axes).
    """
    scale = torch.eye(affine.shape[-1], dtype=torch.float64)
    for axis, (a, b) in enumerate(zip(old, new, strict=True)):
        ratio = a / b
        scale[axis, axis] = ratio
        scale[axis, -1] = (ratio - 1) / 2  # keeps voxel centres aligned
    return affine.to(torch.float64) @ scale


_RAS = nib.orientations.axcodes2ornt("RAS")


def _ras_ornt(file_affine: np.ndarray) -> np.ndarray:
    """File-to-RAS axis transform, exactly as ``medssl.data.io.to_canonical`` applies it."""
    return nib.orientations.ornt_transform(nib.orientations.io_orientation(file_affine), _RAS)


def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    """The transform undoing ``apply_orientation(arr, ornt)``."""
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = [axis, flip]
    return inverse


def plane_ornt(file_affine: np.ndarray, slice_axis: int) -> np.ndarray:
    """(2, 2) transform that turns a stored plane so its axes point along increasing R, A, S.

    The plane is the stored array indexed at one position of ``slice_axis``; its two axes
    are the other stored axes in stored order.
    """
    ornt = nib.orientations.io_orientation(file_affine)
    axes = [a for a in range(3) if a != slice_axis]
    targets = [ornt[a, 0] for a in axes]
    order = np.argsort(targets)  # plane axis order[i] ends up at position i
    out = np.zeros((2, 2))
    for position, axis in enumerate(order):
        out[axis] = [position, ornt[axes[axis], 1]]
    return out


def _tensor_geometry(file_affine: np.ndarray, file_shape: Sequence[int], slice_axis: int,
                     slice_index: int, oriented_shape: Sequence[int],
                     affine: np.ndarray) -> dict[str, torch.Tensor]:
    def ints(v: Sequence[int] | int) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int64)

    return {
        "file_affine": torch.as_tensor(np.asarray(file_affine, dtype=np.float64)),
        "file_shape": ints([int(s) for s in file_shape]),
        "slice_axis": ints(slice_axis),
        "slice_index": ints(slice_index),
        "oriented_shape": ints([int(s) for s in oriented_shape]),
        "shape": ints([int(s) for s in oriented_shape]),
        "affine": torch.as_tensor(np.asarray(affine, dtype=np.float64)),
    }


def volume_geometry(file_affine: np.ndarray, ras_shape: Sequence[int],
                    ras_affine: np.ndarray) -> dict[str, torch.Tensor]:
    """Geometry of a volume loaded by ``medssl.data.io.load_volume`` (RAS, not yet resized).

    Args:
        file_affine: the loader's ``original_affine`` (the grid as stored).
        ras_shape: spatial shape after reorientation to RAS.
        ras_affine: affine after reorientation.
    """
    ornt = _ras_ornt(np.asarray(file_affine, dtype=np.float64))
    file_shape = [int(ras_shape[int(ornt[axis, 0])]) for axis in range(3)]
    return _tensor_geometry(file_affine, file_shape, -1, -1, ras_shape, ras_affine)


def orient_slice(plane: np.ndarray, file_affine: np.ndarray, file_shape: Sequence[int],
                 slice_axis: int, slice_index: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Turn a stored plane (C, A, B) towards increasing R, A, S and describe its geometry.

    Returns:
        the oriented plane (C, U, V) and its geometry (``shape`` = (U, V)).
    """
    ornt = plane_ornt(file_affine, slice_axis)
    moved = np.moveaxis(plane, 0, -1)  # apply_orientation turns the leading axes
    oriented = np.moveaxis(nib.orientations.apply_orientation(moved, ornt), -1, 0)
    # Oriented plane voxel (u, v, w) -> stored plane voxel -> stored volume voxel.
    to_plane = nib.orientations.inv_ornt_aff(ornt, plane.shape[1:])  # 3x3 homogeneous
    to_file = np.zeros((4, 4))
    axes = [a for a in range(3) if a != slice_axis]
    for row, axis in enumerate(axes):
        to_file[axis, [0, 1, 3]] = to_plane[row]
    to_file[slice_axis, 2] = 1.0
    to_file[slice_axis, 3] = slice_index
    to_file[3, 3] = 1.0
    affine = np.asarray(file_affine, dtype=np.float64) @ to_file
    geometry = _tensor_geometry(file_affine, file_shape, slice_axis, slice_index,
                                oriented.shape[1:], affine)
    return np.ascontiguousarray(oriented), geometry


def _as_channel_first(array: np.ndarray | torch.Tensor, spatial: tuple[int, ...],
                      what: str) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    x = x.detach().cpu()
    if tuple(x.shape) == spatial:
        return x[None], False
    if tuple(x.shape[1:]) == spatial:
        return x, True
    raise InputError(f"array of shape {tuple(x.shape)} is not on the {what} grid {spatial} "
                     "(with or without a leading channel axis)")


def invert_to_file_grid(array: np.ndarray | torch.Tensor, geometry: Mapping[str, torch.Tensor],
                        mode: str = "nearest") -> np.ndarray:
    """Map an array on the preprocessed grid back to the input file's grid.

    Args:
        array: (C, *shape) or (*shape) on the grid ``geometry["shape"]``.
        geometry: one item's geometry (not a batch's; see ``decollate_batch``).
        mode: ``nearest`` for label maps (values are copied, never blended); ``area`` for
            images and probabilities (linear where the preprocessing shrank an axis).

    Returns:
        a volume item: (C, *file_shape) or (*file_shape), like the input; a slice item: the
        stored plane, i.e. ``file_shape`` without ``slice_axis``.
    """
    shape = tuple(int(s) for s in geometry["shape"])
    x, channels = _as_channel_first(array, shape, "preprocessed")
    x = resize_grid(x, [int(s) for s in geometry["oriented_shape"]], mode)
    file_affine = geometry["file_affine"].numpy().astype(np.float64)
    slice_axis = int(geometry["slice_axis"])
    ornt = _ras_ornt(file_affine) if slice_axis < 0 else plane_ornt(file_affine, slice_axis)
    moved = np.moveaxis(x.numpy(), 0, -1)
    out = np.moveaxis(nib.orientations.apply_orientation(moved, _invert_ornt(ornt)), -1, 0)
    out = np.ascontiguousarray(out)
    return out if channels else out[0]


def slices_to_file_grid(arrays: Sequence[np.ndarray | torch.Tensor],
                        geometries: Sequence[Mapping[str, torch.Tensor]], mode: str = "nearest",
                        fill: float = 0) -> np.ndarray:
    """Stack slice predictions of one file into a volume on that file's grid.

    Args:
        arrays: per slice, (C, *shape) or (*shape) on its preprocessed grid.
        geometries: the slices' geometries (same file, same ``slice_axis``).
        mode: see ``invert_to_file_grid``.
        fill: value of stored slices that have no prediction.

    Returns:
        (C, *file_shape) or (*file_shape), following the arrays.
    """
    if not arrays or len(arrays) != len(geometries):
        raise InputError(f"need one geometry per slice array, got {len(arrays)} arrays and "
                         f"{len(geometries)} geometries")
    first = geometries[0]
    axis = int(first["slice_axis"])
    file_shape = tuple(int(s) for s in first["file_shape"])
    for g in geometries:
        if int(g["slice_axis"]) < 0:
            raise InputError("slices_to_file_grid got a volume geometry (slice_axis -1)")
        if int(g["slice_axis"]) != axis or tuple(int(s) for s in g["file_shape"]) != file_shape \
                or not torch.equal(g["file_affine"], first["file_affine"]):
            raise InputError("slices_to_file_grid got slices of different files or axes")
    out = None
    for array, g in zip(arrays, geometries, strict=True):
        plane = invert_to_file_grid(array, g, mode)
        if out is None:
            lead = plane.shape[:-2]
            out = np.full((*lead, *file_shape), fill, dtype=plane.dtype)
        index = [slice(None)] * out.ndim
        index[out.ndim - 3 + axis] = int(g["slice_index"])
        out[tuple(index)] = plane
    return out


def _nifti_dtype(array: np.ndarray) -> np.dtype:
    """A NIfTI-friendly dtype: the smallest common integer type that holds the labels."""
    if array.dtype == bool:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return np.dtype(dtype)
        raise InputError(f"label values {lo}..{hi} do not fit a 32-bit NIfTI")
    return np.dtype(np.float32)


def save_on_file_grid(array: np.ndarray | torch.Tensor, geometry: Mapping[str, torch.Tensor],
                      out_path: str | Path, reference: str | Path | None = None) -> None:
    """Write an array on the input file's grid as NIfTI with that file's shape and affine.

    Args:
        array: (*file_shape) or (C, *file_shape), e.g. from ``invert_to_file_grid``;
            several channels are written as a 4D image (channels last).
        geometry: the item's geometry (a volume's, or any slice of the file).
        out_path: ``.nii`` or ``.nii.gz``.
        reference: the input NIfTI file; its header (qform/sform codes, units) is copied so
            the output overlays it exactly. Without it the affine goes into both qform and
            sform (for DICOM input: the loader's grid).
    """
    file_shape = tuple(int(s) for s in geometry["file_shape"])
    x, channels = _as_channel_first(array, file_shape, "file")
    data = x.numpy()
    data = np.moveaxis(data, 0, -1) if channels and data.shape[0] > 1 else data[0]
    data = data.astype(_nifti_dtype(data), copy=False)
    affine = geometry["file_affine"].numpy().astype(np.float64)
    if reference is not None:
        ref = nib.load(str(reference))
        if tuple(ref.shape[:3]) != file_shape or not np.allclose(ref.affine, affine, atol=1e-4):
            raise InputError(f"{reference}: shape {ref.shape[:3]} / affine differ from the "
                             f"geometry's file grid {file_shape}; wrong reference file")
        header = ref.header.copy()
        header.set_data_dtype(data.dtype)
        img = nib.Nifti1Image(data, None, header=header)  # the header's own qform and sform
    else:
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    img.set_data_dtype(data.dtype)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(out_path))
