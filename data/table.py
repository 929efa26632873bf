"""One CSV reader for every task: column checks, fold selection, path checks, target encoding.

Training (``medssl.data.pipeline``) and ``medssl-inspect`` both read cohorts through
``read_cohort`` and check volumes through ``check_volumes``, so they apply the same rules.

CSV formats (one row per volume, or per slice for ``mae2d``):

===============  ===============================================
task             required columns
===============  ===============================================
ssl, mae3d       PatientID, path, fold
classification   PatientID, path, fold, <target columns>
segmentation     PatientID, img_path, seg_path, fold
mae2d            PatientID, path, slice, fold, max_val
predict          PatientID, path (``fold`` optional and ignored)
===============  ===============================================

A ``max_val`` column (required for ``mae2d``, optional elsewhere) scales each row by
x / max_val instead of by percentiles; an empty cell (not for ``mae2d``) keeps percentiles.

Fold values are integers (``0``..``4`` for cross-validation) or the names ``train``,
``val``, ``test`` (MedMNIST style), in any task. ``path``/``img_path``/``seg_path`` are a
DICOM folder, a DICOM file or a NIfTI file, absolute or relative to the CSV's folder.
An optional ``series`` column picks one series from a folder holding several. Every
problem of every row is reported at once, naming the file and line, before anything
trains.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medssl.data import dicom
from medssl.data.io import VolumeError, VolumeInfo, canonical_layout, read_volume_info
from medssl.errors import InputError

log = logging.getLogger(__name__)
TASK_COLUMNS: dict[str, tuple[str, ...]] = {
    "ssl": ("PatientID", "path", "fold"),
    "mae3d": ("PatientID", "path", "fold"),
    "classification": ("PatientID", "path", "fold"),
    "segmentation": ("PatientID", "img_path", "seg_path", "fold"),
    "mae2d": ("PatientID", "path", "slice", "fold", "max_val"),
    "predict": ("PatientID", "path"),  # images to segment: every row is used
}
PREDICT_FOLD = "0"  # the fold given to every row of a ``predict`` CSV
PATH_COLUMNS = ("path", "img_path", "seg_path")
NAMED_FOLDS = ("train", "val", "test")
MISSING = {"", "nan", "na", "n/a", "null", "none"}
MAX_REPORTED = 40

Folds = Sequence[int | str] | int | str | None
BadRows = list[tuple[dict, list[str]]]


class CohortError(InputError):
    """Bad rows or columns in a cohort CSV; the message lists all of them."""


def list_problems(problems: Sequence[str]) -> str:
    """The problems one per indented line, at most ``MAX_REPORTED`` and a count of the rest."""
    shown = problems[:MAX_REPORTED]
    more = len(problems) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def fail(csv_path: Path, problems: Sequence[str]) -> None:
    """Raise a CohortError listing every problem of a CSV."""
    raise CohortError(f"{csv_path}: {len(problems)} problem(s):{list_problems(problems)}")


def is_missing(value: object) -> bool:
    return str(value).strip().lower() in MISSING


def category_order(values: Iterable[str]) -> list[str]:
    """Sorted categories: numerically when all are numbers, else as text."""
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _fold_order(fold: str) -> tuple:
    return (0, int(fold), "") if fold.lstrip("-").isdigit() else (1, 0, fold)


def _as_fold_list(folds: Folds) -> list[str]:
    if folds is None:
        return []
    if isinstance(folds, int | str):
        folds = [folds]
    return [str(f).strip() for f in folds]


@dataclass
class Split:
    """Rows per split, and the rows whose fold is in no split.

    Attributes:
        rows: split name -> its rows (only the splits that were given folds).
        unassigned: rows of the cohort in no split (e.g. a held-out ``test`` fold).
    """

    rows: dict[str, list[dict]]
    unassigned: list[dict]

    def summary(self) -> str:
        """One line for the log, e.g. "train 12 rows, val 4 rows; 8 rows in no split
        (fold test: 8)"."""
        text = ", ".join(f"{name} {len(rows)} rows" for name, rows in self.rows.items())
        counts: dict[str, int] = {}
        for r in self.unassigned:
            counts[r["fold"]] = counts.get(r["fold"], 0) + 1
        folds = ", ".join(f"fold {f}: {counts[f]}" for f in sorted(counts, key=_fold_order))
        return text + (f"; {len(self.unassigned)} rows in no split ({folds})"
                       if self.unassigned else "; every row is in a split")


