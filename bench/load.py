"""``load_volume`` against a bare ``pydicom.dcmread`` loop + ``np.stack`` of the same files.

    python bench/load.py            # 80x256x256 generated series + the real series (~1 min)
    python bench/load.py --full     # 160x384x384, the OAI knee size
    python bench/load.py --repeats 9 --real-data /path/to/real_data

The bare loop only reads and stacks pixels (no sorting, rescaling, geometry checks or
reorientation): it is the floor for reading these files in Python. Both run alternately
in one process on the same files, after one warm-up each (files in the page cache), and
the ratios of their medians and of their fastest runs (less sensitive to other load on
the machine) are printed as a Markdown table row per series. Record results
in bench/RESULTS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

from medssl.data.demo import DemoSpec, write_dicom_series
from medssl.data.io import load_volume

REPO = Path(__file__).resolve().parents[1]
REAL_SERIES = {  # folder under the real-data root: what it is
    "dcm_qa_decubitus/In/HFS/3_t1_fl2d_sag": "MR sagittal 35x256x256",
    "tcia_brain_tumor_progression_PGBM-001/PGBM-001_1992-04-02/11-T1post-80644":
        "MR axial 24x320x260",
    "totalsegmentator/example_ct_dicom": "CT 20x512x512, JPEG 2000",
}


def generate(folder: Path, slices: int, size: int) -> Path:
    """An uncompressed sagittal MR-like series, one file per slice, shuffled names."""
    rng = np.random.default_rng(0)
    spec = DemoSpec(n_subjects=1, rows=size, columns=size, slices=slices,
                    pixel_spacing=0.36, slice_step=0.7)
    raw = rng.integers(0, 4096, (size, size, slices), dtype=np.uint16)
    write_dicom_series(folder, raw, 1.0, 0.0, np.zeros(3), spec, "BENCH", rng)
    return folder


def bare_loop(folder: Path) -> np.ndarray:
    files = sorted(folder.iterdir())
    return np.stack([pydicom.dcmread(f).pixel_array for f in files])


def time_runs(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up: page cache, imports, decoder plugins
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # alternate, so load drift hits both alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def compare(label: str, folder: Path, repeats: int) -> None:
    runs = time_runs({"bare": lambda: bare_loop(folder), "ours": lambda: load_volume(folder)},
                     repeats)
    med = {name: statistics.median(t) for name, t in runs.items()}
    best = {name: min(t) for name, t in runs.items()}
    n_files = sum(1 for p in folder.iterdir() if p.is_file())
    print(f"| {label} | {n_files} | {med['bare'] * 1e3:.0f} | {med['ours'] * 1e3:.0f} | "
          f"{med['ours'] / med['bare']:.2f}x | {best['ours'] / best['bare']:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="160x384x384 instead of 80x256x256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real-data", type=Path, default=Path(os.environ.get(
        "MEDSSL_REAL_DATA", REPO.parent / "shared" / "real_data")))
    args = parser.parse_args(argv)
    slices, size = (160, 384) if args.full else (80, 256)
    print(f"numpy {np.__version__}, pydicom {pydicom.__version__}, {os.cpu_count()} CPUs, "
          f"median of {args.repeats}\n")
    print("| series | files | bare dcmread+stack (ms) | load_volume (ms) | ratio of medians | "
          "ratio of fastest runs |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = generate(Path(tmp) / "series", slices, size)
        compare(f"generated MR {slices}x{size}x{size}, uncompressed", folder, args.repeats)
    for rel, label in REAL_SERIES.items():
        if (args.real_data / rel).is_dir():
            compare(f"real {label}", args.real_data / rel, args.repeats)
        else:
            print(f"| real {label}: not found under {args.real_data} | | | | | |")


if __name__ == "__main__":
    main()
