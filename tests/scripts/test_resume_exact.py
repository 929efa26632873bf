"""A run killed with SIGKILL and re-run ends with the weights of an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, TINY_DINO

# Runs the DINO script's run(cfg); with a step >= 0 it SIGKILLs itself after that step.
RUNNER = """
import os, signal, sys
import lightning as L
import medssl.run.harness as harness
from medssl.run import run
from tests.conftest import compose

kill_at, overrides = int(sys.argv[1]), sys.argv[2:]

class Kill(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

build = harness.build_trainer
def build_with_kill(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.callbacks.append(Kill())
    return trainer
harness.build_trainer = build_with_kill
run(compose("dino", overrides))
"""


def _run(kill_at: int, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUNNER, str(kill_at), *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_sigkill_then_rerun_equals_uninterrupted(demo, tmp_path: Path) -> None:
    common = [*TINY_DINO, "n_epochs=3", f"csv_path={demo.classification_csv}",
              f"results_dir={tmp_path}"]
    straight = _run(-1, [*common, "experiment=straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(4, [*common, "experiment=killed"])  # mid-epoch 1 (3 steps per epoch)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "run.lock").exists()  # left behind by the dead process
    resumed = _run(-1, [*common, "experiment=killed"])  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stale lock" in resumed.stderr

    def weights(name: str) -> dict[str, torch.Tensor]:
        path = tmp_path / name / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=True)["state_dict"]

    a, b = weights("straight"), weights("killed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # TensorBoard shows each step once: the replayed steps of epoch 1 replace the first try's.
    events = EventAccumulator(str(tmp_path / "killed" / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/dino_loss")]
    assert steps == sorted(set(steps)) and len(steps) == 9
