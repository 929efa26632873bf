"""Preprocessing through the real pipeline, and an epoch served from the disk cache vs one
that decodes DICOM.

    python bench/preprocess.py          # 80x256x256 -> [40,224,224], 4-volume epochs (~1 min)
    python bench/preprocess.py --full   # 160x384x384 (the OAI knee size) -> [40,224,224]

Part 1, per format (a generated sagittal DICOM series, one file per slice, and the same
volume as a gzipped int16 NIfTI): the bare read (pydicom ``dcmread`` loop + ``np.stack``, or
``nibabel`` ``get_fdata``), our loading step alone (``LoadItemd``), and the whole
deterministic preprocessing (``preprocessing_transforms``: load, RAS, percentile scaling,
area resize to ``resize_to``), so the table shows what resizing and scaling add.

Part 2: datasets from ``build_dataset`` over a cohort of copies of that series (each its own
folder, so each is its own cache entry), one epoch each: ``cache=none`` (decode every DICOM
file every epoch), ``cache=disk`` filling its cache (first epoch) and served from it, and
``cache=memory`` after filling. Runs alternate in one process after one warm-up each (files
in the page cache) and the table gives medians and the ratio of the fastest runs, which is the
least disturbed by other load on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.transforms import Compose

from medssl.data.demo import DemoSpec, write_dicom_series
from medssl.data.io import load_volume
from medssl.data.pipeline import IMAGE, Preprocessing, build_dataset, preprocessing_transforms
from medssl.data.transforms import LoadItemd


def generate(folder: Path, slices: int, size: int) -> tuple[Path, Path]:
    """An uncompressed sagittal MR-like DICOM series and the same volume as .nii.gz."""
    rng = np.random.default_rng(0)
    spec = DemoSpec(n_subjects=1, rows=size, columns=size, slices=slices,
                    pixel_spacing=0.36, slice_step=0.7)
    raw = rng.integers(0, 4096, (size, size, slices), dtype=np.uint16)
    series = folder / "dicom"
    write_dicom_series(series, raw, 1.0, 0.0, np.zeros(3), spec, "BENCH", rng)
    volume = load_volume(series)
    nifti = folder / "image.nii.gz"
    nib.save(nib.Nifti1Image(volume.array[0].astype(np.int16), volume.affine), nifti)
    return series, nifti


def bare_dicom(folder: Path) -> np.ndarray:
    return np.stack([pydicom.dcmread(f).pixel_array for f in sorted(folder.iterdir())])


def bare_nifti(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def time_runs(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each function once to warm up, then ``repeats`` alternating timed rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def row(label: str, times: list[float], base: list[float], speedup: bool = False) -> str:
    """Median seconds, then time/base ratios of medians and of fastest runs (base/time when
    ``speedup``)."""
    ratios = [statistics.median(times) / statistics.median(base), min(times) / min(base)]
    if speedup:
        ratios = [1 / r for r in ratios]
    return (f"| {label} | {statistics.median(times):.4f} | {ratios[0]:.2f}x | "
            f"{ratios[1]:.2f}x |")


def part1(series: Path, nifti: Path, settings: Preprocessing, repeats: int) -> None:
    load = LoadItemd([IMAGE])
    full = Compose(preprocessing_transforms(settings))
    out = full({IMAGE: str(series), "row": "bench"})[IMAGE]
    print(f"\nPart 1: one volume -> {list(out.shape[1:])} "
          f"(median of {repeats}; ratios to the bare read of the same format)\n")
    print("| step | median s | ratio of medians | ratio of fastest runs |")
    print("|---|---|---|---|")
    for fmt, path, bare in (("DICOM", series, bare_dicom), ("NIfTI .nii.gz", nifti, bare_nifti)):
        times = time_runs({
            "bare": lambda p=path, b=bare: b(p),
            "load": lambda p=path: load({IMAGE: str(p), "row": "bench"}),
            "full": lambda p=path: full({IMAGE: str(p), "row": "bench"}),
        }, repeats)
        print(row(f"{fmt}: bare read", times["bare"], times["bare"]))
        print(row(f"{fmt}: our load (LoadItemd)", times["load"], times["bare"]))
        print(row(f"{fmt}: load + scale + resize", times["full"], times["bare"]))
        added = [f - ld for f, ld in zip(times["full"], times["load"], strict=True)]
        print(f"| {fmt}: scale + resize alone (difference) | {statistics.median(added):.3f} "
              f"| | |", flush=True)


def part2(series: Path, root: Path, settings: Preprocessing, n_volumes: int,
          repeats: int) -> None:
    copies = []
    for k in range(n_volumes):
        copy = root / f"copy{k}"
        shutil.copytree(series, copy)
        copies.append({IMAGE: str(copy), "row": f"row {k}"})
    steps = preprocessing_transforms(settings)
    datasets = {
        "none": build_dataset(copies, steps, settings, "none"),
        "memory": build_dataset(copies, steps, settings, "memory"),  # filled when built
    }
    cache_dir = root / "cache"
    fill_times = []

    def disk_fill() -> None:
        shutil.rmtree(cache_dir, ignore_errors=True)
        start = time.perf_counter()
        epoch(build_dataset(copies, steps, settings, "disk", cache_dir))
        fill_times.append(time.perf_counter() - start)

    def epoch(ds: object) -> None:
        for i in range(len(ds)):  # type: ignore[arg-type]
            ds[i]  # type: ignore[index]

    disk_fill()
    datasets["disk"] = build_dataset(copies, steps, settings, "disk", cache_dir)
    times = time_runs({name: lambda d=ds: epoch(d) for name, ds in datasets.items()}, repeats)
    for _ in range(max(1, repeats // 2)):
        disk_fill()
    fill = fill_times[1:]  # the first fill was the warm-up
    print(f"\nPart 2: one epoch of {n_volumes} volumes through build_dataset (median of "
          f"{repeats}; speed-up over cache=none, which decodes every DICOM file)\n")
    print("| cache | median s per epoch | speed-up (medians) | speed-up (fastest runs) |")
    print("|---|---|---|---|")
    for label, t in (("none (decode DICOM)", times["none"]),
                     ("disk, first epoch (fills the cache)", fill),
                     ("disk, served from the cache", times["disk"]),
                     ("memory, after filling", times["memory"])):
        print(row(label, t, times["none"], speedup=True))
    size = sum(f.stat().st_size for f in cache_dir.rglob("*.pt")) / n_volumes / 1e6
    print(f"\nDisk cache: {size:.2f} MB per volume (float32 {list(settings.resize_to)}).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="160x384x384 instead of 80x256x256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--volumes", type=int, default=4, help="volumes in the epoch of part 2")
    parser.add_argument("--resize-to", type=int, nargs=3, default=[40, 224, 224])
    args = parser.parse_args(argv)
    slices, size = (160, 384) if args.full else (80, 256)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"numpy {np.__version__}, pydicom {pydicom.__version__}, nibabel {nib.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load}; series {slices}x{size}x{size} -> {args.resize_to}")
    settings = Preprocessing(resize_to=tuple(args.resize_to))
    with tempfile.TemporaryDirectory() as tmp:
        series, nifti = generate(Path(tmp), slices, size)
        part1(series, nifti, settings, args.repeats)
        part2(series, Path(tmp), settings, args.volumes, args.repeats)


if __name__ == "__main__":
    main()
