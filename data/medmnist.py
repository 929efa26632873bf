"""``medssl-from-medmnist``: a MedMNIST 3D ``.npz`` file as NIfTI volumes plus a cohort CSV.

MedMNIST v2 (Yang et al., Scientific Data 2023) ships each 3D dataset as one ``.npz`` with
``{train,val,test}_images`` (N, D, H, W) uint8 and ``{train,val,test}_labels`` (N, 1). This
writes every volume as ``OUT_DIR/<name>/<split>_<index>.nii.gz`` (1 mm isotropic, identity
affine, so the array reaches the network unchanged) and ``OUT_DIR/<name>.csv`` as
``PatientID,path,fold,label`` with folds ``train``/``val``/``test`` and paths relative to the
CSV, so the folder can be moved as a whole.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from medssl.errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# MedMNIST's patient-level splits: train/val/test; any of them may be absent from a file.


class MedMNISTError(InputError):
    """An ``.npz`` that is not a MedMNIST 3D file; the message names the file and key."""


def read_npz(npz_path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The images and labels of every split in a MedMNIST 3D ``.npz``.

    Returns:
        split -> (images (N, D, H, W), labels (N, K)), for the splits the file holds.

    Raises:
        MedMNISTError: unreadable file, no split, images without labels (or the reverse),
            counts that differ, or images that are not 3D.
    """
    path = Path(npz_path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MedMNISTError(f"{path}: cannot read as .npz ({exc})") from exc
    with npz:
        keys = set(npz.files)
        found = [s for s in SPLITS if f"{s}_images" in keys or f"{s}_labels" in keys]
        if not found:
            raise MedMNISTError(f"{path}: no {'/'.join(SPLITS)}_images keys; it holds "
                                f"{sorted(keys)}")
        out = {}
        for split in found:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in keys:
                    raise MedMNISTError(f"{path}: has {split} data but no '{key}'")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            if images.ndim != 4:
                raise MedMNISTError(
                    f"{path}: '{split}_images' has shape {images.shape}; a MedMNIST 3D file "
                    "holds volumes (N, D, H, W) (2D MedMNIST files are not supported)")
            labels = labels.reshape(len(labels), -1)
            if len(labels) != len(images):
                raise MedMNISTError(f"{path}: {len(images)} {split} images but "
                                    f"{len(labels)} {split} labels")
            out[split] = (images, labels)
    widths = {labels.shape[1] for _, labels in out.values()}
    if len(widths) != 1:
        raise MedMNISTError(f"{path}: label columns differ between splits ({sorted(widths)})")
    return out


def label_columns(n_labels: int) -> list[str]:
    """``label`` for the usual single-label files; ``label_0``.. for multi-label ones."""
    return ["label"] if n_labels == 1 else [f"label_{k}" for k in range(n_labels)]


def convert(npz_path: str | Path, out_dir: str | Path, name: str | None = None,
            workers: int | None = None) -> Path:
    """Write the volumes as NIfTI and the cohort CSV; returns the CSV path.

    Args:
        npz_path: a MedMNIST 3D ``.npz`` (e.g. ``adrenalmnist3d.npz``).
        out_dir: output folder; created if needed, existing files of the same names replaced.
        name: CSV and volume-folder name; defaults to the file's stem.
        workers: threads writing files; default: Python's thread-pool default. Creating
            a file dominates (about 4 ms each), so threads help even on a single core.
    """
    splits = read_npz(npz_path)
    name = name or Path(npz_path).stem
    out_dir = Path(out_dir)
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for split, (images, labels) in splits.items():
        digits = len(str(len(images) - 1))
        for i in range(len(images)):
            pid = f"{split}_{i:0{digits}d}"
            rel = f"{name}/{pid}.nii.gz"
            rows.append([pid, rel, split, *labels[i].tolist()])
            jobs.append((images[i], folder / f"{pid}.nii.gz"))
    affine = np.eye(4)  # 1 mm isotropic, RAS: voxel axes are the npz axes

    def write(job: tuple[np.ndarray, Path]) -> None:
        volume, path = job
        nib.save(nib.Nifti1Image(np.ascontiguousarray(volume), affine), path)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write, jobs))
    n_labels = next(iter(splits.values()))[1].shape[1]
    table = pd.DataFrame(rows, columns=["PatientID", "path", "fold", *label_columns(n_labels)])
    csv_path = out_dir / f"{name}.csv"
    table.to_csv(csv_path, index=False)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    """Convert a MedMNIST 3D .npz file to NIfTI volumes and a medssl cohort CSV."""
    parser = argparse.ArgumentParser(prog="medssl-from-medmnist", description=main.__doc__)
    parser.add_argument("npz", help="MedMNIST 3D file, e.g. adrenalmnist3d.npz")
    parser.add_argument("out_dir", help="output folder for <name>.csv and <name>/*.nii.gz")
    parser.add_argument("--name", help="name of the CSV and volume folder (default: npz stem)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        csv_path = convert(args.npz, args.out_dir, args.name)
    except MedMNISTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = pd.read_csv(csv_path)
    per_fold = table["fold"].value_counts(sort=False)
    counts = ", ".join(f"{n} {split}" for split, n in per_fold.items())
    print(f"{args.npz} -> {csv_path}: {len(table)} volumes ({counts}) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
