"""Command-line tools: ``medssl-convert`` (volume -> NIfTI) and ``medssl-inspect`` (CSV check)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from medssl.data import dicom
from medssl.data.io import VolumeError, load_volume, read_volume_info, save_nifti
from medssl.data.table import PATH_COLUMNS

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


def _inspect_path(path: str, series: str | None) -> dict:
    try:
        info = read_volume_info(path, series)
    except (VolumeError, dicom.DicomError) as exc:
        problem = str(exc).replace("\n", " ")
        return {"readable": "no", "series": "", "shape": "", "spacing": "", "orientation": "",
                "modality": "", "problem": problem}
    return {
        "readable": "yes",
        "series": str(info.n_series),
        "shape": "x".join(str(n) for n in info.shape),
        "spacing": "x".join(f"{s:g}" for s in info.spacing),
        "orientation": info.axcodes,
        "modality": info.modality or "-",
        "problem": "",
    }


def inspect_csv(csv_path: str | Path) -> tuple[list[dict], int]:
    """Header-level check of every path in a cohort CSV; returns table rows and problem count.

    Only geometry and technical fields are read into the table: patient names, birth
    dates and other identifying DICOM fields are never part of it.
    """
    csv_path = Path(csv_path)
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    cols = [c for c in PATH_COLUMNS if c in df.columns]
    if not cols:
        raise ValueError(f"{csv_path}: no path column (one of {list(PATH_COLUMNS)})")
    table, problems = [], 0
    seen: dict[tuple[str, str | None], dict] = {}
    for i, row in enumerate(df.to_dict("records")):
        for col in cols:
            value = str(row[col]).strip()
            p = Path(value) if Path(value).is_absolute() else csv_path.parent / value
            series = str(row.get("series", "")).strip() or None
            key = (str(p), series)
            if key not in seen:
                seen[key] = _inspect_path(str(p), series) if value else {
                    "readable": "no", "problem": f"{col} is empty"}
            entry = {"line": str(i + 2), "PatientID": str(row.get("PatientID", "")),
                     "column": col, "path": value, **seen[key]}
            problems += entry["readable"] != "yes"
            table.append(entry)
    return table, problems


def _format_table(rows: list[dict]) -> str:
    cols = ["line", "PatientID", "column", "readable", "series", "shape", "spacing",
            "orientation", "modality", "path", "problem"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in cols)]
    for r in rows:
        lines.append("  ".join(str(r.get(c, "")).ljust(widths.get(c, 0)) for c in cols).rstrip())
    return "\n".join(lines)


def inspect_main(argv: list[str] | None = None) -> int:
    """Check every volume of a cohort CSV from its headers; exit 1 when any row has a problem."""
    parser = argparse.ArgumentParser(prog="medssl-inspect", description=inspect_main.__doc__)
    parser.add_argument("csv", help="cohort CSV (path, img_path and/or seg_path columns)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        rows, problems = inspect_csv(args.csv)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_format_table(rows))
    print(f"\n{len(rows)} volume(s) checked, {problems} with problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(inspect_main())
