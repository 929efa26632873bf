"""``n_workers: auto``: loader workers and pinned memory sized to the machine."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from medssl.data.datamodule import CohortDataModule
from medssl.data.pipeline import Preprocessing
from medssl.data.workers import auto_workers, usable_cpus
from tests.conftest import compose


@pytest.mark.parametrize("cpus,devices,on_gpu,expected", [
    (16, 1, True, 8),   # 15 spare cores, capped at 8
    (16, 4, True, 3),   # 4 cores per GPU, one feeds the GPU
    (32, 8, True, 3),
    (4, 8, True, 1),    # fewer cores than GPUs: still one worker each
    (2, 1, False, 0),   # the 2-core CI machine: measured, workers bring nothing
    (1, 1, False, 0),
    (8, 1, False, 4),   # CPU training: half the cores load data
    (8, 2, False, 2),
    (64, 1, False, 8),
])
def test_auto_rule(cpus: int, devices: int, on_gpu: bool, expected: int) -> None:
    assert auto_workers(devices, on_gpu, cpus=cpus) == expected


def test_usable_cpus_follow_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert usable_cpus() == 6
    assert auto_workers(2, True) == 2  # 6 cores / 2 GPUs - 1


def _module(n_workers: int | str) -> CohortDataModule:
    return CohortDataModule("cohort.csv", "ssl", {"train": 0}, Preprocessing(),
                            n_workers=n_workers)


def test_data_module_sizes_auto_from_its_trainer_and_an_int_wins(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    gpu_trainer = SimpleNamespace(num_devices=2, accelerator=CUDAAccelerator())
    auto = _module("auto")
    auto.trainer = gpu_trainer
    with caplog.at_level(logging.INFO):
        options = [auto.loader_options() for _ in range(3)]
    assert options[0] == {"num_workers": 7, "pin_memory": True, "persistent_workers": True}
    assert caplog.text.count("data loader workers per device: 7 (auto for 16 usable CPUs, "
                             "2 device(s) per node, GPU training); pin_memory on") == 1
    auto.trainer = SimpleNamespace(num_devices=1, accelerator=CPUAccelerator())
    assert auto.loader_options() == {"num_workers": 8, "pin_memory": False,
                                     "persistent_workers": True}
    fixed = _module(3)
    fixed.trainer = gpu_trainer
    assert fixed.loader_options()["num_workers"] == 3
    zero = _module(0)
    zero.trainer = gpu_trainer
    assert zero.loader_options() == {"num_workers": 0, "pin_memory": True,
                                     "persistent_workers": False}


@pytest.mark.parametrize("bad", ["abc", -1, 2.5, True, None])
def test_bad_n_workers_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match=r"n_workers must be 'auto' or an integer >= 0, got"):
        _module(bad)  # type: ignore[arg-type]


def test_config_default_is_auto_and_an_int_override_stays_an_int() -> None:
    assert compose("dino", [])["n_workers"] == "auto"
    assert compose("classification", ["n_workers=3"])["n_workers"] == 3
