"""One CSV reader for every task: column checks, fold selection, path checks, target encoding.

CSV formats (one row per volume, or per slice for ``mae2d``):

===============  ===============================================  =================
task             required columns                                 fold values
===============  ===============================================  =================
ssl, mae3d       PatientID, path, fold                            integers
classification   PatientID, path, fold, <target columns>          integers
segmentation     PatientID, img_path, seg_path, fold, max_val     train / val / test
mae2d            PatientID, path, slice, fold, max_val            integers
===============  ===============================================  =================

``path``/``img_path``/``seg_path`` are a DICOM folder, a DICOM file or a NIfTI file,
absolute or relative to the CSV's folder. An optional ``series`` column picks one
series from a folder holding several. Every problem of every row is reported at
once, naming the file and line, before anything trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medssl.data import dicom
from medssl.data.io import VolumeError, VolumeInfo, read_volume_info

TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "ssl": ("PatientID", "path", "fold"),
    "mae3d": ("PatientID", "path", "fold"),
    "classification": ("PatientID", "path", "fold"),
    "segmentation": ("PatientID", "img_path", "seg_path", "fold", "max_val"),
    "mae2d": ("PatientID", "path", "slice", "fold", "max_val"),
}
PATH_COLUMNS = ("path", "img_path", "seg_path")
NAMED_FOLDS = {"segmentation": ("train", "val", "test")}
MISSING = {"", "nan", "na", "n/a", "null", "none"}
MAX_REPORTED = 40


class CohortError(ValueError):
    """Bad rows or columns in a cohort CSV; the message lists all of them."""


def _fail(csv_path: Path, problems: list[str]) -> None:
    shown = problems[:MAX_REPORTED]
    more = len(problems) - len(shown)
    raise CohortError(
        f"{csv_path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown)
        + (f"\n  ... and {more} more" if more else "")
    )


def is_missing(value: object) -> bool:
    return str(value).strip().lower() in MISSING


def category_order(values: Iterable[str]) -> list[str]:
    """Sorted categories: numerically when all are numbers, else as text."""
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


@dataclass
class Cohort:
    """The validated rows of a cohort CSV.

    Attributes:
        csv_path: the CSV file.
        task: one of ``TASK_COLUMNS``.
        records: one dict per row with the CSV's columns (paths resolved to absolute,
            ``slice`` as int, ``max_val`` as float, targets as category indices) and ``row``,
            a "file line N (PatientID X)" string used in every later error message.
        encodings: target column -> category list; index i encodes ``categories[i]``.
    """

    csv_path: Path
    task: str
    records: list[dict]
    encodings: dict[str, list[str]] = field(default_factory=dict)

    def select(self, folds: Sequence[int | str] | int | str | None) -> list[dict]:
        """Rows whose fold is in ``folds`` (ints or strings); None or empty selects nothing."""
        if folds is None:
            return []
        if isinstance(folds, int | str):
            folds = [folds]
        wanted = {str(f).strip() for f in folds}
        present = sorted({r["fold"] for r in self.records}, key=lambda f: (len(f), f))
        unknown = sorted(wanted - set(present))
        if unknown:
            raise CohortError(f"{self.csv_path}: fold(s) {unknown} requested, but the CSV's "
                              f"fold column holds only {present}")
        return [r for r in self.records if r["fold"] in wanted]


def read_cohort(
    csv_path: str | Path,
    task: str,
    targets: Sequence[str] = (),
    encodings: dict[str, list[str]] | None = None,
) -> Cohort:
    """Read and validate a cohort CSV for ``task``.

    Args:
        csv_path: the CSV file.
        task: one of ``TASK_COLUMNS``.
        targets: target columns that must be present and complete (classification).
        encodings: category lists from an earlier run; a value outside them is an error.
            Without it, categories are the sorted distinct values of each target column.
    """
    csv_path = Path(csv_path).resolve()
    if task not in TASK_COLUMNS:
        raise ValueError(f"unknown task '{task}'; choose one of {sorted(TASK_COLUMNS)}")
    if not csv_path.is_file():
        raise CohortError(f"{csv_path}: CSV file not found")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise CohortError(f"{csv_path}: cannot parse CSV ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    required = [*TASK_COLUMNS[task], *targets]
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise CohortError(f"{csv_path}: missing column(s) {absent} for task '{task}'; the CSV "
                          f"has {list(df.columns)}, the task needs {required}")
    if df.empty:
        raise CohortError(f"{csv_path}: no rows")

    problems: list[str] = []
    records = []
    for i, raw in enumerate(df.to_dict("records")):
        row = {k: str(v).strip() for k, v in raw.items()}
        where = f"{csv_path.name} line {i + 2} (PatientID {row['PatientID'] or '?'})"
        row["row"] = where
        bad = _check_row(row, task, targets, csv_path.parent)
        problems += [f"{where}: {p}" for p in bad]
        records.append(row)

    encodings = dict(encodings or {})
    for target in targets:
        values = [r[target] for r in records if not is_missing(r[target])]
        categories = encodings.get(target) or category_order(values)
        encodings[target] = list(categories)
        index = {c: n for n, c in enumerate(categories)}
        for r in records:
            if is_missing(r[target]):
                continue
            if r[target] not in index:
                problems.append(f"{r['row']}: {target}='{r[target]}' is not one of the known "
                                f"categories {categories}")
            else:
                r[target] = index[r[target]]
    if problems:
        _fail(csv_path, problems)
    return Cohort(csv_path, task, records, encodings)


def _check_row(row: dict, task: str, targets: Sequence[str], base: Path) -> list[str]:
    """Validate one row in place (resolving paths, parsing numbers); return its problems."""
    bad = []
    if is_missing(row["PatientID"]):
        bad.append("empty PatientID")
    fold = row["fold"]
    named = NAMED_FOLDS.get(task)
    if named and fold not in named:
        bad.append(f"fold '{fold}' is not one of {list(named)}")
    elif not named:
        try:
            row["fold"] = str(int(fold))
        except ValueError:
            bad.append(f"fold '{fold}' is not an integer")
    for col in PATH_COLUMNS:
        if col not in TASK_COLUMNS[task]:
            continue
        if is_missing(row[col]):
            bad.append(f"{col} is empty")
            continue
        p = Path(row[col]).expanduser()
        p = p if p.is_absolute() else base / p
        row[col] = str(p)
        if not p.exists():
            bad.append(f"{col} {p} does not exist")
        elif p.is_dir() and not any(x.is_file() for x in p.rglob("*")):
            bad.append(f"{col} {p} is an empty folder")
    if "slice" in row and task == "mae2d":
        try:
            row["slice"] = int(row["slice"])
            if row["slice"] < 0:
                raise ValueError
        except ValueError:
            bad.append(f"slice '{row['slice']}' is not a non-negative integer")
    if "max_val" in TASK_COLUMNS[task]:
        try:
            row["max_val"] = float(row["max_val"])
            if not np.isfinite(row["max_val"]) or row["max_val"] <= 0:
                raise ValueError
        except ValueError:
            bad.append(f"max_val '{row['max_val']}' is not a positive number")
    for target in targets:
        if is_missing(row[target]):
            bad.append(f"target {target} is missing (NaN/empty)")
    return bad


def validate_volumes(cohort: Cohort, records: Sequence[dict] | None = None,
                     workers: int = 8) -> None:
    """Read every row's headers (no pixel decoding) and report all unusable rows at once.

    Catches unreadable/damaged files, several series in one folder, non-uniform slice
    spacing, gantry tilt, truncated uncompressed files, a segmentation whose grid differs
    from its image, and ``slice`` indices outside the volume.
    """
    records = cohort.records if records is None else records
    cols = [c for c in PATH_COLUMNS if c in TASK_COLUMNS[cohort.task]]
    volumes = sorted({(r[c], r.get("series") or None) for r in records for c in cols},
                     key=str)

    def info(volume: tuple[str, str | None]) -> VolumeInfo | Exception:
        try:
            return read_volume_info(*volume)
        except (VolumeError, dicom.DicomError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = dict(zip(volumes, pool.map(info, volumes), strict=True))
    problems = []
    for r in records:
        got = {c: infos[(r[c], r.get("series") or None)] for c in cols}
        problems += [f"{r['row']}: {c}: {v}" for c, v in got.items() if isinstance(v, Exception)]
        img, seg = got.get("img_path"), got.get("seg_path")
        if isinstance(img, VolumeInfo) and isinstance(seg, VolumeInfo) and (
            img.shape != seg.shape or not np.allclose(img.affine, seg.affine, atol=1e-2)
        ):
            problems.append(f"{r['row']}: segmentation {r['seg_path']} (shape {seg.shape}, "
                            f"{seg.axcodes}) is not on the grid of image {r['img_path']} "
                            f"(shape {img.shape}, {img.axcodes})")
        vol = got.get("path")
        if "slice" in r and isinstance(vol, VolumeInfo) and r["slice"] >= vol.original_shape[2]:
            problems.append(f"{r['row']}: slice {r['slice']} is outside {r['path']} "
                            f"({vol.original_shape[2]} slices)")
    if problems:
        _fail(cohort.csv_path, problems)