@dataclass
class Cohort:
    """The validated rows of a cohort CSV.

    Attributes:
        csv_path: the CSV file.
        task: one of ``TASK_COLUMNS``.
        records: one dict per usable row with the CSV's columns (paths resolved to
            absolute, ``fold`` normalised, ``slice`` as int, ``max_val`` as float, targets
            as category indices) and ``row``, a "file line N (PatientID X)" string used in
            every later error message.
        encodings: target column -> category list; index i encodes ``categories[i]``.
        rejected: rows left out as bad, with their problems (not in ``records``): those
            failing the CSV checks under ``read_cohort(..., strict=False)`` and, under
            ``make_datasets(..., on_bad_sample="skip")``, those with unreadable volumes.
        lines: ``row`` string -> line number in the CSV.
    """

    csv_path: Path
    task: str
    records: list[dict]
    encodings: dict[str, list[str]] = field(default_factory=dict)
    rejected: BadRows = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)

    def folds(self) -> list[str]:
        """The fold values present, integers first in numeric order."""
        return sorted({r["fold"] for r in self.records}, key=_fold_order)

    def select(self, folds: Folds, key: str = "folds") -> list[dict]:
        """Rows whose fold is in ``folds`` (ints or strings).

        Args:
            folds: the folds to select.
            key: the config key the folds came from, to name it in errors.

        Raises:
            CohortError: when ``folds`` is None or empty, or names a fold the CSV lacks.
        """
        wanted = _as_fold_list(folds)
        present = self.folds()
        if not wanted:
            raise CohortError(f"{self.csv_path}: {key} is empty; list the folds to use (the "
                              f"CSV's fold column holds {present})")
        wanted = [_normalise_fold(f) or f for f in wanted]
        dropped = [(r, found) for r, found in self.rejected if r["fold"] in wanted]
        # A fold whose rows were all rejected (on_bad_sample: skip) is in the CSV.
        unknown = sorted(set(wanted) - set(present) - {r["fold"] for r, _ in dropped},
                         key=_fold_order)
        if unknown:
            raise CohortError(f"{self.csv_path}: {key}: fold(s) {unknown} requested, but the "
                              f"CSV's fold column holds only {present}")
        rows = [r for r in self.records if r["fold"] in wanted]
        if not rows:
            fail(self.csv_path, [f"{key}: every row of fold(s) {wanted} was left out as bad "
                                  "(on_bad_sample=skip)",
                                  *(f"{r['row']}: {p}" for r, found in dropped for p in found)])
        return rows

    def split(self, splits: Mapping[str, Folds], required: Sequence[str] = ("train",),
              shared: Sequence[str] = ("predict",)) -> Split:
        """Rows per split, checked for leakage between splits.

        Args:
            splits: split name (``train``, ``val``, ``test``) -> folds; None or an empty
                list leaves an optional split out. Errors name the key ``<split>_folds``.
            required: splits that must be given folds.
            shared: splits that may share folds and patients with the others (predictions
                neither train nor evaluate).

        Only training rows must be kept apart: ``val`` and ``test`` may share folds (small
        cohorts), with a warning that the test then also picked the checkpoint.

        Returns:
            the rows of each split given folds and the rows in no split (log their count).

        Raises:
            CohortError: a required split without folds, a fold in two splits, or a
                PatientID in two splits (leakage; all of them listed).
        """
        rows: dict[str, list[dict]] = {}
        owner: dict[str, str] = {}
        for name, folds in splits.items():
            key = f"{name}_folds"
            if not _as_fold_list(folds):
                if name in required:
                    self.select([], key)  # raises, naming the key
                continue
            rows[name] = self.select(folds, key)
            if name in shared:
                continue
            for fold in {r["fold"] for r in rows[name]}:
                if fold in owner and "train" in (owner[fold], name):
                    raise CohortError(f"{self.csv_path}: fold {fold} is in both "
                                      f"{owner[fold]}_folds and {key}")
                if fold in owner:
                    log.warning("%s: fold %s is in both %s_folds and %s: the test rows also "
                                "chose the checkpoint, so test metrics are optimistic",
                                self.csv_path, fold, owner[fold], key)
                owner.setdefault(fold, name)
        seen: dict[str, dict[str, list[str]]] = {}
        for name, split_rows in rows.items():
            for r in split_rows if name not in shared else ():
                seen.setdefault(r["PatientID"], {}).setdefault(name, []).append(
                    str(self.lines.get(r["row"], "?")))
        leaks = {pid: where for pid, where in seen.items() if len(where) > 1 and "train" in where}
        if leaks:
            fail(self.csv_path, [
                f"PatientID {pid} is in {len(where)} splits (data leakage): "
                + "; ".join(f"{name} line(s) {', '.join(lines)}" for name, lines in where.items())
                for pid, where in leaks.items()
            ])
        chosen = {id(r) for split_rows in rows.values() for r in split_rows}
        return Split(rows, [r for r in self.records if id(r) not in chosen])


