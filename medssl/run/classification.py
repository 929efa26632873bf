"""Classification fine-tuning as a run-layer task: target encoding from the training rows,
label fractions, augmentation, weight checks, and the test report.

``medssl-compare RUN_DIR [RUN_DIR ...]`` prints the test metrics of finished runs side by
side.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import EarlyStopping
from monai.transforms import RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from omegaconf import MISSING, DictConfig
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import Dataset

from medssl.data.datamodule import CohortDataModule
from medssl.data.pipeline import IMAGE, Preprocessing
from medssl.data.table import Cohort, CohortError, category_order, fail, is_missing
from medssl.errors import InputError, one_of
from medssl.models.backbone_base import POOLINGS
from medssl.models.backbones import build_backbone
from medssl.models.classifier import Classifier
from medssl.models.metrics import classification_report
from medssl.models.weights import (
    RESAVE_HINT,
    TRUST_HINT,
    LoadReport,
    check_backbone_config,
    load_file,
    stored_config,
)
from medssl.run.config import RunConfig, backbone_config, kwargs_for, plain, schema
from medssl.run.dino import preprocessing
from medssl.run.harness import (
    Task,
    WeightSource,
    precise_bn,
    resume_checkpoint,
    run_dir,
    weight_source,
)

log = logging.getLogger(__name__)
CLASS_WEIGHTS = ("balanced", "none")
MAX_LISTED = 40


@schema("classification")
@dataclass
class ClassificationConfig(RunConfig):
    """Classification keys (values and comments: ``configs/classification.yaml``)."""

    cls_targets: list[str] = MISSING
    test_folds: list[Any] = MISSING
    eval_batch_size: int | None = MISSING
    train_mode: str = MISSING
    min_lr: float = MISSING
    warmup_epochs: int = MISSING
    weight_decay: float = MISSING
    backbone_lr_scale: float | None = MISSING
    pooling: str = MISSING
    feature_norm: bool = MISSING
    precise_bn_batches: int = MISSING
    freeze_backbone_epochs: int = MISSING
    grad_clip: float = MISSING
    class_weights: str = MISSING
    label_fraction: float = MISSING
    patience: int | None = MISSING
    aug: bool = MISSING
    flip_axes: list[int] = MISSING
    flip_prob: float = MISSING
    affine_prob: float = MISSING
    rotate_deg: float = MISSING
    scale_range: float = MISSING
    intensity_prob: float = MISSING
    intensity_scale: float = MISSING
    intensity_shift: float = MISSING
    bootstrap_resamples: int = MISSING


def augmentations(flip_axes: Sequence[int], flip_prob: float, affine_prob: float,
                  rotate_deg: float, scale_range: float, intensity_prob: float,
                  intensity_scale: float, intensity_shift: float) -> list:
    """MONAI training augmentation: flips, a small affine, intensity scale and shift.

    Args:
        flip_axes: array axes to flip (RAS: 0 left-right, 1 front-back, 2 up-down).
        flip_prob: probability of each flip.
        affine_prob: probability of the random affine.
        rotate_deg: rotation range (+-degrees) about each axis.
        scale_range: zoom range (+-fraction) per axis.
        intensity_prob: probability of each intensity change.
        intensity_scale: intensity factor range (x * (1 + U(-s, s))).
        intensity_shift: intensity offset range (x + U(-s, s); volumes are scaled to [0, 1]).
    """
    steps: list = [RandFlipd(IMAGE, prob=flip_prob, spatial_axis=axis) for axis in flip_axes]
    if affine_prob > 0:
        steps.append(RandAffined(IMAGE, prob=affine_prob, rotate_range=math.radians(rotate_deg),
                                 scale_range=scale_range, padding_mode="border"))
    if intensity_prob > 0:
        steps += [RandScaleIntensityd(IMAGE, factors=intensity_scale, prob=intensity_prob),
                  RandShiftIntensityd(IMAGE, offsets=intensity_shift, prob=intensity_prob)]
    return steps


def label_subset(rows: list[dict], fraction: float, target: str, seed: int) -> list[dict]:
    """A seeded subset of ``fraction`` of ``rows``, stratified by ``target`` (an empty value
    is its own stratum), in the original row order."""
    if not 0 < fraction <= 1:
        raise InputError(f"label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return rows
    strata = [r[target] if not is_missing(r[target]) else "" for r in rows]
    try:
        keep, _ = train_test_split(list(range(len(rows))), train_size=fraction,
                                   stratify=strata, random_state=seed)
    except ValueError as err:
        raise InputError(f"label_fraction={fraction} of {len(rows)} training rows cannot keep "
                         f"every {target} class ({err})") from err
    return [rows[i] for i in sorted(keep)]


class _Encoded(Dataset):
    """A dataset's items, each with ``targets`` (target -> category index, -1 when empty) and
    ``record_index`` (the row's position in the cohort)."""

    def __init__(self, dataset: Dataset, extra: list[dict]) -> None:
        self.dataset, self.extra = dataset, extra

    def __len__(self) -> int:
        return len(self.extra)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], **self.extra[i]}


