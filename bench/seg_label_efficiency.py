"""Label efficiency of segmentation fine-tuning: DINO-initialised vs from scratch.

For 3D (patches of volumes) and 2D (slices), trains on 2, 4 and all labelled training subjects
of the demo cohort with the same number of optimizer steps, then reports the test Dice of the
best validation checkpoint. The 2D runs start from the same 3D DINO export, deflated to 2D
(``deflate_vit``): patch kernels summed over depth, position embeddings averaged over it.

    python self_supervised/dino.py                  # the DINO demo export, if not there yet
    python bench/seg_label_efficiency.py --dino results/dino_demo/backbone.pt

Prints a Markdown table and writes it, with every run's numbers, under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from medssl.data.table import read_cohort
from medssl.models.backbones import build_backbone
from medssl.models.weights import save_backbone
from medssl.run import compose_config, run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("seg_label_efficiency")


def deflate_vit(export: Path, out: Path) -> Path:
    """A 2D ViT export from a 3D one: same blocks; the patch kernel summed over the first
    (depth) axis, so a plane repeated through depth gives the 3D embedding; position
    embeddings averaged over depth."""
    payload = torch.load(export, map_location="cpu", weights_only=True)
    config = dict(payload["backbone_config"])
    if config["name"] != "vit" or config["spatial_dims"] != 3:
        raise ValueError(f"{export}: need a 3D ViT export, got {config['name']} "
                         f"{config['spatial_dims']}D")
    depth_grid = config["img_size"][0] // config["patch_size"][0]
    config |= {"spatial_dims": 2, "img_size": config["img_size"][1:],
               "patch_size": config["patch_size"][1:]}
    state = dict(payload["state_dict"])
    state["patch_embed.weight"] = state["patch_embed.weight"].sum(dim=2)
    pos = state["pos_embed"]
    grid = pos[:, 1:].reshape(1, depth_grid, -1, pos.shape[-1]).mean(dim=1)
    state["pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)
    config.pop("name")
    backbone = build_backbone("vit", **config)
    backbone.load_state_dict(state)
    save_backbone(out, backbone, {"deflated_from": str(export)})
    return out


def _compose(overrides: list[str]) -> DictConfig:
    return compose_config(CONFIGS, "segmentation", overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dino", type=Path, default=Path("results/dino_demo/backbone.pt"))
    parser.add_argument("--out", type=Path, default=Path("results/bench_seg"))
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps of every run")
    parser.add_argument("--subjects", nargs="+", default=["2", "4", "all"])
    parser.add_argument("--dims", nargs="+", type=int, default=[3, 2])
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.dino.is_file():
        raise SystemExit(f"{args.dino} not found: run `python self_supervised/dino.py` first")
    args.out.mkdir(parents=True, exist_ok=True)
    weights = {3: args.dino, 2: deflate_vit(args.dino, args.out / "dino_2d.pt")}
    base = _compose([f"results_dir={args.out}"])
    n_train = len(read_cohort(base.csv_path, "segmentation").select(list(base.train_folds)))
    dims_settings = {  # (overrides, what one item is)
        3: ["batch_size=2", "num_samples=2"],
        2: ["spatial_dims=2", "backbone.patch_size=[16,16]",
            "patch_size=[64,64]", "batch_size=8", "num_samples=1", "sw_batch_size=32"],
    }
    results = []
    for dims in args.dims:
        for subjects in args.subjects:
            n = n_train if subjects == "all" else int(subjects)
            for init in ("dino", "scratch"):
                name = f"seg{dims}d_{subjects}_{init}"
                overrides = [
                    f"results_dir={args.out}", f"experiment={name}",
                    f"label_fraction={n / n_train}", "n_epochs=100000",
                    f"+trainer.max_steps={args.steps}", "+trainer.check_val_every_n_epoch=null",
                    f"+trainer.val_check_interval={max(args.steps // 4, 1)}",
                    "progress_bar=false", *dims_settings[dims], *args.overrides]
                if init == "dino":
                    overrides.append(f"dino_weights={weights[dims]}")
                start = time.time()
                run(_compose(overrides))
                seconds = time.time() - start
                summary = json.loads((args.out / name / "test" / "metrics.json").read_text())
                results.append({"dims": dims, "subjects": n, "init": init,
                                 "test_dice": summary["dice"], "seconds": round(seconds),
                                 "per_class": summary["per_class"]})
                log.info("%s: test Dice %.3f in %.0f s", name, summary["dice"], seconds)
    table = ["| dims | labelled subjects | DINO test Dice | scratch test Dice | time (s) |",
             "|---|---|---|---|---|"]
    for dims in args.dims:
        for subjects in args.subjects:
            n = n_train if subjects == "all" else int(subjects)
            pair = {r["init"]: r for r in results if r["dims"] == dims and r["subjects"] == n}
            table.append(f"| {dims}D | {n} | {pair['dino']['test_dice']:.3f} | "
                         f"{pair['scratch']['test_dice']:.3f} | "
                         f"{pair['dino']['seconds']} / {pair['scratch']['seconds']} |")
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    text = "\n".join([f"{args.steps} optimizer steps per run; {machine}", "", *table])
    print(text)
    (args.out / "label_efficiency.md").write_text(text + "\n")
    (args.out / "label_efficiency.json").write_text(json.dumps(
        {"steps": args.steps, "machine": machine, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