def _normalise_fold(value: str) -> str | None:
    """Integer folds as canonical text ("01", "1.0" -> "1"), names as they are; None if bad."""
    value = value.strip()
    try:
        return str(int(value))
    except ValueError:
        pass
    try:
        number = float(value)
        if number.is_integer():
            return str(int(number))
    except ValueError:
        pass
    return value if value in NAMED_FOLDS else None


def infer_task(columns: Iterable[str]) -> str:
    """The task a CSV's columns fit best (for ``medssl-inspect`` without ``--task``)."""
    cols = set(columns)
    if {"img_path", "seg_path"} <= cols:
        return "segmentation"
    if {"path", "slice"} <= cols:
        return "mae2d"
    if "path" in cols:
        return "ssl" if "fold" in cols else "predict"
    raise CohortError(f"cannot tell the task from the columns {sorted(cols)}; a cohort CSV "
                      f"needs one of the column sets {sorted(set(TASK_COLUMNS.values()))}")


def read_table(csv_path: str | Path) -> pd.DataFrame:
    """The CSV as text cells with stripped column names; clear errors for an empty file."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CohortError(f"{csv_path}: CSV file not found")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CohortError(f"{csv_path}: cannot read the file as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise CohortError(f"{csv_path}: the file is empty (not even a header line)")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                         encoding="utf-8-sig")
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        raise CohortError(f"{csv_path}: not a valid CSV ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def read_cohort(
    csv_path: str | Path,
    task: str | None,
    targets: Sequence[str] = (),
    encodings: dict[str, list[str]] | None = None,
    strict: bool = True,
) -> Cohort:
    """Read and validate a cohort CSV for ``task``.

    Args:
        csv_path: the CSV file.
        task: one of ``TASK_COLUMNS``; None guesses it from the columns (``infer_task``).
        targets: target columns that must be present and complete (classification).
        encodings: category lists from an earlier run; a value outside them is an error.
            Without it, categories are the sorted distinct values of each target column.
        strict: raise on any bad row (the default); False moves bad rows, with their
            problems, to ``Cohort.rejected`` (for ``on_bad_sample: skip`` and inspection).

    Raises:
        CohortError: file-level problems (no file, empty file, header only, missing
            columns) always; row problems when ``strict``.
    """
    csv_path = Path(csv_path).resolve()
    if task is not None and task not in TASK_COLUMNS:
        raise InputError(f"unknown task '{task}'; choose one of {sorted(TASK_COLUMNS)}")
    df = read_table(csv_path)
    if task is None:
        task = infer_task(df.columns)
    required = [*TASK_COLUMNS[task], *targets]
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise CohortError(f"{csv_path}: missing column(s) {absent} for task '{task}'; the CSV "
                          f"has {list(df.columns)}, the task needs {required}")
    if df.empty:
        raise CohortError(f"{csv_path}: no rows (only a header line)")
    if task == "predict":  # every row is predicted: a fold column, if any, is ignored
        df["fold"] = PREDICT_FOLD

    problems: dict[int, list[str]] = {}
    records, lines = [], {}
    first_seen: dict[tuple, int] = {}  # a row's cells -> the line they first appeared on
    for i, raw in enumerate(df.to_dict("records")):
        row = {k: str(v).strip() for k, v in raw.items()}
        where = f"{csv_path.name} line {i + 2} (PatientID {row['PatientID'] or '?'})"
        cells = tuple(row.values())
        row["row"] = where
        lines[where] = i + 2
        problems[i] = _check_row(row, task, targets, csv_path.parent)
        if cells in first_seen:
            problems[i].append(f"identical to line {first_seen[cells]}: the same row would "
                               "count twice; remove one")
        first_seen.setdefault(cells, i + 2)
        records.append(row)
    _check_folds(records, problems)

    encodings = dict(encodings or {})
    for target in targets:
        values = [r[target] for r in records if not is_missing(r[target])]
        categories = encodings.get(target) or category_order(values)
        encodings[target] = list(categories)
        index = {c: n for n, c in enumerate(categories)}
        for i, r in enumerate(records):
            if is_missing(r[target]):
                continue
            if r[target] not in index:
                problems[i].append(f"{target}='{r[target]}' is not one of the known "
                                   f"categories {categories}")
            else:
                r[target] = index[r[target]]
    bad = [(records[i], found) for i, found in problems.items() if found]
    if bad and strict:
        fail(csv_path, [f"{r['row']}: {p}" for r, found in bad for p in found])
    good = [r for i, r in enumerate(records) if not problems[i]]
    return Cohort(csv_path, task, good, encodings, bad, lines)


def _check_folds(records: list[dict], problems: dict[int, list[str]]) -> None:
    """Normalise every fold; name a bad one by the kind of folds the other rows use."""
    valid = [f for f in (_normalise_fold(r["fold"]) for r in records) if f is not None]
    named = sum(f in NAMED_FOLDS for f in valid) > len(valid) / 2
    for i, r in enumerate(records):
        fold = _normalise_fold(r["fold"])
        if fold is not None:
            r["fold"] = fold
        elif is_missing(r["fold"]):
            problems[i].append("fold is empty")
        elif named:
            problems[i].append(f"fold '{r['fold']}' is not one of {list(NAMED_FOLDS)} "
                               "(nor an integer)")
        else:
            problems[i].append(f"fold '{r['fold']}' is not an integer (nor one of "
                               f"{list(NAMED_FOLDS)})")


def _check_row(row: dict, task: str, targets: Sequence[str], base: Path) -> list[str]:
    """Validate one row in place (resolving paths, parsing numbers); return its problems."""
    bad = []
    if is_missing(row["PatientID"]):
        bad.append("empty PatientID")
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
    # max_val: required for mae2d; elsewhere optional, and an empty cell means percentiles.
    if "max_val" in row and (task == "mae2d" or not is_missing(row["max_val"])):
        try:
            value = float(row["max_val"])
            if not np.isfinite(value) or value <= 0:
                raise ValueError
            row["max_val"] = value
        except ValueError:
            hint = "" if task == "mae2d" else (" (or leave the cell empty: the volume is "
                                               "then scaled by its percentiles)")
            bad.append(f"max_val '{row['max_val']}' is not a positive number{hint}")
    for target in targets:
        if is_missing(row[target]):
            bad.append(f"target {target} is missing (NaN/empty)")
    return bad


@dataclass
class VolumeReport:
    """Header check of a cohort's volumes.

    Attributes:
        infos: (path, series) -> the volume's header information, or the error it raised.
        problems: ``row`` string -> problems of that row (unreadable volume, segmentation
            off the image grid, slice index outside the volume); rows without problems
            are absent.
    """

    infos: dict[tuple[str, str | None], VolumeInfo | Exception]
    problems: dict[str, list[str]]


def _volume_key(record: Mapping, column: str) -> tuple[str, str | None]:
    return record[column], (str(record.get("series") or "").strip() or None)


def check_volumes(cohort: Cohort, records: Sequence[dict] | None = None,
                  workers: int = 8) -> VolumeReport:
    """Read every row's headers (no pixel decoding) and collect every row's problems.

    Catches unreadable, damaged or truncated files, missing edge slices, several series
    in one folder, non-uniform slice spacing, gantry tilt, 2D or multi-volume NIfTI, a
    segmentation whose grid differs from its image, and ``slice`` indices outside the
    volume. NaN/inf and constant voxels need the pixels: ``load_volume`` refuses those
    when a volume is first loaded.
    """
    records = cohort.records if records is None else records
    cols = [c for c in PATH_COLUMNS if c in TASK_COLUMNS[cohort.task]]
    volumes = sorted({_volume_key(r, c) for r in records for c in cols}, key=str)

    def info(volume: tuple[str, str | None]) -> VolumeInfo | Exception:
        try:
            return read_volume_info(*volume)
        except (VolumeError, dicom.DicomError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        infos = dict(zip(volumes, pool.map(info, volumes), strict=True))
    problems: dict[str, list[str]] = {}
    for r in records:
        got = {c: infos[_volume_key(r, c)] for c in cols}
        found = [f"{c}: {v}" for c, v in got.items() if isinstance(v, Exception)]
        img, seg = got.get("img_path"), got.get("seg_path")
        if isinstance(img, VolumeInfo) and isinstance(seg, VolumeInfo):
            differs = _grid_difference(img, seg)
            if differs:
                found.append(f"segmentation {r['seg_path']} (shape {seg.shape}, {seg.axcodes}) "
                             f"is not on the grid of image {r['img_path']} (shape {img.shape}, "
                             f"{img.axcodes}): {differs}")
        vol = got.get("path")
        if "slice" in r and isinstance(vol, VolumeInfo) and r["slice"] >= vol.original_shape[2]:
            found.append(f"slice {r['slice']} is outside {r['path']} "
                         f"({vol.original_shape[2]} slices)")
        if found:
            problems[r["row"]] = found
    return VolumeReport(infos, problems)


def _grid_difference(a: VolumeInfo, b: VolumeInfo, atol_mm: float = 1e-2) -> str | None:
    """How the grid of ``b`` differs from that of ``a`` once both are in RAS order, as they
    are loaded, or None when they are one grid.

    Stored affines may differ for the same grid (an LAS label map of an LPS DICOM series),
    so shapes and affines are compared after reorientation to the closest RAS layout.
    """
    shape_a, affine_a = canonical_layout(a.original_shape, a.affine)
    shape_b, affine_b = canonical_layout(b.original_shape, b.affine)
    if shape_a != shape_b:
        return f"{shape_b} voxels against {shape_a} in RAS order"
    if np.allclose(affine_a, affine_b, atol=atol_mm):
        return None
    spacing_a = np.linalg.norm(affine_a[:3, :3], axis=0)
    spacing_b = np.linalg.norm(affine_b[:3, :3], axis=0)
    parts = []
    if not np.allclose(spacing_a, spacing_b, atol=atol_mm):
        parts.append(f"voxel size {_mm(spacing_b)} mm against {_mm(spacing_a)} mm")
    elif not np.allclose(affine_a[:3, :3], affine_b[:3, :3], atol=atol_mm):
        parts.append("the axes point in other directions (rotated or sheared grid)")
    shift = affine_b[:3, 3] - affine_a[:3, 3]
    if not np.allclose(shift, 0, atol=atol_mm):
        parts.append(f"origin shifted by {_mm(shift)} mm")
    return "; ".join(parts)


def _mm(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def screen_volumes(cohort: Cohort, records: Sequence[dict] | None = None,
                   workers: int = 8) -> tuple[list[dict], BadRows]:
    """Header-check the rows and split them into usable rows and bad rows, without raising.

    For ``on_bad_sample: skip``: train on the good rows, list the bad ones
    (``write_bad_rows``) and log their count.

    Returns:
        the good rows (in order) and the bad rows with their problems.
    """
    records = cohort.records if records is None else records
    problems = check_volumes(cohort, records, workers).problems
    good = [r for r in records if r["row"] not in problems]
    return good, [(r, problems[r["row"]]) for r in records if r["row"] in problems]


def validate_volumes(cohort: Cohort, records: Sequence[dict] | None = None,
                     workers: int = 8) -> VolumeReport:
    """``check_volumes`` that raises ``CohortError`` listing every bad row
    (``on_bad_sample: error``); returns the report (its ``infos``) when all rows are good."""
    report = check_volumes(cohort, records, workers)
    if report.problems:
        fail(cohort.csv_path, [f"{row}: {p}" for row, found in report.problems.items()
                                for p in found])
    return report


def problem_file(record: Mapping, problem: str) -> str:
    """The file a row's problem is about: the path column the problem starts with (header
    problems are prefixed ``<column>: ``, CSV problems ``<column> ``), else every path of
    the row joined by ``;`` (a grid mismatch concerns both, a bad fold the whole row)."""
    first = problem.split(" ", 1)[0].rstrip(":")
    if first in PATH_COLUMNS and first in record:
        return str(record[first])
    return ";".join(str(record[c]) for c in PATH_COLUMNS if c in record)


def write_bad_rows(path: str | Path, bad: BadRows) -> None:
    """Write bad rows as a CSV (row, file, problem, PatientID; one line per problem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "file", "problem", "PatientID"])
        for record, problems in bad:
            for problem in problems:
                writer.writerow([record["row"], problem_file(record, problem),
                                 problem.replace("\n", " "), record.get("PatientID", "")])
