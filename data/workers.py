"""Data loader workers and pinned memory sized to the machine (``n_workers: auto``)."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator

from medssl.errors import InputError

AUTO = "auto"
# More workers than this rarely help one device and each holds a copy of the transforms.
MAX_AUTO_WORKERS = 8
# CPU-only training on this many cores or fewer gets no workers: on the 2-core CI machine a
# demo DINO epoch took 1.04 s with 0 workers, 1.01-1.02 s with 1-2 (no gain: the model step
# needs the cores), and 1.06 -> 1.37-1.47 s once the k-NN monitor's loaders started workers
# every validation (bench/workers.py, bench/results/speed.md).
FEW_CPUS = 2


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or taskset limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS/Windows
        return os.cpu_count() or 1


def auto_workers(devices_per_node: int, on_gpu: bool, cpus: int | None = None) -> int:
    """Loader workers per device for ``n_workers: auto``.

    On GPUs each device's main process mostly waits for its GPU and needs one core to feed
    it: the rest of that device's share of the cores loads data. On CPU the model step itself
    needs the cores, so data gets half of them, and none on machines with ``FEW_CPUS`` or
    fewer (measured; the split above that is not measured).

    Args:
        devices_per_node: training processes on this machine (one per device).
        on_gpu: whether training runs on GPUs.
        cpus: usable CPUs (default: ``usable_cpus()``).
    """
    cpus = usable_cpus() if cpus is None else cpus
    share = max(1, cpus // max(1, devices_per_node))
    if on_gpu:
        return min(max(share - 1, 1), MAX_AUTO_WORKERS)
    if cpus <= FEW_CPUS:
        return 0
    return min(share // 2, MAX_AUTO_WORKERS)


def check_n_workers(n_workers: Any) -> int | str:
    """``n_workers`` as given if it is ``auto`` or an integer >= 0, else a ValueError."""
    if n_workers == AUTO:
        return AUTO
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0:
        raise InputError(f"n_workers must be '{AUTO}' or an integer >= 0, got {n_workers!r}")
    return n_workers


def trainer_layout(trainer: Any | None) -> tuple[int, bool]:
    """(devices per node, on GPU) of a Lightning trainer; without one, what this machine
    offers (one process, GPU when CUDA is available)."""
    if trainer is None:
        return 1, torch.cuda.is_available()
    return max(1, int(trainer.num_devices)), isinstance(trainer.accelerator, CUDAAccelerator)


def loader_workers(n_workers: int | str, devices_per_node: int, on_gpu: bool) -> int:
    """The worker count for a loader: ``n_workers`` itself, or ``auto_workers`` for auto."""
    n_workers = check_n_workers(n_workers)
    return auto_workers(devices_per_node, on_gpu) if n_workers == AUTO else int(n_workers)
