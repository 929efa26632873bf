"""Demo DINO epochs with 0, 1, 2, ... data loader workers: what ``n_workers: auto`` is sized
from.

    python bench/workers.py                 # n_workers 0 1 2, 3 epochs each (~2-4 min)
    python bench/workers.py --workers 0 1 --epochs 4 -- batch_size=8

Each setting runs the real entry-script config (``configs/dino.yaml`` on the demo cohort,
CPU) through ``medssl.run.run`` in this process, with a callback timing every epoch (training
plus validation). The first epoch also starts the workers and is reported apart; the table
gives the median of the later ones. Extra ``key=value`` arguments after ``--`` go to the
config.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from medssl.run import compose_config, run
from medssl.run.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


class EpochTimer(L.Callback):
    """Wall time of each training epoch including its validation."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self._start)


def epoch_times(n_workers: int, epochs: int, overrides: list[str], root: Path) -> list[float]:
    """Epoch times of one demo DINO run with ``n_workers``."""
    cfg = compose_config(REPO / "configs", "dino", [
        f"n_workers={n_workers}", f"n_epochs={epochs}", f"results_dir={root / f'w{n_workers}'}",
        "accelerator=cpu", "devices=1", "progress_bar=false", *overrides])
    timer = EpochTimer()
    task = get_task("dino")
    callbacks = type(task).callbacks
    type(task).callbacks = lambda self, c, d: [*callbacks(self, c, d), timer]  # type: ignore
    try:
        run(cfg)
    finally:
        type(task).callbacks = callbacks  # type: ignore[method-assign]
    return timer.times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpus = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpus} CPUs usable, "
          f"load average {load}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            times = epoch_times(n, args.epochs, args.overrides, Path(tmp))
            rows.append((n, times))
    print("\n| n_workers | first epoch s | later epochs, median s | later epochs s |")
    print("|---|---|---|---|")
    for n, times in rows:
        later = times[1:] or times
        print(f"| {n} | {times[0]:.2f} | {statistics.median(later):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in later)} |")
    print(f"\nload average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
