"""Does DINO have a signal to start from? How well a backbone tells a volume's views apart.

DINO's self-distillation bootstraps from a network that already maps two views of one image
closer together than views of different images. Where it does not, the teacher's targets
cannot be predicted from the student's views, and without head batch norm the head drifts to
uniform output (``bench/results/dino.md``). This script measures that signal before a run is
spent: it composes ``configs/dino.yaml`` with the overrides given, exactly as
``self_supervised/dino.py`` would, cuts training batches into the run's views (the same
``MultiCropd``), embeds every view with the teacher backbone (random init, or the run's
weight source: ``dino_weights=``, ``mae_weights=``, ``suprem_weights=``) and reports, for
global-global and global-local view pairs, with each view's features centred over the batch:

- ``same`` / ``other``: mean cosine between views of the same volume / of different volumes;
- ``top1``: how often a volume's own other view is its nearest neighbour (``top1_chance``:
  1 / batch size, averaged over the batches seen).

    python bench/dino_views.py preset=medmnist csv_path=ADRENAL.csv batch_size=64 cache=none
    python bench/dino_views.py preset=medmnist csv_path=ADRENAL.csv batch_size=64 \\
        mae_weights=results/mae/backbone.pt

On AdrenalMNIST3D a fresh ViT gives top-1 0.03 (global-global) and 0.02 (global-local) at
batch 64 with the default views, and identical views give 1.0 (``bench/results/dino.md``).
Training logs the global-global numbers of its teacher every step (``train/view_top1``,
``train/view_cosine``); this script gives them before a run, at a larger batch, and for the
local views too.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor

from medssl.models import monitors
from medssl.models.backbone_base import pooled_features
from medssl.run import compose_config
from medssl.run.dino import DinoTask
from medssl.run.harness import weight_source

log = logging.getLogger("dino_views")
REPO = Path(__file__).resolve().parents[1]


def view_agreement(a: Tensor, b: Tensor) -> dict[str, float]:
    """``medssl.models.monitors.view_agreement`` (the monitor DINO logs while training) as
    numbers, with ``top1_chance`` = 1 / B."""
    return {k: v.item() for k, v in monitors.view_agreement(a, b).items()} | {
        "top1_chance": 1 / len(a)}


def dino_config(overrides: Sequence[str]) -> DictConfig:
    """``configs/dino.yaml`` with command-line overrides, as the entry script composes it."""
    return compose_config(REPO / "configs", "dino", overrides)


@torch.no_grad()
def measure(cfg: DictConfig, n_batches: int = 1) -> dict[str, dict[str, float]]:
    """Mean view agreement over ``n_batches`` training batches: ``global`` (view 1 against
    view 2) and ``local`` (each global view against each local view)."""
    L.seed_everything(0 if cfg.seed is None else cfg.seed, verbose=False)
    if cfg.augment_on_device:  # where the views are cut, not what they are
        log.info("augment_on_device=true: the views are cut in the loaders here")
        cfg.augment_on_device = False
    task = DinoTask()
    data = task.build_data(cfg)
    data.setup("fit")
    module = task.build_module(cfg, data)
    source = weight_source(cfg)
    if source is not None:
        if not source.pretrained:
            raise ValueError(f"{source.key}: give pretrained weights (dino_weights, "
                             "mae_weights, suprem_weights), not a run to resume or test")
        task.load_pretrained(module, source)  # logs its key report
    backbone = module.teacher_backbone.eval()
    n_global = module.hparams.n_global
    scores: dict[str, list[dict[str, float]]] = {"global": [], "local": []}
    batches = iter(data.train_dataloader())
    for _ in range(n_batches):
        batch = next(batches, None)
        if batch is None:  # a small cohort: another epoch of freshly drawn views
            batches = iter(data.train_dataloader())
            batch = next(batches)
        crops = batch["crops"]
        if crops[0].shape[0] < 2:
            raise ValueError("a batch of one volume has nothing to tell apart: raise batch_size")
        feats = [pooled_features(backbone, c, module.hparams.pooling) for c in crops]
        scores["global"].append(view_agreement(feats[0], feats[1]))
        scores["local"] += [view_agreement(feats[g], feats[j]) for g in range(n_global)
                            for j in range(n_global, len(crops))]
    return {kind: {name: statistics.fmean(row[name] for row in rows) for name in rows[0]}
            for kind, rows in scores.items() if rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="configs/dino.yaml overrides (key=value)")
    parser.add_argument("--batches", type=int, default=1, help="training batches to average")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = dino_config(args.overrides)
    result = measure(cfg, args.batches)
    for kind, values in result.items():
        print(f"{kind:6s} views: same-volume cos {values['same']:.3f}, other volumes "
              f"{values['other']:.3f}, top-1 {values['top1']:.3f} "
              f"(chance {values['top1_chance']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
