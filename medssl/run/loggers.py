"""Loggers (TensorBoard always, ClearML when ``clearml=true``) and the console progress bar.

clearml is imported only when ClearML logging is enabled and configured.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
_FRAMEWORKS = ("catboost", "fastai", "gradio", "hydra", "joblib", "lightgbm", "matplotlib",
               "megengine", "pytorch", "scikit", "tensorboard", "tensorflow", "tfdefines",
               "xgboost")


def _offline() -> bool:
    return os.environ.get("CLEARML_OFFLINE_MODE", "").lower() in ("1", "true", "yes")


def clearml_configured() -> bool:
    """ClearML has a server configuration or runs in offline mode."""
    return (_offline() or "CLEARML_API_ACCESS_KEY" in os.environ
            or Path(os.environ.get("CLEARML_CONFIG_FILE", "~/clearml.conf")).expanduser().exists())


class ClearMLLogger(Logger):
    """Report Lightning metrics as ClearML scalars ("train/lr" -> title "train", series "lr")."""

    def __init__(self, task: Any) -> None:
        super().__init__()
        self.task = task

    @property
    def name(self) -> str:
        return "clearml"

    @property
    def version(self) -> str:
        return str(self.task.id)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the whole resolved config is connected once in make_clearml_logger

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        reporter = self.task.get_logger()
        for key, value in metrics.items():
            title, _, series = key.partition("/")
            reporter.report_scalar(title, series or title, value=float(value),
                                   iteration=step or 0)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.task.flush(wait_for_uploads=True)


def make_clearml_logger(project: str, task_name: str, config: dict) -> ClearMLLogger | None:
    """A ClearML task logging the config and scalars, or None (with a warning) when ClearML
    is not configured, so training goes on with TensorBoard alone."""
    if rank_zero_only.rank != 0:
        return None
    if not clearml_configured():
        log.warning("clearml=true, but ClearML is not configured (no ~/clearml.conf, no "
                    "CLEARML_API_* variables, CLEARML_OFFLINE_MODE unset): run `clearml-init`. "
                    "Logging to TensorBoard only.")
        return None
    from clearml import Task

    if _offline():
        Task.set_offline(offline_mode=True)
    # No framework patching (scalars come from this logger, not from hooking TensorBoard) and
    # no repository/package scan: that scan can block Task.close() for its 300 s timeout.
    frameworks = dict.fromkeys(_FRAMEWORKS, False) | {"detect_repository": False}
    task = Task.init(project_name=project, task_name=task_name, reuse_last_task_id=False,
                     auto_connect_frameworks=frameworks, auto_connect_arg_parser=False)
    task.connect_configuration(config, name="config")
    return ClearMLLogger(task)


def build_loggers(results_dir: str | Path, experiment: str, clearml: bool, clearml_project: str,
                  config: dict, purge_step: int | None = None) -> list[Logger]:
    """TensorBoard under ``results_dir/experiment/tensorboard``, plus ClearML when asked.

    ``purge_step``: on resume, TensorBoard hides earlier events at or after this step.
    """
    loggers: list[Logger] = [TensorBoardLogger(save_dir=str(results_dir), name=experiment,
                                               version="tensorboard", default_hp_metric=False,
                                               purge_step=purge_step)]
    if clearml:
        task_logger = make_clearml_logger(clearml_project, experiment, config)
        if task_logger is not None:
            loggers.append(task_logger)
    return loggers


class EpochProgressBar(TQDMProgressBar):
    """One bar per epoch showing the progress-bar metrics (loss, monitors).

    Drops Lightning's ``v_num`` (our TensorBoard version is the folder name "tensorboard",
    which showed as ``v_num=oard``) and the separate validation bars: validation results
    appear on the epoch's bar when validation ends.
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)
