"""Datasets with selectable caching of the deterministic preprocessing.

``none`` preprocesses every item on every access. ``memory`` (``MemoryCache``) keeps one
preprocessed copy per distinct input, shared by every row and split that reads the same
file the same way, after checking from the headers that it fits in the available memory.
``disk`` (MONAI's PersistentDataset) writes one file per distinct input under a folder
keyed by the preprocessing settings.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from monai.data import Dataset, MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, RandomizableTrait, Transform, apply_transform

from medssl.data.dicom import DicomError
from medssl.data.geometry import GEOMETRY
from medssl.data.io import VolumeError, VolumeInfo, read_volume_info
from medssl.data.table import is_missing, list_problems
from medssl.data.transforms import SLICE, SLICE_AXIS
from medssl.errors import InputError, one_of

if TYPE_CHECKING:
    from medssl.data.pipeline import Preprocessing

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "disk")
IMAGE, LABEL = "image", "label"  # the item keys of the image and label map
# Bump when the preprocessing output changes, to retire old disk caches.
# 2: geometry, area resizing, min-max fallback, max_val scaling, slice items.
# 3: percentile limits of large volumes from a voxel sample (transforms.intensity_limits).
CACHE_FORMAT = 3
# What the disk cache serves; every other item field comes from the current CSV.
CACHED_KEYS = (IMAGE, LABEL, GEOMETRY)
# The item fields preprocessing reads: items equal in these share one cached copy.
INPUT_KEYS = (IMAGE, LABEL, "series", SLICE, SLICE_AXIS, "max_val")
# Memory per cached entry beyond its voxels, bytes: tensor objects, metadata, geometry and
# heap left fragmented between entries (measured 8-64 KiB for 64x64x32 volumes).
ENTRY_OVERHEAD = 64 * 1024
# The memory cache hands freed heap back to the system after every this many entries.
TRIM_EVERY = 32
# Share of the available memory the memory cache may fill; the rest stays for the model,
# batches and loader workers.
MEMORY_SHARE = 0.8
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _input_parts(item: Mapping) -> dict[str, str]:
    """What preprocessing reads from an item (``INPUT_KEYS``) as text."""
    return {key: str(item[key]) for key in INPUT_KEYS if item.get(key) is not None}


def _item_hash(item: Mapping) -> bytes:
    """Cache key of one item: what its preprocessing reads (paths with modification times,
    series, slice, max_val)."""
    parts: dict[str, object] = {}
    for key, value in _input_parts(item).items():
        mtime = os.stat(value).st_mtime_ns if key in (IMAGE, LABEL) and \
            os.path.exists(value) else None
        parts[key] = (value, mtime)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest().encode()


def cache_key(settings: Preprocessing) -> str:
    """Short hash of everything that determines a cached item."""
    payload = {"settings": asdict(settings), "format": CACHE_FORMAT}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_error(exc: BaseException) -> BaseException | None:
    """The VolumeError/DicomError inside MONAI's "applying transform" wrappers, if any."""
    while exc is not None:
        if isinstance(exc, VolumeError | DicomError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _raise_all(errors: Sequence[BaseException]) -> None:
    """Raise the one data error, or all of them in one message (each names its row and
    file)."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise VolumeError(f"{len(errors)} volumes cannot be used:"
                          + list_problems([str(e) for e in errors]))


class _ClearErrors:
    """Mixin: re-raise our data errors (naming CSV row and file) instead of MONAI's
    generic "applying transform <object at 0x...>" wrapper, keeping the chain."""

    def _transform(self, index: int) -> object:
        try:
            return super()._transform(index)  # type: ignore[misc]
        except RuntimeError as exc:
            cause = _data_error(exc)
            if cause is None:
                raise
            raise type(cause)(str(cause)) from exc


class _Dataset(_ClearErrors, Dataset):
    pass


class _PersistentDataset(_ClearErrors, PersistentDataset):
    def _cachecheck(self, item_transformed: Mapping) -> dict:
        cached = super()._cachecheck(item_transformed)
        # A freshly computed item holds MetaTensors, one read back from disk (track_meta=
        # False) plain tensors; serve plain tensors always, or a batch mixing both (a file
        # shared by rows, a run resumed within its first epoch) cannot be collated.
        cached = {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in cached.items()
                  if k in CACHED_KEYS}
        # Files are keyed by what preprocessing reads, so any other field of a cached copy
        # (targets, fold, row, a monitor's class key) belongs to whichever dataset wrote it
        # first: serve the volumes from the file and everything else from the current item.
        live = {k: v for k, v in item_transformed.items() if k not in CACHED_KEYS}
        return {**cached, **live}

    def cache_file(self, item: Mapping) -> Path:
        """Where ``_cachecheck`` keeps ``item`` (MONAI's naming: item hash + transform hash)."""
        return Path(self.cache_dir) / f"{self.hash_func(item).decode()}{self.transform_hash}.pt"

    def fill(self, share: tuple[int, int] = (0, 1), workers: int | None = None) -> int:
        """Write every missing cache file now instead of in the first epoch, so that every
        volume that cannot be used is reported at once, before training (as the memory cache
        does). Under DDP each process fills an interleaved ``share`` (rank, world size).

        Returns:
            the number of files written.
        """
        rank, world = share
        todo: dict[Path, Mapping] = {}
        for i, item in enumerate(self.data):
            path = self.cache_file(item)
            if i % world == rank and path not in todo and not path.is_file():
                todo[path] = item
        workers = max(1, min(4, os.cpu_count() or 1) if workers is None else workers)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            errors = [e for e in pool.map(self._fill_one, todo.values()) if e is not None]
        _raise_all(errors)
        return len(todo)

    def _fill_one(self, item: Mapping) -> VolumeError | DicomError | None:
        try:
            self._cachecheck(item)
        except RuntimeError as exc:  # MONAI's wrapper around our data error
            cause = _data_error(exc)
            if cause is None:
                raise
            return type(cause)(str(cause))
        except (VolumeError, DicomError) as exc:
            return exc
        return None


def _cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                 root: Path = CGROUP_ROOT) -> int | None:
    """Bytes left under the tightest cgroup memory limit on this process (a container's or
    a batch job's, on its cgroup or a parent), reclaimable file cache counted as free; None
    when no limit is set or cgroups cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    folders: list[tuple[Path, tuple[str, str, str]]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / rel.strip("/")
        folders += [(f, names) for f in (folder, *folder.parents) if f == base or base in f.parents]
    room = None
    for folder, (limit_name, usage_name, cache_name) in folders:
        try:
            limit = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 2**60:  # "max" (v2) or ~2**63 (v1): none
            continue
        try:
            stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text()
                        .splitlines())
            usage -= int(stat.get(cache_name, 0))
        except (OSError, ValueError):
            pass
        room = int(limit) - usage if room is None else min(room, int(limit) - usage)
    return room


def available_memory() -> int:
    """Bytes this process can still fill: the system's available memory, or less under a
    container or batch-job memory limit."""
    import psutil  # a dependency of clearml; imported here as only the memory cache needs it

    free = int(psutil.virtual_memory().available)
    room = _cgroup_room()
    return max(0, free if room is None else min(free, room))


def _trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc; elsewhere nothing happens).

    Preprocessing frees large temporary buffers (the native volume, scaled copies) between
    the small results it keeps; glibc keeps those holes, and a filled cache then held about
    3x its volumes' size (1.5 MB per 512 KB entry, measured). Trimming keeps it near 1x.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _series(item: Mapping) -> str | None:
    series = item.get("series")
    return None if series is None or is_missing(series) else str(series).strip()


def _first_random(transforms: Sequence[Callable]) -> int:
    """Index of the first random (or non-MONAI) transform: caches keep what comes before."""
    for n, t in enumerate(transforms):
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
            return n
    return len(transforms)


class MemoryCache:
    """Preprocessed items in memory, one entry per distinct input: every row, of any split,
    that reads the same file(s) with the same series, slice and ``max_val`` shares one entry,
    preprocessed once. Before filling, the memory the new entries need is estimated from
    the headers and compared with the available memory.

    Args:
        steps: the deterministic preprocessing (``preprocessing_transforms``).
        settings: its settings (``resize_to`` gives the cached size).
        workers: threads that fill the cache.
    """

    def __init__(self, steps: Sequence[Callable], settings: Preprocessing,
                 workers: int | None = None) -> None:
        self.steps = list(steps)
        self.preprocess = Compose(self.steps)
        self.settings = settings
        self.workers = max(1, min(4, os.cpu_count() or 1) if workers is None else workers)
        self.entries: dict[str, dict] = {}

    @staticmethod
    def key(item: Mapping) -> str:
        return json.dumps(_input_parts(item), sort_keys=True)

    def add(self, records: Sequence[dict],
            infos: Mapping[tuple[str, str | None], object] | None = None) -> list[str]:
        """Preprocess the inputs not cached yet, once each, after ``check_fits``.

        Args:
            records: dataset items (``to_items``).
            infos: (path, series) -> header info already read (``VolumeReport.infos``).

        Returns:
            each record's entry key.
        """
        keys = [self.key(r) for r in records]
        new: dict[str, dict] = {}
        for key, record in zip(keys, records, strict=True):
            if key not in self.entries:
                new.setdefault(key, record)
        if new:
            self.check_fits(list(new.values()), len(records), infos)
            todo = list(new.items())
            errors: list[VolumeError | DicomError] = []
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for start in range(0, len(todo), TRIM_EVERY):
                    chunk = todo[start:start + TRIM_EVERY]
                    done = pool.map(self._preprocess_or_error, [record for _, record in chunk])
                    for (key, _), entry in zip(chunk, done, strict=True):
                        if isinstance(entry, VolumeError | DicomError):
                            errors.append(entry)
                        else:
                            self.entries[key] = entry
                    _trim_heap()
            _raise_all(errors)
        return keys

    def _preprocess_or_error(self, record: dict) -> dict | VolumeError | DicomError:
        """The entry, or the data error naming its row and file (every bad volume is then
        reported at once, not one per run)."""
        try:
            return self._preprocess(record)
        except (VolumeError, DicomError) as exc:
            return exc

    def _preprocess(self, record: dict) -> dict:
        try:
            out = self.preprocess(dict(record))
        except RuntimeError as exc:
            cause = _data_error(exc)
            if cause is None:
                raise
            raise type(cause)(str(cause)) from exc
        # Keep what preprocessing made or changed; fields it passed through come from each
        # row (PatientID, targets, row), so rows sharing an entry keep their own.
        return {k: v for k, v in out.items() if k not in record or v is not record[k]}

    def estimate(self, records: Sequence[dict],
                 infos: Mapping[tuple[str, str | None], object] | None = None) -> int:
        """Bytes that caching ``records`` (distinct inputs) takes: float32 voxels of each
        image and label after resizing, ``ENTRY_OVERHEAD`` per entry, and one native
        volume per filling thread. Shapes come from the headers (read here if not given)."""
        headers = dict(infos or {})
        volumes = {(r[k], _series(r)) for r in records for k in (IMAGE, LABEL) if k in r}
        unread = [v for v in volumes if not isinstance(headers.get(v), VolumeInfo)]

        def info(volume: tuple[str, str | None]) -> VolumeInfo | None:
            try:
                return read_volume_info(*volume)
            except (VolumeError, DicomError):
                return None  # the fill reports it, naming the row

        with ThreadPoolExecutor(max_workers=8) as pool:
            headers.update(zip(unread, pool.map(info, unread), strict=True))
        total = largest = 0
        for r in records:
            for k in (IMAGE, LABEL):
                header = headers.get((r.get(k), _series(r)))
                if not isinstance(header, VolumeInfo):
                    continue
                shape = list(header.original_shape)
                if r.get(SLICE_AXIS) is not None:
                    shape.pop(int(r[SLICE_AXIS]))
                native = 4 * math.prod(shape)
                resize = self.settings.resize_to
                total += native if resize is None else 4 * math.prod(resize)
                largest = max(largest, native)
        return total + self.workers * largest + len(records) * ENTRY_OVERHEAD

    def check_fits(self, records: Sequence[dict], n_rows: int,
                   infos: Mapping[tuple[str, str | None], object] | None = None) -> int:
        """Estimate the memory ``records`` need; stop when over ``MEMORY_SHARE`` of what is
        available.

        Returns:
            the estimate in bytes.

        Raises:
            MemoryError: the cache would not fit; the message suggests ``cache=disk``.
        """
        need = self.estimate(records, infos)
        free = available_memory()
        if need > MEMORY_SHARE * free:
            raise MemoryError(
                f"cache=memory would need about {_gib(need)} for {len(records)} distinct "
                f"volumes ({n_rows} rows), more than {MEMORY_SHARE:.0%} of the "
                f"{_gib(free)} available; use cache=disk (preprocessed volumes in cache_dir, "
                "read back per item), cache=none, or a smaller resize_to")
        log.info("Memory cache: %d distinct volumes for %d rows, about %s (%s available)",
                 len(records), n_rows, _gib(need), _gib(free))
        return need


class _MemoryItems(Dataset):
    """Rows served from a ``MemoryCache`` entry (a copy) plus their own fields, then the
    remaining (random) transforms."""

    def __init__(self, records: Sequence[dict], memory: MemoryCache,
                 transforms: Sequence[Callable],
                 infos: Mapping[tuple[str, str | None], object] | None = None) -> None:
        super().__init__(list(records), Compose(list(transforms)))
        self.memory = memory
        self.keys = memory.add(self.data, infos)

    def _transform(self, index: int) -> object:
        # A copy, so a consumer writing into its item (or an in-place augmentation) never
        # changes what other rows and epochs get.
        item = {**self.data[index], **copy.deepcopy(self.memory.entries[self.keys[index]])}
        return apply_transform(self.transform, item) if self.transform.transforms else item


class _MemoryDataset(_ClearErrors, _MemoryItems):
    pass


def build_dataset(
    records: Sequence[dict],
    transforms: Sequence[Callable],
    settings: Preprocessing,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    reset_cache: bool = False,
    num_workers: int = 0,
    memory: MemoryCache | None = None,
) -> Dataset:
    """A MONAI dataset over ``records`` with the chosen caching.

    Args:
        records: items from ``medssl.data.pipeline.to_items`` (or ``expand_slices``):
            ``image`` (and ``label``)
            paths, ``row`` and any targets.
        transforms: deterministic preprocessing first (``preprocessing_transforms``), then
            any random augmentation; the caches keep the output of the transforms before
            the first random one.
        settings: the preprocessing settings; the disk cache lives in a sub-folder named by
            their hash, so changed settings never serve stale volumes; file names hash the
            item and the deterministic transforms, so extra deterministic steps get their
            own files.
        cache: ``none``, ``memory`` (``MemoryCache``: one preprocessed copy per distinct
            file, filled now after checking that it fits) or ``disk`` (PersistentDataset).
        cache_dir: folder for ``disk``.
        reset_cache: delete this settings' disk cache before building.
        num_workers: threads used to fill the memory cache (0: up to 4).
        memory: a memory cache to share (e.g. between splits); ``transforms`` must start
            with its steps. None makes one from the steps before the first random one.
    """
    cache = one_of("cache", cache, CACHE_MODES)
    transforms = list(transforms)
    transform = Compose(transforms)
    if cache == "none":
        return _Dataset(list(records), transform)
    if cache == "memory":
        if memory is None:
            memory = MemoryCache(transforms[:_first_random(transforms)], settings,
                                 num_workers or None)
        n = len(memory.steps)
        if [id(t) for t in transforms[:n]] != [id(t) for t in memory.steps]:
            raise InputError("transforms must start with the memory cache's preprocessing steps")
        return _MemoryDataset(records, memory, transforms[n:])
    if cache_dir is None:
        raise InputError("cache='disk' needs cache_dir")
    folder = Path(cache_dir) / cache_key(settings)
    if reset_cache and folder.exists():
        log.info("Removing the disk cache %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    # hash_transform: file names also hash the deterministic transforms, so a dataset with
    # extra steps (e.g. a monitor's resize) never shares files with the plain pipeline.
    return _PersistentDataset(list(records), transform, cache_dir=folder, hash_func=_item_hash,
                             hash_transform=pickle_hashing, track_meta=False,
                             weights_only=True)
