"""Preprocessing pipelines on MONAI dictionary transforms, and the datasets of a cohort.

Items are volumes, or 2D slices of volumes (``slice`` and ``slice_axis`` keys). ``slice``
indexes a *stored* voxel axis: the NIfTI array's axis, or for DICOM the loader's
(columns, rows, slices) grid; a CSV's ``slice`` column indexes stored axis 2
(``CSV_SLICE_AXIS``, the axis ``validate_volumes`` checks it against). Caching:
``medssl.data.cache``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import EnsureTyped

from medssl.data.cache import CACHE_MODES, GEOMETRY, IMAGE, LABEL, MemoryCache, build_dataset
from medssl.data.cache import cache_key as cache_key  # re-exported: callers import it from here
from medssl.data.dicom import DicomError
from medssl.data.io import VolumeError, read_volume_info, slices_with_foreground
from medssl.data.table import (
    TASK_COLUMNS,
    BadRows,
    Cohort,
    CohortError,
    check_volumes,
    is_missing,
    read_cohort,
    validate_volumes,
)
from medssl.data.transforms import (
    SLICE,
    SLICE_AXIS,
    CheckSameGridd,
    GridResized,
    LoadItemd,
    ScaleToUnitd,
)
from medssl.errors import InputError, one_of

log = logging.getLogger(__name__)

BAD_SAMPLE_MODES = ("error", "skip")
HAS_FOREGROUND = "has_foreground"
CSV_SLICE_AXIS = 2  # the stored axis a CSV's ``slice`` column indexes


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic preprocessing settings (everything that changes cached items).

    Attributes:
        resize_to: output spatial size, 3 sizes (X, Y, Z in RAS order) for volumes or 2 for
            slice items; None keeps the native grid. Shrinking axes are area-averaged,
            growing axes interpolated linearly, label maps copied nearest.
        lower_percentile: intensities below this percentile are clipped, then map to 0.
        upper_percentile: intensities above this percentile are clipped, then map to 1.
        normalize: False skips intensity scaling (e.g. CT already in HU windows).
        use_max_val: rows with a ``max_val`` column are scaled by it (x / max_val clipped to
            [0, 1]) instead of by their own percentiles.
    """

    resize_to: tuple[int, ...] | None = None
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    normalize: bool = True
    use_max_val: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise InputError("need 0 <= lower_percentile < upper_percentile <= 100, got "
                             f"{self.lower_percentile}, {self.upper_percentile}")
        if self.resize_to is not None:
            object.__setattr__(self, "resize_to", tuple(int(s) for s in self.resize_to))
            if len(self.resize_to) not in (2, 3) or min(self.resize_to) < 1:
                raise InputError("resize_to must be 2 (slices) or 3 (volumes) positive sizes, "
                                 f"got {self.resize_to}")


def preprocessing_transforms(settings: Preprocessing, label: bool = False) -> list[Callable]:
    """Load (RAS volume or oriented slice), scale intensities to [0, 1], resize.

    Every item gets ``geometry`` (``medssl.data.geometry``), kept in step with the
    resizing, so outputs can be mapped back to the input file's grid.

    Args:
        settings: the preprocessing settings.
        label: also load ``label`` (nearest-neighbour resize, no intensity change).

    Returns:
        a list of dictionary transforms over the keys ``image`` (and ``label``), channel
        first throughout.
    """
    keys = [IMAGE, LABEL] if label else [IMAGE]
    # No MONAI Orientationd: the loader already returns RAS volumes (and turned slices),
    # and the geometry records exactly that reorientation.
    steps: list[Callable] = [LoadItemd(keys)]
    if label:
        steps.append(CheckSameGridd([LABEL]))
    if settings.normalize:
        steps.append(ScaleToUnitd(IMAGE, settings.lower_percentile, settings.upper_percentile,
                                  max_val_key="max_val" if settings.use_max_val else None))
    if settings.resize_to is not None:
        steps.append(GridResized(keys, settings.resize_to, mode=["area", "nearest"][: len(keys)]))
    steps.append(EnsureTyped(keys, dtype=torch.float32))
    return steps


