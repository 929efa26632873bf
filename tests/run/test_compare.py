"""medssl-compare: test metrics of several runs in one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medssl.run.compare import main


def test_runs_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "cls_dino" / "test").mkdir(parents=True)
    (tmp_path / "cls_dino" / "test" / "metrics.json").write_text(json.dumps(
        {"mean": {"auc": 0.91, "bacc": 0.8, "acc": 0.85}}))
    (tmp_path / "cls_scratch").mkdir()
    (tmp_path / "cls_scratch" / "metrics.json").write_text(json.dumps(
        {"mean": {"auc": 0.62, "bacc": None, "acc": 0.5}}))
    assert main([str(tmp_path / "cls_dino"), str(tmp_path / "cls_scratch")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "AUC", "BACC", "ACC"]
    assert lines[1].split() == ["cls_dino", "0.910", "0.800", "0.850"]
    assert lines[2].split() == ["cls_scratch", "0.620", "-", "0.500"]


def test_run_without_metrics_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "dino_demo")])
    assert exit_.value.code == 2  # a one-line error, no traceback
    assert capsys.readouterr().err == (f"error: {tmp_path / 'dino_demo'}: no metrics.json "
                                       "(classification and segmentation runs write one in "
                                       "their test stage)\n")
