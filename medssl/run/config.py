"""Typed config schemas shared by every entry script, and their registration with Hydra.

Values live in ``configs/*.yaml``; the dataclasses here give each key a type, so a bad
override such as ``batch_size=abc`` fails at composition with a message naming the key
(``full_key: batch_size``) instead of a ``TypeError`` deep inside training. A key missing from
the schema is an error too (typos do not pass silently).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

WEIGHT_SOURCES = ("dino_weights", "mae_weights", "suprem_weights", "baseline_weights",
                  "resume_training_from", "test_ckpt")


@dataclass
class RunConfig:
    """Keys every script shares (values and comments: ``configs/common.yaml``)."""

    task: str = MISSING
    experiment: str = MISSING
    results_dir: str = MISSING
    csv_path: str = MISSING
    train_folds: list[Any] = MISSING
    val_folds: list[Any] = MISSING
    backbone: dict[str, Any] = MISSING
    resize_to: list[int] | None = MISSING
    lower_percentile: float = MISSING
    upper_percentile: float = MISSING
    cache: str = MISSING
    cache_dir: str = MISSING
    reset_cache: bool = MISSING
    on_bad_sample: str = MISSING
    batch_size: int = MISSING
    n_workers: Any = MISSING  # auto or an int >= 0 (OmegaConf 2.3 has no int | str)
    n_epochs: int = MISSING
    lr: float = MISSING
    accumulate_grad_batches: int = MISSING
    precision: str = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING
    num_nodes: int = MISSING
    trainer: dict[str, Any] = field(default_factory=dict)
    progress_bar: bool = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING
    seed: int | None = MISSING
    monitor: str | None = MISSING
    monitor_mode: str = MISSING
    save_top_k: int = MISSING
    clearml: bool = MISSING
    clearml_project_name: str = MISSING
    dino_weights: str | None = MISSING
    mae_weights: str | None = MISSING
    suprem_weights: str | None = MISSING
    baseline_weights: str | None = MISSING
    resume_training_from: str | None = MISSING
    test_ckpt: str | None = MISSING
    trust_checkpoint: bool = MISSING


_SCHEMAS: dict[str, type] = {}


def schema(name: str) -> Callable[[type], type]:
    """Class decorator: register a script's schema as ``<name>_schema`` for its primary config."""

    def register(cls: type) -> type:
        _SCHEMAS[name] = cls
        return cls

    return register


def _demo_csv(name: str) -> str:
    """``${demo_csv:NAME}``: the demo cohort's NAME.csv, generated on first use."""
    from medssl.data.demo import ensure_demo

    return str(getattr(ensure_demo(), f"{name}_csv").resolve())


def register_configs() -> None:
    """Register the schemas and the ``demo_csv`` resolver; call before composing a config.

    Explicit rather than at import, so importing the package changes no global state.
    """
    from medssl.run.tasks import import_tasks

    import_tasks()
    store = ConfigStore.instance()
    for name, cls in _SCHEMAS.items():
        store.store(name=f"{name}_schema", node=cls)
    if not OmegaConf.has_resolver("demo_csv"):
        OmegaConf.register_new_resolver("demo_csv", _demo_csv)


def compose_config(config_dir: str | Path, config_name: str,
                   overrides: Sequence[str] = ()) -> DictConfig:
    """``config_dir/<config_name>.yaml`` plus overrides, composed as the entry scripts' Hydra
    does, for code that is not a Hydra app (benchmarks, tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def plain(value: Any) -> Any:
    """A config node as plain Python (lists, dicts); other values unchanged."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


# Keys the script configs set for their default ViT whatever the family (its position grid
# from the input size; MAE 2D's patches): other families take any input size and have no such
# arguments.
VIT_ONLY_KEYS = ("img_size", "patch_size")


def backbone_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``backbone`` group as ``build_backbone`` arguments, without ``VIT_ONLY_KEYS`` for
    families other than the ViT (so ``backbone=unet3d`` works with every script as is)."""
    config = plain(cfg.backbone)
    if config["name"] != "vit":
        for key in VIT_ONLY_KEYS:
            config.pop(key, None)
    return config


def kwargs_for(fn: Callable, cfg: DictConfig, **given: Any) -> dict[str, Any]:
    """Arguments of ``fn`` taken from the config keys of the same name, plus ``given``.

    Config keys equal the arguments they feed, so a constructor's options are never copied
    by hand into a call; ``given`` supplies what is not a config key (or differs from it).
    """
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    out = {n: plain(cfg[n]) for n in names if n in cfg and n not in given}
    return out | given
