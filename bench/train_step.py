"""The real training step of each method through a Lightning Trainer: samples/s, achieved FLOP/s
against this machine's matmul FLOP/s in the same precision, where the time goes, and what a
fused AdamW would save.

    python bench/train_step.py                      # demo-size cases: DINO (demo, ViT-S),
                                                    # classification, segmentation, MAE 3D
    python bench/train_step.py --full               # also the OAI reference sizes (minutes)
    python bench/train_step.py --case dino-vit-s --steps 5 --precision bf16-mixed

A case composes the script's config (``configs/<script>.yaml`` plus overrides, as the entry
script would), builds the module with the run layer's task, and fits it on synthetic batches
of the real batch format with ``limit_train_batches``: schedules, parameter groups, clipping,
last-layer freezing and the teacher EMA all run, as in training. Data costs nothing here (one
prepared batch served again), so this is the step alone. Each case runs in its own process,
so its peak memory (RSS on CPU, allocated on CUDA) is its own.

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one fitted
step (matmuls, convolutions and attention, forward and backward; the optimizer's elementwise
work is not counted). The matmul reference is the best of a few 2048x2048 ``torch.mm`` runs in
the case's precision, measured in the same process just before and after the steps; the
achieved rate uses the fastest timed step, so both sides of the ratio are the least disturbed
by other load on a shared machine. AdamW is timed alone (fastest of 15) on the module's own
parameter groups, default and ``fused=True``, because Lightning runs forward and backward
inside ``optimizer.step(closure)`` and the profiler cannot separate them. The run layer's
non-finite gradient check (``FiniteLossCheck.on_before_optimizer_step``: one ``_foreach_norm``
over every gradient and one host sync), which the bare trainer here leaves out, is timed the
same way on the module's parameters, as a share of the fastest step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def dino_batch(cfg: DictConfig, batch_size: int) -> dict:
    """A batch as the DINO data module yields it: ``crops``, global crops first."""
    n_local = cfg.n_crops - 2
    crops = [torch.rand(batch_size, 1, *cfg.global_crop_size) for _ in range(2)]
    crops += [torch.rand(batch_size, 1, *cfg.local_crop_size) for _ in range(n_local)]
    return {"crops": crops}


def classification_batch(cfg: DictConfig, batch_size: int) -> dict:
    """As the classification data module yields it: whole resized volumes, one class index per
    target (two classes each, see ``_stub_data``) and the rows' ids."""
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(batch_size, 1, *cfg.resize_to, generator=g),
            "record_index": torch.arange(batch_size),
            "targets": {t: torch.randint(0, 2, (batch_size,), generator=g)
                        for t in cfg.cls_targets}}


def segmentation_batch(cfg: DictConfig, batch_size: int) -> dict:
    """As the segmentation data module yields it: ``num_samples`` patches per volume, each
    with its label map (classes 0..num_classes-1)."""
    g = torch.Generator().manual_seed(0)
    n = batch_size * cfg.num_samples
    return {"image": torch.rand(n, 1, *cfg.patch_size, generator=g),
            "label": torch.randint(0, cfg.num_classes, (n, 1, *cfg.patch_size), generator=g)}


def mae_batch(cfg: DictConfig, batch_size: int) -> dict:
    """As the MAE data module yields it: volumes at ``resize_to`` (masking is the module's)."""
    return {"image": torch.rand(batch_size, 1, *cfg.resize_to)}


# name: (script config, overrides, batch builder, full-size only)
CASES: dict[str, tuple[str, list[str], Callable[[DictConfig, int], dict], bool]] = {
    # The default demo config (configs/dino.yaml, configs/backbone/vit.yaml).
    "dino-demo": ("dino", [], dino_batch, False),
    # ViT-S-like (hidden 384, 6 blocks, patch 16) at 2x 32x96x96 + 4x 16x48x48, head 65536:
    # the DINO row of shared/docs/cpu_costs.md.
    "dino-vit-s": ("dino", ["global_crop_size=[32,96,96]", "local_crop_size=[16,48,48]",
                            "resize_to=[32,96,96]", "backbone.patch_size=16",
                            "backbone.hidden_size=384", "backbone.mlp_dim=1536",
                            "backbone.num_layers=6", "backbone.num_heads=6", "out_dim=65536",
                            "hidden_dim=2048", "bottleneck_dim=256"], dino_batch, False),
    # The OAI reference recipe (preset=oai: UNet3D, 2x 40x224x224 + 2x 40x128x128).
    "dino-oai": ("dino", ["preset=oai", "csv_path=unused.csv"], dino_batch, True),
    # The demo defaults of the downstream scripts and MAE (configs/<script>.yaml as shipped):
    # ViT classifier on 32x64x64 volumes (two targets), UNETR on 2x2 patches of 32x64x64
    # (5 classes), 3D MAE ViT on 32x64x64.
    "classification-demo": ("classification", ["class_weights=none"], classification_batch,
                            False),
    "segmentation-demo": ("segmentation", [], segmentation_batch, False),
    "mae3d-demo": ("mae3d", [], mae_batch, False),
    # Convnets at the same demo size, for the channels_last comparison (--channels-last); the
    # UNet3D segmentation step takes ~30 s on one CPU core, so it runs with --full or --case.
    "segmentation-unet3d": ("segmentation", ["backbone=unet3d"], segmentation_batch, True),
    "classification-unet3d": ("classification", ["backbone=unet3d", "class_weights=none"],
                              classification_batch, False),
}


