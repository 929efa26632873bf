"""bench/train_step.py times the run layer's own gradient check, not a copy of it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from medssl.run.guards import NonFiniteLossError

TRAIN_STEP_PY = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("medssl_bench_train_step", TRAIN_STEP_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)


def test_gradient_check_timing_runs_the_real_check() -> None:
    bench = _load_bench()
    module = _Tiny()
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    assert 0 < bench.finite_check_timing(module, "32-true", reps=2) < 1
    module.b.weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient in 1 parameter\(s\) "
                                                  r"\(e\.g\. b\.weight\)"):
        bench.finite_check_timing(module, "32-true", reps=1)


def test_every_case_builds_its_module_from_the_stub_data(tmp_path: Path) -> None:
    """The stub stands in for a data module: it must offer what each task's ``build_module``
    reads (the classification cases once failed when it started reading training labels)."""
    from medssl.run.tasks import get_task

    bench = _load_bench()
    for name, (script, overrides, _, _) in bench.CASES.items():
        cfg = bench.compose_config(script, [*overrides, "accelerator=cpu",
                                            f"results_dir={tmp_path}"])
        module = get_task(cfg.task).build_module(cfg, bench._stub_data(cfg))
        assert isinstance(module, L.LightningModule), name
