"""Every script's config: typed, every key commented and read, bad overrides named."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medssl.run.config import WEIGHT_SOURCES
from tests.conftest import REPO, compose

CONFIGS = REPO / "configs"
SCRIPTS = sorted(p.stem for p in CONFIGS.glob("*.yaml")
                 if re.search(r"^task:", p.read_text(), re.M))
RUN_SOURCES = sorted((REPO / "medssl" / "run").glob("*.py"))


def _keys_read() -> set[str]:
    """Keys the run layer reads by name, plus arguments it fills from same-named keys."""
    keys: set[str] = set(WEIGHT_SOURCES)  # weight_source() reads each (tested on its own)
    for path in RUN_SOURCES:
        text = path.read_text()
        keys |= set(re.findall(r"\bcfg\.(\w+)\b(?!\()", text))
        keys |= set(re.findall(r"\bcfg(?:\.get\(|\[)[\"'](\w+)[\"']", text))
        module = importlib.import_module(f"medssl.run.{path.stem}")
        for name in re.findall(r"kwargs_for\(\s*(\w+)", text):
            target = getattr(module, name, None)
            if target is not None:
                keys |= set(inspect.signature(target).parameters)
    return keys


def test_scripts_are_found() -> None:
    assert "dino" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_key_is_read_and_commented(script: str) -> None:
    cfg = compose(script, ["csv_path=x"])
    keys = [k for k in cfg if k not in ("backbone", "hydra")]
    unread = sorted(set(keys) - _keys_read())
    assert not unread, f"{script}: config keys never read: {unread}"
    text = (CONFIGS / f"{script}.yaml").read_text() + (CONFIGS / "common.yaml").read_text()
    undocumented = [k for k in keys if not re.search(rf"^{k}:.*#", text, re.M)]
    assert not undocumented, f"{script}: keys without a comment: {undocumented}"
    missing = [k for k in keys if OmegaConf.is_missing(cfg, k)]
    assert not missing, f"{script}: keys without a value: {missing}"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("override,key", [("batch_size=abc", "batch_size"),
                                          ("lr=fast", "lr"), ("seed=[1]", "seed"),
                                          ("btach_size=4", "btach_size")],
                         ids=["int", "float", "optional-int", "typo"])
def test_bad_override_names_its_key(script: str, override: str, key: str) -> None:
    with pytest.raises(Exception, match=key):
        compose(script, [override])


def test_type_error_from_the_command_line_names_the_key() -> None:
    result = subprocess.run([sys.executable, str(REPO / "self_supervised" / "dino.py"),
                             "batch_size=abc"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert "full_key: batch_size" in result.stderr and "Traceback" not in result.stderr


ENTRY_SCRIPTS = sorted([*(REPO / "self_supervised").glob("[!_]*.py"),
                        *(REPO / "downstream").glob("[!_]*.py")])


def test_an_input_error_prints_its_message_without_a_traceback(tmp_path: Path) -> None:
    csv = tmp_path / "cohort.csv"
    csv.write_text("PatientID,path,fold,sex\nA,/no/such/volume.nii.gz,train,1\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "downstream" / "classification.py"), f"csv_path={csv}",
         "cls_targets=[sex]", f"results_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": ""})
    assert result.returncode == 1
    assert ("Error: " in result.stderr and "line 2 (PatientID A): path /no/such/volume.nii.gz "
            "does not exist" in result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


def test_run_script_reports_input_errors_and_keeps_other_tracebacks(monkeypatch) -> None:
    from hydra.errors import CompactHydraException

    from medssl.errors import InputError
    from medssl.run import harness
    from medssl.run.guards import NonFiniteLossError

    for error in (InputError("bad row"), NonFiniteLossError("loss is nan")):
        monkeypatch.setattr(harness, "run", lambda cfg, e=error: (_ for _ in ()).throw(e))
        with pytest.raises(CompactHydraException, match=f"^Error: {error}$") as caught:
            harness.run_script(OmegaConf.create())
        assert caught.value.__cause__ is error  # HYDRA_FULL_ERROR=1 shows the original
    monkeypatch.setattr(harness, "run", lambda cfg: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug is not dressed up as an input error
        harness.run_script(OmegaConf.create())


@pytest.mark.parametrize("script,overrides,message", [
    ("segmentation", ["cache=memroy"],
     "cache='memroy' is not one of ['none', 'memory', 'disk']; did you mean 'memory'?"),
    ("segmentation", ["sw_mode=gausian"], "sw_mode='gausian' is not one of"),
    ("classification", ["cls_targets=[sex]", "class_weights=balance"],
     "class_weights='balance' is not one of ['balanced', 'none']; did you mean 'balanced'?"),
    ("classification", ["cls_targets=[sex]", "backbone.num_heads=5"],
     "backbone vit: hidden_size 192 must be divisible by num_heads 5"),
    ("mae3d", ["backbone=unet3d", "backbone.act=rlu"],
     "backbone unet3d: act='rlu' is not one of"),
    ("dino", ["backbone.num_heads=5"], "backbone vit: hidden_size 192 must be divisible by "
     "num_heads 5"),
    ("segmentation", ["spatial_dims=2"], "patch_size [32, 64, 64] has 3 sizes; spatial_dims=2 "
     "needs 2 (e.g. patch_size=[64,64]; a ViT also needs a 2D backbone.patch_size)"),
    ("segmentation", ["spatial_dims=2", "patch_size=[64,64]"],
     "backbone vit: patch_size must be a positive int or 2 positive ints, got [8, 16, 16]"),
    ("dino", ["accelerator=tpu"], "accelerator='tpu' is not one of ['auto', 'cpu', 'gpu', "
     "'cuda']"),
    ("dino", ["accelerator=cpu", "devices=[0,1]"], "accelerator=cpu, devices=[0, 1], "
     "num_nodes=1: `devices` selected with `CPUAccelerator` should be an int > 0"),
    pytest.param("mae3d", ["accelerator=gpu"], "accelerator=gpu, devices=auto, num_nodes=1: No "
                 "supported gpu backend found! (this machine: 0 CUDA device(s) visible; "
                 "accelerator=cpu or auto runs on the CPU)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
], ids=["cache", "sw_mode", "class_weights", "cls-heads", "act", "heads", "2d-patch",
        "2d-vit-patch", "accelerator", "cpu-device-list", "no-gpu"])
def test_a_bad_option_is_named_before_any_volume_loads(script: str, overrides: list[str],
                                                       message: str, tmp_path: Path) -> None:
    """Option values are checked by name (with the closest valid one), and the network is
    built before the cohort loads: the CSV's missing volume is never reached."""
    from medssl.errors import InputError
    from medssl.run.harness import run

    csv = tmp_path / "cohort.csv"
    csv.write_text("PatientID,path,img_path,seg_path,fold,sex\n"
                   "A,/no/such.nii.gz,/no/such.nii.gz,/no/such.nii.gz,0,1\n")
    cfg = compose(script, [f"csv_path={csv}", f"results_dir={tmp_path}", *overrides])
    with pytest.raises(InputError) as caught:
        run(cfg)
    assert message in str(caught.value)


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda p: p.stem)
def test_every_entry_script_runs_through_run_script(script: Path) -> None:
    assert re.search(r"^    run_script\(cfg\)$", script.read_text(), re.M)
