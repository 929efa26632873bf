"""``run(cfg)``: what every entry script shares, written once.

Results folder and lock, seeding, the weight-source rule, loggers, checkpoints with monitor
and mode from the config, backbone export, and fit, then test and predict when the task has
them. A method plugs in as a ``Task`` (``medssl.run.tasks``), which builds its data module,
LightningModule and extra callbacks from the config.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import CompactHydraException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from medssl.data.table import write_bad_rows
from medssl.errors import InputError, MissingFileError, one_of
from medssl.models.batchnorm import PreciseBatchNorm
from medssl.models.weights import (
    RESAVE_HINT,
    TRUST_HINT,
    LoadReport,
    check_backbone_config,
    load_file,
    load_weights,
    stored_config,
)
from medssl.run.checkpoints import checkpoint_callbacks
from medssl.run.config import WEIGHT_SOURCES, plain
from medssl.run.guards import FiniteLossCheck, NonFiniteLossError
from medssl.run.loggers import EpochProgressBar, build_loggers
from medssl.run.seeding import EpochSeed
from medssl.run.tasks import get_task

log = logging.getLogger(__name__)
PRETRAINED = ("dino_weights", "mae_weights", "suprem_weights", "baseline_weights")
BAD_ROWS = "bad_rows.csv"
MONITOR_MODES = ("min", "max")


@dataclass(frozen=True)
class WeightSource:
    """The one weight source of a run: its config key and file."""

    key: str
    path: Path

    @property
    def pretrained(self) -> bool:
        return self.key in PRETRAINED


class Task:
    """How one method builds its run; subclasses override the ``build_*`` hooks.

    Attributes:
        name: the config's ``task`` value.
        export_attr: the LightningModule attribute exported as ``backbone.pt`` (None: none).
        init_attr: the sub-network that pretrained weights (``dino_weights``, ...) start.
        has_test: the method has a test stage (``test_folds``, ``test_ckpt``).
        module_needs_data: ``build_module`` reads the loaded data (classification: its labels);
            otherwise the module is built before any volume loads, so a bad network option
            fails in seconds rather than after caching a cohort.
    """

    name: str = ""
    export_attr: str | None = None
    init_attr: str = "backbone"
    has_test: bool = False
    module_needs_data: bool = False

    def build_data(self, cfg: DictConfig) -> L.LightningDataModule:
        raise NotImplementedError

    def build_module(self, cfg: DictConfig, data: L.LightningDataModule) -> L.LightningModule:
        raise NotImplementedError

    def callbacks(self, cfg: DictConfig, data: L.LightningDataModule) -> list[L.Callback]:
        return []

    def build_predict_data(self, cfg: DictConfig) -> L.LightningDataModule | None:
        """Data for a predict stage after fit and test (e.g. a ``predict_csv``); None: none."""
        return None

    def load_pretrained(self, module: L.LightningModule, source: WeightSource) -> LoadReport:
        """Start ``init_attr`` from the source; the report is logged by the caller."""
        return load_weights(attrgetter(self.init_attr)(module), source.path)


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / cfg.experiment


def weight_source(cfg: DictConfig) -> WeightSource | None:
    """The run's one weight source, or None (from scratch, or auto-resume).

    Raises:
        ValueError: more than one source is set (all are named), or the file is missing.
    """
    given = [key for key in WEIGHT_SOURCES if cfg.get(key) is not None]
    if len(given) > 1:
        raise InputError(
            f"at most one weight source may be set, got {', '.join(given)}: pretrained weights "
            "(dino_weights, mae_weights, suprem_weights/baseline_weights) start a new run, "
            "resume_training_from continues one, test_ckpt evaluates one")
    if not given:
        return None
    path = Path(cfg[given[0]])
    if not path.is_file():
        raise MissingFileError(f"{given[0]}={path}: no such file")
    return WeightSource(given[0], path)


EXPORT_METHODS = {"dino_weights": "dino", "mae_weights": "mae"}  # the run each key expects


def check_loadable(path: Path, trust: bool, pretrained: bool = False,
                   key: str | None = None) -> int:
    """Read a weight file before any data is prepared: refuse one that is not a PyTorch file,
    or that ``torch.load(weights_only=True)`` cannot read (it would run pickled code) unless
    ``trust_checkpoint=true`` for a run's own checkpoint (``pretrained`` weights are never
    unpickled). When ``key`` (``dino_weights``/``mae_weights``) names an export another method
    made (its ``method`` entry), warn: it loads, but the run's config and comparisons will
    name the key. Returns the ``global_step`` (0 if none)."""
    checkpoint = load_file(path, trust and not pretrained, mmap=True,
                           unsafe_hint=RESAVE_HINT if pretrained else TRUST_HINT)
    if not isinstance(checkpoint, dict):
        return 0
    expected, made_by = EXPORT_METHODS.get(key), checkpoint.get("method")
    if expected is not None and made_by is not None and made_by != expected:
        log.warning("%s=%s is an export of a %s run, not of %s: it is loaded all the same, but "
                    "this run's config and comparisons will call it %s", key, path, made_by,
                    expected, key)
    return int(checkpoint.get("global_step", 0))


def check_fits(path: Path, key: str, task: Task, module: L.LightningModule,
               trust: bool) -> None:
    """A checkpoint to resume or test must be one of this script's runs with this
    configuration: its backbone settings and its parameter names and shapes are compared
    with the built module, so a mismatch is a short error instead of Lightning's list of
    every key."""
    ckpt = load_file(path, trust, mmap=True, unsafe_hint=TRUST_HINT)
    what = f"{key}={path}"
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
            and "pytorch-lightning_version" in ckpt):
        raise InputError(f"{what} is not a checkpoint of a run (a .ckpt in a run's "
                         "checkpoints/ folder); to start from exported weights use "
                         "dino_weights=, mae_weights= or suprem_weights=")
    backbone = attrgetter(task.export_attr)(module) if task.export_attr else None
    stored = stored_config(ckpt)
    if stored is not None and isinstance(getattr(backbone, "config", None), dict):
        check_backbone_config(what, stored, backbone.config)
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    mismatched = [f"{k} {theirs[k]} in the file, {ours[k]} here" for k in sorted(ours)
                  if k in theirs and theirs[k] != ours[k]]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{len(found)} {name} (e.g. {', '.join(found[:3])})" for name, found in
             (("keys of this model missing", missing), ("keys this model lacks", unexpected),
              ("shape mismatches", mismatched)) if found]
    raise InputError(f"{what} does not fit this {task.name} run: {'; '.join(parts)}. Is it a "
                     "checkpoint of another script, or of a run with other settings?")


def resume_checkpoint(cfg: DictConfig, source: WeightSource | None,
                      announce: bool = True) -> Path | None:
    """The checkpoint to resume: ``resume_training_from``, else this experiment's last.ckpt
    (not in a ``fast_dev_run`` debug run, which saves no checkpoints).

    Re-running the command of an interrupted run resumes it, even when that command names
    pretrained weights: the checkpoint already holds weights trained from them. ``announce``
    logs which file is resumed.
    """
    if source is not None and source.key == "resume_training_from":
        return source.path
    if source is not None and source.key == "test_ckpt":
        return None
    last = run_dir(cfg) / "checkpoints" / "last.ckpt"
    if not last.is_file() or plain(cfg.trainer).get("fast_dev_run"):
        return None
    if announce and source is not None:
        log.info("%s is not loaded: continuing from %s, a run that started from it (a "
                 "finished run trains no further)", source.key, last)
    elif announce:
        log.info("Continuing this experiment from %s (an interrupted run resumes training, a "
                 "finished one trains no further)", last)
    return last


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/run.lock`` for the run; a second run of the same experiment refuses.

    A lock left by a process that is gone (same host, dead pid) is taken over. Only global
    rank 0 locks: the other DDP ranks belong to the same run.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "run.lock"
    host, pid = socket.gethostname(), os.getpid()
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner_host, _, owner_pid = lock.read_text().partition(" ")
        if owner_host != host or _alive(int(owner_pid or 0)):
            raise RuntimeError(
                f"{folder} is in use by another run (process {owner_pid} on {owner_host}, "
                f"see {lock}); choose another experiment name, or wait for it to finish"
            ) from None
        log.warning("Taking over the stale lock %s of process %s, which is gone", lock, owner_pid)
        lock.unlink()
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(f"{host} {pid}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@rank_zero_only
def save_config(cfg: DictConfig) -> None:
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


@rank_zero_only
def save_bad_rows(cfg: DictConfig, data: L.LightningDataModule) -> None:
    """List the rows the data module left out (``on_bad_sample: skip``; its ``bad_rows``) in
    ``bad_rows.csv``; a list from an earlier run of the experiment is removed when none are."""
    path = run_dir(cfg) / BAD_ROWS
    bad = getattr(data, "bad_rows", [])
    if not bad:
        path.unlink(missing_ok=True)
        return
    write_bad_rows(path, bad)
    log.warning("%d bad row(s) left out of this run (on_bad_sample=skip) are listed with their "
                "problems in %s", len(bad), path)


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 autocast on GPUs that support it (Ampere and newer: half the activation
    memory, tensor cores), else full fp32 (on CPU, bf16 autocast did not speed up the ViT step:
    issue 11). Any other value is Lightning's own."""
    if precision != "auto":
        return precision
    # Native bf16 only: torch also reports pre-Ampere GPUs (V100, T4) that emulate it slowly.
    if (_on_gpu(accelerator) and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported(including_emulation=False)):
        return "bf16-mixed"
    return "32-true"