# Item keys the pipeline owns; CSV columns of these names stay out of items.
PIPELINE_KEYS = (IMAGE, LABEL, GEOMETRY, SLICE_AXIS)


def to_items(records: Sequence[dict], task: str) -> list[dict]:
    """Cohort rows -> dataset items with ``image`` (and ``label``) paths.

    Rows of a task with a ``slice`` column (``mae2d``) become slice items along stored
    axis ``CSV_SLICE_AXIS``; all other rows are volume items.
    """
    items = []
    for r in records:
        # CSV columns ride along (targets, max_val, ...), except those named like the keys the
        # pipeline fills: a target column called ``label`` (MedMNIST's) must not be taken for
        # a segmentation label map.
        item = {k: v for k, v in r.items() if k not in PIPELINE_KEYS}
        if task == "segmentation":
            item[IMAGE], item[LABEL] = r["img_path"], r["seg_path"]
        else:
            item[IMAGE] = r["path"]
        if SLICE in TASK_COLUMNS.get(task, ()):
            item[SLICE], item[SLICE_AXIS] = int(r[SLICE]), CSV_SLICE_AXIS
        items.append(item)
    return items


def expand_slices(items: Sequence[dict], slice_axis: int = CSV_SLICE_AXIS,
                  foreground: bool = False, workers: int = 8) -> list[dict]:
    """Volume items -> one slice item per stored slice along ``slice_axis``.

    Image and label (when the item has one) are sliced together. Slice counts come from
    the headers; with ``foreground`` each label map is read once and every item gets
    ``has_foreground`` (any non-zero label voxel in that slice), for ``select_slices``.

    Args:
        items: volume items from ``to_items``.
        slice_axis: the stored voxel axis to cut along (0, 1 or 2).
        foreground: mark slices with foreground (needs ``label``).
        workers: threads reading headers and label maps.
    """
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be 0, 1 or 2 (a stored voxel axis), got {slice_axis}")
    for item in items:
        if item.get(SLICE_AXIS) is not None:
            raise InputError(f"{item.get('row', '')}: already a slice item")
        if foreground and LABEL not in item:
            raise InputError(f"{item.get('row', '')}: foreground marking needs a label")

    def count(item: dict) -> tuple[int, np.ndarray | None]:
        series = None if is_missing(item.get("series")) else str(item["series"])
        try:
            n = read_volume_info(item[IMAGE], series).original_shape[slice_axis]
            fg = slices_with_foreground(item[LABEL], slice_axis, series) if foreground else None
        except (VolumeError, DicomError) as exc:
            raise VolumeError(f"{item.get('row', '')}: {exc}") from exc
        return n, fg

    with ThreadPoolExecutor(max_workers=workers) as pool:
        counts = list(pool.map(count, items))
    out = []
    for item, (n, fg) in zip(items, counts, strict=True):
        for k in range(n):
            extra = {} if fg is None else {HAS_FOREGROUND: bool(fg[k])}
            out.append({**item, SLICE: k, SLICE_AXIS: slice_axis, **extra})
    return out


def select_slices(items: Sequence[dict], empty_per_foreground: float,
                  seed: int | None = 0) -> list[dict]:
    """Keep every slice with foreground and, drawn at random, ``empty_per_foreground``
    empty slices per foreground slice (all empty ones when there are fewer).

    Args:
        items: slice items marked by ``expand_slices(..., foreground=True)``.
        empty_per_foreground: e.g. 0.5 keeps half as many empty as foreground slices.
        seed: the draw's seed (the same seed selects the same slices; None: random).

    Returns:
        the kept items in their original order.
    """
    if empty_per_foreground < 0:
        raise InputError(f"empty_per_foreground must be >= 0, got {empty_per_foreground}")
    unmarked = [i for i in items if HAS_FOREGROUND not in i]
    if unmarked:
        raise InputError(f"{unmarked[0].get('row', '')}: slice items need has_foreground; "
                         "build them with expand_slices(..., foreground=True)")
    empty = [n for n, i in enumerate(items) if not i[HAS_FOREGROUND]]
    n_fg = len(items) - len(empty)
    n_keep = min(len(empty), round(empty_per_foreground * n_fg))
    drawn = np.random.default_rng(seed).choice(len(empty), size=n_keep, replace=False)
    keep = {empty[j] for j in drawn}
    return [i for n, i in enumerate(items) if i[HAS_FOREGROUND] or n in keep]