def _stub_data(cfg: DictConfig) -> SimpleNamespace:
    """What ``build_module`` reads from a data module: for classification, class names (two per
    target; the batches draw from them) and the training rows' labels (balanced)."""
    targets = cfg.get("cls_targets") or []
    return SimpleNamespace(classes={t: ["a", "b"] for t in targets},
                           train_labels=lambda: {t: np.array([0, 1] * 8) for t in targets})


class _Repeat(Dataset):
    """The same prepared batch, ``n`` times (batch_size=None in the loader)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return self.batch


class _StepTimer(L.Callback):
    """Wall time from batch start to batch end (forward, backward, clipping, optimizer, EMA)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose_config(script: str, overrides: list[str]) -> DictConfig:
    from medssl.run import compose_config as compose

    return compose(REPO / "configs", script, overrides)


def fit(module: L.LightningModule, batch: dict, n_batches: int, args: argparse.Namespace,
        callbacks: list[L.Callback]) -> None:
    """One epoch of ``n_batches`` steps on ``batch`` through a bare Lightning Trainer."""
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision,
                        max_epochs=1, limit_train_batches=n_batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks)
    loader = DataLoader(_Repeat(batch, n_batches), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)


def matmul_flops(device: str, precision: str, n: int = 2048, reps: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul in the dtype the precision setting computes in."""
    dtype = torch.bfloat16 if precision.startswith("bf16") else (
        torch.float16 if precision.startswith("16") else torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps):
        _sync(torch.device(device))
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(torch.device(device))
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def optimizer_timings(module: L.LightningModule, reps: int = 15) -> dict[str, float]:
    """Fastest seconds per AdamW step on the module's own parameter groups: as the module
    builds it (``models/optim.py``: foreach off CUDA), torch's per-tensor loop, and fused.

    The fastest run, not the median: on a shared machine the median mostly measures the load.
    """
    opt = module.configure_optimizers()
    groups = opt.param_groups if isinstance(opt, torch.optim.Optimizer) else opt[0].param_groups
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out: dict[str, list[float]] = {"default": [], "loop": [], "fused": []}
    flags = {"default": {}, "loop": {"foreach": False}, "fused": {"fused": True}}
    opts = {}
    for kind in out:
        opts[kind] = opt if kind == "default" else torch.optim.AdamW(
            [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")}
             for g in groups], **flags[kind])
        opts[kind].step()  # allocate state
    for _ in range(reps):
        for kind, o in opts.items():  # alternate, so load drift hits both alike
            _sync(params[0].device)
            start = time.perf_counter()
            o.step()
            _sync(params[0].device)
            out[kind].append(time.perf_counter() - start)
    return {k: min(v) for k, v in out.items()}


def finite_check_timing(module: L.LightningModule, precision: str, reps: int = 15) -> float:
    """Fastest seconds of the run layer's gradient check (``FiniteLossCheck``, as
    ``build_trainer`` adds it) on the module's current gradients, one process (no all-reduce)."""
    from medssl.run.guards import FiniteLossCheck

    check = FiniteLossCheck()
    trainer = SimpleNamespace(precision=precision, current_epoch=0, global_step=0,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda ok, all: ok))
    device = next(module.parameters()).device
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        check.on_before_optimizer_step(trainer, module, None)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def profile(module: L.LightningModule, batch: dict, args: argparse.Namespace,
            top: int) -> list[tuple[str, float]]:
    """Shares of two fitted steps' time by operator (self time), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    timer = _StepTimer()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda"
                                           else [])
    with torch_profile(activities=activities) as prof:
        fit(module, batch, 2, args, [timer])
    events = prof.key_averages()
    attr = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    rows = sorted(((e.key, getattr(e, attr) / total) for e in events), key=lambda r: -r[1])
    return rows[:top]


def run_case(name: str, args: argparse.Namespace) -> dict:
    from medssl.run.harness import to_channels_last
    from medssl.run.tasks import get_task

    script, overrides, make_batch, _ = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:  # no earlier run's last.ckpt is picked up
        cfg = compose_config(script, [*overrides, "accelerator=cpu", f"results_dir={tmp}"])
        torch.manual_seed(0)
        task = get_task(cfg.task)
        module = task.build_module(cfg, _stub_data(cfg))
    if args.channels_last:
        to_channels_last(module)  # what channels_last=true does in the run layer
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda"
                                        else "32-true")
    batch_size = args.batch or cfg.batch_size
    batch = make_batch(cfg, batch_size)
    samples = len(batch["crops"][0]) if "crops" in batch else len(batch["image"])  # patches
    peak_before = matmul_flops(args.device, args.precision)

    timer = _StepTimer()
    fit(module, batch, 1 + args.steps, args, [timer])  # step 0 is the warm-up
    step_s, best_s = statistics.median(timer.times[1:]), min(timer.times[1:])
    peak = max(peak_before, matmul_flops(args.device, args.precision))
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    counter = FlopCounterMode(display=False)
    with counter:
        fit(module, batch, 1, args, [])
    flops = counter.get_total_flops()

    top = profile(module, batch, args, args.top)
    # Lightning runs forward and backward inside optimizer.step(closure), so the profiler's
    # Optimizer.step span is the whole step: time AdamW alone on the same parameters instead.
    adamw = optimizer_timings(module)
    check_s = finite_check_timing(module, args.precision)  # on optimizer_timings' gradients
    return {"case": name, "device": args.device, "precision": args.precision,
            "batch": samples, "threads": torch.get_num_threads(),
            "s_per_step": step_s, "best_s_per_step": best_s,
            "samples_per_s": samples / step_s, "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / best_s / 1e9, "matmul_gflops": peak / 1e9,
            "optimizer_share": adamw["default"] / best_s,
            "adamw_s": adamw["default"], "adamw_fused_s": adamw["fused"],
            "adamw_loop_s": adamw["loop"], "check_s": check_s, "check_share": check_s / best_s,
            "peak_gb": peak_gb, "profile": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None,
                        help="Lightning precision; default 32-true on CPU, bf16-mixed on CUDA")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--full", action="store_true", help="also the OAI reference sizes")
    parser.add_argument("--case", nargs="*", default=None, choices=sorted(CASES))
    parser.add_argument("--top", type=int, default=8, help="operators in the profile summary")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per case (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolutions in channels-last order (the channels_last switch)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_case(args.one, args)))
        return
    names = args.case or [n for n, c in CASES.items() if args.full or not c[3]]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} "
          f"threads, device {args.device}, channels_last {args.channels_last}, load average "
          f"{load}\n")
    print("| case | precision | batch | s/step (median) | samples/s | GFLOP/step | "
          "achieved GFLOP/s (fastest step) | matmul GFLOP/s | % of matmul | AdamW share | "
          "AdamW ms: ours (loop, fused) | gradient check ms (share) | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    profiles = {}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device,
               "--steps", str(args.steps), "--top", str(args.top)]
        cmd += ["--precision", args.precision] if args.precision else []
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--channels-last"] if args.channels_last else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        profiles[name] = r["profile"]
        print(f"| {name} | {r['precision']} | {r['batch']} | {r['s_per_step']:.3f} | "
              f"{r['samples_per_s']:.2f} | {r['gflop_per_step']:.1f} | "
              f"{r['achieved_gflops']:.1f} | {r['matmul_gflops']:.0f} | "
              f"{100 * r['achieved_gflops'] / r['matmul_gflops']:.0f}% | "
              f"{100 * r['optimizer_share']:.0f}% | {1e3 * r['adamw_s']:.1f} "
              f"({1e3 * r['adamw_loop_s']:.1f}, {1e3 * r['adamw_fused_s']:.1f}) | "
              f"{1e3 * r['check_s']:.2f} ({100 * r['check_share']:.1f}%) | "
              f"{r['peak_gb']:.2f} |", flush=True)
    for name, rows in profiles.items():
        print(f"\n{name}: share of profiled self time by operator: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in rows))


if __name__ == "__main__":
    main()