def _check_spellings(rows: Sequence[Mapping], targets: Sequence[str], csv_path: Path) -> None:
    """Refuse one class written two ways in the CSV ('1' and '1.0', 'Male' and 'male'): as
    text they would be two classes, or a val/test value "never seen" in training."""
    problems = []
    for t in targets:
        spellings: dict[object, dict[str, str]] = {}
        for r in rows:
            value = r[t]
            if is_missing(value):
                continue
            try:
                key: object = float(value)
            except ValueError:
                key = " ".join(value.split()).casefold()
            spellings.setdefault(key, {}).setdefault(value, r["row"])
        problems += [f"{t}: {', '.join(f'{v!r} ({row})' for v, row in found.items())} "
                     "are one class written differently; write it one way"
                     for found in spellings.values() if len(found) > 1]
    if problems:
        fail(csv_path, problems)


class ClassificationData(CohortDataModule):
    """The cohort data module plus target encoding from the training rows.

    After ``setup``: ``classes`` (target -> categories of the training rows, or the given
    ones), ``train_rows`` (the rows that train, after ``label_fraction``) and every split's
    items carrying ``targets`` and ``record_index``.

    Args:
        cls_targets: target columns (one head each).
        label_fraction: fraction of the training rows used (stratified by the first target).
        seed: seed of the label subset.
        classes: known encodings (e.g. from a checkpoint) instead of the training rows'.
        Other arguments: see ``CohortDataModule``.
    """

    def __init__(self, csv_path: str | Path, splits: Mapping[str, Any], settings: Preprocessing,
                 cls_targets: Sequence[str], augment: Mapping[str, Sequence] | None = None,
                 batch_size: int = 2, eval_batch_size: int | None = None,
                 n_workers: int | str = 0, cache: str = "none", cache_dir: str | Path | None = None,
                 reset_cache: bool = False, label_fraction: float = 1.0, seed: int = 0,
                 classes: Mapping[str, Sequence[str]] | None = None,
                 on_bad_sample: str = "error") -> None:
        if not cls_targets:
            raise InputError("cls_targets must name at least one target column")
        if not 0 < label_fraction <= 1:
            raise InputError(f"label_fraction must be in (0, 1], got {label_fraction}")
        # Targets are encoded here, not by the cohort reader: classes come from the training
        # rows only, and empty cells are allowed (masked loss).
        super().__init__(csv_path, "classification", splits=splits, settings=settings,
                         augment=augment, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         n_workers=n_workers, cache=cache, cache_dir=cache_dir,
                         reset_cache=reset_cache, seed=seed, on_bad_sample=on_bad_sample)
        self.cls_targets, self.label_fraction = list(cls_targets), label_fraction
        self.given_classes = None if classes is None else {k: list(v) for k, v in classes.items()}
        self.classes: dict[str, list[str]] = {}
        self.train_rows: list[dict] = []

    def select(self, name: str, items: list[dict], cohort: Cohort) -> list[dict]:
        """Classes and the label subset from the training rows (checked before anything is
        cached); the training split keeps only ``train_rows``."""
        if not self.classes:
            self._prepare(cohort)
        if name == "train":
            keep = {r["row"] for r in self.train_rows}
            items = [item for item in items if item["row"] in keep]
        return super().select(name, items, cohort)

    def _prepare(self, cohort: Cohort) -> None:
        absent = [t for t in self.cls_targets if t not in cohort.records[0]]
        if absent:
            raise CohortError(f"{cohort.csv_path}: cls_targets {absent} are not columns of the "
                              f"CSV (columns: {[c for c in cohort.records[0] if c != 'row']})")
        train = cohort.select(self.splits.get("train"), "train_folds")
        _check_spellings(cohort.records, self.cls_targets, cohort.csv_path)
        self.classes = self.given_classes or {
            t: category_order(r[t] for r in train if not is_missing(r[t]))
            for t in self.cls_targets}
        self._check_categories(cohort)
        self.train_rows = label_subset(train, self.label_fraction, self.cls_targets[0],
                                       self.seed)
        self._log_counts()

    def setup(self, stage: str | None = None) -> None:
        if self.cohort is not None:
            return
        super().setup(stage)
        index = {r["row"]: k for k, r in enumerate(self.cohort.records)}
        for name, dataset in list(self.datasets.items()):
            rows = [item["row"] for item in dataset.data]
            extra = [{"targets": self.encode(self.cohort.records[index[row]]),
                      "record_index": index[row]} for row in rows]
            self.datasets[name] = _Encoded(dataset, extra)

    def encode(self, record: Mapping) -> dict[str, int]:
        """Category index per target; -1 for an empty value."""
        return {t: -1 if is_missing(record[t]) else self.classes[t].index(record[t])
                for t in self.cls_targets}

    def _check_categories(self, cohort: Cohort) -> None:
        """Every val/test (and, with given classes, training) value must be a known class."""
        problems = []
        for name, folds in self.splits.items():
            if not folds or (name == "train" and self.given_classes is None):
                continue
            for r in cohort.select(folds, f"{name}_folds"):
                problems += [
                    f"{r['row']}: {t}='{r[t]}' in the {name} folds was never seen in the "
                    f"training rows (categories {self.classes[t]})"
                    for t in self.cls_targets
                    if not is_missing(r[t]) and r[t] not in self.classes[t]]
        if problems:
            more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(
                problems) > MAX_LISTED else ""
            raise CohortError(f"{cohort.csv_path}: {len(problems)} unknown categor"
                              f"{'y' if len(problems) == 1 else 'ies'}:\n  "
                              + "\n  ".join(problems[:MAX_LISTED]) + more)

    def _log_counts(self) -> None:
        n = len(self.train_rows)
        if self.label_fraction < 1:
            log.info("label_fraction=%g: %d training rows (seed %d, stratified by %s)",
                     self.label_fraction, n, self.seed, self.cls_targets[0])
        for t in self.cls_targets:
            counts = Counter(r[t] for r in self.train_rows if not is_missing(r[t]))
            log.info("%s: %d classes from the training rows: %s", t, len(self.classes[t]),
                     ", ".join(f"{c!r} ({counts[c]})" for c in self.classes[t]))
            empty = sum(is_missing(r[t]) for r in self.train_rows)
            if empty:
                log.info("%s: %d of %d training rows have no value: they train the other "
                         "targets only (masked loss)", t, empty, n)
        unused = sum(all(is_missing(r[t]) for t in self.cls_targets) for r in self.train_rows)
        if unused:
            log.warning("%d training rows have no value for any of %s: they train nothing",
                        unused, self.cls_targets)

    def train_labels(self) -> dict[str, np.ndarray]:
        """Category indices of the training rows per target (-1 for empty)."""
        codes = [self.encode(r) for r in self.train_rows]
        return {t: np.array([c[t] for c in codes]) for t in self.cls_targets}