def _check_dimensions(settings: Preprocessing, items: Mapping[str, Sequence[dict]]) -> None:
    """``resize_to`` must have one size per spatial axis of the items it resizes."""
    if settings.resize_to is None:
        return
    for name, rows in items.items():
        dims = 2 if rows and rows[0].get(SLICE_AXIS) is not None else 3
        if len(settings.resize_to) != dims:
            raise InputError(f"resize_to {list(settings.resize_to)} has "
                             f"{len(settings.resize_to)} sizes, but the '{name}' items are "
                             f"{dims}D {'slices' if dims == 2 else 'volumes'}; give {dims} sizes")


def bad_sample_mode(value: str) -> str:
    """``value`` if it is one of ``BAD_SAMPLE_MODES``; a ValueError naming the key if not."""
    if value not in BAD_SAMPLE_MODES:
        raise InputError(f"on_bad_sample must be one of {list(BAD_SAMPLE_MODES)}, got {value!r}")
    return value


def _leave_out(cohort: Cohort, selected: dict[str, list[dict]],
               problems: Mapping[str, list[str]]) -> dict[str, list[dict]]:
    """``on_bad_sample: skip``: move rows with header problems from the cohort's records to
    ``cohort.rejected`` (beside the CSV rejects), log the count, and drop them from the
    splits; a split left with no row is an error listing why."""
    bad: BadRows = [(r, problems[r["row"]]) for r in cohort.records if r["row"] in problems]
    n_csv = len(cohort.rejected)
    cohort.records = [r for r in cohort.records if r["row"] not in problems]
    cohort.rejected = sorted([*cohort.rejected, *bad],
                             key=lambda b: cohort.lines.get(b[0]["row"], 0))
    if cohort.rejected:
        log.warning("%s: %d bad row(s) left out (on_bad_sample=skip): %d with CSV problems, "
                    "%d with unreadable volumes; first: %s: %s", cohort.csv_path.name,
                    len(cohort.rejected), n_csv, len(bad), cohort.rejected[0][0]["row"],
                    cohort.rejected[0][1][0])
    kept = {name: [r for r in rows if r["row"] not in problems] for name, rows in selected.items()}
    for name, rows in kept.items():
        if not rows:
            folds = sorted({r["fold"] for r in selected[name]})
            raise CohortError(
                f"{cohort.csv_path}: {name}_folds: every row of fold(s) {folds} was left out "
                "as bad (on_bad_sample=skip):\n  "
                + "\n  ".join(f"{r['row']}: {p}" for r in selected[name][:10]
                               for p in problems[r["row"]]))
    return kept


def rank_share(items: Sequence[dict], rank: int, world_size: int,
               shuffle_seed: int | None = None) -> list[dict]:
    """The items that process ``rank`` of ``world_size`` serves, as torch's DistributedSampler
    splits them for one epoch: (with ``shuffle_seed``: a seeded permutation of) the items,
    padded by repeating them from the start to a multiple of ``world_size``, then every
    ``world_size``-th from ``rank``. Every rank gets the same count, so their step counts
    match; the shares are disjoint apart from the padding and together cover every item.
    """
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} outside a world of {world_size}")
    order = list(range(len(items)))
    if shuffle_seed is not None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(
            shuffle_seed)).tolist()
    total = math.ceil(len(order) / world_size) * world_size
    if order:
        order += (order * math.ceil(total / len(order)))[:total - len(order)]
    return [items[i] for i in order[rank:total:world_size]]