def compile_networks(module: nn.Module) -> list[str]:
    """``torch.compile`` every top-most backbone and segmentation network of ``module`` in
    place (``nn.Module.compile``: parameter names, checkpoints and exports stay the same).

    Only calls through the network itself are compiled; methods called directly (e.g. the
    MAE encoder's ``forward_tokens``) run eagerly. Returns the compiled submodules' names.
    """
    from medssl.models.backbone_base import Backbone
    from medssl.models.segmenters import Segmenter

    names: list[str] = []

    def visit(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, (Backbone, Segmenter)):
                child.compile()
                names.append(prefix + name)
            else:
                visit(f"{prefix}{name}.", child)

    visit("", module)
    return names


def to_channels_last(module: nn.Module) -> int:
    """Every convolution weight of ``module`` in channels-last memory order in place
    (``channels_last_3d`` for 3D, ``channels_last`` for 2D kernels); convolutions then produce
    channels-last activations, which cuDNN's tensor-core kernels prefer. Parameter names and
    values stay the same. Returns the number of convolutions converted."""
    formats = {5: torch.channels_last_3d, 4: torch.channels_last}
    converted = 0
    for child in module.modules():
        if isinstance(child, nn.modules.conv._ConvNd) and child.weight.dim() in formats:
            child.to(memory_format=formats[child.weight.dim()])
            converted += 1
    return converted


