"""The shared run layer: weight-source rule, checkpoints by monitor and mode, locks, loading."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from medssl.run.checkpoints import BEST_EXPORT, checkpoint_callbacks
from medssl.run.harness import check_loadable, resume_checkpoint, run_lock, weight_source
from tests.conftest import REPO, compose

SOURCES = ["dino_weights", "mae_weights", "suprem_weights", "baseline_weights",
           "resume_training_from", "test_ckpt"]


def test_models_import_nothing_from_data_or_the_run_layer() -> None:
    offenders = []
    for path in sorted((REPO / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[:2] in (["medssl", "data"], ["medssl", "run"])
                          or n.split(".")[0] in ("data", "models")]
    assert not offenders


def _cfg(**values: object):
    return OmegaConf.create({key: None for key in SOURCES} | values)


@pytest.mark.parametrize("pair", [("dino_weights", "mae_weights"),
                                  ("suprem_weights", "resume_training_from"),
                                  ("baseline_weights", "test_ckpt")], ids=str)
def test_at_most_one_weight_source(pair: tuple[str, str], tmp_path: Path) -> None:
    for key in pair:
        (tmp_path / key).touch()
    cfg = _cfg(**{key: str(tmp_path / key) for key in pair})
    with pytest.raises(ValueError, match="at most one weight source") as err:
        weight_source(cfg)
    assert all(key in str(err.value) for key in pair)


def test_weight_source_must_exist(tmp_path: Path) -> None:
    assert weight_source(_cfg()) is None
    with pytest.raises(FileNotFoundError, match="mae_weights=.*no such file"):
        weight_source(_cfg(mae_weights=str(tmp_path / "nope.pt")))
    (tmp_path / "w.pt").touch()
    source = weight_source(_cfg(dino_weights=str(tmp_path / "w.pt")))
    assert source.key == "dino_weights" and source.pretrained


class _Exported(nn.Linear):
    config = {"name": "fake"}


class _Scripted(L.LightningModule):
    """Logs a fixed metric value per epoch, so the best epoch is known in advance."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values, self.net = values, _Exported(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val/metric", self.values[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(values: list[float], mode: str, folder: Path) -> list:
    """Train with checkpoints in ``folder``; backbone.pt lands in its parent (the run folder)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 2)))
    callbacks = checkpoint_callbacks(folder, "val/metric", mode, 1, "net")
    trainer = L.Trainer(max_epochs=len(values), callbacks=callbacks, logger=False,
                        enable_progress_bar=False, num_sanity_val_steps=0,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Scripted(values), loader, loader)
    return callbacks


@pytest.mark.parametrize("mode,best_epoch", [("min", 1), ("max", 2)], ids=["loss", "auc"])
def test_checkpoint_mode_picks_the_best_epoch(mode: str, best_epoch: int, tmp_path: Path) -> None:
    top_k, last = _fit([0.5, 0.1, 0.9], mode, tmp_path / "checkpoints")
    assert f"epoch{best_epoch:03d}" in Path(top_k.best_model_path).name
    export = torch.load(tmp_path / BEST_EXPORT, weights_only=True)  # in the run folder
    assert export["epoch"] == best_epoch and export["backbone_config"] == {"name": "fake"}
    # last.ckpt is written after the top-k update of its own epoch: resuming knows every file.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    top_k_state = next(v for k, v in state.items() if "val/metric" in k)
    assert Path(top_k_state["best_model_path"]).name == Path(top_k.best_model_path).name
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == sorted(
        ["last.ckpt", Path(top_k.best_model_path).name])


def test_checkpoint_needing_unpickling_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": pickle.PickleError()}, path)
    with pytest.raises(ValueError, match="trust_checkpoint=true"):
        check_loadable(path, trust=False)
    check_loadable(path, trust=True)
    safe = tmp_path / "safe.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, safe)
    check_loadable(safe, trust=False)
    # Pretrained weights are never unpickled, whatever trust_checkpoint says.
    with pytest.raises(ValueError, match="Re-save only its state dict"):
        check_loadable(path, trust=True, pretrained=True)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", bytes(range(256)) * 16, "half"],
                         ids=["empty", "text", "random", "truncated"])
@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_not_a_checkpoint_is_named_with_the_cause(tmp_path: Path,
                                                                 content: bytes | str,
                                                                 trust: bool) -> None:
    path = tmp_path / "weights.ckpt"
    if content == "half":  # a copy cut short
        torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint") as err:
        check_loadable(path, trust=trust)
    assert str(path) in str(err.value)
    assert ("it is empty" in str(err.value)) is (content == b"")


def test_second_run_of_an_experiment_refuses(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        assert (tmp_path / "run.lock").read_text().endswith(str(os.getpid()))
        busy = f"in use by another run \\(process {os.getpid()}"
        with pytest.raises(RuntimeError, match=busy), run_lock(tmp_path):
            pass
    assert not (tmp_path / "run.lock").exists()


def test_stale_lock_is_taken_over(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "run.lock").write_text(f"{socket.gethostname()} {dead}")
    with run_lock(tmp_path):
        assert (tmp_path / "run.lock").read_text().endswith(str(os.getpid()))


def test_interrupted_export_leaves_the_previous_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while writing backbone.pt (here: the writer dies after 10 bytes) leaves the
    previous export whole: the new one is written beside it and renamed only when complete."""
    import medssl.run.checkpoints as checkpoints

    path = tmp_path / "backbone.pt"
    first = _Exported(2, 1)
    checkpoints.export_backbone(path, first, {"epoch": 0})

    def dies_mid_write(target: Path, backbone: nn.Module, extra: dict) -> None:
        Path(target).write_bytes(b"PK\x03\x04truncat")
        raise KeyboardInterrupt  # what SIGINT does; SIGKILL stops at the same point

    monkeypatch.setattr(checkpoints, "save_backbone", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.export_backbone(path, _Exported(2, 1), {"epoch": 1})
    export = torch.load(path, weights_only=True)
    assert export["epoch"] == 0
    assert torch.equal(export["state_dict"]["weight"], first.weight.detach())


def test_trainer_group_overrides_defaults_but_not_config_keys(tmp_path: Path) -> None:
    from medssl.run.harness import build_trainer
    from medssl.run.tasks import get_task
    from tests.conftest import TINY_DINO, compose

    base = [f"results_dir={tmp_path}", *TINY_DINO]
    cfg = compose("dino", [*base, "+trainer.log_every_n_steps=7"])
    assert build_trainer(cfg, get_task("dino"), []).log_every_n_steps == 7
    cfg = compose("dino", [*base, "+trainer.max_epochs=3"])
    with pytest.raises(ValueError, match="trainer.max_epochs -> n_epochs"):
        build_trainer(cfg, get_task("dino"), [])


def test_precision_auto_is_bf16_only_on_gpus_that_support_it(monkeypatch) -> None:
    from medssl.run import harness

    assert harness.resolve_precision("auto", "cpu") == "32-true"
    assert harness.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert harness.resolve_precision("auto", "auto") == "bf16-mixed"
    assert harness.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert harness.resolve_precision("auto", "gpu") == "32-true"
    # A V100 or T4: torch reports bf16 as supported by default, through slow emulation.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    assert harness.resolve_precision("auto", "gpu") == "32-true"


@pytest.mark.parametrize("script", ["dino", "mae3d", "classification", "segmentation"])
def test_debug_fdr_keeps_out_of_real_runs(script: str, tmp_path: Path) -> None:
    """``debug=fdr`` writes to its own folder and never resumes a last.ckpt (a finished run's
    would make Lightning refuse max_epochs=1)."""
    real = compose(script, ["csv_path=x", f"results_dir={tmp_path}"])
    debug = compose(script, ["csv_path=x", f"results_dir={tmp_path}", "debug=fdr"])
    assert debug.experiment == f"{real.task}_fdr" != real.experiment
    for cfg in (real, debug):
        last = tmp_path / cfg.experiment / "checkpoints" / "last.ckpt"
        last.parent.mkdir(parents=True)
        last.touch()
    assert resume_checkpoint(real, None) == tmp_path / real.experiment / "checkpoints/last.ckpt"
    assert resume_checkpoint(debug, None) is None