def make_datasets(
    csv_path: str | Path,
    task: str,
    splits: Mapping[str, Sequence[int | str] | int | str | None],
    settings: Preprocessing,
    targets: Sequence[str] = (),
    augment: Mapping[str, Sequence[Callable]] | None = None,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    reset_cache: bool = False,
    validate: bool = True,
    slices: Mapping[str, int] | None = None,
    empty_per_foreground: float | None = None,
    seed: int | None = 0,
    on_bad_sample: str = "error",
    select: Callable[[str, list[dict], Cohort], list[dict]] | None = None,
    share: tuple[int, int] = (0, 1),
) -> tuple[dict[str, Dataset], Cohort]:
    """Read the CSV, check every selected row and build one dataset per split.

    Rows are chosen by ``Cohort.split``: a fold or a PatientID in two splits is an error
    (``predict`` may share them), ``train`` (when given) needs folds, and the rows in no
    split are counted in the log.

    Args:
        csv_path: cohort CSV (formats in ``medssl.data.table``).
        task: the CSV format to expect.
        splits: split name (e.g. ``train``) -> folds to select; None/empty skips the split
            (except ``train``, which must have folds when it is named).
        settings: preprocessing settings.
        targets: target columns to check and encode.
        augment: split name -> random transforms appended after preprocessing.
        cache, cache_dir, reset_cache: see ``build_dataset``; the memory cache is shared by
            all splits.
        validate: read every selected volume's headers first and report all bad rows.
        slices: split name -> stored voxel axis; that split's volume rows become one item
            per slice (2D training on volumes). Other splits serve whole volumes.
        empty_per_foreground: for expanded splits with labels, keep all slices with
            foreground and this many empty slices per foreground slice (None keeps all).
        seed: seed of that selection.
        on_bad_sample: ``error`` raises listing every bad row; ``skip`` leaves out rows
            with CSV problems or (with ``validate``) unreadable volumes, moves them to
            ``cohort.rejected`` with their problems and logs their count.
        select: (split name, items, cohort) -> the items that split serves, applied before
            anything is cached (e.g. a label subset, or one DDP rank's share: ``rank_share``).
        share: this process's (rank, world size); with ``cache="disk"`` each process writes
            an interleaved share of the missing files before returning, so every unusable
            volume of every split is reported here, before training, as with ``memory``.

    Returns:
        the datasets by split and the cohort (its usable rows, target encodings and, under
        ``skip``, the rows left out).
    """
    skip = bad_sample_mode(on_bad_sample) == "skip"
    cohort = read_cohort(csv_path, task, targets, strict=not skip)
    split = cohort.split(splits, required=[name for name in ("train",) if name in splits])
    log.info("%s: %s", cohort.csv_path.name, split.summary())
    selected = split.rows
    slices = dict(slices or {})
    unknown = sorted(set(slices) - set(selected))
    if unknown:
        raise InputError(f"slices names split(s) {unknown} that are not selected "
                         f"({sorted(selected)})")
    infos = None
    if validate:
        seen: dict[str, dict] = {}
        for rows in selected.values():
            seen.update({r["row"]: r for r in rows})
        report = (check_volumes if skip else validate_volumes)(cohort, list(seen.values()))
        infos = report.infos
    if skip:
        selected = _leave_out(cohort, selected, report.problems if validate else {})
    label = task == "segmentation"
    items = {name: to_items(rows, task) for name, rows in selected.items()}
    for name, axis in slices.items():
        mark = label and empty_per_foreground is not None
        items[name] = expand_slices(items[name], axis, foreground=mark)
        if mark:
            items[name] = select_slices(items[name], empty_per_foreground, seed)
    if select is not None:
        items = {name: select(name, rows, cohort) for name, rows in items.items()}
    _check_dimensions(settings, items)
    base = preprocessing_transforms(settings, label=label)
    memory = None
    if one_of("cache", cache, CACHE_MODES) == "memory":
        memory = MemoryCache(base, settings)
        memory.add([item for rows in items.values() for item in rows], infos)
    datasets = {
        name: build_dataset(rows, [*base, *(augment or {}).get(name, ())], settings, cache,
                            cache_dir, reset_cache and n == 0, memory=memory)
        for n, (name, rows) in enumerate(items.items())
    }
    if cache == "disk":
        start = time.perf_counter()
        written = sum(dataset.fill(share) for dataset in datasets.values())
        if written:
            log.info("cache=disk: %d file(s) written in %.1f s", written,
                     time.perf_counter() - start)
    return datasets, cohort