def class_shares(labels: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]]
                 ) -> dict[str, list[float]]:
    """Each class's share of the labelled training rows per target, add-one smoothed
    ((count + 1) / (n + classes)) so a class without rows keeps a finite log."""
    out = {}
    for target, names in classes.items():
        y = labels[target][labels[target] >= 0]
        counts = np.bincount(y, minlength=len(names))
        out[target] = ((counts + 1) / (len(y) + len(names))).tolist()
    return out


def balanced_weights(labels: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]]
                     ) -> dict[str, list[float]]:
    """sklearn's "balanced" class weights, n / (n_classes * count), per target."""
    out = {}
    for target, names in classes.items():
        y = labels[target][labels[target] >= 0]
        absent = [names[c] for c in range(len(names)) if c not in set(y.tolist())]
        if absent:
            raise InputError(f"class_weights=balanced: {target} classes {absent} have no "
                             "training row (label_fraction too small?); use class_weights=none")
        out[target] = compute_class_weight("balanced", classes=np.arange(len(names)),
                                           y=y).tolist()
    return out


def _plain_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as stored in files


# Backbone learning rate / head learning rate when fine-tuning pretrained weights and
# `backbone_lr_scale: null`. DINO on AdrenalMNIST3D, 100% labels, 10 seeds: 0.03 beat 0.1 on
# 9 of them (bench/results/classification.md).
PRETRAINED_BACKBONE_LR_SCALE = 0.03


