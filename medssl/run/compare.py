"""``medssl-compare RUN_DIR ...``: test metrics of several runs side by side.

Reads the newest ``metrics.json`` under each run folder (classification: mean ROC AUC,
balanced accuracy and accuracy over targets; segmentation: mean Dice and HD95 over classes)
and prints one row per run, e.g. DINO-initialised against from-scratch fine-tuning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (label, path in metrics.json) of the numbers worth comparing, where present.
COLUMNS = (("AUC", ("mean", "auc")), ("BACC", ("mean", "bacc")), ("ACC", ("mean", "acc")),
           ("Dice", ("dice",)), ("HD95", ("hd95",)))


def _get(report: dict, path: tuple[str, ...]) -> object:
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def read_metrics(run_dir: str | Path) -> dict:
    """The newest ``metrics.json`` below ``run_dir``."""
    found = sorted(Path(run_dir).rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no metrics.json (classification and segmentation "
                                "runs write one in their test stage)")
    return json.loads(found[-1].read_text())


def table(run_dirs: list[str]) -> str:
    """A text table: one row per run, one column per metric any of them reports."""
    reports = {Path(d).name: read_metrics(d) for d in run_dirs}
    columns = [(label, path) for label, path in COLUMNS
               if any(isinstance(_get(r, path), int | float) for r in reports.values())]
    width = max(len(name) for name in reports) + 2
    lines = ["run".ljust(width) + "".join(label.rjust(11) for label, _ in columns)]
    for name, report in reports.items():
        cells = []
        for _, path in columns:
            value = _get(report, path)
            cells.append(f"{value:11.3f}" if isinstance(value, int | float) else "-".rjust(11))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="results_dir/experiment folders")
    args = parser.parse_args(argv)
    try:
        print(table(args.run_dirs))
    except FileNotFoundError as error:  # a DINO/MAE run or a mistyped folder
        parser.exit(2, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
