"""Time to the first training batch and peak memory for a large CSV of few distinct files.

    python bench/cache_scale.py                   # 2,000 rows over the 24 demo files (~1 min)
    python bench/cache_scale.py --rows 10000      # the issue-12 case
    python bench/cache_scale.py --rows 10000 --epoch --modes memory,disk

Rows repeat the 24 demo volumes (64x64x32, a DICOM series each) with one PatientID per row,
folds 0-3 train and 4 validation, resized to the DINO demo's [32, 64, 64]. Each cache mode
runs in its own process (a fresh disk cache each time), which builds ``CohortDataModule``,
runs ``setup`` (CSV checks, header screen, cache fill) and draws the first training batch;
``--epoch`` then also times one full pass over the training loader. Peak memory is the
process's maximum RSS; "after imports" is its RSS before the data module is built.
Results are printed as Markdown table rows with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

MODES = ("none", "memory", "disk")
RESIZE_TO = (32, 64, 64)


def _rss() -> int:
    """Current resident memory of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_csv(demo_root: Path, out: Path, rows: int) -> Path:
    """``rows`` rows over the demo's volumes, one PatientID per row."""
    files = pd.read_csv(demo_root / "ssl.csv").path.tolist()
    pd.DataFrame({"PatientID": [f"B{i:06d}" for i in range(rows)],
                  "path": [str(demo_root / files[i % len(files)]) for i in range(rows)],
                  "fold": [i % 5 for i in range(rows)]}).to_csv(out, index=False)
    return out


def child(csv: Path, mode: str, cache_dir: Path, batch_size: int, epoch: bool) -> dict:
    """One measurement in this process (run by the parent in a fresh interpreter)."""
    from medssl.data.datamodule import CohortDataModule
    from medssl.data.pipeline import Preprocessing

    after_imports = _rss()
    start = time.perf_counter()
    data = CohortDataModule(csv, "ssl", {"train": [0, 1, 2, 3], "val": [4]},
                            Preprocessing(resize_to=RESIZE_TO), batch_size=batch_size,
                            cache=mode, cache_dir=cache_dir)
    data.setup("fit")
    setup = time.perf_counter() - start
    loader = data.train_dataloader()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    result = {"mode": mode, "setup_s": setup, "first_batch_s": first,
              "after_imports_gb": after_imports / 2**30}
    if epoch:
        for _ in batches:
            pass
        result["epoch_s"] = time.perf_counter() - start
    result["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="CSV rows (10000: issue 12)")
    parser.add_argument("--modes", default=",".join(MODES), help="cache modes to run")
    parser.add_argument("--epoch", action="store_true", help="also time one training epoch")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--demo", type=Path, default=None,
                        help="an existing demo cohort folder (default: generate one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.csv, args.child, args.cache_dir, args.batch_size,
                               args.epoch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.demo
        if root is None:
            from medssl.data.demo import generate

            root = generate(Path(tmp) / "demo").root
        csv = write_csv(root, Path(tmp) / "rows.csv", args.rows)
        print(f"{args.rows} rows over 24 files, resize_to {list(RESIZE_TO)}, batch "
              f"{args.batch_size}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs")
        print("| rows | cache | setup s | first batch s | epoch s | peak GB | after imports GB |")
        print("|---|---|---|---|---|---|---|")
        for mode in args.modes.split(","):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--csv", str(csv), "--cache-dir",
                 str(Path(tmp) / f"cache_{mode}"), "--batch-size", str(args.batch_size),
                 *(["--epoch"] if args.epoch else [])],
                capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {args.rows} | {mode} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            epoch = f"{r['epoch_s']:.1f}" if "epoch_s" in r else "-"
            print(f"| {args.rows} | {mode} | {r['setup_s']:.1f} | {r['first_batch_s']:.1f} | "
                  f"{epoch} | {r['peak_gb']:.2f} | {r['after_imports_gb']:.2f} |")


if __name__ == "__main__":
    main()