def backbone_lr_scale(configured: float | None, source: WeightSource | None,
                      hparams: Mapping) -> float:
    """The backbone's learning-rate factor: ``configured`` if set; else the value of the
    checkpoint being resumed or tested (``hparams``), else ``PRETRAINED_BACKBONE_LR_SCALE``
    for pretrained weights and 1 from scratch (``Classifier`` rejects a negative value)."""
    if configured is not None:
        return float(configured)
    if "backbone_lr_scale" in hparams:
        return float(hparams["backbone_lr_scale"])
    scale = PRETRAINED_BACKBONE_LR_SCALE if source is not None and source.pretrained else 1.0
    log.info("backbone_lr_scale=null: %s for %s", scale,
             source.key if scale != 1.0 else "a backbone trained from scratch")
    return scale


def _read(path: str | Path, trust: bool, pretrained: bool = False) -> Mapping:
    """A checkpoint to resume or test (``trust_checkpoint`` honoured), or pretrained weights
    (never unpickled)."""
    obj = load_file(path, trust and not pretrained,
                    unsafe_hint=RESAVE_HINT if pretrained else TRUST_HINT)
    if not isinstance(obj, Mapping):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a checkpoint")
    return obj


class ClassificationTask(Task):
    name = "classification"
    export_attr = "backbone"
    init_attr = "backbone"
    has_test = True
    module_needs_data = True  # class encoding and priors come from the loaded rows

    def build_data(self, cfg: DictConfig) -> ClassificationData:
        one_of("class_weights", cfg.class_weights, CLASS_WEIGHTS)
        one_of("pooling", cfg.pooling, POOLINGS)
        # The module is built once the rows are loaded: build its backbone now, so that a bad
        # backbone option fails before the cohort's volumes are read (about 1 s for a ViT-B).
        build_backbone(**backbone_config(cfg))
        classes = None
        if cfg.test_ckpt is not None:  # evaluate with the checkpoint's encoding
            hparams = _read(cfg.test_ckpt, cfg.trust_checkpoint).get("hyper_parameters", {})
            classes = hparams.get("classes")
            if classes is None:
                raise InputError(f"test_ckpt={cfg.test_ckpt} is not a classification "
                                 "checkpoint of ours (no class encoding in its hyper_parameters)")
        one_of("train_mode", cfg.train_mode, ("finetune", "linear"))
        augment = {}
        if cfg.aug and cfg.train_mode == "linear":
            log.info("train_mode=linear: no augmentation (each row's features are computed once)")
        elif cfg.aug:
            augment["train"] = augmentations(**kwargs_for(augmentations, cfg))
        splits = {"train": plain(cfg.train_folds), "val": plain(cfg.val_folds) or None,
                  "test": plain(cfg.test_folds) or None}
        return ClassificationData(**kwargs_for(
            ClassificationData, cfg, splits=splits, settings=preprocessing(cfg), augment=augment,
            seed=0 if cfg.seed is None else cfg.seed, classes=classes))

    def build_module(self, cfg: DictConfig, data: ClassificationData) -> Classifier:
        weights = priors = None
        if cfg.test_ckpt is None:
            labels = data.train_labels()
            priors = class_shares(labels, data.classes)
            if cfg.class_weights == "balanced":
                weights = balanced_weights(labels, data.classes)
        source = weight_source(cfg)
        checkpoint = cfg.test_ckpt or resume_checkpoint(cfg, source, announce=False)
        hparams = ({} if checkpoint is None else
                   _read(checkpoint, cfg.trust_checkpoint).get("hyper_parameters", {}))
        module = Classifier(**kwargs_for(
            Classifier, cfg, backbone_config=backbone_config(cfg), classes=data.classes,
            class_weights=weights, class_priors=priors,
            backbone_lr_scale=backbone_lr_scale(cfg.backbone_lr_scale, source, hparams)))
        module.backbone.check_input_size(plain(cfg.resize_to), "resize_to")
        if checkpoint is not None:
            self._check_checkpoint(checkpoint, hparams, module)
        return module

    @staticmethod
    def _check_checkpoint(path: str | Path, hparams: Mapping, module: Classifier) -> None:
        """A checkpoint to resume or test (its ``hparams``) must be a classifier with the
        configured pooling, feature norm and classes (the run layer's ``check_fits`` compares
        its backbone settings, as for every script)."""
        if "classes" not in hparams:
            raise InputError(f"{path} is not a classification checkpoint of ours (no class "
                             "encoding in its hyper_parameters); to start from another "
                             "script's weights use dino_weights=, mae_weights= or "
                             "suprem_weights=")
        # Checkpoints from before the option pooled the CLS token.
        pooling = hparams.get("pooling", "cls")
        if pooling != module.hparams.pooling:
            raise InputError(f"{path} was trained with pooling={pooling}, but "
                             f"pooling={module.hparams.pooling} is configured: set "
                             f"pooling={pooling} (the heads read those features)")
        # Checkpoints from before the option had it in linear mode only.
        norm = hparams.get("feature_norm", False) or hparams.get("train_mode") == "linear"
        if norm != (module.hparams.feature_norm or module.linear):
            raise InputError(f"{path} was trained with feature_norm={norm}, but "
                             f"feature_norm={module.hparams.feature_norm} is configured "
                             f"(train_mode={module.hparams.train_mode}): set "
                             f"feature_norm={norm}")
        classes = hparams.get("classes")
        if classes is not None and _plain_json(classes) != _plain_json(module.hparams.classes):
            raise InputError(f"{path} was trained with classes {classes}, but the training rows "
                             f"of this CSV give {dict(module.hparams.classes)}")

    def load_pretrained(self, module: L.LightningModule, source: WeightSource) -> LoadReport:
        """Check the file's recorded backbone config first, then load its backbone weights
        (our export, DINO's teacher, MAE's encoder, SuPreM; see ``load_weights``)."""
        stored = stored_config(_read(source.path, trust=False, pretrained=True))
        if stored is not None:
            check_backbone_config(f"{source.key}={source.path}", stored, module.backbone.config)
        return super().load_pretrained(module, source)

    def callbacks(self, cfg: DictConfig, data: ClassificationData) -> list[L.Callback]:
        callbacks: list[L.Callback] = [ClassificationReport(
            run_dir(cfg), data, n_resamples=cfg.bootstrap_resamples,
            seed=0 if cfg.seed is None else cfg.seed,
            extra={"label_fraction": cfg.label_fraction, "train_mode": cfg.train_mode})]
        precise = precise_bn(cfg, _classifier_forward)  # checks the value in every mode
        if cfg.train_mode != "linear":
            # A frozen backbone's features do not move, so the running averages converge; the
            # re-estimate would only read every training image a second time per epoch.
            callbacks += precise
        if cfg.patience is not None and cfg.val_folds:
            callbacks.append(EarlyStopping(monitor=cfg.monitor, mode=cfg.monitor_mode,
                                           patience=cfg.patience, check_finite=False))
        return callbacks


