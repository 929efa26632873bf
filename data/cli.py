"""Command-line tools: ``medssl-convert`` (volume -> NIfTI) and ``medssl-inspect`` (CSV check)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medssl.data import dicom
from medssl.data.io import VolumeError, VolumeInfo, load_volume, save_nifti
from medssl.data.table import PATH_COLUMNS, TASK_COLUMNS, check_volumes, read_cohort

log = logging.getLogger(__name__)


def convert_main(argv: list[str] | None = None) -> int:
    """Write what the loader reads (RAS array and affine) as NIfTI, to check it in a viewer."""
    parser = argparse.ArgumentParser(prog="medssl-convert", description=convert_main.__doc__)
    parser.add_argument("input", help="DICOM folder, DICOM file or NIfTI file")
    parser.add_argument("output", help="output .nii or .nii.gz")
    parser.add_argument("--series", help="series label or SeriesInstanceUID to pick from a "
                        "folder holding several")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.output.endswith((".nii", ".nii.gz")):
        parser.error("output must end in .nii or .nii.gz")
    try:
        volume = load_volume(args.input, args.series)
    except (VolumeError, dicom.DicomError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_nifti(volume, args.output)
    shape = "x".join(str(n) for n in volume.array.shape[1:])
    print(f"{args.input} -> {args.output}: {shape} voxels, spacing "
          f"{tuple(round(float(s), 4) for s in volume.meta['spacing'])} mm, stored as "
          f"{volume.meta['original_axcodes']}, written as RAS")
    return 0


def _describe(info: VolumeInfo | Exception | None) -> dict:
    if not isinstance(info, VolumeInfo):
        return {"readable": "no", "series": "", "shape": "", "spacing": "", "orientation": "",
                "modality": ""}
    return {
        "readable": "yes",
        "series": str(info.n_series),
        "shape": "x".join(str(n) for n in info.shape),
        "spacing": "x".join(f"{s:g}" for s in info.spacing),
        "orientation": info.axcodes,
        "modality": info.modality or "-",
    }


@dataclass
class Inspection:
    """What ``medssl-inspect`` prints: one table row per volume (or per bad CSV row), the
    number of table rows with a problem, and the split summary when splits were given."""

    rows: list[dict]
    problems: int
    splits: str | None = None


def inspect_csv(csv_path: str | Path, task: str | None = None, targets: Sequence[str] = (),
                splits: Mapping[str, Sequence[str]] | None = None,
                workers: int = 8) -> Inspection:
    """Check a cohort CSV with the rules training applies.

    The CSV is read by ``read_cohort`` (columns, folds, paths, targets) and its volumes'
    headers by ``check_volumes``, exactly as before training. Only geometry and technical
    fields are read into the table: patient names, birth dates and other identifying
    DICOM fields are never part of it.

    Args:
        csv_path: the cohort CSV.
        task: the CSV format; None guesses it from the columns.
        targets: target columns to check (classification).
        splits: split name -> folds; also checks that no PatientID is in two splits.
        workers: threads reading headers.

    Raises:
        CohortError: file-level problems (empty file, header only, missing columns) and,
            with ``splits``, folds that cannot be split as asked.
    """
    cohort = read_cohort(csv_path, task, targets, strict=False)
    report = check_volumes(cohort, workers=workers)
    cols = [c for c in PATH_COLUMNS if c in TASK_COLUMNS[cohort.task]]
    table = []
    for record, problems in cohort.rejected:
        table.append({"line": str(cohort.lines[record["row"]]), "PatientID": record["PatientID"],
                      "column": "csv", **_describe(None), "path": "",
                      "problem": "; ".join(problems)})
    for r in cohort.records:
        found = report.problems.get(r["row"], [])
        # check_volumes prefixes a file's problems with its column; the rest (grid, slice)
        # concern the row as a whole and are shown on its last column.
        whole_row = [p for p in found if not p.startswith(tuple(f"{c}: " for c in cols))]
        for col in cols:
            info = report.infos[(r[col], str(r.get("series") or "").strip() or None)]
            mine = [p.removeprefix(f"{col}: ") for p in found if p.startswith(f"{col}: ")]
            if col == cols[-1]:
                mine += whole_row
            table.append({"line": str(cohort.lines[r["row"]]), "PatientID": r["PatientID"],
                          "column": col, **_describe(info), "path": r[col],
                          "problem": "; ".join(mine)})
    for entry in table:
        entry["problem"] = entry["problem"].replace("\n", " ")
    table.sort(key=lambda e: int(e["line"]))
    problems = sum(bool(e["problem"]) for e in table)
    summary = cohort.split(splits, required=()).summary() if splits else None
    return Inspection(table, problems, summary)


def _format_table(rows: list[dict]) -> str:
    cols = ["line", "PatientID", "column", "readable", "series", "shape", "spacing",
            "orientation", "modality", "path", "problem"]
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in cols[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(widths.get(c, 0)) for c in cols).rstrip())
    return "\n".join(lines)


def _split_arg(text: str) -> tuple[str, list[str]]:
    name, sep, folds = text.partition("=")
    if not sep or not name.strip() or not folds.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FOLD[,FOLD...], got '{text}'")
    return name.strip(), [f.strip() for f in folds.split(",")]


def inspect_main(argv: list[str] | None = None) -> int:
    """Check a cohort CSV and every volume's headers with the rules training applies.

    Exit status: 0 clean, 1 when any row has a problem, 2 when the CSV itself cannot be
    used (empty, header only, missing columns, folds that cannot be split as asked).
    """
    parser = argparse.ArgumentParser(prog="medssl-inspect", description=inspect_main.__doc__)
    parser.add_argument("csv", help="cohort CSV")
    parser.add_argument("--task", choices=sorted(TASK_COLUMNS),
                        help="CSV format (default: guessed from the columns)")
    parser.add_argument("--targets", nargs="*", default=[],
                        help="target columns that must be complete (classification)")
    parser.add_argument("--split", type=_split_arg, action="append", default=[],
                        metavar="NAME=FOLDS", help="e.g. --split train=0,1,2 --split val=3: "
                        "also check that no PatientID is in two splits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = inspect_csv(args.csv, args.task, args.targets, dict(args.split) or None)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_format_table(result.rows))
    print(f"\n{len(result.rows)} volume(s) checked, {result.problems} with problems")
    if result.splits:
        print(f"splits: {result.splits}")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(inspect_main())