def precise_bn(cfg: DictConfig, forward: Callable[[nn.Module, Any], Any]) -> list[L.Callback]:
    """The PreciseBN callback for ``cfg.precise_bn_batches`` (0: none; it acts only on
    networks with batch norms). ``forward`` runs the module on one training batch."""
    if cfg.precise_bn_batches < 0:
        raise InputError(f"precise_bn_batches must be >= 0 (0 disables), got "
                         f"{cfg.precise_bn_batches}")
    return [PreciseBatchNorm(forward, cfg.precise_bn_batches)] if cfg.precise_bn_batches else []


ACCELERATORS = ("auto", "cpu", "gpu", "cuda")  # what medssl runs on (Lightning knows more)


def process_layout(cfg: DictConfig) -> tuple[int, int]:
    """(global rank, world size) that this process's trainer will have, known before the
    trainer is built (its callbacks need the checked data): Lightning resolves them at
    construction from ``devices``/``num_nodes`` and the launcher's environment (its own DDP
    launch, torchrun, SLURM), so a bare trainer with the same layout is asked."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    one_of("accelerator", cfg.accelerator, ACCELERATORS)
    quiet.setLevel(logging.WARNING)  # its device report is printed once, by the real trainer
    try:
        probe = L.Trainer(accelerator=cfg.accelerator, devices=plain(cfg.devices),
                          num_nodes=cfg.num_nodes,
                          strategy=plain(cfg.trainer).get("strategy", "auto"), logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    # e.g. accelerator=gpu on a machine without one, devices=[0, 1] on the CPU
    except (MisconfigurationException, TypeError, ValueError) as exc:
        gpus = torch.cuda.device_count()
        raise InputError(
            f"accelerator={cfg.accelerator}, devices={plain(cfg.devices)}, num_nodes="
            f"{cfg.num_nodes}: {exc} (this machine: {gpus} CUDA device(s) visible"
            + ("; accelerator=cpu or auto runs on the CPU)"
               if not gpus and cfg.accelerator in ("gpu", "cuda") else ")")) from exc
    finally:
        quiet.setLevel(level)
    return probe.global_rank, probe.world_size


def build_trainer(cfg: DictConfig, task: Task, callbacks: list[L.Callback],
                  resume_step: int = 0) -> L.Trainer:
    """Lightning trainer: CPU, one GPU or DDP over ``devices``/``num_nodes``; extra Trainer
    arguments from ``trainer`` (e.g. ``+trainer.limit_train_batches=2``).

    ``resume_step``: the step a resumed run restarts from; TensorBoard drops the events an
    interrupted run wrote past it, so replayed steps are not shown twice.
    """
    if cfg.monitor_mode not in MONITOR_MODES:
        raise InputError(f"monitor_mode must be one of {MONITOR_MODES}, got {cfg.monitor_mode!r}")
    monitor = cfg.monitor if cfg.get("val_folds") else None
    callbacks = [*callbacks, *checkpoint_callbacks(
        run_dir(cfg) / "checkpoints", monitor, cfg.monitor_mode, cfg.save_top_k,
        task.export_attr, task.name)]
    if cfg.progress_bar:
        callbacks.append(EpochProgressBar())
    if cfg.seed is not None:
        callbacks.append(EpochSeed(cfg.seed))
    callbacks.append(FiniteLossCheck())
    loggers = build_loggers(cfg.results_dir, cfg.experiment, cfg.clearml,
                            cfg.clearml_project_name, OmegaConf.to_container(cfg, resolve=True),
                            purge_step=resume_step or None)
    owned = {  # Trainer arguments set by top-level config keys
        "default_root_dir": "results_dir/experiment", "max_epochs": "n_epochs",
        "accelerator": "accelerator", "devices": "devices", "num_nodes": "num_nodes",
        "precision": "precision", "accumulate_grad_batches": "accumulate_grad_batches",
        "logger": "clearml", "callbacks": "monitor", "enable_progress_bar": "progress_bar"}
    extra = plain(cfg.trainer)
    clash = {k: owned[k] for k in extra if k in owned}
    if clash:
        raise InputError("trainer: set these through their own config keys instead: "
                         + ", ".join(f"trainer.{k} -> {v}" for k, v in clash.items()))
    # Defaults the ``trainer:`` group may override (e.g. +trainer.log_every_n_steps=50).
    defaults = {
        # Batch-norm statistics over all GPUs under DDP (SyncBatchNorm only runs on GPUs).
        "sync_batchnorm": _on_gpu(cfg.accelerator), "log_every_n_steps": 1,
        "num_sanity_val_steps": 0}
    return L.Trainer(
        default_root_dir=run_dir(cfg), max_epochs=cfg.n_epochs, accelerator=cfg.accelerator,
        devices=plain(cfg.devices), num_nodes=cfg.num_nodes,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        accumulate_grad_batches=cfg.accumulate_grad_batches, logger=loggers, callbacks=callbacks,
        enable_progress_bar=cfg.progress_bar, **(defaults | extra))


def run(cfg: DictConfig) -> L.Trainer:
    """Build the configured method's run, then fit, test and predict as configured.

    Returns:
        the trainer (its ``lightning_module`` holds the trained module).
    """
    task = get_task(cfg.task)
    source = weight_source(cfg)  # fails early on conflicting options
    if source is not None and source.key == "test_ckpt" and not task.has_test:
        raise InputError(f"test_ckpt: {task.name} has no test stage")
    resume = resume_checkpoint(cfg, source)
    resume_step = check_loadable(resume, cfg.trust_checkpoint) if resume is not None else 0
    if source is not None and source.path != resume:
        check_loadable(source.path, cfg.trust_checkpoint, source.pretrained, source.key)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    layout = process_layout(cfg)  # under DDP a memory cache holds only this rank's share
    data = task.build_data(cfg)
    data.layout = layout
    module = None if task.module_needs_data else task.build_module(cfg, data)
    data.setup("fit")  # every CSV and volume problem surfaces here, before training
    predict = task.build_predict_data(cfg)
    if predict is not None:
        predict.layout = layout
        predict.setup("predict")
    if module is None:
        module = task.build_module(cfg, data)
    checkpoint = resume or (source.path if source is not None and source.key == "test_ckpt"
                            else None)
    if checkpoint is not None:
        key = ("test_ckpt" if resume is None else "resume_training_from"
               if source is not None and source.key == "resume_training_from"
               else "resuming this experiment from")
        check_fits(checkpoint, key, task, module, cfg.trust_checkpoint)
    if source is not None and source.pretrained and resume is None:
        report = task.load_pretrained(module, source)
        (log.info if report.complete else log.warning)("%s: %s", source.key, report)
    if cfg.channels_last:
        log.info("channels_last: %d convolutions", to_channels_last(module))
    if cfg.compile:
        log.info("torch.compile: %s", ", ".join(compile_networks(module)) or "nothing to compile")
    with run_lock(run_dir(cfg)):
        save_config(cfg)
        save_bad_rows(cfg, data)
        trainer = build_trainer(cfg, task, task.callbacks(cfg, data), resume_step)
        weights_only = not cfg.trust_checkpoint
        if source is None or source.key != "test_ckpt":
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=weights_only)
        ckpt = source.path if source is not None and source.key == "test_ckpt" else "best"
        if ckpt == "best" and not trainer.checkpoint_callback.best_model_path:
            ckpt = None  # no validation: evaluate the weights as trained
        if task.has_test and cfg.get("test_folds"):
            trainer.test(module, datamodule=data, ckpt_path=ckpt, weights_only=weights_only)
        if predict is not None:
            trainer.predict(module, datamodule=predict, ckpt_path=ckpt,
                            weights_only=weights_only, return_predictions=False)
    if trainer.is_global_zero:
        log.info("Results in %s", run_dir(cfg))
    return trainer


class ReportedError(CompactHydraException):
    """An input error that Hydra prints as its message alone."""


def run_script(cfg: DictConfig) -> None:
    """``run`` for the entry scripts: an input error (a bad option, CSV row, volume or weight
    file) or a non-finite loss prints its message without a traceback and exits with status 1;
    any other error keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows every traceback.
    """
    try:
        run(cfg)
    except (InputError, NonFiniteLossError) as error:
        raise ReportedError(f"Error: {error}") from error