def _classifier_forward(module: Classifier, batch: dict) -> None:
    module(batch["image"], batch["record_index"])


class ClassificationReport(L.Callback):
    """Writes the training-row record at fit start and the test report after testing:
    predictions.csv, metrics.json, ROC and confusion PNGs (also to TensorBoard)."""

    def __init__(self, out_dir: Path, data: ClassificationData, n_resamples: int, seed: int,
                 extra: Mapping) -> None:
        self.out_dir, self.data = Path(out_dir), data
        self.n_resamples, self.seed, self.extra = n_resamples, seed, dict(extra)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame([{"PatientID": r["PatientID"], "row": r["row"]}
                          for r in self.data.train_rows]).to_csv(
                self.out_dir / "train_rows.csv", index=False)

    def on_test_end(self, trainer: L.Trainer, module: Classifier) -> None:
        results = module.test_results
        if not trainer.is_global_zero or results is None:
            return
        records = self.data.cohort.records
        extra = self.extra | {"n_train_rows": len(self.data.train_rows),
                              "checkpoint": str(trainer.ckpt_path or "")}
        report, figures = classification_report(
            self.out_dir, [records[i]["PatientID"] for i in results["index"]],
            results["labels"], results["probs"], module.hparams.classes, self.n_resamples,
            self.seed, extra, rows=[records[i]["row"] for i in results["index"]])
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_figure"):
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"test/{name}", fig, trainer.global_step)
        mean = report["mean"]
        log.info("Test: AUC %.3f, accuracy %.3f, balanced accuracy %.3f (%d subjects); "
                 "report in %s", mean["auc"], mean["acc"], mean["bacc"], report["n_subjects"],
                 self.out_dir)


TASK = ClassificationTask()
