"""Lightning data module over a cohort CSV: the same loading for every task and split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Randomizable
from torch.utils.data import DistributedSampler, RandomSampler, default_collate

from medssl.data.cache import IMAGE
from medssl.data.pipeline import (
    CACHE_MODES,
    Preprocessing,
    bad_sample_mode,
    make_datasets,
    rank_share,
)
from medssl.data.table import BadRows, Cohort
from medssl.data.workers import AUTO, check_n_workers, loader_workers, trainer_layout, usable_cpus
from medssl.errors import InputError, one_of

log = logging.getLogger(__name__)
ITEM_INDEX = "item_index"  # an evaluation item's position in its split (models/gather.py)

SPLITS = ("train", "val", "test", "predict")
Folds = Sequence[int | str] | int | str | None


class EpochRandomSampler(RandomSampler):
    """A shuffle that is a function of (seed, epoch): Lightning calls ``set_epoch`` before
    each epoch, so a resumed run draws the same order as an uninterrupted one, whenever the
    loader's iterator is created. Under DDP Lightning swaps it for its DistributedSampler,
    which is seeded by (seed, epoch) the same way."""

    def __init__(self, data_source: Sequence, seed: int | None) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(torch.randint(2**31, ())) if seed is None else seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)


def augment_batch(batch: dict, transforms: Sequence[Callable]) -> dict:
    """Apply ``transforms`` to each sample of a collated batch where it lies (e.g. on the GPU)
    and collate the results back: ``image`` (B, C, *S) in, e.g. MultiCropd's ``crops`` (one
    (B, C, *size) tensor per view) out; other batch keys are kept.

    Randomizable transforms are re-seeded from torch's generator first, which the run seeds
    per (seed, epoch, batch): a resumed run draws the same views.
    """
    batch = dict(batch)
    images = batch.pop(IMAGE)
    for t in transforms:
        if isinstance(t, Randomizable):
            t.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ())))
    items = []
    for i, image in enumerate(images):
        item: dict = {IMAGE: image, "row": batch["row"][i] if "row" in batch else ""}
        for t in transforms:
            item = t(item)
        items.append({k: v for k, v in item.items() if k != "row"})
    return batch | default_collate(items)


class CohortDataModule(L.LightningDataModule):
    """Train/val/test/predict datasets from one cohort CSV.

    ``setup`` reads the CSV once and checks every selected row of every split (headers of
    every volume) before anything trains; all problems are reported together, or with
    ``on_bad_sample="skip"`` the bad rows are left out and kept in ``bad_rows``.

    Args:
        csv_path: cohort CSV (formats in ``medssl.data.table``).
        task: CSV format (``ssl``, ``classification``, ``segmentation``, ``mae2d``, ...).
        splits: split name (``train``, ``val``, ``test``, ``predict``) -> folds to select;
            None or empty leaves the split out, except ``train`` (an error naming
            ``train_folds``). A fold or PatientID in two splits is an error (``predict`` may
            share them).
        settings: deterministic preprocessing.
        augment: split name -> random transforms applied after preprocessing.
        device_augment: random transforms applied to each training sample after its batch
            reached the device (``augment_batch``): crops of a GPU run are then cut and
            augmented on the GPU instead of in CPU workers. Validation and test batches are
            left alone.
        batch_size: samples per device and training step.
        eval_batch_size: samples per device for val/test/predict (None: ``batch_size``).
        n_workers: data loader processes per device, or ``auto`` (``medssl.data.workers``:
            sized from the usable CPUs and the trainer's devices, logged once).
        targets: target columns to validate and encode.
        cache, cache_dir, reset_cache: see ``medssl.data.cache.build_dataset``. Under DDP
            with ``cache=memory`` each rank caches and serves only its share of every split
            (``rank_share``: DistributedSampler's split, the training share drawn once per
            run from ``seed``) instead of a copy of the whole cohort; each rank then
            reshuffles its training share every epoch.
        slices: split name -> stored voxel axis; that split's volume rows become one 2D
            item per slice (e.g. ``{"train": 2}`` for 2D training, whole volumes elsewhere).
        empty_per_foreground: for sliced splits with labels, keep all foreground slices and
            this many empty slices per foreground slice (None keeps all).
        seed: seed of that slice selection and of the training order (drawn from
            (seed, epoch)); None draws both at random.
        on_bad_sample: ``error`` stops on any bad row (listing all of them); ``skip`` leaves
            out rows with CSV problems or unreadable volumes (header check) and logs their
            count; the run writes them to ``bad_rows.csv``.

    Attributes:
        cohort: the validated CSV (``cohort.encodings`` maps targets to categories); set by
            ``setup``.
        datasets: split name -> dataset; set by ``setup``.
        bad_rows: rows left out under ``skip``, with their problems (``write_bad_rows``).
    """

    def __init__(self, csv_path: str | Path, task: str, splits: Mapping[str, Folds],
                 settings: Preprocessing, augment: Mapping[str, Sequence[Callable]] | None = None,
                 device_augment: Sequence[Callable] = (),
                 batch_size: int = 2, eval_batch_size: int | None = None,
                 n_workers: int | str = 0, targets: Sequence[str] = (), cache: str = "none",
                 cache_dir: str | Path | None = None, reset_cache: bool = False,
                 slices: Mapping[str, int] | None = None,
                 empty_per_foreground: float | None = None, seed: int | None = 0,
                 on_bad_sample: str = "error") -> None:
        super().__init__()
        augment = dict(augment or {})
        for name in [*splits, *augment, *(slices or {})]:
            one_of("split", name, SPLITS)
        for what, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise InputError(f"{what} must be positive, got {value}")
        n_workers = check_n_workers(n_workers)
        one_of("cache", cache, CACHE_MODES)
        self.on_bad_sample = bad_sample_mode(on_bad_sample)
        self.csv_path, self.task, self.settings = csv_path, task, settings
        self.splits = dict(splits)
        self.augment, self.device_augment = augment, list(device_augment)
        self.batch_size, self.n_workers = batch_size, n_workers
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.targets = list(targets)
        self.cache, self.cache_dir, self.reset_cache = cache, cache_dir, reset_cache
        self.slices, self.empty_per_foreground, self.seed = dict(slices or {}), \
            empty_per_foreground, seed
        self.datasets: dict[str, Dataset] = {}
        self.cohort: Cohort | None = None
        self._logged_workers: set[tuple[int, bool]] = set()
        # (global rank, world size) this process will train as; an attached trainer's wins.
        # The run sets it before ``setup`` (which comes before the trainer): medssl.run.harness.
        self.layout: tuple[int, int] = (0, 1)
        self.shard: tuple[int, int] | None = None  # the layout, when the memory cache is sharded

    def setup(self, stage: str | None = None) -> None:
        """Build every split's dataset (once; later calls, e.g. for ``test``, reuse them)."""
        if self.cohort is not None:
            return
        trainer = self.trainer
        if trainer is not None:
            self.layout = (trainer.global_rank, trainer.world_size)
        if self.cache == "memory" and self.layout[1] > 1:
            self.shard = self.layout
        self.datasets, self.cohort = make_datasets(
            self.csv_path, self.task, self.splits, self.settings, targets=self.targets,
            augment=self.augment, cache=self.cache, cache_dir=self.cache_dir,
            reset_cache=self.reset_cache, slices=self.slices,
            empty_per_foreground=self.empty_per_foreground, seed=self.seed,
            on_bad_sample=self.on_bad_sample, select=self.select, share=self.layout)
        if self.shard is not None:
            log.info("cache=memory under DDP: rank %d of %d caches and serves its share",
                     *self.shard)
        log.info("%s: %s", Path(self.csv_path).name,
                 ", ".join(f"{n} {len(d)} items" for n, d in self.datasets.items()))

    def select(self, name: str, items: list[dict], cohort: Cohort) -> list[dict]:
        """The items split ``name`` serves, chosen before anything is cached: all of them, or
        under a sharded memory cache this rank's share. Subclasses narrow them first (e.g. a
        label subset) and call this last. Evaluation items (every split but ``train``) are
        numbered (``ITEM_INDEX``), so that metrics under DDP count each once: the samplers pad
        every device's share with repeated items."""
        if name != "train":
            items = [{**item, ITEM_INDEX: i} for i, item in enumerate(items)]
        if self.shard is None:
            return items
        return rank_share(items, *self.shard,
                          shuffle_seed=(self.seed or 0) if name == "train" else None)

    @property
    def bad_rows(self) -> BadRows:
        """Rows left out as bad (``on_bad_sample="skip"``) with their problems."""
        return [] if self.cohort is None else self.cohort.rejected

    def _dataset(self, name: str) -> Dataset:
        if self.cohort is None:
            raise RuntimeError("call setup() before asking for data loaders")
        if name not in self.datasets:
            raise InputError(f"{self.csv_path}: no '{name}' split configured (splits: "
                             f"{sorted(self.datasets)}); give its folds")
        return self.datasets[name]

    def loader_options(self) -> dict:
        """``num_workers``, ``pin_memory`` and ``persistent_workers`` for a DataLoader.

        ``n_workers: auto`` is sized from the attached trainer's devices (before one is
        attached: one process, GPU if CUDA is available); memory is pinned only for GPU
        training, where it speeds the copy to the device.
        """
        devices, on_gpu = trainer_layout(self.trainer)
        n = loader_workers(self.n_workers, devices, on_gpu)
        if (n, on_gpu) not in self._logged_workers:  # once per distinct choice
            self._logged_workers.add((n, on_gpu))
            how = (f"auto for {usable_cpus()} usable CPUs, {devices} device(s) per node, "
                   f"{'GPU' if on_gpu else 'CPU'} training" if self.n_workers == AUTO
                   else "n_workers")
            log.info("data loader workers per device: %d (%s); pin_memory %s", n, how,
                     "on" if on_gpu else "off")
        return {"num_workers": n, "pin_memory": on_gpu, "persistent_workers": n > 0}

    def _loader(self, name: str, batch_size: int, train: bool = False) -> DataLoader:
        dataset = self._dataset(name)
        trainer = self.trainer
        if self.shard is not None and trainer is not None and \
                (trainer.global_rank, trainer.world_size) != self.shard:
            # e.g. ddp_spawn/ddp_fork: every process got a copy of the main process's module.
            raise RuntimeError(
                f"cache=memory holds the share of rank {self.shard[0]} of {self.shard[1]}, but "
                f"this process trains as rank {trainer.global_rank} of {trainer.world_size} "
                "(a spawn or fork launch copies the main process's data): use the default DDP "
                "launch (strategy=ddp), or cache=disk or none")
        if self.shard is not None:
            # Already this rank's share: a one-replica DistributedSampler, which Lightning
            # keeps instead of splitting the share again (shuffled per (seed, epoch)).
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=train,
                                         seed=self.seed or 0)
        else:
            sampler = EpochRandomSampler(dataset, self.seed) if train else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                          **self.loader_options())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.device_augment and trainer is not None and trainer.training:
            return augment_batch(batch, self.device_augment)
        return batch

    def train_dataloader(self) -> DataLoader:
        n = len(self._dataset("train"))
        if n < self.batch_size:
            raise InputError(f"{self.csv_path}: {n} training items but batch_size="
                             f"{self.batch_size} (incomplete batches are dropped); lower "
                             "batch_size or add training rows")
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """The val loader, or an empty list (no validation) when no val split is given."""
        if self.cohort is not None and "val" not in self.datasets:
            return []
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size)
