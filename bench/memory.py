"""Peak memory per sample of each backbone's training forward + backward, with and without
activation checkpointing (``use_checkpoint``).

    python bench/memory.py            # each backbone at its default (demo) size, batch 2 (~1 min)
    python bench/memory.py --full     # also the OAI input size [40,224,224]
    python bench/memory.py --device cuda --batch 4

Backbones are built from ``configs/backbone/<name>.yaml`` (EfficientNet, which has no config
of its own, from its constructor defaults), in training mode; the loss is the sum of every
``forward_features`` map, so every activation a decoder or head would use is kept. Two
measures per run, each in a fresh process:

- saved for backward: bytes of the distinct tensors autograd keeps between forward and
  backward (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded; exact and
  independent of the allocator and of other load.
- peak: on CPU the rise of the process's peak RSS over its RSS just before the step (includes
  temporary buffers and the gradients); on CUDA ``torch.cuda.max_memory_allocated`` over the
  allocation before the step.

Both are divided by the batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# name: (backbone registry name, config overrides, input (C, *spatial), full-size only)
CASES: dict[str, tuple[str, dict, tuple[int, ...], bool]] = {
    "vit-demo": ("vit", {"img_size": [32, 64, 64]}, (1, 32, 64, 64), False),
    "unet3d-demo": ("unet3d", {}, (1, 32, 64, 64), False),
    "swin-demo": ("swin_unetr", {}, (1, 32, 64, 64), False),
    "efficientnet-b0-2d": ("efficientnet", {}, (1, 224, 224), False),
    "vit-s-oai": ("vit", {"img_size": [40, 224, 224], "hidden_size": 384, "mlp_dim": 1536,
                          "num_layers": 12, "num_heads": 6}, (1, 40, 224, 224), True),
    "unet3d-oai": ("unet3d", {}, (1, 40, 224, 224), True),
    "swin48-oai-32": ("swin_unetr", {"feature_size": 48}, (1, 32, 224, 224), True),
}


def backbone_config(name: str, overrides: dict) -> dict:
    """The backbone's config file values (interpolations replaced by ``overrides``)."""
    path = REPO / "configs" / "backbone" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())["backbone"] if path.exists() else {"name": name}
    config.update(overrides)
    return config


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(case: str, checkpoint: bool, batch: int, device: str) -> dict:
    from medssl.models.backbones import build_backbone

    name, overrides, shape, _ = CASES[case]
    torch.manual_seed(0)
    net = build_backbone(**{**backbone_config(name, overrides), "use_checkpoint": checkpoint})
    net = net.to(device).train()
    x = torch.randn(batch, *shape, device=device)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        maps = net.forward_features(x)
    sum(m.sum() for m in maps).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"saved_mb": sum(saved.values()) / batch / 1e6, "peak_mb": peak / batch / 1e6,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="also the OAI input sizes")
    parser.add_argument("--case", nargs="*", default=None, choices=sorted(CASES))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        case, ckpt = args.one
        print(json.dumps(run_one(case, ckpt == "1", args.batch, args.device)))
        return
    names = args.case or [n for n, c in CASES.items() if args.full or not c[3]]
    print(f"torch {torch.__version__}, device {args.device}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; MB per sample\n")
    print("| backbone | input | params (M) | saved for backward: off / on | peak: off / on | "
          "peak ratio on/off |")
    print("|---|---|---|---|---|---|")
    for case in names:
        res = {}
        for ckpt in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--one", case, ckpt, "--batch",
                                  str(args.batch), "--device", args.device],
                                 capture_output=True, text=True)
            if out.returncode:
                res = {"error": out.stderr.strip().splitlines()[-1]}
                break
            res[ckpt] = json.loads(out.stdout.strip().splitlines()[-1])
        if "error" in res:
            print(f"| {case} | failed: {res['error']} |", flush=True)
            continue
        off, on = res["0"], res["1"]
        shape = "x".join(str(s) for s in CASES[case][2][1:])
        print(f"| {case} | {shape} | {off['params_m']:.1f} | {off['saved_mb']:.0f} / "
              f"{on['saved_mb']:.0f} | {off['peak_mb']:.0f} / {on['peak_mb']:.0f} | "
              f"{on['peak_mb'] / off['peak_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
