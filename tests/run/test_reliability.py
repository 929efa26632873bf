"""Run-layer reliability: a non-finite loss names its batch and spares last.ckpt; rows left
out by ``on_bad_sample=skip`` are listed in the results folder."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from medssl.data.demo import DemoPaths
from medssl.run import run
from medssl.run.guards import NonFiniteLossError
from medssl.run.harness import Task, build_trainer, run_dir
from medssl.run.tasks import get_task
from tests.conftest import REPO, compose

POISONED = "P05"  # the PatientID whose batch turns the loss into NaN in epoch 1


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((2,), float(i)), "PatientID": f"P{i:02d}",
                "row": f"c.csv line {i + 2} (PatientID P{i:02d})"}


class _Poisoned(L.LightningModule):
    """A regression whose loss is NaN for the batch holding ``POISONED`` after epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.net(batch["x"]).pow(2).mean()
        if self.current_epoch >= 1 and POISONED in batch["PatientID"]:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.net(batch["x"]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Items(), batch_size=2)


def _set(cfg: DictConfig, **values: object) -> DictConfig:
    with open_dict(cfg):
        for key, value in values.items():
            cfg[key] = value
    return cfg


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_finite_loss_names_the_batch_and_keeps_last_ckpt(dino_cfg: DictConfig) -> None:
    cfg = _set(dino_cfg, experiment="nan", n_epochs=1, monitor="val/loss")
    task = Task()
    build_trainer(cfg, task, []).fit(_Poisoned(), _loader(), _loader())
    last = run_dir(cfg) / "checkpoints" / "last.ckpt"
    before = _digest(last)
    assert torch.load(last, weights_only=True)["epoch"] == 0
    _set(cfg, n_epochs=3)
    with pytest.raises(NonFiniteLossError) as err:
        build_trainer(cfg, task, []).fit(_Poisoned(), _loader(), _loader(), ckpt_path=last)
    batch = _Items()[4]["PatientID"], _Items()[5]["PatientID"]  # batch 2 holds P04, P05
    assert f"PatientID(s) {batch[0]}, {batch[1]}" in str(err.value)
    assert "c.csv line 7 (PatientID P05)" in str(err.value)
    assert "epoch 1" in str(err.value)
    assert _digest(last) == before  # the last good checkpoint is intact
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


class _PoisonedGradient(_Poisoned):
    """A finite loss whose gradient is NaN for the batch holding ``POISONED`` after epoch 0
    (d sqrt(u) / du is inf at u = 0, times du / dw = 0)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.net(batch["x"]).pow(2).mean()
        if self.current_epoch >= 1 and POISONED in batch["PatientID"]:
            weight = self.net.weight.sum()
            loss = loss + torch.sqrt(weight - weight)
        return loss


def test_non_finite_gradient_stops_before_the_step(dino_cfg: DictConfig) -> None:
    """Without the check, one NaN gradient made every weight NaN (the clipped total norm is
    NaN), and the next epoch's last.ckpt and export held only NaNs."""
    cfg = _set(dino_cfg, experiment="nan_grad", n_epochs=1, monitor="val/loss")
    module = _PoisonedGradient()
    build_trainer(cfg, Task(), []).fit(module, _loader(), _loader())
    last = run_dir(cfg) / "checkpoints" / "last.ckpt"
    before = _digest(last)
    _set(cfg, n_epochs=3)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient in 1 parameter.*net.weight"
                       ".* at epoch 1.*PatientID.s. P04, P05"):
        build_trainer(cfg, Task(), []).fit(module, _loader(), _loader(), ckpt_path=last)
    assert all(torch.isfinite(p).all() for p in module.parameters())  # no step was taken
    assert _digest(last) == before


def test_other_training_errors_name_the_batch(dino_cfg: DictConfig,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """An error raised by a module's own check (e.g. DINO's NaN check) names the batch too."""

    class Raising(_Poisoned):
        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            if POISONED in batch["PatientID"]:
                raise FloatingPointError("loss is nan")
            return super().training_step(batch, batch_idx)

    cfg = _set(dino_cfg, experiment="raise", n_epochs=1, monitor="val/loss")
    with caplog.at_level(logging.ERROR), pytest.raises(FloatingPointError):
        build_trainer(cfg, Task(), []).fit(Raising(), _loader(), _loader())
    assert "PatientID(s) P04, P05" in caplog.text


def test_skipped_rows_are_listed_in_the_results_folder(
        dino_cfg: DictConfig, demo: DemoPaths, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "c"
    shutil.copytree(demo.root, root)
    df = pd.read_csv(root / "classification.csv", dtype=str)
    train = df.index[df.fold.isin([str(f) for f in dino_cfg.train_folds])].tolist()
    df.loc[train[0], "path"] = "dicom/NOPE"
    victim = sorted((root / "dicom" / df.PatientID[train[1]]).iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:100])
    df.to_csv(root / "classification.csv", index=False)
    cfg = _set(dino_cfg, csv_path=str(root / "classification.csv"), experiment="skip",
               on_bad_sample="skip", knn_target=None,
               trainer={"limit_train_batches": 1, "limit_val_batches": 1})
    with caplog.at_level(logging.WARNING):
        run(cfg)
    listed = pd.read_csv(run_dir(cfg) / "bad_rows.csv", dtype=str)
    assert list(listed.columns[:3]) == ["row", "file", "problem"]
    assert listed.row.tolist() == [f"classification.csv line {i + 2} (PatientID "
                                   f"{df.PatientID[i]})" for i in train[:2]]
    assert listed.file.tolist() == [str(root / "dicom" / "NOPE"),
                                    str(root / "dicom" / df.PatientID[train[1]])]
    assert "does not exist" in listed.problem[0] and str(victim) in listed.problem[1]
    assert "2 bad row(s) left out" in caplog.text and "bad_rows.csv" in caplog.text
    # Fixed data and a re-run (it resumes, with nothing left to train): the stale list goes.
    _set(cfg, csv_path=str(demo.classification_csv))
    run(cfg)
    assert not (run_dir(cfg) / "bad_rows.csv").exists()


SCRIPTS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml")
                 if re.search(r"^task:", p.read_text(), re.M))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_passes_on_bad_sample_to_its_data(script: str, demo: DemoPaths,
                                                      tmp_path: Path) -> None:
    csv = getattr(demo, f"{'classification' if script == 'dino' else script}_csv")
    cfg = compose(script, [f"results_dir={tmp_path}", f"csv_path={csv}", "on_bad_sample=skip"])
    data = get_task(cfg.task).build_data(cfg)
    assert data.on_bad_sample == "skip"
